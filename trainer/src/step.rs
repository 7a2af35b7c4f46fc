//! One training iteration (udi-spec §4, order of operations):
//! schedules → teacher forward → student forward → loss (current centres) → centre update →
//! backward → per-parameter clipping (the two class tokens jointly) → last layer dropped while
//! `epoch < freeze_last_layer` → AdamW → teacher EMA.
//!
//! Stochastic depth draws from `shared::rng::rng_for(seed, Domain::Step, 0, global_step)`:
//! global crops first, then local crops; per crop batch, block by block, the attention branch
//! then the MLP branch, one uniform per sample (keep iff u < 1 − rate). A resumed run therefore
//! draws the same masks.

use crate::config::TrainConfig;
use crate::data::TrainBatch;
use crate::kernels::Compute;
use crate::loss::{udi_loss_with, Centres};
use crate::model::Network;
use crate::nn::scalar_f64;
use crate::optim::{clip_plan, ema_update, squared_norms, AdamW};
use crate::params::{is_last_layer, ParamStore};
use crate::schedule::Schedules;
use crate::vit::{drop_masks, DropMasks};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

/// What one step reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepStats {
    pub epoch: u64,
    pub global_step: u64,
    pub loss: f64,
    pub loss_cls: f64,
    pub loss_udi: f64,
    pub loss_patch: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
    /// Mean entropy of the teacher's P0 ([cls]), P1 (multimodal), P2 (patch) targets.
    pub teacher_entropy: [f64; 3],
    /// ‖c₀‖, ‖c₁‖, ‖c₂‖ after the update.
    pub centre_norms: [f64; 3],
    /// Global ‖∇‖ over all trainable parameters before clipping.
    pub grad_norm: f64,
    /// Seconds: teacher forward, student forward + loss, backward, optimiser + EMA. The device's
    /// time under `--profile` (stage marks synchronise, [`crate::prof::mark`]) and on the CPU;
    /// on a GPU otherwise mostly the host's time to queue the work.
    pub timings: [f64; 4],
}

/// [`StepStats`] plus per-parameter gradient norms (pre- and post-clipping; `None` for
/// parameters without gradient, e.g. the frozen last layer post-clip).
pub struct StepReport {
    pub stats: StepStats,
    pub grad_norms: Vec<(String, Option<f64>, Option<f64>)>,
}

/// What the training loop, checkpoints and `debug-step` need of a training step, whichever
/// engine runs it ([`crate::engine::EngineKind`]).
pub trait TrainStep {
    /// One iteration (udi-spec §4) with per-parameter gradient norms.
    fn step_detailed(
        &mut self,
        batch: &TrainBatch,
        epoch: u64,
        global_step: u64,
    ) -> Result<StepReport>;

    fn step(&mut self, batch: &TrainBatch, epoch: u64, global_step: u64) -> Result<StepStats> {
        Ok(self.step_detailed(batch, epoch, global_step)?.stats)
    }

    /// Everything a checkpoint needs for a bitwise resume: `student.<name>`, `teacher.<name>`,
    /// `center.{cls,udi,patch}`, `optim.<name>.{exp_avg,exp_avg_sq,step}` (each tensor in a
    /// buffer of its own). Both engines write and read the same names.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;

