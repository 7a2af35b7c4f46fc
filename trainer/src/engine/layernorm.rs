//! LayerNorm over the last dimension (eps from the config), statistics in f32 (the parameter
//! dtype), output in the dtype its consumer asks for.
//!
//! forward: y = (x − μ)·rstd·w + b. Saved for the backward: the input x itself (the residual
//! stream or an activation the forward keeps anyway); μ and rstd are recomputed from it by the
//! backward (one read of x, fused into the backward kernel).
//! backward: x̂ = (x − μ)·rstd, g = dy·w: dx = rstd·(g − mean g − x̂·mean(g·x̂)) (`=`),
//! dw += Σ dy·x̂, db += Σ dy. In a block the residual update runs in the same pass as the
//! LayerNorm after it ([`LayerNorm::forward_residual`]); backward, the stream's gradient is added
//! to dx and the next branch's gradient made in the same pass ([`LayerNorm::backward_residual`]).

use super::{Grads, Ops};
use crate::kernels::ln_residual::{layer_norm_backward_residual, residual_add_layer_norm, Branch};
use crate::kernels::{layer_norm, layer_norm_backward};
use candle_core::{DType, Result, Tensor};

pub struct LayerNorm {
    pub w: Tensor,
    pub b: Tensor,
    pub w_id: usize,
    pub b_id: usize,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, ops: &Ops, x: &Tensor, out: DType) -> Result<Tensor> {
        layer_norm(x, &self.w, &self.b, self.eps, out, ops.fused)
    }

    /// The residual update before this LayerNorm and the LayerNorm itself: y = x + m·(a + ab)
    /// (x's dtype and shape; `m` per sample; `ab` the branch's last bias, not yet added to its
    /// product `a`) and LN(y) as rows in `out`.
    pub fn forward_residual(
        &self,
        ops: &Ops,
        x: &Tensor,
        a: &Tensor,
        ab: Option<&Tensor>,
        m: Option<&Tensor>,
        out: DType,
    ) -> Result<(Tensor, Tensor)> {
        residual_add_layer_norm(x, a, ab, m, &self.w, &self.b, self.eps, out, ops.fused)
    }

    /// Returns dx (x's dtype); dw, db into `grads`.
    pub fn backward(
        &self,
        ops: &Ops,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (dx, dw, db) = layer_norm_backward(x, &self.w, dy, self.eps, ops.fused)?;
        grads.add(self.w_id, &dw)?;
        grads.add(self.b_id, &db)?;
        Ok(dx)
    }

    /// A pre-norm branch's LayerNorm backward inside the residual stream: returns
    /// dres + dx (dres's shape and dtype) and, with `branch`, that times the next branch's
    /// per-sample multipliers in its dtype; dw, db into `grads`.
    pub fn backward_residual(
        &self,
        ops: &Ops,
        x: &Tensor,
        dy: &Tensor,
        dres: &Tensor,
        branch: Option<Branch<'_>>,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let g = layer_norm_backward_residual(x, &self.w, dy, dres, self.eps, branch, ops.fused)?;
        grads.add(self.w_id, &g.dw)?;
        grads.add(self.b_id, &g.db)?;
        Ok((g.dx, g.branch))
    }
}
