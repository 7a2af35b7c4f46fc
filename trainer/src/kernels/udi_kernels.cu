// The trainer's own CUDA kernels. Compiled to PTX by trainer/build.rs with the
// same nvcc as candle's kernels; loaded at run time by trainer::kernels (one module, "udi_kernels").
// Every kernel has a CPU reference in the Rust op that launches it (`cpu_fwd`); `trainer
// kernel-check --device cuda` compares the two. trainer/tests/cuda_source_on_cpu.rs compiles this
// file unchanged as C++ against a CUDA emulation (emu/) and compares it with the same references
// on the CPU: what the emulation lacks (fragment element access, partial-warp masks) fails there.
//
// Conventions: every tensor is contiguous; statistics and accumulations are f32 whatever the
// storage type; activations are f32 or bf16 (suffix _f32 / _bf16 / _f32_bf16 = input_output).
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Kernels with one block per row take up to 1024 threads (`geometry::threads_for`): the bound
// keeps them within 64 registers, or such a launch would fail for lack of registers.
#define ROW_BLOCK __launch_bounds__(1024)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

// Sum and max over the warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `sh` holds 32 floats. Safe to call
// repeatedly (leading barrier protects `sh` from the previous call's readers).
__device__ float block_sum(float v, float *sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? sh[lane] : 0.f);
}

__device__ float block_max(float v, float *sh) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_max(lane < nwarps ? sh[lane] : -INFINITY);
}

// ---- LayerNorm (mean/var form, as trainer::nn::LayerNorm) --------------------------------------
// Row statistics of x[row, 0..d): mean and 1/sqrt(var + eps) (two passes over the row).
template <typename T>
__device__ void row_stats(const T *x, int d, float eps, float *sh, float *mean, float *rstd) {
  float s = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) s += to_f(x[j]);
  const float m = block_sum(s, sh) / d;
  float q = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float c = to_f(x[j]) - m;
    q += c * c;
  }
  const float var = block_sum(q, sh) / d;
  *mean = m;
  *rstd = rsqrtf(var + eps);
}

// One block per row: y = (x − mean)·rstd·w + b.
template <typename TI, typename TO>
__device__ void ln_fwd(const TI *x, const float *w, const float *b, TO *y, int d, float eps) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  x += row * d;
  y += row * d;
  float mean, rstd;
  row_stats(x, d, eps, sh, &mean, &rstd);
  for (int j = threadIdx.x; j < d; j += blockDim.x)
    y[j] = from_f<TO>((to_f(x[j]) - mean) * rstd * w[j] + b[j]);
}

// One block per row: dx = rstd·(w·dy − mean(w·dy·x̂)·x̂ − mean(w·dy)).
template <typename TI, typename TO>
__device__ void ln_bwd_dx(const TI *x, const float *w, const TO *dy, TI *dx, int d, float eps) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  x += row * d;
  dy += row * d;
  dx += row * d;
  float mean, rstd;
  row_stats(x, d, eps, sh, &mean, &rstd);
  float s1 = 0.f, s2 = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float xh = (to_f(x[j]) - mean) * rstd;
    const float g = w[j] * to_f(dy[j]);
    s1 += g * xh;
    s2 += g;
  }
  const float c1 = block_sum(s1, sh) / d;
  const float c2 = block_sum(s2, sh) / d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float xh = (to_f(x[j]) - mean) * rstd;
    const float g = w[j] * to_f(dy[j]);
    dx[j] = from_f<TI>(rstd * (g - c1 * xh - c2));
  }
}

// dw = Σ_rows dy·x̂, db = Σ_rows dy into dwdb[0..d) and dwdb[d..2d) (zeroed by the caller).
// Block b handles rows [b·rows_per_block, …): per-column sums in registers, one atomicAdd per
// column and block. Needs d ≤ 8·blockDim.x.
#define LN_MAXC 8
template <typename TI, typename TO>
__device__ void ln_bwd_wb(const TI *x, const TO *dy, float *dwdb, int rows, int d, float eps,
                          int rows_per_block) {
  __shared__ float sh[32];
  float aw[LN_MAXC], ab[LN_MAXC];
#pragma unroll
  for (int c = 0; c < LN_MAXC; c++) aw[c] = ab[c] = 0.f;
  const int r0 = blockIdx.x * rows_per_block;
  const int r1 = min(rows, r0 + rows_per_block);
  for (int r = r0; r < r1; r++) {
    const TI *xr = x + (size_t)r * d;
    const TO *dyr = dy + (size_t)r * d;
    float mean, rstd;
    row_stats(xr, d, eps, sh, &mean, &rstd);
#pragma unroll
    for (int c = 0; c < LN_MAXC; c++) {
      const int j = threadIdx.x + c * blockDim.x;
      if (j < d) {
        const float g = to_f(dyr[j]);
        aw[c] += g * (to_f(xr[j]) - mean) * rstd;
        ab[c] += g;
      }
    }
  }
#pragma unroll
  for (int c = 0; c < LN_MAXC; c++) {
    const int j = threadIdx.x + c * blockDim.x;
    if (j < d) {
      atomicAdd(dwdb + j, aw[c]);
      atomicAdd(dwdb + d + j, ab[c]);
    }
  }
}

#define LN_INST(SUF, TI, TO)                                                                     \
  extern "C" __global__ void ROW_BLOCK ln_fwd_##SUF(const TI *x, const float *w, const float *b, TO *y,     \
                                          int d, float eps) {                                    \
    ln_fwd<TI, TO>(x, w, b, y, d, eps);                                                          \
  }                                                                                              \
  extern "C" __global__ void ROW_BLOCK ln_bwd_dx_##SUF(const TI *x, const float *w, const TO *dy, TI *dx,   \
                                             int d, float eps) {                                 \
    ln_bwd_dx<TI, TO>(x, w, dy, dx, d, eps);                                                     \
  }                                                                                              \
  extern "C" __global__ void ROW_BLOCK ln_bwd_wb_##SUF(const TI *x, const TO *dy, float *dwdb, int rows,    \
                                             int d, float eps, int rows_per_block) {             \
    ln_bwd_wb<TI, TO>(x, dy, dwdb, rows, d, eps, rows_per_block);                                \
  }
LN_INST(f32_f32, float, float)
LN_INST(f32_bf16, float, bf16)
LN_INST(bf16_bf16, bf16, bf16)
LN_INST(bf16_f32, bf16, float)

// ---- bias + GELU (erf form) -------------------------------------------------------------------
__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_erf_grad(float v) {
  return 0.5f * (1.f + erff(v * 0.70710678118654752f)) + v * 0.39894228040143268f * expf(-0.5f * v * v);
}

