//! Differentiable building blocks.
//!
//! candle-nn's fused `LayerNorm` and `softmax_last_dim` have no backward pass (gradients
//! upstream silently vanish: candle issues #2168, #2977, #3011), so everything here is written
//! with plain tensor ops that candle can differentiate.

use candle_core::{DType, Result, Tensor, D};

/// `x · Wᵀ + b` over the last dimension, for inputs of any rank (flattened to 2-D for one gemm).
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("linear input has a last dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, d_in))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// LayerNorm over the last dimension with affine weight/bias (mean/var formulation).
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
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

/// Multi-head attention core: `softmax(q kᵀ · scale) v` for q [B,H,n,dh], k/v [B,H,N,dh].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let logits = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    softmax(&logits)?.matmul(&v.contiguous()?)
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
