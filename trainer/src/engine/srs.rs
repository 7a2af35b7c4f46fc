//! The SRS module (udi-spec §2.3) on the patch tokens X of one view and a row matrix R
//! `[B, n, N]` (one-hot S-rows on the student, bilinear T-rows on the teacher):
//! X̂ = LN₁(X); Q, K, V = split(X̂·Wqkvᵀ + b); O = attn(R·Q, K, V); o = O·Wprojᵀ + b (+ R·X̂ with
//! the skip connection); Z = LN(o). All-zero rows give zero queries, hence uniform attention:
//! the official "fill with 1e-9" result; those rows are masked out downstream.
//!
//! Saved: X (the LN₁ input), X̂, Q/K/V, R·Q and P, the merged heads, o.
//! backward: dO → post-LN → (skip: dX̂ += Rᵀ·do) → proj → attention → dQ = Rᵀ·d(RQ) →
//! qkv → dX̂ → LN₁ → dX.

use super::attention::{self, Composed};
use super::layernorm::LayerNorm;
use super::linear::Linear;
use super::{Grads, Ops};
use candle_core::{Result, Tensor};

pub struct Srs {
    pub norm1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm: LayerNorm,
    pub heads: usize,
    pub skip: bool,
}

pub struct SrsSaved {
    x: Tensor,
    x_hat: Tensor,
    rows: Tensor,
    attn: Composed,
    heads_out: Tensor,
    o: Tensor,
}

impl Srs {
    /// Patch tokens `x` `[B, N, D]` (parameter dtype), rows `[B, n, N]` → Z `[B·n, D]`
    /// (parameter dtype).
    pub fn forward(
        &self,
        ops: &Ops,
        x: &Tensor,
        rows: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<SrsSaved>)> {
        let (b, n_tok, d) = x.dims3()?;
        let h = self.heads;
        let n = rows.dim(1)?;
        let x = x.contiguous()?;
        let x_hat = self
            .norm1
            .forward(ops, &x.reshape((b * n_tok, d))?, ops.cdt)?;
        let (q_all, k, v) = attention::split_qkv(&self.qkv.forward(ops, &x_hat)?, b, n_tok, h)?;
        let rows = rows.to_dtype(ops.cdt)?;
        let q = rows
            .unsqueeze(1)?
            .broadcast_as((b, h, n, n_tok))?
            .contiguous()?
            .matmul(&q_all)?;
        let scale = ((d / h) as f64).powf(-0.5);
        let (o_heads, p) = attention::forward(ops, &q, &k, &v, scale)?;
        let heads_out = attention::merge_heads(&o_heads)?;
        let mut o = self.proj.forward(ops, &heads_out)?;
        if self.skip {
            let sel = rows
                .matmul(&x_hat.reshape((b, n_tok, d))?)?
                .reshape((b * n, d))?;
            o = (o + sel)?;
        }
        let z = self.norm.forward(ops, &o, ops.pdt)?;
        let saved = save.then(|| SrsSaved {
            x,
            x_hat,
            rows,
            attn: Composed { q, k, v, p },
            heads_out,
            o,
        });
        Ok((z, saved))
    }

    /// dZ `[B·n, D]` → dX `[B, N, D]` (parameter dtype).
    pub fn backward(
        &self,
        ops: &Ops,
        s: &SrsSaved,
        dz: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (b, n_tok, d) = s.x.dims3()?;
        let h = self.heads;
        let n = s.rows.dim(1)?;
        let d_o = self
            .norm
            .backward(ops, &s.o, dz, grads)?
            .to_dtype(ops.cdt)?;
        let rows_t = s.rows.t()?; // [B, N, n]
        let mut dx_hat = match self.skip {
            true => Some(rows_t.matmul(&d_o.reshape((b, n, d))?)?),
            false => None,
        };
        let dheads = self
            .proj
            .backward(ops, &s.heads_out, &d_o, grads, true)?
            .expect("dx");
        let scale = ((d / h) as f64).powf(-0.5);
        let d_oh = attention::split_heads(&dheads, b, h)?;
        let (dq, dk, dv) = attention::backward(ops, &s.attn, &d_oh, scale)?;
        let dq_all = rows_t
            .unsqueeze(1)?
            .broadcast_as((b, h, n_tok, n))?
            .contiguous()?
            .matmul(&dq)?;
        let dqkv = attention::merge_qkv(&dq_all, &dk, &dv)?;
        let mut dxh = self
            .qkv
            .backward(ops, &s.x_hat, &dqkv, grads, true)?
            .expect("dx");
        if let Some(skip) = dx_hat.take() {
            dxh = (dxh + skip.reshape((b * n_tok, d))?)?;
        }
        let dx = self
            .norm1
            .backward(ops, &s.x.reshape((b * n_tok, d))?, &dxh, grads)?;
        dx.reshape((b, n_tok, d))
    }
}
