//! Attention: per head, O = softmax(Q·Kᵀ·scale)·V.
//!
//! * A block's attention on its qkv rows ([`forward_rows`], [`backward_rows`]): with the fused
//!   kernels, one flash op reads Q, K, V in place (adding the qkv bias as it loads them) and
//!   writes the merged heads, saving only its output and the row log-sum-exps
//!   ([`crate::kernels::flash`]); otherwise the bias add and the composed core.
//! * The composed core ([`forward`], [`backward`], also the SRS module's, whose queries are row
//!   mixtures): Q `[B, H, n, dh]`, K, V `[B, H, N, dh]`; saves Q, K, V and the probabilities
//!   P `[B, H, n, N]`. backward: dP = dO·Vᵀ, dV = Pᵀ·dO, dS = scale·P⊙(dP − Σ_N P⊙dP),
//!   dQ = dS·K, dK = dSᵀ·Q; every transpose is a strided view read by the batched GEMM.

use super::Ops;
use crate::kernels::{attn_softmax, attn_softmax_backward, bias_add, flash};
use candle_core::{Result, Tensor};

/// What the composed core's backward reads.
pub struct Composed {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub p: Tensor,
}

/// What a block's attention backward reads.
pub enum AttnSaved {
    Composed(Composed),
    /// The qkv rows (before their bias), the bias and the flash op's packed output (O and the
    /// row log-sum-exps).
    Flash {
        qkv: Tensor,
        bias: Option<Tensor>,
        packed: Tensor,
    },
}

/// A block's attention on its qkv rows `[B·T, 3·H·dh]`, the projection's product before its
/// `bias` → the merged heads `[B·T, H·dh]`.
pub fn forward_rows(
    ops: &Ops,
    qkv: &Tensor,
    bias: Option<&Tensor>,
    b: usize,
    heads: usize,
    scale: f64,
    save: bool,
) -> Result<(Tensor, Option<AttnSaved>)> {
    let (rows, cols) = qkv.dims2()?;
    if ops.flash && flash::supported(qkv.device(), qkv.dtype(), cols / 3 / heads) {
        let out = flash::forward(qkv, bias, b, heads, scale, save)?;
        let saved = out.packed.map(|packed| AttnSaved::Flash {
            qkv: qkv.clone(),
            bias: bias.cloned(),
            packed,
        });
        return Ok((out.o, saved));
    }
    let qkv = match bias {
        Some(bias) => bias_add(qkv, bias, ops.fused)?,
        None => qkv.clone(),
    };
    let (q, k, v) = split_qkv(&qkv, b, rows / b, heads)?;
    let (o, p) = forward(ops, &q, &k, &v, scale)?;
    let saved = save.then(|| AttnSaved::Composed(Composed { q, k, v, p }));
    Ok((merge_heads(&o)?, saved))
}

/// d merged heads `[B·T, H·dh]` → dqkv `[B·T, 3·H·dh]`.
pub fn backward_rows(
    ops: &Ops,
    s: &AttnSaved,
    dheads: &Tensor,
    b: usize,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    match s {
        AttnSaved::Flash { qkv, bias, packed } => {
            let d_o = dheads.to_dtype(qkv.dtype())?;
            flash::backward(qkv, bias.as_ref(), packed, &d_o, b, heads, scale)
        }
        AttnSaved::Composed(c) => {
            let d_o = split_heads(dheads, b, heads)?;
            let (dq, dk, dv) = backward(ops, c, &d_o, scale)?;
            merge_qkv(&dq, &dk, &dv)
        }
    }
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
    s: &Composed,
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
