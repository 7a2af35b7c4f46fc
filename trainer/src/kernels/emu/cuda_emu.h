// CUDA on the CPU, just enough of it for udi_kernels.cu: force-included (-include) before the
// kernel source, which then compiles unchanged as C++20 (g++ -pthread). launch.cpp runs a grid
// block by block; each block's threads are real threads, so a missing barrier is a real race
// (wrong results, or a ThreadSanitizer report).
//
// What is checked on top of the arithmetic (each a launch error): __syncthreads / warp
// collectives reached from different source lines by the threads of one barrier phase; a warp
// collective whose mask names lanes that do not exist or have exited; WMMA pointers not 256-bit
// aligned or ldm not a multiple of 16 bytes; the lanes of a warp storing different fragments.
// Shared memory is filled with 0xff bytes (NaN in f32 and bf16) before every block, so a read of
// a shared value nobody wrote shows up as NaN.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// One block runs at a time, so a block's shared memory can be a static. In a section of its own
// so that the launcher can poison it; AddressSanitizer adds no redzones to variables in custom
// sections, so that mode keeps plain statics.
#ifdef CUDA_EMU_PLAIN_SHARED
#define __shared__ static
#else
#define __shared__ static __attribute__((section("udi_emu_shared")))
#endif

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace cuda_emu {
using loc_t = std::source_location;
// Records a launch error (the first one is reported, with the block and thread).
[[gnu::format(printf, 2, 3)]] void fail(const loc_t &where, const char *fmt, ...);
// Barrier over the block's threads that have not exited.
void sync_block(const loc_t &where);
// Barrier over the lanes of `mask` in this thread's warp (the whole warp: others are refused).
void sync_warp(unsigned mask, const char *what, const loc_t &where);
// Shuffle of up to 8 bytes: returns the value lane (this lane ^ lane_mask) passed.
uint64_t shfl_xor(unsigned mask, uint64_t v, int lane_mask, int width, const loc_t &where);
// This thread's lane.
int lane();
// The WMMA store's cross-lane check: every lane hands in a fingerprint of its fragment; true
// (after a warp barrier) for the one lane that performs the store.
bool wmma_store_lane(uint64_t fingerprint, const loc_t &where);
}  // namespace cuda_emu

inline void __syncthreads(const std::source_location &w = std::source_location::current()) {
  cuda_emu::sync_block(w);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location &w = std::source_location::current()) {
  cuda_emu::sync_warp(mask, "__syncwarp", w);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const std::source_location &w = std::source_location::current()) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = cuda_emu::shfl_xor(mask, bits, lane_mask, width, w);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// Relaxed atomics, as CUDA's.
inline float atomicAdd(float *p, float v) {
  float old, sum;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(p, &old, &sum, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
inline unsigned atomicAdd(unsigned *p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
