//! The UDI loss (udi-spec §3): L_cls, L_udi and L_patch with three centres, the multimodal
//! target on raw logits, and the centre updates.
//!
//! Shapes follow [`crate::model`]: student crops g0, g1, l0.. (B rows each), teacher views
//! view-major, pairs as in [`crate::data`]. With `n_pairs = 2 + 2L`:
//!
//! * L_cls = (1/n_pairs)·[Σ_v mean_b H(P0(t_cls[v̄]), s_cls[g_v]) + Σ_k Σ_t mean_b H(P0(t_cls[t]), s_cls[l_k])]
//! * L_udi: the same pairs with s_cls+ and P1 of the multimodal targets
//!   mm = α·Σ_valid rows / (n_valid + 1e-5) + (1−α)·t_cls (logits).
//! * L_patch = Σ_{valid rows of both global pairs} H(P2(t_pat), s_pat) / #valid rows.
//! * P_j(x) = softmax((x − c_j)/τ_t), H(P, s) = −Σ P·log_softmax(s/τ_s).

use crate::config::LossConfig;
use crate::data::TrainBatch;
use crate::kernels::{
    centered_softmax_entropy, col_sum, local_multimodal_targets, other_view,
    other_view_softmax_entropy, other_view_weighted_sum, soft_ce_rows,
};
use crate::model::{StudentOut, TeacherOut};
use candle_core::{DType, Device, Result, Tensor};

/// The three centres c₀ ([cls]), c₁ (multimodal), c₂ (patch), each `[K]`.
#[derive(Clone, Debug)]
pub struct Centres {
    pub cls: Tensor,
    pub udi: Tensor,
    pub patch: Tensor,
}

impl Centres {
    pub fn zeros(k: usize, dtype: DType, device: &Device) -> Result<Self> {
        let z = Tensor::zeros(k, dtype, device)?;
        Ok(Self {
            cls: z.clone(),
            udi: z.clone(),
            patch: z,
        })
    }
    /// ‖c₀‖, ‖c₁‖, ‖c₂‖ in f64, `[3]` on the device (read with the step's other values).
    pub fn norms(&self) -> Result<Tensor> {
        let norm = |c: &Tensor| c.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt();
        Tensor::stack(&[norm(&self.cls)?, norm(&self.udi)?, norm(&self.patch)?], 0)
    }

    /// The centres of a checkpoint map (`center.{cls,udi,patch}`, shape `[k]`), in `dtype` on
    /// `device`, each in a buffer of its own.
    pub fn from_map(
        map: &std::collections::HashMap<String, Tensor>,
        k: usize,
        dtype: DType,
        device: &Device,
        what: &str,
    ) -> anyhow::Result<Self> {
        let c = |name: &str| -> anyhow::Result<Tensor> {
            let t = map
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("{what}: missing {name}"))?;
            anyhow::ensure!(t.dims() == [k], "{what}: {name} has shape {:?}", t.dims());
            Ok(t.to_dtype(dtype)?.to_device(device)?.copy()?.detach())
        };
        Ok(Self {
            cls: c("center.cls")?,
            udi: c("center.udi")?,
            patch: c("center.patch")?,
        })
    }

    /// `c ← m·c + (1 − m)·batch` for each centre (udi-spec §3.4).
    pub fn ema(&self, batch: &Centres, m: f64) -> Result<Centres> {
        let e = |c: &Tensor, b: &Tensor| (c * m)? + (b * (1.0 - m))?;
        Ok(Centres {
            cls: e(&self.cls, &batch.cls)?,
            udi: e(&self.udi, &batch.udi)?,
            patch: e(&self.patch, &batch.patch)?,
        })
    }

    /// `[("center.cls", c₀), ("center.udi", c₁), ("center.patch", c₂)]`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("center.cls".into(), self.cls.clone()),
            ("center.udi".into(), self.udi.clone()),
            ("center.patch".into(), self.patch.clone()),
        ]
    }
}

