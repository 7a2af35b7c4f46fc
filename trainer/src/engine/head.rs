//! The shared DINO head (udi-spec §2.4): h₁ = gelu(fc0(x)), h₂ = gelu(fc2(h₁)), z = fc4(h₂),
//! ẑ = z / max(‖z‖, 1e-12), logits = ẑ·Wᵀ with the weight-normalised W = g ⊙ V/‖V_row‖.
//!
//! Saved: the input rows, fc0/fc2 pre-bias products and GELU outputs, ‖z‖, ẑ and W (‖V_row‖ is
//! made again in W's backward). backward: dẑ = dlogits·W; dW = dlogitsᵀ·ẑ; dg = Σ_e dW ⊙ V/‖V‖,
//! dV = g/‖V‖ ⊙ (dW − V/‖V‖ ⊙ dg); dz = (dẑ − ẑ·(dẑ·ẑ))/‖z‖ (dẑ/eps below eps); then the three
//! linears in reverse.

use super::linear::Linear;
use super::{Grads, Ops};
use crate::kernels::{weight_norm, weight_norm_backward};
use candle_core::{Result, Tensor, D};

const L2_EPS: f64 = 1e-12;

pub struct Head {
    pub fc: [Linear; 3],
    pub g: Tensor,
    pub v: Tensor,
    pub g_id: usize,
    pub v_id: usize,
}

/// The normalised last layer W (compute dtype).
pub struct LastLayer {
    pub w: Tensor,
}

pub struct HeadSaved {
    x: Tensor,
    pre: [Tensor; 2],
    act: [Tensor; 2],
    z_norm: Tensor,
    z_hat: Tensor,
}

impl Head {
    pub fn last_layer(&self, ops: &Ops) -> Result<LastLayer> {
        let w = weight_norm(&self.v, &self.g, ops.cdt, ops.fused)?;
        Ok(LastLayer { w })
    }

    /// Input rows `[R, D]` (parameter dtype) → the L2-normalised bottleneck ẑ `[R, E]`
    /// (parameter dtype).
    pub fn bottleneck(
        &self,
        ops: &Ops,
        x: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<HeadSaved>)> {
        let x = x.to_dtype(ops.cdt)?;
        let (h1, pre0) = self.fc[0].forward_gelu(ops, &x)?;
        let (h2, pre1) = self.fc[1].forward_gelu(ops, &h1)?;
        let z = self.fc[2].forward(ops, &h2)?.to_dtype(ops.pdt)?;
        let z_norm = z.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let z_hat = z.broadcast_div(&z_norm.maximum(L2_EPS)?)?;
        let saved = save.then(|| HeadSaved {
            x,
            pre: [pre0, pre1],
            act: [h1, h2],
            z_norm,
            z_hat: z_hat.clone(),
        });
        Ok((z_hat, saved))
    }

    /// dlogits `[R, K]` (compute dtype) → d input rows `[R, D]` (parameter dtype). The last
    /// layer's gradient is computed while it is frozen too (the update then skips it): its norm
    /// is reported and counts in the logged global norm, as in the official code.
    pub fn backward(
        &self,
        ops: &Ops,
        s: &HeadSaved,
        last: &LastLayer,
        dlogits: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        {
            let dw = dlogits
                .t()?
                .matmul(&s.z_hat.to_dtype(ops.cdt)?)?
                .to_dtype(ops.pdt)?;
            let (dg, dv) = weight_norm_backward(&dw, &self.v, &self.g, ops.fused)?;
            grads.add(self.g_id, &dg)?;
            grads.add(self.v_id, &dv)?;
        }
        let dz_hat = dlogits.matmul(&last.w)?.to_dtype(ops.pdt)?;
        // Below eps the normalisation divides by the constant eps.
        let above = s.z_norm.gt(L2_EPS)?.to_dtype(ops.pdt)?;
        let proj = (&dz_hat * &s.z_hat)?
            .sum_keepdim(D::Minus1)?
            .broadcast_mul(&above)?;
        let dz = dz_hat
            .sub(&s.z_hat.broadcast_mul(&proj)?)?
            .broadcast_div(&s.z_norm.maximum(L2_EPS)?)?;
        let dz = dz.to_dtype(ops.cdt)?;
        let dh2 = self.fc[2]
            .backward(ops, &s.act[1], &dz, grads, true)?
            .expect("dx");
        let dh1 = self.fc[1].backward_gelu(ops, &s.act[0], &s.pre[1], &dh2, grads)?;
        let dx = self.fc[0].backward_gelu(ops, &s.x, &s.pre[0], &dh1, grads)?;
        dx.to_dtype(ops.pdt)
    }
}

impl LastLayer {
    /// ẑ `[R, E]` → logits `[R, K]` in the compute dtype.
    pub fn forward(&self, ops: &Ops, z_hat: &Tensor) -> Result<Tensor> {
        z_hat.to_dtype(ops.cdt)?.matmul(&self.w.t()?)
    }
}
