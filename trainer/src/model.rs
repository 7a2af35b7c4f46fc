//! One UDI network (backbone + SRS + shared head) and the student/teacher forward passes that
//! feed the loss (udi-spec §2.4, §3.5).

use crate::config::TrainConfig;
use crate::data::TrainBatch;
use crate::head::{Head, LastLayer};
use crate::kernels::Compute;
use crate::params::ParamStore;
use crate::prof;
use crate::srs::Srs;
use crate::vit::{DropMasks, Vit};
use candle_core::{DType, Result, Tensor};

/// Backbone, SRS and head of one network, reading the parameters of a [`ParamStore`].
pub struct Network {
    pub backbone: Vit,
    pub srs: Srs,
    pub head: Head,
    dino_only: bool,
}

/// Student head outputs (raw logits). Crop order: g0, g1 (B each), then l0..l_{L-1} (B each).
pub struct StudentOut {
    /// [cls] logits `[(2+L)·B, K]`.
    pub cls: Tensor,
    /// [cls+] logits `[(2+L)·B, K]` (`None` with `dino_only`).
    pub cls_plus: Option<Tensor>,
    /// Patch logits of view v at its S-rows (pair v), `[2B, n_g, K]` (`None` with `dino_only`).
    pub patch: Option<Tensor>,
}

/// Teacher head outputs (raw logits, no gradient).
pub struct TeacherOut {
    /// [cls] logits of the two global views `[2B, K]`, view-major.
    pub cls: Tensor,
    /// The T-rows read on view u (`teacher_rows` layout: n_g global rows, then L·n_l local ones).
    pub rows: Option<TeacherRows>,
}

/// The teacher's T-row outputs. The loss needs the logits of each global T-row, but of the
/// local T-rows only validity-weighted sums (per local crop, and over the batch for the centre
/// c₂); the head's last layer is linear, so those sums are taken over the 256-wide bottleneck
/// features and the last layer is applied to the 2·B·L sums instead of to 2·B·L·n_l rows of K
/// logits (ViT-S at batch 128: 23 040 rows × 65 536 — 6 GB of f32 the loss used to write, mask
/// and reduce). Same arithmetic, different rounding.
pub enum TeacherRows {
    /// Logits of every T-row, `[2B, n_g + L·n_l, K]`.
    Logits(Tensor),
    /// Global T-row logits `[2B, n_g, K]`, local T-row bottleneck features `[2B, L·n_l, E]`
    /// (parameter dtype) and the last layer that maps them to logits.
    Factored {
        global: Tensor,
        local_features: Tensor,
        last: LastLayer,
    },
}

impl TeacherRows {
    /// Logits of the n_g global T-rows, `[2B, n_g, K]`.
    pub fn global(&self, n_g: usize) -> Result<Tensor> {
        match self {
            Self::Logits(r) => r.narrow(1, 0, n_g),
            Self::Factored { global, .. } => Ok(global.clone()),
        }
    }

    /// Local T-rows pooled with validity weights `valid_l` `[2, B, L, n_l]`:
    /// (Σ_r v·logits / (Σ_r v + 1e-5) `[2, B, L, K]`, Σ_{t,b,k,r} v·logits `[K]`). The sum is in
    /// `dt`; the means are in `dt` from logits and in the last layer's output dtype from
    /// features (the targets' op reads them as they are).
    pub fn local_pool(&self, n_g: usize, valid_l: &Tensor, dt: DType) -> Result<(Tensor, Tensor)> {
        let (two, b, l, n_l) = valid_l.dims4()?;
        let v5 = valid_l.unsqueeze(4)?;
        let pool = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let masked = x.broadcast_mul(&v5)?;
            let mean = masked
                .sum(3)?
                .broadcast_div(&(valid_l.sum_keepdim(3)? + 1e-5)?)?;
            Ok((mean, masked.sum((0, 1, 2, 3))?))
        };
        match self {
            Self::Logits(r) => {
                let k = r.dim(2)?;
                let x = r.narrow(1, n_g, l * n_l)?.to_dtype(dt)?;
                pool(&x.reshape((two, b, l, n_l, k))?)
            }
            Self::Factored {
                local_features,
                last,
                ..
            } => {
                let e = local_features.dim(2)?;
                let x = local_features.to_dtype(dt)?.reshape((two, b, l, n_l, e))?;
                let (mean, total) = pool(&x)?;
                let mean = last.forward(&mean.reshape((two * b * l, e))?)?;
                let k = mean.dim(1)?;
                let total = last
                    .forward(&total.unsqueeze(0)?)?
                    .to_dtype(dt)?
                    .squeeze(0)?;
                Ok((mean.reshape((two, b, l, k))?, total))
            }
        }
    }

    /// Logits of every T-row, `[2B, n_g + L·n_l, K]` (materialised: tests and debugging).
    pub fn logits(&self) -> Result<Tensor> {
        match self {
            Self::Logits(r) => Ok(r.clone()),
            Self::Factored {
                global,
                local_features,
                last,
            } => {
                let (b2, r, e) = local_features.dims3()?;
                let local = last.forward(&local_features.reshape((b2 * r, e))?)?;
                let k = local.dim(1)?;
                Tensor::cat(&[global, &local.reshape((b2, r, k))?], 1)
            }
        }
    }
}

