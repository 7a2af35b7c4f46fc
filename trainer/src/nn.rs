//! Differentiable building blocks.
//!
//! candle-nn's fused `LayerNorm` and `softmax_last_dim` have no backward pass (gradients
//! upstream silently vanish: candle issues #2168, #2977, #3011), so the composed path is written
//! with plain tensor ops that candle can differentiate; the fused path ([`crate::kernels`]) uses
//! our custom ops, which carry their own backward.
//!
//! Precision ([`Compute`]): weights are the f32 masters; a [`Linear`] casts its input and weight
//! to the compute dtype (bf16 or the parameter dtype) per call, so autograd returns f32
//! gradients to the masters through the cast. [`LayerNorm`] computes its statistics in the
//! parameter dtype and writes the dtype its caller asks for.

use crate::kernels::{self, Compute};
use candle_core::{DType, Result, Tensor, D};

/// `x · Wᵀ + b` over the last dimension, for inputs of any rank (flattened to 2-D for one gemm),
/// computed and returned in the compute dtype.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub compute: Compute,
}

impl Linear {
    /// `x · Wᵀ` without the bias, `[rows, d_out]` plus the output shape.
    fn matmul(&self, x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let dt = self.compute.dtype(self.weight.dtype());
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("linear input has a last dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let w = self.weight.to_dtype(dt)?;
        let y = x.to_dtype(dt)?.reshape((rows, d_in))?.matmul(&w.t()?)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        Ok((y, out))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, out) = self.matmul(x)?;
        let y = match &self.bias {
            Some(b) => kernels::bias_add(&y, b, self.compute.fused())?,
            None => y,
        };
        y.reshape(out)
    }

    /// `gelu(x · Wᵀ + b)`: the bias and GELU fused into one op with `--kernels fused`.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let (y, out) = self.matmul(x)?;
        let y = match &self.bias {
            Some(b) => kernels::bias_gelu(&y, b, self.compute.fused())?,
            None => gelu(&y)?,
        };
        y.reshape(out)
    }
}

/// LayerNorm over the last dimension with affine weight/bias (mean/var formulation).
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub compute: Compute,
}

impl LayerNorm {
    /// Output in the parameter dtype (features, head inputs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_to(x, self.weight.dtype())
    }

    /// Output in the compute dtype (the input of a matmul).
    pub fn forward_compute(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_to(x, self.compute.dtype(self.weight.dtype()))
    }

    /// Statistics in the parameter dtype (f32 under bf16), output in `out`.
    pub fn forward_to(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        kernels::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
            out,
            self.compute.fused(),
        )
    }
}

/// Softmax over the last dimension (max subtracted; the max is a constant for the gradient).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let xs = x.broadcast_sub(&m)?;
    let lse = xs.exp()?.sum_keepdim(D::Minus1)?.log()?;
    xs.broadcast_sub(&lse)
}

/// `x / max(‖x‖₂, eps)` over the last dimension (torch `F.normalize`).
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(eps)?;
    x.broadcast_div(&n)
}

/// GELU, exact erf form.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Multi-head attention core: `softmax(q kᵀ · scale) v` for q [B,H,n,dh], k/v [B,H,N,dh]
/// (matmuls in the inputs' dtype, softmax statistics in f32).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, fused: bool) -> Result<Tensor> {
    // kᵀ as a strided view: cuBLAS reads it transposed (no copy).
    let logits = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    kernels::attn_softmax(&logits, scale, fused)?.matmul(&v.contiguous()?)
}

/// Splits `[B, T, 3·D]` qkv projections into q, k, v of shape `[B, H, T, D/H]` each.
pub fn split_heads(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    let dh = d3 / 3 / heads;
    let qkv = qkv
        .reshape((b, t, 3, heads, dh))?
        .permute((2, 0, 3, 1, 4))?;
    Ok((
        qkv.get(0)?.contiguous()?,
        qkv.get(1)?.contiguous()?,
        qkv.get(2)?.contiguous()?,
    ))
}

/// `[B, H, n, dh]` → `[B, n, H·dh]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, dh) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, n, h * dh))
}

/// A scalar tensor's value as f64 (any float dtype).
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
