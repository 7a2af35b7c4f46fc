// The trainer's own CUDA kernels. Compiled to PTX by trainer/build.rs with the
// same nvcc as candle's kernels; loaded at run time by trainer::kernels (one module, "udi_kernels").
// Every kernel has a CPU reference in the Rust op that launches it (`cpu_fwd`); `trainer
// kernel-check --device cuda` compares the two.
//
// Conventions: every tensor is contiguous; statistics and accumulations are f32 whatever the
// storage type; activations are f32 or bf16 (suffix _f32 / _bf16 / _f32_bf16 = input_output).
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

// Sum over the block; every thread gets the result. `sh` holds 32 floats. Safe to call
// repeatedly (leading barrier protects `sh` from the previous call's readers).
__device__ float block_sum(float v, float *sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < nwarps ? sh[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ float block_max(float v, float *sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < nwarps ? sh[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
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
  extern "C" __global__ void ln_fwd_##SUF(const TI *x, const float *w, const float *b, TO *y,     \
                                          int d, float eps) {                                    \
    ln_fwd<TI, TO>(x, w, b, y, d, eps);                                                          \
  }                                                                                              \
  extern "C" __global__ void ln_bwd_dx_##SUF(const TI *x, const float *w, const TO *dy, TI *dx,   \
                                             int d, float eps) {                                 \
    ln_bwd_dx<TI, TO>(x, w, dy, dx, d, eps);                                                     \
  }                                                                                              \
  extern "C" __global__ void ln_bwd_wb_##SUF(const TI *x, const TO *dy, float *dwdb, int rows,    \
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
// dx[i] = dy[i]·gelu'(x[i] + b[i mod d])  (db = Σ_rows dx, reduced by the caller).
template <typename T>
__device__ void bias_gelu_bwd(const T *x, const float *b, const T *dy, T *dx, size_t n, int d) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dx[i] = from_f<T>(to_f(dy[i]) * gelu_erf_grad(to_f(x[i]) + b[i % d]));
}
#define BG_INST(SUF, T)                                                                          \
  extern "C" __global__ void bias_gelu_fwd_##SUF(const T *x, const float *b, T *y, size_t n,      \
                                                 int d) {                                        \
    bias_gelu_fwd<T>(x, b, y, n, d);                                                             \
  }                                                                                              \
  extern "C" __global__ void bias_gelu_bwd_##SUF(const T *x, const float *b, const T *dy, T *dx,  \
                                                 size_t n, int d) {                              \
    bias_gelu_bwd<T>(x, b, dy, dx, n, d);                                                        \
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

// ---- the head's softmax / cross-entropy (K up to 65 536, one block per row) ------------------
// Teacher targets: p[r, k] = softmax_k((t[r, k] − c[k]) / tau)  (f32 out, no backward).
template <typename T>
__device__ void centered_softmax(const T *t, const float *c, float *p, int k, float inv_tau) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  t += row * k;
  p += row * k;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < k; j += blockDim.x) m = fmaxf(m, (to_f(t[j]) - c[j]) * inv_tau);
  m = block_max(m, sh);
  float s = 0.f;
  for (int j = threadIdx.x; j < k; j += blockDim.x) s += expf((to_f(t[j]) - c[j]) * inv_tau - m);
  const float inv = 1.f / block_sum(s, sh);
  for (int j = threadIdx.x; j < k; j += blockDim.x) p[j] = expf((to_f(t[j]) - c[j]) * inv_tau - m) * inv;
}

// Teacher entropy (monitoring): h[r] = H(softmax((t[r] − c)/tau)) = log S − Σ e·(z − m)/S.
template <typename T>
__device__ void centered_entropy(const T *t, const float *c, float *h, int k, float inv_tau) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  t += row * k;
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
}
extern "C" __global__ void centered_entropy_f32(const float *t, const float *c, float *h, int k, float it) {
  centered_entropy<float>(t, c, h, k, it);
}
extern "C" __global__ void centered_entropy_bf16(const bf16 *t, const float *c, float *h, int k, float it) {
  centered_entropy<bf16>(t, c, h, k, it);
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

#define CE_INST(SUF, T)                                                                          \
  extern "C" __global__ void centered_softmax_##SUF(const T *t, const float *c, float *p, int k,  \
                                                    float inv_tau) {                             \
    centered_softmax<T>(t, c, p, k, inv_tau);                                                    \
  }                                                                                              \
  extern "C" __global__ void soft_ce_fwd_##SUF(const T *s, const float *p, float *loss, int k,    \
                                               int p_rows, float inv_tau) {                      \
    soft_ce_fwd<T>(s, p, loss, k, p_rows, inv_tau);                                              \
  }                                                                                              \
  extern "C" __global__ void soft_ce_bwd_##SUF(const T *s, const float *p, const float *g, T *ds, \
                                               int k, int p_rows, float inv_tau) {               \
    soft_ce_bwd<T>(s, p, g, ds, k, p_rows, inv_tau);                                             \
  }
CE_INST(f32, float)
CE_INST(bf16, bf16)

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
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  float s = 0.f;
  for (int j = lane; j < n; j += 32) s += expf(to_f(x[j]) * scale - m);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
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
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
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