impl Network {
    /// `tracked`: build over the variables (student) or detached tensors (teacher). Computes
    /// in the parameter dtype with composed ops.
    pub fn new(cfg: &TrainConfig, store: &ParamStore, tracked: bool) -> Result<Self> {
        Self::with_compute(cfg, store, tracked, Compute::default())
    }

    /// As [`Self::new`] with a precision / kernel choice (head logits come out in the compute
    /// dtype).
    pub fn with_compute(
        cfg: &TrainConfig,
        store: &ParamStore,
        tracked: bool,
        compute: Compute,
    ) -> Result<Self> {
        Ok(Self {
            backbone: Vit::with_compute(cfg, store, tracked, compute)?,
            srs: Srs::new(cfg, store, tracked, compute)?,
            head: Head::new(cfg, store, tracked, compute)?,
            dino_only: cfg.loss.dino_only,
        })
    }

    /// The student pass over all crops (drop masks: `(globals, locals)` or none).
    pub fn student(
        &self,
        batch: &TrainBatch,
        drop: Option<&(DropMasks, DropMasks)>,
    ) -> Result<StudentOut> {
        let b = batch.batch_size;
        let np = self.backbone.n_prefix();
        let xg = self
            .backbone
            .forward_tokens(&batch.globals, drop.map(|d| &d.0))?;
        let mut cls_in = vec![self.backbone.class_outputs(&xg)?];
        if let Some(l) = &batch.locals {
            let x = self.backbone.forward_tokens(l, drop.map(|d| &d.1))?;
            cls_in.push(self.backbone.class_outputs(&x)?);
        }
        let cls_tok = Tensor::cat(&cls_in, 0)?; // [(2+L)B, np, D]
        let n_crops = cls_tok.dim(0)?;
        let d = cls_tok.dim(2)?;
        // One head call over every row: [cls of all crops; cls+ of all crops; SRS rows].
        let mut inputs = vec![cls_tok.narrow(1, 0, 1)?.squeeze(1)?];
        let mut n_patch = 0;
        if !self.dino_only {
            inputs.push(cls_tok.narrow(1, 1, 1)?.squeeze(1)?);
            let z = prof::time(xg.device(), "srs", || {
                self.srs.forward(&xg, np, &batch.student_rows)
            })?; // [2B, n_g, D]
            n_patch = z.dim(1)?;
            inputs.push(z.reshape((2 * b * n_patch, d))?);
        }
        let logits = self.head.forward(&Tensor::cat(&inputs, 0)?)?;
        let k = logits.dim(1)?;
        let cls = logits.narrow(0, 0, n_crops)?;
        if self.dino_only {
            return Ok(StudentOut {
                cls,
                cls_plus: None,
                patch: None,
            });
        }
        let cls_plus = logits.narrow(0, n_crops, n_crops)?;
        let patch = logits
            .narrow(0, 2 * n_crops, 2 * b * n_patch)?
            .reshape((2 * b, n_patch, k))?;
        Ok(StudentOut {
            cls,
            cls_plus: Some(cls_plus),
            patch: Some(patch),
        })
    }

    /// The teacher pass over the two global views (no drop path; call on detached networks).
    pub fn teacher(&self, batch: &TrainBatch) -> Result<TeacherOut> {
        let b = batch.batch_size;
        let np = self.backbone.n_prefix();
        let xg = self.backbone.forward_tokens(&batch.globals, None)?;
        let cls_tok = self
            .backbone
            .class_outputs(&xg)?
            .narrow(1, 0, 1)?
            .squeeze(1)?; // [2B, D]
        if self.dino_only {
            return Ok(TeacherOut {
                cls: self.head.forward(&cls_tok)?,
                rows: None,
            });
        }
        let z = prof::time(xg.device(), "srs", || {
            self.srs.forward(&xg, np, &batch.teacher_rows)
        })?; // [2B, R, D]
        let (_, r, d) = z.dims3()?;
        let n_g = batch.student_rows.dim(1)?;
        // Bottleneck features of every row; logits only for [cls] and the global T-rows.
        let f = self
            .head
            .bottleneck(&Tensor::cat(&[cls_tok, z.reshape((2 * b * r, d))?], 0)?)?;
        teacher_out(&f, b, n_g, self.head.last_layer()?)
    }
}

/// The teacher's outputs from the bottleneck features `f` `[2B + 2B·R, E]` (the [cls] rows of
/// both global views, then every T-row): the last layer applied to the [cls] rows and the n_g
/// global T-rows; the local T-rows stay features, pooled by the loss ([`TeacherRows::Factored`]).
pub fn teacher_out(f: &Tensor, b: usize, n_g: usize, last: LastLayer) -> Result<TeacherOut> {
    let e = f.dim(1)?;
    let r = (f.dim(0)? - 2 * b) / (2 * b);
    let f_rows = f.narrow(0, 2 * b, 2 * b * r)?.reshape((2 * b, r, e))?;
    let logits = last.forward(&Tensor::cat(
        &[
            f.narrow(0, 0, 2 * b)?,
            f_rows.narrow(1, 0, n_g)?.reshape((2 * b * n_g, e))?,
        ],
        0,
    )?)?;
    let k = logits.dim(1)?;
    Ok(TeacherOut {
        cls: logits.narrow(0, 0, 2 * b)?,
        rows: Some(TeacherRows::Factored {
            global: logits
                .narrow(0, 2 * b, 2 * b * n_g)?
                .reshape((2 * b, n_g, k))?,
            local_features: f_rows.narrow(1, n_g, r - n_g)?,
            last,
        }),
    })
}