// y[i] = gelu(x[i] + b[i mod d]).
template <typename T>
__device__ void bias_gelu_fwd(const T *x, const float *b, T *y, size_t n, int d) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(gelu_erf(to_f(x[i]) + b[i % d]));
}
// dx[r, j] = dy[r, j]·gelu'(x[r, j] + b[j]) and the bias gradient in the same pass:
// db[j] += Σ_{rows of this block} dx[r, j], of dx as written (rounded), as a column sum of dx
// would read it (db zeroed by the caller); when gelu_in_place, x[r, j] is then overwritten by the
// forward's output gelu(x + b) (bit for bit bias_gelu_fwd's), for a backward that did not keep
// it. Each thread writes only the elements it read. Grid as col_sum: a thread per column,
// coalesced along the row, one atomicAdd per column and block.
template <typename T>
__device__ void bias_gelu_bwd(T *x, const float *b, const T *dy, T *dx, float *db, int rows, int d,
                              int rows_per_block, int gelu_in_place) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int r0 = blockIdx.y * rows_per_block;
  const int r1 = min(rows, r0 + rows_per_block);
  const float bj = b[j];
  float s = 0.f;
  for (int r = r0; r < r1; r++) {
    const size_t i = (size_t)r * d + j;
    const float u = to_f(x[i]) + bj;
    const T v = from_f<T>(to_f(dy[i]) * gelu_erf_grad(u));
    dx[i] = v;
    s += to_f(v);
    if (gelu_in_place) x[i] = from_f<T>(gelu_erf(u));
  }
  atomicAdd(db + j, s);
}
#define BG_INST(SUF, T)                                                                          \
  extern "C" __global__ void bias_gelu_fwd_##SUF(const T *x, const float *b, T *y, size_t n,      \
                                                 int d) {                                        \
    bias_gelu_fwd<T>(x, b, y, n, d);                                                             \
  }                                                                                              \
  extern "C" __global__ void bias_gelu_bwd_##SUF(T *x, const float *b, const T *dy, T *dx,        \
                                                 float *db, int rows, int d, int rpb,            \
                                                 int gelu_in_place) {                            \
    bias_gelu_bwd<T>(x, b, dy, dx, db, rows, d, rpb, gelu_in_place);                             \
  }
BG_INST(f32, float)
BG_INST(bf16, bf16)

// ---- bias add (f32 bias onto f32/bf16 activations; the backward is a f32 column sum) --------
template <typename T>
__device__ void bias_add(const T *x, const float *b, T *y, size_t n, int d) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(to_f(x[i]) + b[i % d]);
}
extern "C" __global__ void bias_add_f32(const float *x, const float *b, float *y, size_t n, int d) {
  bias_add<float>(x, b, y, n, d);
}
extern "C" __global__ void bias_add_bf16(const bf16 *x, const float *b, bf16 *y, size_t n, int d) {
  bias_add<bf16>(x, b, y, n, d);
}

// ---- column sums: out[j] += Σ_{rows of this block} x[r, j] (out zeroed by the caller) ----------
// grid (⌈d/256⌉, ⌈rows/rows_per_block⌉): coalesced reads along a row, one atomicAdd per column
// and block.
template <typename T>
__device__ void col_sum(const T *x, float *out, int rows, int d, int rows_per_block) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int r0 = blockIdx.y * rows_per_block;
  const int r1 = min(rows, r0 + rows_per_block);
  float s = 0.f;
  for (int r = r0; r < r1; r++) s += to_f(x[(size_t)r * d + j]);
  atomicAdd(out + j, s);
}
extern "C" __global__ void col_sum_f32(const float *x, float *out, int rows, int d, int rpb) {
  col_sum<float>(x, out, rows, d, rpb);
}
extern "C" __global__ void col_sum_bf16(const bf16 *x, float *out, int rows, int d, int rpb) {
  col_sum<bf16>(x, out, rows, d, rpb);
}

// ---- residual add: y = x + m[i / per]·a (x, m, y f32; a f32 or bf16); its branch gradient ------
template <typename T>
__device__ void residual_add(const float *x, const T *a, const float *m, float *y, size_t n, size_t per) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = x[i] + m[i / per] * to_f(a[i]);
}
extern "C" __global__ void residual_add_f32(const float *x, const float *a, const float *m, float *y, size_t n, size_t per) {
  residual_add<float>(x, a, m, y, n, per);
}
extern "C" __global__ void residual_add_bf16(const float *x, const bf16 *a, const float *m, float *y, size_t n, size_t per) {
  residual_add<bf16>(x, a, m, y, n, per);
}
// ---- input crops ---------------------------------------------------------------------------
// uint8 HWC crops [N, S, S, 3] → f32 NCHW [N, 3, S, S]: (x/255 − mean[c])/std[c], true f32
// divisions in that order, so bit for bit the composed ops (torchvision's ToTensor + Normalize).
extern "C" __global__ void normalise_crops(const uint8_t *x, float *y, size_t n, int s, float m0,
                                           float m1, float m2, float d0, float d1, float d2) {
  const size_t hw = (size_t)s * s;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t img = i / (3 * hw), p = i % hw;
    const int c = (int)(i / hw % 3);
    const float mean = c == 0 ? m0 : (c == 1 ? m1 : m2);
    const float sd = c == 0 ? d0 : (c == 1 ? d1 : d2);
    y[i] = ((float)x[(img * hw + p) * 3 + c] / 255.f - mean) / sd;
  }
}

template <typename T>
__device__ void row_scale(const float *g, const float *m, T *y, size_t n, size_t per) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(g[i] * m[i / per]);
}
extern "C" __global__ void row_scale_f32(const float *g, const float *m, float *y, size_t n, size_t per) {
  row_scale<float>(g, m, y, n, per);
}
extern "C" __global__ void row_scale_bf16(const float *g, const float *m, bf16 *y, size_t n, size_t per) {
  row_scale<bf16>(g, m, y, n, per);
}

// ---- gradient accumulation into the flat f32 gradient buffer: dst += g -------------------------
template <typename T>
__device__ void grad_accumulate(float *dst, const T *g, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dst[i] += to_f(g[i]);
}
extern "C" __global__ void grad_accumulate_f32(float *dst, const float *g, size_t n) {
  grad_accumulate<float>(dst, g, n);
}
extern "C" __global__ void grad_accumulate_bf16(float *dst, const bf16 *g, size_t n) {
  grad_accumulate<bf16>(dst, g, n);
}

