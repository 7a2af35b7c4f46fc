//! The three UDI losses of the student's head logits against the teacher's targets
//! ([`crate::loss::targets`]), with their gradient written in closed form.
//!
//! Every term is a weighted sum of row cross-entropies H(P, s) = −Σ_K P·log softmax(s/τ_s),
//! whose gradient is ∂H/∂s = (softmax(s/τ_s)·ΣP − P)/τ_s. With n_pairs = 2 + 2L:
//! L_cls and L_udi weigh each row 1/(B·n_pairs) (a local crop's target is the sum of both
//! views' distributions, ΣP = 2), L_patch weighs each valid row 1/#valid. The total is
//! w₀·L_cls + w₁·L_udi + w₂·L_patch.

use super::Ops;
use crate::config::LossConfig;
use crate::kernels::soft_ce_in_place;
use crate::loss::Targets;
use candle_core::{Result, Tensor};

/// The loss values of one step.
pub struct LossValues {
    pub total: f64,
    pub cls: f64,
    pub udi: f64,
    pub patch: f64,
}

/// The loss as it leaves the device: the row groups' sums (and the valid patch-row count), read
/// by the step with its other values in one transfer, then combined on the host.
pub struct LossParts {
    /// f64 `[groups (+ 1)]` on the device.
    pub sums: Tensor,
    /// Groups of [cls] rows (1, or 2 with local crops); the [cls+] groups follow, then the
    /// patch group and its count when `udi`.
    n_cls: usize,
    udi: bool,
    norm: f64,
    weights: [f64; 3],
}

impl LossParts {
    /// The values from `sums` as read back.
    pub fn values(&self, sums: &[f64]) -> LossValues {
        let [w0, w1, w2] = self.weights;
        let cls = sums[..self.n_cls].iter().sum::<f64>() / self.norm;
        let (udi, patch) = match self.udi {
            true => {
                let n = sums.len();
                let plus = sums[self.n_cls..n - 2].iter().sum::<f64>() / self.norm;
                (plus, sums[n - 2] / sums[n - 1])
            }
            false => (0.0, 0.0),
        };
        LossValues {
            total: w0 * cls + w1 * udi + w2 * patch,
            cls,
            udi,
            patch,
        }
    }

    /// Reads the sums (one transfer) and combines them.
    pub fn read(&self) -> Result<LossValues> {
        Ok(self.values(&self.sums.to_vec1::<f64>()?))
    }
}

/// Loss parts and dlogits `[R, K]` (compute dtype) for the student head rows in the order
/// [cls of every crop; cls+ of every crop; patch rows] (`logits` `[R, K]`). Each row group's
/// value and gradient come from one pass over its rows, which writes the gradient over the
/// logits: the returned dlogits are the logits' own buffer.
pub fn forward_backward(
    ops: &Ops,
    cfg: &LossConfig,
    tg: &Targets,
    logits: Tensor,
    b: usize,
    n_local: usize,
) -> Result<(LossParts, Tensor)> {
    let ts = cfg.student_temp;
    let n_crops = (2 + n_local) * b;
    let norm = (b * (2 + 2 * n_local)) as f64;
    let [w0, w1, w2] = cfg.weights;
    let dev = logits.device();
    let pdt = ops.pdt;
    // Row groups: (first row, rows, target, per-row weight of the value and the gradient).
    let mut groups: Vec<(usize, usize, &Tensor, Tensor)> = Vec::new();
    let uniform = |n: usize, w: f64| Tensor::full(w, n, dev)?.to_dtype(pdt);
    groups.push((0, 2 * b, &tg.cls_global, uniform(2 * b, w0 / norm)?));
    if let Some(p) = &tg.cls_local {
        groups.push((2 * b, n_local * b, p, uniform(n_local * b, w0 / norm)?));
    }
    let mut valid_rows = None;
    if let Some(u) = &tg.udi {
        groups.push((n_crops, 2 * b, &u.plus_global, uniform(2 * b, w1 / norm)?));
        if let Some(p) = &u.plus_local {
            groups.push((
                n_crops + 2 * b,
                n_local * b,
                p,
                uniform(n_local * b, w1 / norm)?,
            ));
        }
        let valid = u.valid.flatten_all()?.to_dtype(pdt)?;
        let n_valid = valid.sum_all()?;
        let w = (valid.broadcast_div(&n_valid)? * w2)?;
        groups.push((2 * n_crops, valid.dim(0)?, &u.patch, w));
        valid_rows = Some((valid, n_valid));
    }
    let covered: usize = groups.iter().map(|g| g.1).sum();
    if covered != logits.dim(0)? {
        candle_core::bail!(
            "loss: the row groups cover {covered} of {} head rows",
            logits.dim(0)?
        );
    }
    let mut sums = Vec::new();
    for (i, (first, rows, p, w)) in groups.iter().enumerate() {
        let s = logits.narrow(0, *first, *rows)?;
        let h = soft_ce_in_place(&s, p, w, ts, ops.fused)?;
        // The patch rows' sum counts valid rows only.
        let is_patch = tg.udi.is_some() && i == groups.len() - 1;
        sums.push(match (&valid_rows, is_patch) {
            (Some((v, _)), true) => (h * v)?.sum_all()?,
            _ => h.sum_all()?,
        });
    }
    let mut parts = sums;
    if let Some((_, n)) = &valid_rows {
        parts.push(n.clone());
    }
    Ok((
        LossParts {
            sums: Tensor::stack(&parts, 0)?.to_dtype(candle_core::DType::F64)?,
            n_cls: if tg.cls_local.is_some() { 2 } else { 1 },
            udi: tg.udi.is_some(),
            norm,
            weights: cfg.weights,
        },
        logits,
    ))
}
