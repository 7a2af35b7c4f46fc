//! Linear layers over row matrices `[rows, d_in]` in the compute dtype.
//!
//! forward: y = x·Wᵀ + b; with GELU: h = gelu(u), u = x·Wᵀ + b, saving the pre-bias product
//! x·Wᵀ (the GELU input less its bias; the fused bias-GELU backward kernel reads it).
//! backward: dx = dy·W, dW = dyᵀ·x, db = Σ_rows dy. Weight and bias gradients are added to
//! [`Grads`] (`+=`: a layer used on several crop groups accumulates); dx is returned (`=`).
//! GEMMs read W and the transposes as strided views: nothing is copied.

use super::{Grads, Ops};
use crate::kernels::{bias_add, bias_gelu, bias_gelu_backward, col_sum};
use candle_core::{Result, Tensor};

pub struct Linear {
    /// `[d_out, d_in]` in the compute dtype.
    pub w: Tensor,
    /// `[d_out]` in the parameter dtype.
    pub b: Option<Tensor>,
    pub w_id: usize,
    pub b_id: Option<usize>,
}

impl Linear {
    pub fn forward(&self, ops: &Ops, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        match &self.b {
            Some(b) => bias_add(&y, b, ops.fused),
            None => Ok(y),
        }
    }

    /// x·Wᵀ alone: for a consumer that adds the bias in its own pass (the residual update).
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.w.t()?)
    }

    /// `(gelu(x·Wᵀ + b), x·Wᵀ)`: the output and what the backward keeps.
    pub fn forward_gelu(&self, ops: &Ops, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let y = x.matmul(&self.w.t()?)?;
        let b = self.b.as_ref().expect("GELU linears have a bias");
        Ok((bias_gelu(&y, b, ops.fused)?, y))
    }

    /// Weight/bias gradients of `dy` (rows of x) into `grads`; returns dx when `need_dx`.
    pub fn backward(
        &self,
        ops: &Ops,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        grads.add(self.w_id, &dy.t()?.matmul(x)?)?;
        if let (Some(b), Some(id)) = (&self.b, self.b_id) {
            grads.add(id, &col_sum(dy, b.dtype(), ops.fused)?)?;
        }
        if need_dx {
            Ok(Some(dy.matmul(&self.w)?))
        } else {
            Ok(None)
        }
    }

    /// GELU(y + b) again from the saved pre-bias product `y` (the same values as the forward's:
    /// the backward recomputes them instead of keeping them).
    pub fn gelu_of(&self, ops: &Ops, y: &Tensor) -> Result<Tensor> {
        bias_gelu(
            y,
            self.b.as_ref().expect("GELU linears have a bias"),
            ops.fused,
        )
    }

    /// Backward of [`Self::forward_gelu`] from its saved pre-bias product `y`; returns dx.
    pub fn backward_gelu(
        &self,
        ops: &Ops,
        x: &Tensor,
        y: &Tensor,
        dh: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let b = self.b.as_ref().expect("GELU linears have a bias");
        let (du, db) = bias_gelu_backward(y, b, dh, ops.fused)?;
        grads.add(self.w_id, &du.t()?.matmul(x)?)?;
        grads.add(self.b_id.expect("bias id"), &db)?;
        du.matmul(&self.w)
    }
}
