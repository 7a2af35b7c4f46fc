//! The three UDI losses of the student's head logits against the teacher's targets
//! ([`crate::loss::targets`]), with their gradient written in closed form.
//!
//! Every term is a weighted sum of row cross-entropies H(P, s) = −Σ_K P·log softmax(s/τ_s),
//! whose gradient is ∂H/∂s = (softmax(s/τ_s)·ΣP − P)/τ_s. With n_pairs = 2 + 2L:
//! L_cls and L_udi weigh each row 1/(B·n_pairs) (a local crop's target is the sum of both
//! views' distributions, ΣP = 2), L_patch weighs each valid row 1/#valid. The total is
//! w₀·L_cls + w₁·L_udi + w₂·L_patch. The last layer runs here too, a chunk of rows at a time
//! ([`forward_backward`]).

use super::head::LastLayer;
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

/// The loss values, dẑ `[R, E]` (parameter dtype) and the last layer's weight gradient dW
/// `[K, E]` (parameter dtype) for the student head rows ẑ `[R, E]` in the order [cls of every
/// crop; cls+ of every crop; patch rows].
///
/// The last layer, the cross-entropy and its gradient run `chunk_rows` rows at a time (a fused
/// linear cross-entropy, as Liger's): the `[rows, K]` logits and their gradient exist for one
/// chunk only, never for all R rows (R·K·4 bytes each: 1.9 GB at batch 128, K = 65 536). Each
/// chunk's dẑ and dW are complete, so nothing is recomputed.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    ops: &Ops,
    cfg: &LossConfig,
    tg: &Targets,
    z_hat: &Tensor,
    last: &LastLayer,
    b: usize,
    n_local: usize,
    chunk_rows: usize,
) -> Result<(LossValues, Tensor, Tensor)> {
    let ts = cfg.student_temp;
    let n_crops = (2 + n_local) * b;
    let norm = (b * (2 + 2 * n_local)) as f64;
    let [w0, w1, w2] = cfg.weights;
    let dev = z_hat.device();
    let pdt = ops.pdt;
    // Row groups: (first row, rows, target, per-row weight of the gradient, rows counted in the
    // value: all, or the valid patch rows).
    let mut groups: Vec<(usize, usize, &Tensor, Tensor, Option<Tensor>)> = Vec::new();
    let uniform = |n: usize, w: f64| Tensor::full(w, n, dev)?.to_dtype(pdt);
    groups.push((0, 2 * b, &tg.cls_global, uniform(2 * b, w0 / norm)?, None));
    if let Some(p) = &tg.cls_local {
        groups.push((
            2 * b,
            n_local * b,
            p,
            uniform(n_local * b, w0 / norm)?,
            None,
        ));
    }
    let mut n_valid = None;
    if let Some(u) = &tg.udi {
        groups.push((
            n_crops,
            2 * b,
            &u.plus_global,
            uniform(2 * b, w1 / norm)?,
            None,
        ));
        if let Some(p) = &u.plus_local {
            groups.push((
                n_crops + 2 * b,
                n_local * b,
                p,
                uniform(n_local * b, w1 / norm)?,
                None,
            ));
        }
        let valid = u.valid.flatten_all()?.to_dtype(pdt)?;
        let n = valid.sum_all()?;
        let w = (valid.broadcast_div(&n)? * w2)?;
        groups.push((2 * n_crops, valid.dim(0)?, &u.patch, w, Some(valid)));
        n_valid = Some(n);
    }
    let chunk_rows = chunk_rows.max(1);
    let mut sums = Vec::new();
    let mut dz = Vec::new();
    let mut dw: Option<Tensor> = None;
    for (first, rows, p, w, counted) in &groups {
        let mut sum: Option<Tensor> = None;
        // A target of P < rows rows serves row r from row r mod P (the local crops' [cls]
        // rows): chunks are then whole multiples of P and read all of it.
        let pr = p.dim(0)?;
        let step = match pr == *rows {
            true => chunk_rows,
            false => pr.max(chunk_rows / pr * pr),
        };
        for c in (0..*rows).step_by(step) {
            let n = step.min(rows - c);
            let z = z_hat.narrow(0, first + c, n)?;
            let s = last.forward(ops, &z)?;
            let p = match pr == *rows {
                true => p.narrow(0, c, n)?,
                false => (*p).clone(),
            };
            let h = soft_ce_rows(&s, &p, ts, ops.fused)?;
            let h = match counted {
                Some(v) => (h * v.narrow(0, c, n)?)?.sum_all()?,
                None => h.sum_all()?,
            };
            sum = Some(match sum {
                Some(a) => (a + h)?,
                None => h,
            });
            let g = soft_ce_backward(&s, &p, &w.narrow(0, c, n)?, ts, ops.fused)?;
            drop(s);
            let (dz_c, dw_c) = last.backward(ops, &z, &g)?;
            dz.push(dz_c);
            dw = Some(match dw {
                Some(a) => (a + dw_c)?,
                None => dw_c,
            });
        }
        sums.push(sum.expect("a row group has rows"));
    }
    // One transfer for every value.
    let mut parts = sums.clone();
    if let Some(n) = &n_valid {
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
        Tensor::cat(&dz, 0)?,
        dw.expect("rows"),
    ))
}
