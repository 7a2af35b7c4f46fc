// nvcuda::wmma for the CPU emulation (cuda_emu.h): 16×16×16 tiles, bf16 inputs, f32 accumulate.
//
// A fragment is warp-distributed on a GPU, in an unspecified mapping. Here every lane holds the
// whole tile, and the warp-collective semantics are kept: load/mma/store wait for the whole warp
// on entry (as the `_sync` ops do) and not on exit; a store is performed by one lane, after
// checking that every lane holds the same tile. The fragment has no `x` / `num_elements`, so
// code that touches fragment elements directly does not compile here rather than silently
// assuming a mapping.
#pragma once
#include <cuda_bf16.h>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>,
                "only bf16 and f32 fragments are emulated");

 public:
  // The whole tile, row by row, as f32 (bf16 values convert exactly).
  float emu_tile[16][16];
};

namespace detail {
// Checks the operands; waits for the warp unless the caller does (the store).
template <typename T>
inline void enter(const char *what, const void *p, unsigned ldm, const cuda_emu::loc_t &w,
                  bool barrier = true) {
  if (barrier) cuda_emu::sync_warp(0xffffffffu, what, w);
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    cuda_emu::fail(w, "%s: pointer %p is not 256-bit aligned", what, p);
  if ((ldm * sizeof(T)) % 16 != 0)
    cuda_emu::fail(w, "%s: ldm %u is not a multiple of 16 bytes", what, ldm);
}

inline float as_f32(float x) { return x; }
inline float as_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Element (i, j) of a 16×16 tile at p with leading dimension ldm.
template <typename T>
inline float at(const T *p, unsigned ldm, bool row_major, int i, int j) {
  return as_f32(row_major ? p[(size_t)i * ldm + j] : p[i + (size_t)j * ldm]);
}

inline uint64_t fingerprint(const float (&t)[16][16]) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      uint32_t u;
      std::memcpy(&u, &t[i][j], 4);
      h = (h ^ u) * 1099511628211ull;
    }
  return h;
}
}  // namespace detail

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L> &f, float v) {
  for (auto &row : f.emu_tile)
    for (auto &e : row) e = detail::as_f32(T(v));
}

// matrix_a / matrix_b: the layout is part of the type.
template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L> &f, const T *p, unsigned ldm,
                             const cuda_emu::loc_t &w = cuda_emu::loc_t::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load needs a layout_t");
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>);
  detail::enter<T>("load_matrix_sync", p, ldm, w);
  const bool rm = std::is_same_v<L, row_major>;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.emu_tile[i][j] = detail::at(p, ldm, rm, i, j);
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T> &f, const T *p, unsigned ldm,
                             layout_t layout,
                             const cuda_emu::loc_t &w = cuda_emu::loc_t::current()) {
  detail::enter<T>("load_matrix_sync", p, ldm, w);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.emu_tile[i][j] = detail::at(p, ldm, layout == mem_row_major, i, j);
}

template <typename T>
inline void store_matrix_sync(T *p, const fragment<accumulator, 16, 16, 16, T> &f, unsigned ldm,
                              layout_t layout,
                              const cuda_emu::loc_t &w = cuda_emu::loc_t::current()) {
  detail::enter<T>("store_matrix_sync", p, ldm, w, false);
  if (!cuda_emu::wmma_store_lane(detail::fingerprint(f.emu_tile), w)) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const size_t at = layout == mem_row_major ? (size_t)i * ldm + j : i + (size_t)j * ldm;
      p[at] = f.emu_tile[i][j];
    }
}

// d = a·b + c, products exact (bf16 × bf16 fits f32), f32 sums in k order.
template <typename Ta, typename La, typename Tb, typename Lb>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                     const fragment<matrix_a, 16, 16, 16, Ta, La> &a,
                     const fragment<matrix_b, 16, 16, 16, Tb, Lb> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c,
                     const cuda_emu::loc_t &w = cuda_emu::loc_t::current()) {
  cuda_emu::sync_warp(0xffffffffu, "mma_sync", w);
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.emu_tile[i][j];
      for (int k = 0; k < 16; ++k) s += a.emu_tile[i][k] * b.emu_tile[k][j];
      r[i][j] = s;
    }
  std::memcpy(d.emu_tile, r, sizeof r);
}

}  // namespace wmma
}  // namespace nvcuda