/// Loss terms (scalar tensors; `total` carries the student graph) and the new centres.
pub struct LossOut {
    pub total: Tensor,
    pub cls: Tensor,
    pub udi: Tensor,
    pub patch: Tensor,
    pub new_centres: Centres,
    /// Mean entropy (nats) of the teacher distributions P0, P1, P2 (P2 over valid rows), f64
    /// `[3]` on the device.
    pub teacher_entropy: Tensor,
}

/// Σ_rows −Σ_K p·log_softmax(s/τ_s) (p broadcast over leading groups of s's rows).
fn ce_sum(s: &Tensor, p: &Tensor, tau_s: f64, fused: bool) -> Result<Tensor> {
    soft_ce_rows(s, p, tau_s, fused)?.sum_all()
}

/// Mean over rows (weighted by 0/1 `weights` if given; 0 when none is set) of the teacher
/// entropies `h` (one per row, from [`centered_softmax_entropy`]), as an f64 scalar left on the
/// device: the step reads it with its other values in one transfer.
fn mean_entropy(h: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        Some(w) => {
            let n = w.sum_all()?.to_dtype(DType::F64)?;
            let s = (h * w)?.sum_all()?.to_dtype(DType::F64)?;
            // With no weight set the sum is 0 too, and 0/MIN_POSITIVE = 0.
            s.div(&n.maximum(f64::MIN_POSITIVE)?)
        }
        None => h.mean_all()?.to_dtype(DType::F64),
    }
}

/// The teacher's side of one step (no gradient): the target distribution of every student
/// row and the updated centres. Row groups follow [`crate::model::StudentOut`].
pub struct Targets {
    /// P0 target of the student [cls] rows of the global views `[2B, K]` (view v reads teacher
    /// view v̄).
    pub cls_global: Tensor,
    /// P0(view 0) + P0(view 1) per image `[B, K]`: the (two-term) target of every local crop's
    /// [cls] row (row k·B + b reads row b).
    pub cls_local: Option<Tensor>,
    /// The [cls+] and patch targets (`None` with `dino_only`).
    pub udi: Option<UdiTargets>,
    /// This batch's means of the teacher logits that update the centres (udi-spec §3.4; data-
    /// parallel training averages them over the ranks before the update).
    pub batch_centres: Centres,
    /// Mean entropy (nats) of the teacher distributions P0, P1, P2 (P2 over valid rows), f64
    /// `[3]` on the device.
    pub teacher_entropy: Tensor,
}

impl Targets {
    /// The centres updated with this batch alone (udi-spec §3.4). With `dino_only` only c₀
    /// moves: the others are kept as they are, since their EMA with themselves is not exact in
    /// floating point.
    pub fn new_centres(&self, centres: &Centres, m: f64) -> Result<Centres> {
        let ema = centres.ema(&self.batch_centres, m)?;
        Ok(match self.udi {
            Some(_) => ema,
            None => Centres {
                cls: ema.cls,
                udi: centres.udi.clone(),
                patch: centres.patch.clone(),
            },
        })
    }
}

/// Targets of the [cls+] and patch rows.
pub struct UdiTargets {
    /// P1 of the multimodal targets of the global views `[2B, K]`.
    pub plus_global: Tensor,
    /// Σ_t P1(mm_l[k, t]) per local crop row `[L·B, K]` (crop-major).
    pub plus_local: Option<Tensor>,
    /// P2 of the teacher patch logits, row r of student view v's S-rows `[2B·n_g, K]`.
    pub patch: Tensor,
    /// Validity of those rows `[2, B, n_g]`.
    pub valid: Tensor,
}

