//! Linear layers over row matrices `[rows, d_in]` in the compute dtype.
//!
//! forward: y = x·Wᵀ + b; with GELU: h = gelu(u), u = x·Wᵀ + b, saving the pre-bias product
//! x·Wᵀ (the GELU input less its bias; the fused bias-GELU backward kernel reads it).
//! backward: dx = dy·W, dW = dyᵀ·x, db = Σ_rows dy. Weight and bias gradients are added to
//! [`Grads`] (`+=`: a layer used on several crop groups accumulates); dx is returned (`=`).
//! GEMMs read W and the transposes as strided views: nothing is copied.

use super::{Grads, Ops};
use crate::kernels::{
    bias_add, bias_gelu, bias_gelu_backward, bias_gelu_backward_recompute, col_sum,
};
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
            Ok(Some(self.input_grad(dy)?))
        } else {
            Ok(None)
        }
    }

    /// dx = dy·W alone: for a backward that needs it before the weight gradient's input exists.
    pub fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        dy.matmul(&self.w)
    }

    /// The GELU's backward from the saved pre-bias product `y` when its output was not kept:
    /// returns du (the bias gradient added to `grads`) and overwrites `y` with the output
    /// gelu(y + b) again, bit for bit the forward's, both from one pass over y. The weight
    /// gradient and dx follow in [`Self::backward_product`] once the layer's input is at hand.
    pub fn gelu_backward_recompute(
        &self,
        ops: &Ops,
        y: &Tensor,
        dh: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let b = self.b.as_ref().expect("GELU linears have a bias");
        let (du, db) = bias_gelu_backward_recompute(y, b, dh, ops.fused)?;
        grads.add(self.b_id.expect("bias id"), &db)?;
        Ok(du)
    }

    /// The weight gradient of the product's gradient `du` (rows of x) into `grads`; returns dx.
    pub fn backward_product(&self, x: &Tensor, du: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        grads.add(self.w_id, &du.t()?.matmul(x)?)?;
        self.input_grad(du)
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
        grads.add(self.b_id.expect("bias id"), &db)?;
        self.backward_product(x, &du, grads)
    }
}
