// bf16 for the CPU emulation (cuda_emu.h), bit-exact with CUDA's conversions: float → bf16
// rounds to nearest even (cvt.rn.bf16.f32; NaN becomes the canonical 0x7fff), bf16 → float is
// exact.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16;
inline __nv_bfloat16 __float2bfloat16(float f);
inline float __bfloat162float(__nv_bfloat16 h);

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) { *this = __float2bfloat16(f); }
  operator float() const { return __bfloat162float(*this); }
};
static_assert(sizeof(__nv_bfloat16) == 2);

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.__x = 0x7fff;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    h.__x = (unsigned short)(u >> 16);
  }
  return h;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.__x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