/// Computes the targets and this batch's centres (udi-spec §3.2–§3.4) from the teacher's
/// outputs. Logits may be bf16: they are read in the centres' dtype (f32).
pub fn targets(
    cfg: &LossConfig,
    batch: &TrainBatch,
    t: &TeacherOut,
    centres: &Centres,
    teacher_temp: f64,
    fused: bool,
) -> Result<Targets> {
    let dt = centres.cls.dtype();
    let t_cls_logits = t.cls.to_dtype(dt)?;
    // Each target distribution and its entropy (monitoring) from one pass over the logits.
    let teacher_probs = |x: &Tensor, c: &Tensor, tau: f64| -> Result<(Tensor, Tensor)> {
        centered_softmax_entropy(x, c, tau, fused)
    };
    let b = batch.batch_size;
    let l = batch.n_local;
    let tau = teacher_temp;
    let k = t_cls_logits.dim(1)?;

    // ---- [cls] targets ---------------------------------------------------------------------
    let t_cls = t_cls_logits.reshape((2, b, k))?;
    let (p0, h0) = teacher_probs(&t_cls, &centres.cls, tau)?;
    let cls_global = other_view(&p0)?.reshape((2 * b, k))?;
    // Every local crop k (rows k·B + b) against both views' targets of image b.
    let cls_local = if l > 0 {
        Some((p0.get(0)? + p0.get(1)?)?)
    } else {
        None
    };
    let batch_cls = t_cls_logits.mean(0)?;
    let h0 = mean_entropy(&h0, None)?;

    let Some(rows) = &t.rows else {
        // dino_only: L_cls alone; the other centres do not move ([`Targets::new_centres`]).
        return Ok(Targets {
            cls_global,
            cls_local,
            udi: None,
            batch_centres: Centres {
                cls: batch_cls,
                udi: centres.udi.clone(),
                patch: centres.patch.clone(),
            },
            teacher_entropy: Tensor::cat(
                &[h0.reshape(1)?, Tensor::zeros(2, DType::F64, h0.device())?],
                0,
            )?,
        });
    };
    let n_g = batch.student_rows.dim(1)?;

    // ---- teacher patch logits per pair -----------------------------------------------------
    // Global: teacher view u holds pair ū's rows, so pair v (student view v) reads view v̄: the
    // ops below read the other view's rows of the logits as they are (no swapped copy or cast).
    let tg = rows.global(n_g)?.reshape((2, b, n_g, k))?; // by teacher view
    let vg = &batch.valid_g; // [2, B, n_g] by pair

    // ---- multimodal targets (raw logits) ---------------------------------------------------
    let alpha = cfg.alpha;
    let sum_g = other_view_weighted_sum(&tg, vg, fused)?; // [2, B, K]
    let avg_g = sum_g.broadcast_div(&(vg.sum_keepdim(2)? + 1e-5)?)?; // [2, B, K]
    let mm_g = ((avg_g * alpha)? + (other_view(&t_cls)? * (1.0 - alpha))?)?; // [2, B, K] by student view
    let mut mm_sum = mm_g.sum((0, 1))?;
    let (plus_global, h1_g) = teacher_probs(&mm_g, &centres.udi, tau)?;
    let plus_global = plus_global.reshape((2 * b, k))?;
    let mut h1_sum = (mean_entropy(&h1_g, None)? * (2 * b) as f64)?;
    let mut patch_sum = sum_g.sum((0, 1))?;
    let mut plus_local = None;
    if l > 0 {
        // Local T-rows [t, b, k, r] pooled over r (and, for c₂, over everything): [2, B, L, K]
        // and [K].
        let (avg_l, local_sum) = rows.local_pool(n_g, &batch.valid_l, dt)?;
        // mm_l[t, b, k] = α·avg_l[t, b, k] + (1−α)·t_cls[t, b], blended inside the targets' op;
        // its sum over the 2·B·L rows from the two terms' column sums.
        let (p1_l, h1_l) =
            local_multimodal_targets(&avg_l, &t_cls, &centres.udi, alpha, tau, fused)?; // [L, B, K]
        let cls_sum = t_cls.sum((0, 1))?;
        mm_sum = ((mm_sum + (col_sum(&avg_l, dt, fused)? * alpha)?)?
            + (cls_sum * ((1.0 - alpha) * l as f64))?)?;
        plus_local = Some(p1_l.reshape((l * b, k))?);
        h1_sum = (h1_sum + (mean_entropy(&h1_l, None)? * (2 * b * l) as f64)?)?;
        patch_sum = (patch_sum + local_sum)?;
    }
    let batch_udi = (mm_sum / ((2 * b + 2 * b * l) as f64))?;
    let h1 = (h1_sum / (2 * b + 2 * b * l) as f64)?;

    // ---- patch targets (global views only) --------------------------------------------------
    let (p2, h2) = other_view_softmax_entropy(&tg, &centres.patch, tau, fused)?;
    let h2 = mean_entropy(&h2, Some(vg))?;
    // c₂ count: the sum of the bilinear row sums of every T-row (global and local pairs).
    let count = batch.teacher_rows.sum_all()?;
    let batch = Centres {
        cls: batch_cls,
        udi: batch_udi,
        patch: patch_sum.broadcast_div(&count)?,
    };
    Ok(Targets {
        cls_global,
        cls_local,
        udi: Some(UdiTargets {
            plus_global,
            plus_local,
            patch: p2.reshape((2 * b * n_g, k))?,
            valid: vg.clone(),
        }),
        batch_centres: batch,
        teacher_entropy: Tensor::stack(&[h0, h1, h2], 0)?,
    })
}