// ---- the head's softmax / cross-entropy (K up to 65 536, one block per row) ------------------
// Teacher targets p[r, k] = softmax_k(z), z = (t[r, k] − c[k]) / tau (f32 out, no backward), and
// the row's entropy from the same statistics (monitoring): h[r] = H(p) = log S − Σ e·(z − m)/S,
// S = Σ e, e = exp(z − m).
template <typename T>
__device__ void centered_softmax(const T *t, const float *c, float *p, float *h, int k,
                                 float inv_tau, int shift) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  t += ((row + shift) % gridDim.x) * k;
  p += row * k;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < k; j += blockDim.x) m = fmaxf(m, (to_f(t[j]) - c[j]) * inv_tau);
  m = block_max(m, sh);
  float s = 0.f, sz = 0.f;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const float z = (to_f(t[j]) - c[j]) * inv_tau - m;
    const float e = expf(z);
    s += e;
    sz += e * z;
  }
  s = block_sum(s, sh);
  sz = block_sum(sz, sh);
  if (threadIdx.x == 0) h[row] = logf(s) - sz / s;
  const float inv = 1.f / s;
  for (int j = threadIdx.x; j < k; j += blockDim.x) p[j] = expf((to_f(t[j]) - c[j]) * inv_tau - m) * inv;
}

// out[g, j] = Σ_i w[g, i]·x[(g + shift) mod G, i, j] over groups of r rows of k columns (the
// validity-weighted sums of the teacher's patch logits, shift = G/2 to read the other view).
// Grid (⌈k/256⌉, G), 256 threads: thread j of a group walks its r rows down one column.
template <typename T>
__device__ void weighted_rows(const T *x, const float *w, float *out, int r, int k, int shift) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const size_t g = blockIdx.y, src = (g + shift) % gridDim.y;
  x += src * r * k + j;
  w += g * r;
  float acc = 0.f;
  for (int i = 0; i < r; i++) acc += w[i] * to_f(x[(size_t)i * k]);
  out[g * k + j] = acc;
}

// The local crops' [cls+] targets (udi-spec §3.2): for image b, local crop l and both global
// views t, z_t = (alpha·avg[t, b, l] + (1 − alpha)·cls[t, b] − c)/tau; the target row l·B + b is
// softmax(z_0) + softmax(z_1) and h[t, b, l] each softmax's entropy. One block per (b, l), in
// that order, so that neighbouring blocks reread image b's [cls] rows from L2; the blended
// logits are made in registers, never stored.
template <typename T>
__device__ __forceinline__ float blended_z(const T *a, const float *cl, const float *c, int j,
                                           float alpha, float inv_tau) {
  return (alpha * to_f(a[j]) + (1.f - alpha) * cl[j] - c[j]) * inv_tau;
}

template <typename T>
__device__ void local_multimodal(const T *avg, const float *cls, const float *c, float *p,
                                 float *h, int batch, int n_local, int k, float alpha,
                                 float inv_tau) {
  __shared__ float sh[32];
  const int b = blockIdx.x / n_local, l = blockIdx.x % n_local;
  const size_t row = (size_t)l * batch + b;
  const T *a0 = avg + ((size_t)b * n_local + l) * k;
  const T *a1 = avg + ((size_t)(batch + b) * n_local + l) * k;
  const float *c0 = cls + (size_t)b * k, *c1 = cls + (size_t)(batch + b) * k;
  p += (size_t)row * k;
  float m0 = -INFINITY, m1 = -INFINITY;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    m0 = fmaxf(m0, blended_z(a0, c0, c, j, alpha, inv_tau));
    m1 = fmaxf(m1, blended_z(a1, c1, c, j, alpha, inv_tau));
  }
  m0 = block_max(m0, sh);
  m1 = block_max(m1, sh);
  float s0 = 0.f, sz0 = 0.f, s1 = 0.f, sz1 = 0.f;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const float z0 = blended_z(a0, c0, c, j, alpha, inv_tau) - m0;
    const float z1 = blended_z(a1, c1, c, j, alpha, inv_tau) - m1;
    const float e0 = expf(z0), e1 = expf(z1);
    s0 += e0;
    sz0 += e0 * z0;
    s1 += e1;
    sz1 += e1 * z1;
  }
  s0 = block_sum(s0, sh);
  sz0 = block_sum(sz0, sh);
  s1 = block_sum(s1, sh);
  sz1 = block_sum(sz1, sh);
  if (threadIdx.x == 0) {
    h[(size_t)b * n_local + l] = logf(s0) - sz0 / s0;
    h[(size_t)(batch + b) * n_local + l] = logf(s1) - sz1 / s1;
  }
  const float i0 = 1.f / s0, i1 = 1.f / s1;
  for (int j = threadIdx.x; j < k; j += blockDim.x)
    p[j] = expf(blended_z(a0, c0, c, j, alpha, inv_tau) - m0) * i0 +
           expf(blended_z(a1, c1, c, j, alpha, inv_tau) - m1) * i1;
}

// Row statistics of the student row z = s/tau: max, log Σ exp(z − max); and of the target row:
// Σ p, Σ p·z. Target row = student row mod p_rows (a target broadcast over leading groups).
template <typename T>
__device__ void ce_stats(const T *s, const float *p, int k, float inv_tau, float *sh, float *mx,
                         float *lse, float *sp, float *spz) {
  float m = -INFINITY;
  for (int j = threadIdx.x; j < k; j += blockDim.x) m = fmaxf(m, to_f(s[j]) * inv_tau);
  m = block_max(m, sh);
  float e = 0.f, a = 0.f, b = 0.f;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const float z = to_f(s[j]) * inv_tau;
    e += expf(z - m);
    a += p[j];
    b += p[j] * z;
  }
  *lse = logf(block_sum(e, sh));
  *sp = block_sum(a, sh);
  *spz = block_sum(b, sh);
  *mx = m;
}

// loss[r] = −Σ_k p[r mod P, k] · log_softmax(s[r]/tau)_k = Σp·(max + lse) − Σ p·z.
template <typename T>
__device__ void soft_ce_fwd(const T *s, const float *p, float *loss, int k, int p_rows, float inv_tau) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  float mx, lse, sp, spz;
  ce_stats(s + row * k, p + (row % p_rows) * (size_t)k, k, inv_tau, sh, &mx, &lse, &sp, &spz);
  if (threadIdx.x == 0) loss[row] = sp * (mx + lse) - spz;
}

// ds[r, k] = g[r] · (Σp · softmax(z)_k − p_k) / tau.
template <typename T>
__device__ void soft_ce_bwd(const T *s, const float *p, const float *g, T *ds, int k, int p_rows,
                            float inv_tau) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  s += row * k;
  ds += row * k;
  p += (row % p_rows) * (size_t)k;
  float mx, lse, sp, spz;
  ce_stats(s, p, k, inv_tau, sh, &mx, &lse, &sp, &spz);
  const float gr = g[row] * inv_tau;
  const float off = mx + lse;
  for (int j = threadIdx.x; j < k; j += blockDim.x)
    ds[j] = from_f<T>(gr * (sp * expf(to_f(s[j]) * inv_tau - off) - p[j]));
}

