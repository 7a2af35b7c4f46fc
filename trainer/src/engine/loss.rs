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
use crate::kernels::{soft_ce_backward, soft_ce_rows};
use crate::loss::Targets;
use candle_core::{Result, Tensor};

/// The loss values of one step.
pub struct LossValues {
    pub total: f64,
    pub cls: f64,
    pub udi: f64,
    pub patch: f64,
}

/// Loss values and dlogits `[R, K]` (compute dtype) for the student head rows in the order
/// [cls of every crop; cls+ of every crop; patch rows] (`logits` `[R, K]`).
pub fn forward_backward(
    ops: &Ops,
    cfg: &LossConfig,
    tg: &Targets,
    logits: &Tensor,
    b: usize,
    n_local: usize,
) -> Result<(LossValues, Tensor)> {
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
    let mut sums = Vec::new();
    let mut grads = Vec::new();
    for (i, (first, rows, p, w)) in groups.iter().enumerate() {
        let s = logits.narrow(0, *first, *rows)?;
        let h = soft_ce_rows(&s, p, ts, ops.fused)?;
        // The patch rows' sum counts valid rows only.
        let is_patch = tg.udi.is_some() && i == groups.len() - 1;
        sums.push(match (&valid_rows, is_patch) {
            (Some((v, _)), true) => (h * v)?.sum_all()?,
            _ => h.sum_all()?,
        });
        grads.push(soft_ce_backward(&s, p, w, ts, ops.fused)?);
    }
    // One transfer for every value.
    let mut parts = sums.clone();
    if let Some((_, n)) = &valid_rows {
        parts.push(n.clone());
    }
    let vals = Tensor::stack(&parts, 0)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let n_l = if tg.cls_local.is_some() { 2 } else { 1 };
    let cls = vals[..n_l].iter().sum::<f64>() / norm;
    let (udi, patch) = match tg.udi {
        Some(_) => {
            let plus = vals[n_l..groups.len() - 1].iter().sum::<f64>() / norm;
            (plus, vals[groups.len() - 1] / vals[groups.len()])
        }
        None => (0.0, 0.0),
    };
    let total = w0 * cls + w1 * udi + w2 * patch;
    Ok((
        LossValues {
            total,
            cls,
            udi,
            patch,
        },
        Tensor::cat(&grads, 0)?,
    ))
}