/// Computes the loss and the updated centres with composed ops. `teacher` outputs must carry no
/// gradient.
pub fn udi_loss(
    cfg: &LossConfig,
    batch: &TrainBatch,
    s: &StudentOut,
    t: &TeacherOut,
    centres: &Centres,
    teacher_temp: f64,
) -> Result<LossOut> {
    udi_loss_with(cfg, batch, s, t, centres, teacher_temp, false)
}

/// [`udi_loss`] with the teacher softmax and the student cross-entropy as fused ops when
/// `fused`. The student's log-softmax is computed in f32 either way.
pub fn udi_loss_with(
    cfg: &LossConfig,
    batch: &TrainBatch,
    s: &StudentOut,
    t: &TeacherOut,
    centres: &Centres,
    teacher_temp: f64,
    fused: bool,
) -> Result<LossOut> {
    let tg = targets(cfg, batch, t, centres, teacher_temp, fused)?;
    let new_centres = tg.new_centres(centres, cfg.center_momentum)?;
    let ts = cfg.student_temp;
    let b = batch.batch_size;
    let l = batch.n_local;
    let norm = (b * (2 + 2 * l)) as f64;

    let mut l_cls = ce_sum(&s.cls.narrow(0, 0, 2 * b)?, &tg.cls_global, ts, fused)?;
    if let Some(p) = &tg.cls_local {
        l_cls = (l_cls + ce_sum(&s.cls.narrow(0, 2 * b, l * b)?, p, ts, fused)?)?;
    }
    let l_cls = (l_cls / norm)?;
    let (u, s_plus, s_pat) = match (&tg.udi, &s.cls_plus, &s.patch) {
        (Some(u), Some(p), Some(q)) => (u, p, q),
        _ => {
            let zero = l_cls.zeros_like()?;
            return Ok(LossOut {
                total: l_cls.clone(),
                cls: l_cls,
                udi: zero.clone(),
                patch: zero,
                new_centres,
                teacher_entropy: tg.teacher_entropy,
            });
        }
    };
    let mut l_udi = ce_sum(&s_plus.narrow(0, 0, 2 * b)?, &u.plus_global, ts, fused)?;
    if let Some(p) = &u.plus_local {
        l_udi = (l_udi + ce_sum(&s_plus.narrow(0, 2 * b, l * b)?, p, ts, fused)?)?;
    }
    let l_udi = (l_udi / norm)?;
    // L_patch: global views only, pooled over valid rows. No valid row in the whole batch gives
    // NaN, as in the official code (training then stops).
    let k = s_pat.dim(2)?;
    let n_g = s_pat.dim(1)?;
    let h_rows = soft_ce_rows(&s_pat.reshape((2 * b * n_g, k))?, &u.patch, ts, fused)?
        .reshape((2, b, n_g))?;
    let l_patch = (h_rows * &u.valid)?.sum_all()?.div(&u.valid.sum_all()?)?;

    let [w0, w1, w2] = cfg.weights;
    let total = (((&l_cls * w0)? + (&l_udi * w1)?)? + (&l_patch * w2)?)?;
    Ok(LossOut {
        total,
        cls: l_cls,
        udi: l_udi,
        patch: l_patch,
        new_centres,
        teacher_entropy: tg.teacher_entropy,
    })
}