// Both at once, in place (the explicit step's loss): loss[r] as soft_ce_fwd, then s[r]
// overwritten by ds[r] as soft_ce_bwd. Each thread writes only the elements it read for the row
// statistics, so no other thread's read can see a gradient.
template <typename T>
__device__ void soft_ce_fused(T *s, const float *p, const float *g, float *loss, int k, int p_rows,
                              float inv_tau) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  s += row * k;
  p += (row % p_rows) * (size_t)k;
  float mx, lse, sp, spz;
  ce_stats(s, p, k, inv_tau, sh, &mx, &lse, &sp, &spz);
  if (threadIdx.x == 0) loss[row] = sp * (mx + lse) - spz;
  const float gr = g[row] * inv_tau;
  const float off = mx + lse;
  for (int j = threadIdx.x; j < k; j += blockDim.x)
    s[j] = from_f<T>(gr * (sp * expf(to_f(s[j]) * inv_tau - off) - p[j]));
}

#define CE_INST(SUF, T)                                                                          \
  extern "C" __global__ void ROW_BLOCK centered_softmax_##SUF(const T *t, const float *c, float *p,      \
                                                    float *h, int k, float inv_tau, int shift) { \
    centered_softmax<T>(t, c, p, h, k, inv_tau, shift);                                          \
  }                                                                                              \
  extern "C" __global__ void weighted_rows_##SUF(const T *x, const float *w, float *out, int r,  \
                                                 int k, int shift) {                             \
    weighted_rows<T>(x, w, out, r, k, shift);                                                    \
  }                                                                                              \
  extern "C" __global__ void ROW_BLOCK local_multimodal_##SUF(                                  \
      const T *avg, const float *cls, const float *c, float *p, float *h, int batch, int n_local, \
      int k, float alpha, float inv_tau) {                                                       \
    local_multimodal<T>(avg, cls, c, p, h, batch, n_local, k, alpha, inv_tau);                   \
  }                                                                                              \
  extern "C" __global__ void ROW_BLOCK soft_ce_fwd_##SUF(const T *s, const float *p, float *loss, int k,    \
                                               int p_rows, float inv_tau) {                      \
    soft_ce_fwd<T>(s, p, loss, k, p_rows, inv_tau);                                              \
  }                                                                                              \
  extern "C" __global__ void ROW_BLOCK soft_ce_bwd_##SUF(const T *s, const float *p, const float *g, T *ds, \
                                               int k, int p_rows, float inv_tau) {               \
    soft_ce_bwd<T>(s, p, g, ds, k, p_rows, inv_tau);                                             \
  }                                                                                              \
  extern "C" __global__ void ROW_BLOCK soft_ce_fused_##SUF(T *s, const float *p, const float *g,   \
                                                 float *loss, int k, int p_rows, float inv_tau) { \
    soft_ce_fused<T>(s, p, g, loss, k, p_rows, inv_tau);                                         \
  }
CE_INST(f32, float)
CE_INST(bf16, bf16)

// ---- the head's weight-normalised last layer (one warp per row of V [K, E]) -------------------
// W = g ⊙ V/‖V_row‖, as (v / ‖v‖)·g.
template <typename T>
__device__ void weight_norm(const float *v, const float *g, T *w, size_t rows, int e) {
  const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  v += row * e;
  w += row * e;
  float s = 0.f;
  for (int j = lane; j < e; j += 32) s += v[j] * v[j];
  const float n = sqrtf(warp_sum(s)), gr = g[row];
  for (int j = lane; j < e; j += 32) w[j] = from_f<T>(v[j] / n * gr);
}
extern "C" __global__ void weight_norm_f32(const float *v, const float *g, float *w, size_t rows, int e) {
  weight_norm<float>(v, g, w, rows, e);
}
extern "C" __global__ void weight_norm_bf16(const float *v, const float *g, bf16 *w, size_t rows, int e) {
  weight_norm<bf16>(v, g, w, rows, e);
}

// With u = v/‖v‖: dg = Σ dW·u and dV = g/‖v‖·(dW − u·dg), ‖v‖ recomputed from the row.
extern "C" __global__ void weight_norm_bwd(const float *dw, const float *v, const float *g, float *dv,
                                           float *dg, size_t rows, int e) {
  const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  dw += row * e;
  v += row * e;
  dv += row * e;
  float s = 0.f;
  for (int j = lane; j < e; j += 32) s += v[j] * v[j];
  const float n = sqrtf(warp_sum(s));
  float d = 0.f;
  for (int j = lane; j < e; j += 32) d += dw[j] * (v[j] / n);
  d = warp_sum(d);
  if (lane == 0) dg[row] = d;
  const float scale = g[row] / n;
  for (int j = lane; j < e; j += 32) dv[j] = (dw[j] - v[j] / n * d) * scale;
}

// ---- attention softmax over the last dim (N ≤ 1024 keys, one warp per row) -------------------
// y = softmax(x·scale) computed in f32; rows of length n.
template <typename T>
__device__ void attn_softmax_fwd(const T *x, T *y, size_t rows, int n, float scale) {
  const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  x += row * n;
  y += row * n;
  float m = -INFINITY;
  for (int j = lane; j < n; j += 32) m = fmaxf(m, to_f(x[j]) * scale);
  m = warp_max(m);
  float s = 0.f;
  for (int j = lane; j < n; j += 32) s += expf(to_f(x[j]) * scale - m);
  s = warp_sum(s);
  const float inv = 1.f / s;
  for (int j = lane; j < n; j += 32) y[j] = from_f<T>(expf(to_f(x[j]) * scale - m) * inv);
}
// dx = scale · y · (dy − Σ y·dy).
template <typename T>
__device__ void attn_softmax_bwd(const T *y, const T *dy, T *dx, size_t rows, int n, float scale) {
  const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  y += row * n;
  dy += row * n;
  dx += row * n;
  float s = 0.f;
  for (int j = lane; j < n; j += 32) s += to_f(y[j]) * to_f(dy[j]);
  s = warp_sum(s);
  for (int j = lane; j < n; j += 32) dx[j] = from_f<T>(scale * to_f(y[j]) * (to_f(dy[j]) - s));
}
#define SM_INST(SUF, T)                                                                          \
  extern "C" __global__ void attn_softmax_fwd_##SUF(const T *x, T *y, size_t rows, int n,         \
                                                    float scale) {                               \
    attn_softmax_fwd<T>(x, y, rows, n, scale);                                                   \
  }                                                                                              \
  extern "C" __global__ void attn_softmax_bwd_##SUF(const T *y, const T *dy, T *dx, size_t rows,  \
                                                    int n, float scale) {                        \
    attn_softmax_bwd<T>(y, dy, dx, rows, n, scale);                                              \
  }