    /// Restores [`Self::state_tensors`] (optimiser entries may be absent: fresh state).
    fn load_state(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()>;

    /// One optimiser step of data-parallel training and/or gradient accumulation: this rank's
    /// `slice.accumulate` batches come from `fetch(m)`, and `comm` averages over the ranks.
    /// Engines without it train one process, one batch per step.
    fn step_group(
        &mut self,
        fetch: &mut dyn FnMut(usize) -> Result<TrainBatch>,
        slice: shared::rng::Slice,
        epoch: u64,
        global_step: u64,
        comm: &mut dyn crate::dist::Collective,
    ) -> Result<StepReport> {
        if slice != shared::rng::Slice::WHOLE || comm.world().size > 1 {
            bail!("data-parallel training and --accumulate need the explicit engine (leave --engine unset or pass --engine explicit)");
        }
        let batch = fetch(0)?;
        self.step_detailed(&batch, epoch, global_step)
    }

    /// Stochastic depth on (training) or off (`debug-step`).
    fn set_drop_path(&mut self, on: bool);

    /// The lr, weight-decay, momentum and temperature schedules.
    fn schedules_mut(&mut self) -> &mut Schedules;

    fn centres(&self) -> &Centres;
}

/// A training step of the chosen engine.
pub fn build(
    engine: crate::engine::EngineKind,
    cfg: &TrainConfig,
    iters_per_epoch: u64,
    device: &Device,
    dtype: DType,
    compute: Compute,
) -> Result<Box<dyn TrainStep>> {
    Ok(match engine {
        crate::engine::EngineKind::Explicit => Box::new(crate::engine::Explicit::new(
            cfg,
            iters_per_epoch,
            device,
            dtype,
            compute,
        )?),
        crate::engine::EngineKind::Autograd => Box::new(Trainer::with_options(
            cfg,
            iters_per_epoch,
            device,
            dtype,
            compute,
        )?),
    })
}

/// Student, teacher, centres, optimiser and schedules of one run.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    /// Parameter (master weight) dtype: f32 in training, f64 in gradient tests.
    pub dtype: DType,
    /// Precision of the forward and which kernels run (see [`crate::kernels`]).
    pub compute: Compute,
    pub student: ParamStore,
    pub teacher: ParamStore,
    student_net: Network,
    teacher_net: Network,
    pub centres: Centres,
    pub optim: AdamW,
    pub schedules: Schedules,
    /// Stochastic depth in the student (on for training, off for `debug-step`).
    pub drop_path: bool,
    /// Clip groups: parameter indices clipped on their joint norm.
    clip_groups: Vec<Vec<usize>>,
}

impl Trainer {
    /// Fresh student (init from `cfg.data.seed`), teacher = copy, zero centres, f32 masters;
    /// the device's default precision and kernels ([`Compute::for_device`]: bf16 + fused on
    /// CUDA, f32 + composed on the CPU).
    pub fn new(cfg: &TrainConfig, iters_per_epoch: u64, device: &Device) -> Result<Self> {
        let compute = Compute::for_device(device, None, None);
        Self::with_options(cfg, iters_per_epoch, device, DType::F32, compute)
    }

    /// Parameters in `dtype`, composed ops in that dtype (the reference path).
    pub fn with_dtype(
        cfg: &TrainConfig,
        iters_per_epoch: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::with_options(cfg, iters_per_epoch, device, dtype, Compute::default())
    }

