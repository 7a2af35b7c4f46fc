//! The attention core shared by the blocks and the SRS module: per head,
//! O = softmax(Q·Kᵀ·scale)·V for Q `[B, H, n, dh]`, K, V `[B, H, N, dh]`.
//!
//! Saved for the backward: Q, K, V and the probabilities P `[B, H, n, N]` (compute dtype).
//! backward: dP = dO·Vᵀ, dV = Pᵀ·dO, dS = scale·P⊙(dP − Σ_N P⊙dP), dQ = dS·K, dK = dSᵀ·Q.
//! Every transpose is a strided view read by the batched GEMM.

use super::Ops;
use crate::kernels::{attn_softmax, attn_softmax_backward};
use candle_core::{Result, Tensor};

/// What the backward reads.
pub struct AttnSaved {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub p: Tensor,
}

/// `(O, P)`.
pub fn forward(
    ops: &Ops,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let p = attn_softmax(&q.matmul(&k.t()?)?, scale, ops.fused)?;
    Ok((p.matmul(v)?, p))
}

/// `(dQ, dK, dV)`.
pub fn backward(
    ops: &Ops,
    s: &AttnSaved,
    d_o: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dp = d_o.matmul(&s.v.t()?)?;
    let dv = s.p.t()?.matmul(d_o)?;
    let ds = attn_softmax_backward(&s.p, &dp, scale, ops.fused)?;
    Ok((ds.matmul(&s.k)?, ds.t()?.matmul(&s.q)?, dv))
}

/// `[B, T, 3·H·dh]` rows of a qkv projection → q, k, v `[B, H, T, dh]` (contiguous).
pub fn split_qkv(
    qkv: &Tensor,
    b: usize,
    t: usize,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dh = qkv.dim(1)? / 3 / heads;
    let x = qkv
        .reshape((b, t, 3, heads, dh))?
        .permute((2, 0, 3, 1, 4))?;
    Ok((
        x.get(0)?.contiguous()?,
        x.get(1)?.contiguous()?,
        x.get(2)?.contiguous()?,
    ))
}

/// The inverse of [`split_qkv`] for the gradients: `[B·T, 3·H·dh]`.
pub fn merge_qkv(dq: &Tensor, dk: &Tensor, dv: &Tensor) -> Result<Tensor> {
    let (b, h, t, dh) = dq.dims4()?;
    Tensor::stack(&[dq, dk, dv], 0)?
        .permute((1, 3, 0, 2, 4))?
        .contiguous()?
        .reshape((b * t, 3 * h * dh))
}

/// `[B, H, n, dh]` → rows `[B·n, H·dh]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, dh) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b * n, h * dh))
}

/// Rows `[B·n, H·dh]` → `[B, H, n, dh]` (contiguous).
pub fn split_heads(x: &Tensor, b: usize, heads: usize) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    x.reshape((b, rows / b, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()
}