SM_INST(f32, float)
SM_INST(bf16, bf16)

// ---- residual update + the next LayerNorm (pre-norm blocks) ------------------------------------
// One block per row: y = x + m[row / per]·(a + ab) (the stream, f32; a + ab rounded to a's dtype
// as bias_add rounds it: ab is the branch's last bias, folded in here instead of its own pass),
// out = (y − mean)·rstd·w + b. Each thread reads back only the y elements it wrote, so the
// statistics need no extra barrier.
template <typename TA, typename TO>
__device__ void residual_ln_fwd(const float *x, const TA *a, const float *ab, const float *m,
                                const float *w, const float *b, float *y, TO *out, int d, int per,
                                float eps) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const float mr = m[row / per];
  x += row * d;
  a += row * d;
  y += row * d;
  out += row * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x)
    y[j] = x[j] + mr * to_f(from_f<TA>(to_f(a[j]) + ab[j]));
  float mean, rstd;
  row_stats(y, d, eps, sh, &mean, &rstd);
  for (int j = threadIdx.x; j < d; j += blockDim.x) out[j] = from_f<TO>((y[j] - mean) * rstd * w[j] + b[j]);
}

#define RLN_INST(SUF, TA, TO)                                                                     \
  extern "C" __global__ void ROW_BLOCK residual_ln_fwd_##SUF(const float *x, const TA *a, const float *ab,   \
                                                   const float *m, const float *w, const float *b,\
                                                   float *y, TO *out, int d, int per, float eps) { \
    residual_ln_fwd<TA, TO>(x, a, ab, m, w, b, y, out, d, per, eps);                              \
  }
RLN_INST(f32_f32, float, float)
RLN_INST(bf16_bf16, bf16, bf16)
RLN_INST(bf16_f32, bf16, float)
RLN_INST(f32_bf16, float, bf16)

// ---- LayerNorm backward fused with the residual stream's gradient (pre-norm blocks) ------------
// A warp per row (blockDim.x/32 warps take rows [blockIdx.x·rows_per_block, +rows_per_block) in
// turn): dx = dres + rstd·(g − mean(g·x̂)·x̂ − mean g), g = w·dy (x, dres, dx f32: the residual
// stream); when write_branch, branch = dx·m[row / per] in dy's dtype (the next branch's gradient);
// dw += Σ dy·x̂, db += Σ dy into dwdb[0..d) / [d..2d) (zeroed by the caller): per lane in
// registers, summed over the block's warps in shared memory, one atomicAdd per column and block.
// Needs d ≤ 32·LNR_COLS and blockDim.x = 256 (4 blocks per SM at 64 registers).
#define LNR_COLS 16

template <typename TO>
__device__ void ln_bwd_residual(const float *x, const float *w, const TO *dy, const float *dres,
                                const float *m, float *dx, TO *branch, float *dwdb, int rows, int d,
                                float eps, int rows_per_block, int per, int write_branch) {
  __shared__ float acc[2 * 32 * LNR_COLS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int j = threadIdx.x; j < 2 * d; j += blockDim.x) acc[j] = 0.f;
  float aw[LNR_COLS], ab[LNR_COLS];
#pragma unroll
  for (int c = 0; c < LNR_COLS; c++) aw[c] = ab[c] = 0.f;
  const int r0 = blockIdx.x * rows_per_block;
  const int r1 = min(rows, r0 + rows_per_block);
  for (int r = r0 + warp; r < r1; r += nwarps) {
    const size_t o = (size_t)r * d;
    float s = 0.f;
    for (int j = lane; j < d; j += 32) s += x[o + j];
    const float mean = warp_sum(s) / d;
    float q = 0.f;
    for (int j = lane; j < d; j += 32) {
      const float c = x[o + j] - mean;
      q += c * c;
    }
    const float rstd = rsqrtf(warp_sum(q) / d + eps);
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int c = 0; c < LNR_COLS; c++) {
      const int j = lane + 32 * c;
      if (j < d) {
        const float xh = (x[o + j] - mean) * rstd, gy = to_f(dy[o + j]), g = w[j] * gy;
        s1 += g * xh;
        s2 += g;
        aw[c] += gy * xh;
        ab[c] += gy;
      }
    }
    const float c1 = warp_sum(s1) / d, c2 = warp_sum(s2) / d;
    const float mr = m[r / per];
#pragma unroll
    for (int c = 0; c < LNR_COLS; c++) {
      const int j = lane + 32 * c;
      if (j < d) {
        const float xh = (x[o + j] - mean) * rstd, g = w[j] * to_f(dy[o + j]);
        const float v = dres[o + j] + rstd * (g - c1 * xh - c2);
        dx[o + j] = v;
        if (write_branch) branch[o + j] = from_f<TO>(v * mr);
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < LNR_COLS; c++) {
    const int j = lane + 32 * c;
    if (j < d) {
      atomicAdd(acc + j, aw[c]);
      atomicAdd(acc + d + j, ab[c]);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < 2 * d; j += blockDim.x) atomicAdd(dwdb + j, acc[j]);
}

#define LNR_INST(SUF, TO)                                                                         \
  extern "C" __global__ void __launch_bounds__(256, 4) ln_bwd_residual_##SUF(                     \
      const float *x, const float *w, const TO *dy, const float *dres, const float *m, float *dx,  \
      TO *branch, float *dwdb, int rows, int d, float eps, int rows_per_block, int per,            \
      int write_branch) {                                                                         \
    ln_bwd_residual<TO>(x, w, dy, dres, m, dx, branch, dwdb, rows, d, eps, rows_per_block, per,   \
                        write_branch);                                                            \
  }
LNR_INST(f32, float)
LNR_INST(bf16, bf16)

// ---- multi-tensor AdamW + teacher EMA over flat f32 buffers -----------------------------------
// state = [p | m | v | t] (4·n floats): student params, Adam moments, teacher params; g = flat
// gradients (n). Segment s (one parameter) is meta[8s .. 8s+8) as u32:
//   0 offset, 1 length, 2 flags (bit 0: apply AdamW), 3 decay = 1 − lr·wd, 4 step = lr/(1−β₁ᵗ),
//   5 sqrt(1−β₂ᵗ), 6 clip factor, 7 unused   (3–6 are f32 bit patterns).
// PyTorch AdamW order: p ← p·decay; m ← m + (1−β₁)(g − m); v ← β₂v + (1−β₂)g²;
// p ← p − step·m/(√v/√(1−β₂ᵗ) + ε); then t ← mom·t + (1−mom)·p for every element.
extern "C" __global__ void adamw_ema(float *state, const float *g, const uint32_t *meta, int n_seg,
                                     size_t n, float beta1, float beta2, float eps, float mom) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    // Last segment whose offset ≤ i.
    int lo = 0, hi = n_seg - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if ((size_t)meta[8 * mid] <= i) lo = mid; else hi = mid - 1;
    }
    const uint32_t *sm = meta + 8 * lo;
    float p = state[i];
    if (sm[2] & 1u) {
      const float decay = __uint_as_float(sm[3]);
      const float step = __uint_as_float(sm[4]);
      const float bc2s = __uint_as_float(sm[5]);
      const float clip = __uint_as_float(sm[6]);
      const float gi = g[i] * clip;
      float m = state[n + i], v = state[2 * n + i];
      p = p * decay;
      m = m + (1.f - beta1) * (gi - m);
      v = beta2 * v + (1.f - beta2) * gi * gi;
      p = p - step * (m / (sqrtf(v) / bc2s + eps));
      state[i] = p;
      state[n + i] = m;
      state[2 * n + i] = v;
    }
    state[3 * n + i] = mom * state[3 * n + i] + (1.f - mom) * p;
  }
}