    pub fn with_options(
        cfg: &TrainConfig,
        iters_per_epoch: u64,
        device: &Device,
        dtype: DType,
        compute: Compute,
    ) -> Result<Self> {
        cfg.validate()?;
        let student = ParamStore::init(cfg, cfg.data.seed, dtype, device)?;
        let teacher = student.deep_copy()?;
        let student_net = Network::with_compute(cfg, &student, true, compute)?;
        let teacher_net = Network::with_compute(cfg, &teacher, false, compute)?;
        // The official code stores [cls] and [cls+] as ONE [1,2,D] parameter: clip them jointly
        // (the layout's clip groups, in the store's order).
        let clip_groups = crate::engine::layout::ParamLayout::new(cfg).clip_groups;
        let o = &cfg.optim;
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            dtype,
            compute,
            optim: AdamW::new(student.len(), o.beta1, o.beta2, o.eps),
            centres: Centres::zeros(cfg.model.out_dim, dtype, device)?,
            schedules: Schedules::new(cfg, iters_per_epoch),
            student,
            teacher,
            student_net,
            teacher_net,
            drop_path: true,
            clip_groups,
        })
    }

    pub fn student_net(&self) -> &Network {
        &self.student_net
    }
    /// The teacher network (k-NN and export read the teacher, udi-spec §5).
    pub fn teacher_net(&self) -> &Network {
        &self.teacher_net
    }

    /// Drop-path masks of one step: `(globals, locals)`.
    pub fn drop_masks(
        &self,
        batch: &TrainBatch,
        global_step: u64,
    ) -> Result<(DropMasks, DropMasks)> {
        Ok(drop_masks(
            &self.student_net.backbone.drop_rates,
            self.cfg.data.seed,
            batch.batch_size,
            batch.n_local,
            global_step,
            (0, 1),
            self.dtype,
            &self.device,
        )?)
    }

    /// One iteration; see the module docs for the order of operations.
    pub fn step(&mut self, batch: &TrainBatch, epoch: u64, global_step: u64) -> Result<StepStats> {
        Ok(self.step_detailed(batch, epoch, global_step)?.stats)
    }

    pub fn step_detailed(
        &mut self,
        batch: &TrainBatch,
        epoch: u64,
        global_step: u64,
    ) -> Result<StepReport> {
        let (lr, wd, mom, tau) = self.schedules.at(epoch, global_step);
        let t0 = crate::prof::mark(&self.device)?;
        let t_out = self.teacher_net.teacher(batch)?;
        let t1 = crate::prof::mark(&self.device)?;
        let masks = if self.drop_path {
            Some(self.drop_masks(batch, global_step)?)
        } else {
            None
        };
        let s_out = self.student_net.student(batch, masks.as_ref())?;
        let fused = self.compute.fused();
        let loss = crate::prof::time(&self.device, "loss (forward)", || {
            udi_loss_with(
                &self.cfg.loss,
                batch,
                &s_out,
                &t_out,
                &self.centres,
                tau,
                fused,
            )
        })?;
        let total = scalar_f64(&loss.total)?;
        let t2 = Instant::now();
        if !total.is_finite() {
            bail!("non-finite loss {total} at epoch {epoch}, step {global_step} (L_cls {}, L_udi {}, L_patch {})",
                scalar_f64(&loss.cls)?, scalar_f64(&loss.udi)?, scalar_f64(&loss.patch)?);
        }
        self.centres = loss.new_centres.clone();
        let grads = loss.total.backward()?;
        let t3 = crate::prof::mark(&self.device)?;

        let params = self.student.params();
        let frozen = epoch < self.cfg.optim.freeze_last_layer;
        // ‖g‖² of every gradient in one device→host transfer (one sync, not one per tensor).
        let with_grad: Vec<(usize, Tensor)> = params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.trainable)
            .filter_map(|(i, p)| grads.get(p.var.as_tensor()).map(|g| (i, g.clone())))
            .collect();
        let sq = {
            let refs: Vec<&Tensor> = with_grad.iter().map(|(_, g)| g).collect();
            squared_norms(&refs)?
        };
        let mut grad_of: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut sq_of: Vec<Option<f64>> = vec![None; params.len()];
        for ((i, g), s) in with_grad.into_iter().zip(sq) {
            grad_of[i] = Some(g);
            sq_of[i] = Some(s);
        }
        // The frozen last layer gets no update, no decay and no Adam state (grad = None).
        let plan = clip_plan(
            &self.clip_groups,
            &sq_of,
            |i| !(frozen && is_last_layer(&params[i].name)),
            self.cfg.optim.clip_grad,
        );
        let clipped: Vec<Option<(Tensor, f64)>> = grad_of
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                g.filter(|_| plan.post[i].is_some())
                    .map(|g| (g, plan.factor[i]))
            })
            .collect();
        if fused {
            let gs: Vec<Option<(Tensor, f64, f64)>> = clipped
                .into_iter()
                .enumerate()
                .map(|(i, c)| c.map(|(g, f)| (g, f, if params[i].decay { wd } else { 0.0 })))
                .collect();
            self.optim
                .fused_update_ema(&self.student, &self.teacher, &gs, lr, mom)
                .context("fused AdamW + EMA")?;
        } else {
            for (i, c) in clipped.into_iter().enumerate() {
                if let Some((g, f)) = c {
                    let g = if f < 1.0 { (g * f)? } else { g };
                    let p = &params[i];
                    let wd_i = if p.decay { wd } else { 0.0 };
                    self.optim
                        .update(i, &p.var, &g, lr, wd_i)
                        .with_context(|| format!("AdamW on {}", p.name))?;
                }
            }
            ema_update(&self.teacher, &self.student, mom)?;
        }
        let t4 = crate::prof::mark(&self.device)?;

        let cn = self.centres.norms()?.to_vec1::<f64>()?;
        let stats = StepStats {
            epoch,
            global_step,
            loss: total,
            loss_cls: scalar_f64(&loss.cls)?,
            loss_udi: scalar_f64(&loss.udi)?,
            loss_patch: scalar_f64(&loss.patch)?,
            lr,
            weight_decay: wd,
            momentum: mom,
            teacher_temp: tau,
            teacher_entropy: {
                let h = loss.teacher_entropy.to_vec1::<f64>()?;
                [h[0], h[1], h[2]]
            },
            centre_norms: [cn[0], cn[1], cn[2]],
            grad_norm: plan.norm,
            timings: [
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
                (t4 - t3).as_secs_f64(),
            ],
        };
        let grad_norms = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), plan.pre[i], plan.post[i]))
            .collect();
        Ok(StepReport { stats, grad_norms })
    }

    /// Everything a checkpoint needs for a bitwise resume: `student.<name>`, `teacher.<name>`,
    /// `center.{cls,udi,patch}`, `optim.<name>.{exp_avg,exp_avg_sq,step}`, each copied into a
    /// buffer of its own (after a fused AdamW step the moments are views of one flat buffer, and
    /// candle's `copy` clones a view's whole buffer: 668 clones of 714 MB for ViT-S, an OOM).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (n, t) in self.student.named_tensors() {
            out.push((format!("student.{n}"), own(&t)?));
        }
        for (n, t) in self.teacher.named_tensors() {
            out.push((format!("teacher.{n}"), own(&t)?));
        }
        for (n, t) in self.centres.named_tensors() {
            out.push((n, own(&t)?));
        }
        for (n, t) in self.optim.named_tensors(&self.student)? {
            out.push((n, own(&t)?));
        }
        Ok(out)
    }

    /// Restores [`Self::state_tensors`] (optimiser entries may be absent: fresh state).
    pub fn load_state(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        self.load_weights(map, what)?;
        self.centres =
            Centres::from_map(map, self.cfg.model.out_dim, self.dtype, &self.device, what)?;
        self.optim.load_from(map, &self.student, what)?;
        Ok(())
    }

    /// Loads only `student.*` and `teacher.*`.
    pub fn load_weights(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        self.student.load_from(map, "student.", what)?;
        self.teacher.load_from(map, "teacher.", what)?;
        Ok(())
    }
}

impl TrainStep for Trainer {
    fn step_detailed(
        &mut self,
        batch: &TrainBatch,
        epoch: u64,
        global_step: u64,
    ) -> Result<StepReport> {
        Trainer::step_detailed(self, batch, epoch, global_step)
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Trainer::state_tensors(self)
    }
    fn load_state(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        Trainer::load_state(self, map, what)
    }
    fn set_drop_path(&mut self, on: bool) {
        self.drop_path = on;
    }
    fn schedules_mut(&mut self) -> &mut Schedules {
        &mut self.schedules
    }
    fn centres(&self) -> &Centres {
        &self.centres
    }
}

/// `t`'s elements in a new, compact buffer (bit-exact).
fn own(t: &Tensor) -> candle_core::Result<Tensor> {
    Ok(t.force_contiguous()?.detach())
}