// ---- per-parameter squared gradient norms over the flat gradient, in f64 ------------------------
// The gradient-clipping rule needs ‖g‖² of every parameter. A parameter is cut into chunks of at
// most SQ_CHUNK elements (chunks = (offset, length) pairs, u32); block j sums chunk j's squares
// in f64 into part[j], each thread a strided run, then a tree in shared memory; a second launch
// adds each parameter's chunks (first[s] .. first[s+1]) in order. Fixed orders throughout, no
// atomics: the norms are bitwise reproducible, whatever the grid.
#define SQ_THREADS 256
extern "C" __global__ void __launch_bounds__(SQ_THREADS)
sq_norm_chunks(const float *g, const uint32_t *chunks, double *part) {
  __shared__ double sh[SQ_THREADS];
  const size_t off = chunks[2 * blockIdx.x];
  const uint32_t len = chunks[2 * blockIdx.x + 1];
  double acc = 0.0;
  for (uint32_t i = threadIdx.x; i < len; i += SQ_THREADS) {
    const double x = g[off + i];
    acc += x * x;
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = SQ_THREADS / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

extern "C" __global__ void sq_norm_segments(const double *part, const uint32_t *first, int n_seg,
                                            double *out) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= n_seg) return;
  double acc = 0.0;
  for (uint32_t j = first[s]; j < first[s + 1]; ++j) acc += part[j];
  out[s] = acc;
}

// ---- fused (flash-style) attention on packed qkv rows, bf16, head dim 64 ---------------------
// qkv: rows [B·T, 3·H·64] as the qkv projection writes them (q | k | v, head-major inside each),
// read in place; o: rows [B·T, H·64], the proj input; lse: [B, H, T] f32, natural-log units of
// scale·q·k. The [T, T] scores never reach global memory: the forward keeps a running max and
// sum per row (online softmax over 32-key tiles), the backward recomputes P = exp(scale·S − lse).
// Tensor-core tiles (WMMA 16×16×16, bf16 in, f32 accumulate). One block = 2 warps = 32 rows (a
// warp owns 16); in a warp, lane pair (2r, 2r+1) owns row r, each lane half of its columns.
// The backward writes dq (per query tile) and dk, dv (per key tile) in two kernels, so every
// output element is written once, without atomics: bitwise reproducible.
#include <mma.h>
namespace wm = nvcuda::wmma;

#define FA_D 64   // head dim
#define FA_T 32   // rows per block and keys per inner tile
#define FA_LD 72  // bf16 tile row stride (multiple of 8; +8 staggers the banks)
#define FA_LS 36  // f32 score row stride
#define FA_LP 40  // bf16 probability row stride
#define FA_LO 68  // f32 output row stride

typedef wm::fragment<wm::accumulator, 16, 16, 16, float> fa_acc;
typedef wm::fragment<wm::matrix_a, 16, 16, 16, bf16, wm::row_major> fa_a;
typedef wm::fragment<wm::matrix_b, 16, 16, 16, bf16, wm::row_major> fa_b_row;
typedef wm::fragment<wm::matrix_b, 16, 16, 16, bf16, wm::col_major> fa_b_col;

// `valid` rows of 64 bf16 (row stride ld) into a [FA_T][FA_LD] tile, plus `bias` per column
// when it is not null; the other rows are zero.
__device__ __forceinline__ void fa_load(bf16 *sh, const bf16 *g, size_t ld, int valid,
                                        const float *bias) {
  for (int e = threadIdx.x; e < FA_T * 8; e += blockDim.x) {
    const int r = e >> 3, c = (e & 7) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) {
      val = *reinterpret_cast<const uint4 *>(g + r * ld + c);
      if (bias) {  // the qkv bias, rounded to bf16 as bias_add rounds it
        bf16 *v = reinterpret_cast<bf16 *>(&val);
        for (int q = 0; q < 8; ++q) v[q] = __float2bfloat16(__bfloat162float(v[q]) + bias[c + q]);
      }
    }
    *reinterpret_cast<uint4 *>(sh + r * FA_LD + c) = val;
  }
}

// out[16 × 32] (f32, row stride FA_LS) = A[16 × 64] · Bᵀ where B is a [32 × 64] tile: the score
// block of 16 rows of `a` against the 32 rows of `b`.
__device__ __forceinline__ void fa_abt(const bf16 *a, const bf16 *b, float *out) {
  fa_acc acc[2];
  wm::fill_fragment(acc[0], 0.f);
  wm::fill_fragment(acc[1], 0.f);
  for (int kk = 0; kk < FA_D / 16; ++kk) {
    fa_a fa;
    wm::load_matrix_sync(fa, a + kk * 16, FA_LD);
    for (int n = 0; n < 2; ++n) {
      fa_b_col fb;
      wm::load_matrix_sync(fb, b + n * 16 * FA_LD + kk * 16, FA_LD);
      wm::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
  for (int n = 0; n < 2; ++n) wm::store_matrix_sync(out + n * 16, acc[n], FA_LS, wm::mem_row_major);
}

// acc[4] (16 × 64) += P[16 × 32] (bf16, row stride FA_LP) · B[32 × 64] (a tile).
__device__ __forceinline__ void fa_pb(fa_acc *acc, const bf16 *p, const bf16 *b) {
  for (int kk = 0; kk < FA_T / 16; ++kk) {
    fa_a fa;
    wm::load_matrix_sync(fa, p + kk * 16, FA_LP);
    for (int n = 0; n < FA_D / 16; ++n) {
      fa_b_row fb;
      wm::load_matrix_sync(fb, b + kk * 16 * FA_LD + n * 16, FA_LD);
      wm::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Rows [0, valid) of a warp's 16 × 64 accumulator to bf16 global rows (stride ld), through `st`
// (the warp's [16][FA_LO] f32 staging).
__device__ __forceinline__ void fa_store_rows(fa_acc *acc, float *st, bf16 *g, size_t ld, int valid) {
  for (int n = 0; n < FA_D / 16; ++n) wm::store_matrix_sync(st + n * 16, acc[n], FA_LO, wm::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 32;
  if (r < valid)
    for (int c = 0; c < 32; ++c) g[r * ld + c0 + c] = __float2bfloat16(st[r * FA_LO + c0 + c]);
}

// Where a block works (sequence b, head h, its tile's first row) and what this thread owns (its
// warp, row r of the tile, half of that row's columns); qkv and O row strides; `base`: q of
// sequence b's first row, head h; bq/bk/bv: head h's slices of the qkv bias (null without one:
// qkv already has it).
struct FaBlock {
  int b, h, row0, warp, r, half;
  size_t ld, hd;
  const bf16 *base;
  const float *bq, *bk, *bv;
  __device__ FaBlock(const bf16 *qkv, const float *qkv_bias, int t, int heads)
      : b(blockIdx.z), h(blockIdx.y), row0(blockIdx.x * FA_T), warp(threadIdx.x >> 5),
        r((threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 1)),
        half(threadIdx.x & 1), ld((size_t)3 * heads * FA_D), hd((size_t)heads * FA_D),
        base(qkv + (size_t)blockIdx.z * t * ld + blockIdx.y * FA_D),
        bq(qkv_bias ? qkv_bias + blockIdx.y * FA_D : nullptr), bk(qkv_bias ? bq + hd : nullptr),
        bv(qkv_bias ? bq + 2 * hd : nullptr) {}
};

// The backward kernels' tiles (every array a multiple of 32 bytes: the WMMA pointers stay aligned).
struct __align__(32) FaBwdTiles {
  bf16 qs[FA_T * FA_LD], dos[FA_T * FA_LD], ks[FA_T * FA_LD], vs[FA_T * FA_LD];
  float ss[FA_T * FA_LS];
  bf16 ps[FA_T * FA_LP];
  float os[FA_T * FA_LO];
};

// Forward: grid (⌈T/32⌉, H, B), 64 threads. `lse` may be null (the teacher keeps nothing).
extern "C" __global__ void __launch_bounds__(64)
    flash_fwd_bf16(const bf16 *qkv, const float *qkv_bias, bf16 *o, float *lse, int t, int heads,
                   float scale) {
  __shared__ __align__(32) bf16 qs[FA_T * FA_LD];
  __shared__ __align__(32) bf16 ks[FA_T * FA_LD];
  __shared__ __align__(32) bf16 vs[FA_T * FA_LD];
  __shared__ __align__(32) float ss[FA_T * FA_LS];
  __shared__ __align__(32) bf16 ps[FA_T * FA_LP];
  __shared__ __align__(32) float os[FA_T * FA_LO];
  const FaBlock k(qkv, qkv_bias, t, heads);
  const int b = k.b, h = k.h, i0 = k.row0, warp = k.warp, r = k.r, half = k.half;
  const size_t ld = k.ld, hd = k.hd;
  const bf16 *base = k.base;
  fa_load(qs, base + i0 * ld, ld, min(FA_T, t - i0), k.bq);
  for (int e = threadIdx.x; e < FA_T * FA_LO; e += blockDim.x) os[e] = 0.f;
  const float sl2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x·log2 e)
  float m = -INFINITY, l = 0.f;
  for (int j0 = 0; j0 < t; j0 += FA_T) {
    const int kvalid = min(FA_T, t - j0);
    __syncthreads();  // every warp is done with the previous K/V tile
    fa_load(ks, base + hd + j0 * ld, ld, kvalid, k.bk);
    fa_load(vs, base + 2 * hd + j0 * ld, ld, kvalid, k.bv);
    __syncthreads();
    fa_abt(qs + warp * 16 * FA_LD, ks, ss + warp * 16 * FA_LS);
    __syncwarp();
    float sv[16], tmax = -INFINITY;
    for (int c = 0; c < 16; ++c) {
      const int col = half * 16 + c;
      sv[c] = col < kvalid ? ss[r * FA_LS + col] * sl2 : -INFINITY;
      tmax = fmaxf(tmax, sv[c]);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 1));
    const float m_new = fmaxf(m, tmax);
    const float alpha = exp2f(m - m_new);  // 0 on the first tile
    float sum = 0.f;
    for (int c = 0; c < 16; ++c) {
      const float p = exp2f(sv[c] - m_new);
      sum += p;
      ps[r * FA_LP + half * 16 + c] = __float2bfloat16(p);
    }
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    for (int c = 0; c < 32; ++c) os[r * FA_LO + half * 32 + c] *= alpha;
    __syncwarp();
    for (int n = 0; n < FA_D / 16; ++n) {
      fa_acc acc;
      wm::load_matrix_sync(acc, os + warp * 16 * FA_LO + n * 16, FA_LO, wm::mem_row_major);
      for (int kk = 0; kk < FA_T / 16; ++kk) {
        fa_a fa;
        fa_b_row fb;
        wm::load_matrix_sync(fa, ps + warp * 16 * FA_LP + kk * 16, FA_LP);
        wm::load_matrix_sync(fb, vs + kk * 16 * FA_LD + n * 16, FA_LD);
        wm::mma_sync(acc, fa, fb, acc);
      }
      wm::store_matrix_sync(os + warp * 16 * FA_LO + n * 16, acc, FA_LO, wm::mem_row_major);
    }
    __syncwarp();
  }
  const int i = i0 + r;
  if (i < t) {
    const float inv = 1.f / l;
    bf16 *orow = o + ((size_t)b * t + i) * hd + h * FA_D + half * 32;
    for (int c = 0; c < 32; ++c) orow[c] = __float2bfloat16(os[r * FA_LO + half * 32 + c] * inv);
    if (half == 0 && lse != nullptr)
      lse[((size_t)b * heads + h) * t + i] = (m + log2f(l)) * 0.6931471805599453f;
  }
}

// D = Σ_d dO·O per (row, head) (the softmax backward's row term): one warp each.
extern "C" __global__ void flash_bwd_dot_bf16(const bf16 *o, const bf16 *d_o, float *dsum,
                                              size_t rows, int t, int heads) {
  const size_t w = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= rows * heads) return;
  const size_t row = w / heads;
  const int h = (int)(w % heads);
  const bf16 *a = o + row * heads * FA_D + h * FA_D, *g = d_o + row * heads * FA_D + h * FA_D;
  float s = to_f(a[lane]) * to_f(g[lane]) + to_f(a[lane + 32]) * to_f(g[lane + 32]);
  s = warp_sum(s);
  if (lane == 0) dsum[((row / t) * heads + h) * t + row % t] = s;
}

// dQ: grid (⌈T/32⌉, H, B), 64 threads. dS = P ⊙ (dP − D)·scale, dQ = dS·K.
extern "C" __global__ void __launch_bounds__(64)
    flash_bwd_dq_bf16(const bf16 *qkv, const float *qkv_bias, const bf16 *d_o, const float *lse,
                      const float *dsum, bf16 *dqkv, int t, int heads, float scale) {
  __shared__ FaBwdTiles sh;
  bf16 *qs = sh.qs, *dos = sh.dos, *ks = sh.ks, *vs = sh.vs, *ps = sh.ps;
  float *ss = sh.ss, *os = sh.os;
  const FaBlock k(qkv, qkv_bias, t, heads);
  const int b = k.b, h = k.h, i0 = k.row0, warp = k.warp, r = k.r, half = k.half;
  const size_t ld = k.ld, hd = k.hd;
  const bf16 *base = k.base;
  const int qvalid = min(FA_T, t - i0);
  fa_load(qs, base + i0 * ld, ld, qvalid, k.bq);
  fa_load(dos, d_o + ((size_t)b * t + i0) * hd + h * FA_D, hd, qvalid, nullptr);
  const size_t srow = ((size_t)b * heads + h) * t + i0 + r;
  const float lse_r = r < qvalid ? lse[srow] : 0.f, d_r = r < qvalid ? dsum[srow] : 0.f;
  fa_acc acc[FA_D / 16];
  for (int n = 0; n < FA_D / 16; ++n) wm::fill_fragment(acc[n], 0.f);
  for (int j0 = 0; j0 < t; j0 += FA_T) {
    const int kvalid = min(FA_T, t - j0);
    __syncthreads();
    fa_load(ks, base + hd + j0 * ld, ld, kvalid, k.bk);
    fa_load(vs, base + 2 * hd + j0 * ld, ld, kvalid, k.bv);
    __syncthreads();
    fa_abt(qs + warp * 16 * FA_LD, ks, ss + warp * 16 * FA_LS);
    __syncwarp();
    float pv[16];
    for (int c = 0; c < 16; ++c) {
      const int col = half * 16 + c;
      pv[c] = (col < kvalid && r < qvalid) ? expf(ss[r * FA_LS + col] * scale - lse_r) : 0.f;
    }
    __syncwarp();
    fa_abt(dos + warp * 16 * FA_LD, vs, ss + warp * 16 * FA_LS);  // dP
    __syncwarp();
    for (int c = 0; c < 16; ++c) {
      const int col = half * 16 + c;
      ps[r * FA_LP + col] = __float2bfloat16(pv[c] * (ss[r * FA_LS + col] - d_r) * scale);
    }
    __syncwarp();
    fa_pb(acc, ps + warp * 16 * FA_LP, ks);
  }
  fa_store_rows(acc, os + warp * 16 * FA_LO, dqkv + ((size_t)b * t + i0 + warp * 16) * ld + h * FA_D,
                ld, qvalid - warp * 16);
}

// dK, dV: grid (⌈T/32⌉ key tiles, H, B), 64 threads; loops over the query tiles.
// dV = Pᵀ·dO, dK = dSᵀ·Q (scale folded into dS).
extern "C" __global__ void __launch_bounds__(64)
    flash_bwd_dkdv_bf16(const bf16 *qkv, const float *qkv_bias, const bf16 *d_o, const float *lse,
                        const float *dsum, bf16 *dqkv, int t, int heads, float scale) {
  __shared__ FaBwdTiles sh;
  __shared__ float lse_s[FA_T], d_s[FA_T];
  bf16 *qs = sh.qs, *dos = sh.dos, *ks = sh.ks, *vs = sh.vs, *ps = sh.ps;
  float *ss = sh.ss, *os = sh.os;
  const FaBlock k(qkv, qkv_bias, t, heads);  // the tile is of keys here: r is this lane's key
  const int b = k.b, h = k.h, j0 = k.row0, warp = k.warp, r = k.r, half = k.half;
  const size_t ld = k.ld, hd = k.hd;
  const bf16 *base = k.base;
  const int kvalid = min(FA_T, t - j0);
  fa_load(ks, base + hd + j0 * ld, ld, kvalid, k.bk);
  fa_load(vs, base + 2 * hd + j0 * ld, ld, kvalid, k.bv);
  fa_acc dk[FA_D / 16], dv[FA_D / 16];
  for (int n = 0; n < FA_D / 16; ++n) {
    wm::fill_fragment(dk[n], 0.f);
    wm::fill_fragment(dv[n], 0.f);
  }
  for (int i0 = 0; i0 < t; i0 += FA_T) {
    const int qvalid = min(FA_T, t - i0);
    __syncthreads();
    fa_load(qs, base + i0 * ld, ld, qvalid, k.bq);
    fa_load(dos, d_o + ((size_t)b * t + i0) * hd + h * FA_D, hd, qvalid, nullptr);
    if (threadIdx.x < FA_T) {
      const size_t srow = ((size_t)b * heads + h) * t + i0 + threadIdx.x;
      lse_s[threadIdx.x] = (int)threadIdx.x < qvalid ? lse[srow] : 0.f;
      d_s[threadIdx.x] = (int)threadIdx.x < qvalid ? dsum[srow] : 0.f;
    }
    __syncthreads();
    fa_abt(ks + warp * 16 * FA_LD, qs, ss + warp * 16 * FA_LS);  // Sᵀ: keys × queries
    __syncwarp();
    float pv[16];
    for (int c = 0; c < 16; ++c) {
      const int col = half * 16 + c;
      pv[c] = col < qvalid ? expf(ss[r * FA_LS + col] * scale - lse_s[col]) : 0.f;
      ps[r * FA_LP + col] = __float2bfloat16(pv[c]);
    }
    __syncwarp();
    fa_pb(dv, ps + warp * 16 * FA_LP, dos);
    fa_abt(vs + warp * 16 * FA_LD, dos, ss + warp * 16 * FA_LS);  // dPᵀ
    __syncwarp();
    for (int c = 0; c < 16; ++c) {
      const int col = half * 16 + c;
      ps[r * FA_LP + col] = __float2bfloat16(pv[c] * (ss[r * FA_LS + col] - d_s[col]) * scale);
    }
    __syncwarp();
    fa_pb(dk, ps + warp * 16 * FA_LP, qs);
  }
  bf16 *out = dqkv + ((size_t)b * t + j0 + warp * 16) * ld + h * FA_D;
  fa_store_rows(dk, os + warp * 16 * FA_LO, out + hd, ld, kvalid - warp * 16);
  __syncwarp();
  fa_store_rows(dv, os + warp * 16 * FA_LO, out + 2 * hd, ld, kvalid - warp * 16);
}
