//! The explicit training step: the whole UDI iteration (udi-spec §2–§4) written as forward and
//! backward calls over flat buffers, without candle's autograd.
//!
//! * [`layout`]: the parameter table and the flat `[p | m | v | t]` state + gradient buffers.
//! * one file per layer kind, forward and backward side by side, each saying what its forward
//!   saves: [`linear`], [`layernorm`], [`attention`], [`vit`] (patch embedding, blocks, final
//!   LN), [`srs`], [`head`], [`loss`] (the three terms and their closed-form gradient).
//! * [`Explicit`]: the step, reading top-down like udi-spec §4.
//!
//! Accumulation rule (as llm.c): parameter gradients are added (`+=`, a layer used on the global
//! and the local crops accumulates), activation gradients are returned (`=`), and the residual
//! stream's gradient passes through each block with the branch gradients added to it.
//!
//! The host waits for the device twice per step ([`TrainStep::step_group`]): for the loss values
//! and teacher entropies after the backward, and for the squared gradient norms (clipping is
//! decided on the host) and the centres' norms before AdamW. Stage timings synchronise only
//! under `--profile`, so otherwise the host queues each stage while the device runs the last.
//!
//! Tensors are candle tensors on any device, so the same code runs on the CPU (where CI checks
//! it against the autograd step, `trainer/tests/engine_parity.rs`) and on CUDA (cuBLAS GEMMs and
//! the fused kernels of [`crate::kernels`] with `--kernels fused`). None of them is a variable,
//! so candle records no graph and frees each intermediate when its last reader is done.

pub mod attention;
pub mod head;
pub mod layernorm;
pub mod layout;
pub mod linear;
pub mod loss;
pub mod srs;
pub mod vit;

use crate::config::TrainConfig;
use crate::data::TrainBatch;
use crate::dist::{Collective, Single};
use crate::kernels::adamw::{meta_tensor, AdamwEma, Segment};
use crate::kernels::sq_norms::SqNormPlan;
use crate::kernels::Compute;
use crate::loss::Centres;
use crate::model::{teacher_out, TeacherOut};
use crate::optim::{clip_plan, ClipPlan};
use crate::params::ParamStore;
use crate::prof;
use crate::schedule::Schedules;
use crate::step::{StepReport, StepStats, TrainStep};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use layernorm::LayerNorm;
use layout::ParamLayout;
use linear::Linear;
use serde::{Deserialize, Serialize};
use shared::rng::Slice;
use std::collections::HashMap;
use std::fmt;

/// `--engine` / `[run] engine`: which implementation runs the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Hand-written forward and backward over flat buffers ([`Explicit`]).
    Explicit,
    /// candle's autograd over the model of [`crate::model`] ([`crate::step::Trainer`]): the
    /// independent reference.
    Autograd,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Explicit => "explicit",
            Self::Autograd => "autograd",
        })
    }
}

impl EngineKind {
    /// The default: explicit on the CPU, where it is the faster one (0.81× the step time, 0.39×
    /// the peak memory: `bench/results/cpu-engines-2026-12-06.md`); autograd on CUDA until the
    /// explicit step is measured faster there (`scripts/gpu-check.sh`).
    pub fn for_device(device: &Device, chosen: Option<Self>) -> Self {
        chosen.unwrap_or(if device.is_cuda() {
            Self::Autograd
        } else {
            Self::Explicit
        })
    }
}

/// How the ops compute: the fused kernels or composed candle ops, the matmul (compute) dtype and
/// the parameter dtype (statistics, residual stream, loss).
#[derive(Clone, Copy, Debug)]
pub struct Ops {
    pub fused: bool,
    /// Flash attention in the blocks (with `fused`, where the device supports the shapes).
    pub flash: bool,
    pub cdt: DType,
    pub pdt: DType,
    /// Blocks keep their LayerNorm and GELU outputs for the backward (else it recomputes them).
    pub keep_activations: bool,
}

/// The flat gradient buffer of one step: `[n]` in the layout's order (named views by layout id),
/// then the batch centres, so that the step reduces one buffer. Zeroed once; each gradient is
/// added in place where the backward makes it (`+=`; a parameter without one keeps zeros).
pub struct Grads<'a> {
    layout: &'a ParamLayout,
    flat: Tensor,
    fused: bool,
}

impl<'a> Grads<'a> {
    fn new(layout: &'a ParamLayout, ops: &Ops, tail: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            layout,
            flat: Tensor::zeros(layout.n + tail, ops.pdt, device)?,
            fused: ops.fused,
        })
    }

    /// `grad[id] += g` (g has the parameter's element count; any shape and float dtype).
    pub fn add(&mut self, id: usize, g: &Tensor) -> candle_core::Result<()> {
        let e = &self.layout.entries[id];
        if g.elem_count() != e.len {
            candle_core::bail!(
                "gradient of {}: {} elements, expected {}",
                e.name,
                g.elem_count(),
                e.len
            );
        }
        crate::kernels::accumulate(&self.flat, e.offset, g, self.fused)
    }

    /// The buffer, with `tail` (the batch centres) added after the parameters.
    fn finish(self, tail: &[&Tensor]) -> Result<Tensor> {
        let mut at = self.layout.n;
        for t in tail {
            crate::kernels::accumulate(&self.flat, at, t, self.fused)?;
            at += t.elem_count();
        }
        ensure!(
            at == self.flat.elem_count(),
            "gradient buffer tail: {at} elements"
        );
        Ok(self.flat)
    }
}

/// One network's layers as views of a flat parameter buffer (`flat`) and its compute-dtype copy
/// (`cflat`, the matmul weights).
pub struct Net {
    pub backbone: vit::Backbone,
    pub srs: srs::Srs,
    pub head: head::Head,
}

impl Net {
    fn new(
        cfg: &TrainConfig,
        layout: &ParamLayout,
        flat: &Tensor,
        cflat: &Tensor,
        resample: &[(usize, Tensor)],
    ) -> Result<Self> {
        let m = &cfg.model;
        let p = |n: &str| layout.view_of(flat, n);
        let lin = |n: &str| -> Result<Linear> {
            let (w_id, w) = layout.view_of(cflat, &format!("{n}.weight"))?;
            let (b_id, b) = p(&format!("{n}.bias"))?;
            Ok(Linear {
                w,
                b: Some(b),
                w_id,
                b_id: Some(b_id),
            })
        };
        let ln = |n: &str| -> Result<LayerNorm> {
            let (w_id, w) = p(&format!("{n}.weight"))?;
            let (b_id, b) = p(&format!("{n}.bias"))?;
            Ok(LayerNorm {
                w,
                b,
                w_id,
                b_id,
                eps: m.ln_eps,
            })
        };
        let blocks = (0..m.depth)
            .map(|i| {
                let n = format!("backbone.blocks.{i}");
                Ok(vit::Block {
                    norm1: ln(&format!("{n}.norm1"))?,
                    qkv: lin(&format!("{n}.attn.qkv"))?,
                    proj: lin(&format!("{n}.attn.proj"))?,
                    norm2: ln(&format!("{n}.norm2"))?,
                    fc1: lin(&format!("{n}.mlp.fc1"))?,
                    fc2: lin(&format!("{n}.mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut patch = lin("backbone.patch_embed.proj")?;
        patch.w = patch.w.reshape((m.dim, ()))?;
        let (cls_id, cls_token) = p("backbone.cls_token")?;
        let (reg_id, reg_token) = p("backbone.reg_token")?;
        let (pos_id, pos_embed) = p("backbone.pos_embed")?;
        let (g_id, g) = p("head.last_layer.weight_g")?;
        let (v_id, v) = p("head.last_layer.weight_v")?;
        Ok(Self {
            backbone: vit::Backbone {
                patch,
                cls_token,
                reg_token,
                pos_embed,
                cls_ids: [cls_id, reg_id],
                pos_id,
                blocks,
                norm: ln("backbone.norm")?,
                heads: m.heads,
                patch_size: cfg.augment.patch_size as usize,
                pos_grid: cfg.pos_grid(),
                resample: resample.to_vec(),
            },
            srs: srs::Srs {
                norm1: ln("srs.norm1")?,
                qkv: lin("srs.attn.qkv")?,
                proj: lin("srs.attn.proj")?,
                norm: ln("srs.attn.norm")?,
                heads: m.heads,
                skip: m.srs_skip,
            },
            head: head::Head {
                fc: [lin("head.mlp.0")?, lin("head.mlp.2")?, lin("head.mlp.4")?],
                g,
                v,
                g_id,
                v_id,
            },
        })
    }
}

/// Student, teacher, AdamW state and centres of one run in flat buffers, and the explicit step.
pub struct Explicit {
    pub cfg: TrainConfig,
    pub device: Device,
    /// Parameter (master) dtype: f32 in training, f64 in gradient tests.
    pub dtype: DType,
    pub compute: Compute,
    pub layout: ParamLayout,
    /// `[p | m | v | t]`, 4·n elements ([`layout`]).
    state: Tensor,
    /// AdamW steps taken by each parameter (0: no state yet, e.g. the frozen last layer).
    steps: Vec<u64>,
    pub centres: Centres,
    pub schedules: Schedules,
    /// Stochastic depth in the student (on for training, off for `debug-step`).
    pub drop_path: bool,
    drop_rates: Vec<f64>,
    resample: Vec<(usize, Tensor)>,
    /// The chunks of the trainable parameters' squared gradient norms (clipping).
    sq_norms: SqNormPlan,
}

impl Explicit {
    pub fn new(
        cfg: &TrainConfig,
        iters_per_epoch: u64,
        device: &Device,
        dtype: DType,
        compute: Compute,
    ) -> Result<Self> {
        cfg.validate()?;
        if cfg.loss.dino_only {
            bail!("the explicit engine trains the full UDI objective; use --engine autograd for dino_only");
        }
        let layout = ParamLayout::new(cfg);
        let init = ParamStore::init(cfg, cfg.data.seed, dtype, device)?;
        let p = Tensor::cat(
            &init
                .params()
                .iter()
                .map(|p| p.var.as_tensor().flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        ensure!(
            p.elem_count() == layout.n,
            "parameter layout does not match the store"
        );
        let zeros = p.zeros_like()?;
        // Detached: nothing here may record a backprop graph, or every step's tensors would stay
        // reachable from the state and the centres.
        let state = Tensor::cat(&[&p, &zeros, &zeros, &p], 0)?.detach();
        let resample = crate::vit::resample_matrices(cfg, dtype, device)?;
        let trainable: Vec<(usize, usize)> = layout
            .entries
            .iter()
            .filter(|e| e.trainable)
            .map(|e| (e.offset, e.len))
            .collect();
        let sq_norms = SqNormPlan::new(&trainable, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            dtype,
            compute,
            steps: vec![0; layout.entries.len()],
            layout,
            state,
            centres: Centres::zeros(cfg.model.out_dim, dtype, device)?,
            schedules: Schedules::new(cfg, iters_per_epoch),
            drop_path: true,
            drop_rates: crate::vit::drop_rates(cfg),
            resample,
            sq_norms,
        })
    }

    fn ops(&self) -> Ops {
        Ops {
            fused: self.compute.fused(),
            flash: self.compute.flash(),
            cdt: self.compute.dtype(self.dtype),
            pdt: self.dtype,
            keep_activations: self.compute.keep_activations,
        }
    }

    /// Part k of the state: 0 student, 1 first moments, 2 second moments, 3 teacher.
    fn part(&self, k: usize) -> candle_core::Result<Tensor> {
        self.state.narrow(0, k * self.layout.n, self.layout.n)
    }

    /// One network over state part k (weights cast to the compute dtype once, in one op).
    fn net(&self, k: usize) -> Result<Net> {
        let flat = self.part(k)?;
        let cflat = flat.to_dtype(self.ops().cdt)?;
        Net::new(&self.cfg, &self.layout, &flat, &cflat, &self.resample)
    }

    /// The teacher pass over the two global views, keeping nothing for a backward: [cls] logits,
    /// logits of the global T-rows, bottleneck features of the local T-rows (the loss pools them
    /// before the last layer, see [`crate::model::TeacherRows`]).
    fn teacher(&self, ops: &Ops, t: &Net, batch: &TrainBatch) -> Result<TeacherOut> {
        let b = batch.batch_size;
        let (xg, _) = t.backbone.forward(ops, &batch.globals, None, false)?;
        let d = xg.dim(2)?;
        let cls = t
            .backbone
            .class_outputs(ops, &xg)?
            .narrow(1, 0, 1)?
            .squeeze(1)?;
        let n_tok = xg.dim(1)? - 2;
        let (z, _) = t
            .srs
            .forward(ops, &xg.narrow(1, 2, n_tok)?, &batch.teacher_rows, false)?;
        let r = batch.teacher_rows.dim(1)?;
        let n_g = batch.student_rows.dim(1)?;
        let (f, _) = t.head.bottleneck(
            ops,
            &Tensor::cat(&[&cls, &z.reshape((2 * b * r, d))?], 0)?,
            false,
        )?;
        let last = t.head.last_layer(ops)?;
        Ok(teacher_out(
            &f,
            b,
            n_g,
            crate::head::LastLayer::from_weight(last.w, self.compute),
        )?)
    }

    /// Per-parameter clipping (the class tokens jointly) and the update segments of the fused
    /// AdamW + EMA launch.
    fn clip_and_plan(
        &mut self,
        sq_trainable: &[f64],
        epoch: u64,
        lr: f64,
        wd: f64,
    ) -> Result<(Vec<Segment>, ClipPlan)> {
        let entries = &self.layout.entries;
        let mut sq = vec![None; entries.len()];
        let trainable = (0..entries.len()).filter(|&i| entries[i].trainable);
        for (i, &s) in trainable.zip(sq_trainable) {
            sq[i] = Some(s);
        }
        let frozen = epoch < self.cfg.optim.freeze_last_layer;
        let plan = clip_plan(
            &self.layout.clip_groups,
            &sq,
            |i| !(frozen && entries[i].last_layer),
            self.cfg.optim.clip_grad,
        );
        let (b1, b2) = (self.cfg.optim.beta1, self.cfg.optim.beta2);
        let mut segs = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let mut seg = Segment {
                offset: e.offset,
                len: e.len,
                update: false,
                decay: 1.0,
                step_size: 0.0,
                bc2_sqrt: 1.0,
                clip: 1.0,
            };
            if plan.post[i].is_some() {
                self.steps[i] += 1;
                let t = self.steps[i] as i32;
                let wd_i = if e.decay { wd } else { 0.0 };
                seg.update = true;
                seg.decay = (1.0 - lr * wd_i) as f32;
                seg.step_size = (lr / (1.0 - b1.powi(t))) as f32;
                seg.bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
                seg.clip = plan.factor[i] as f32;
            }
            segs.push(seg);
        }
        Ok((segs, plan))
    }

    /// Loads `student.*`, `teacher.*` into the flat buffers.
    fn load_params(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let mut parts = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for (k, prefix) in [(0, "student."), (3, "teacher.")] {
            for e in &self.layout.entries {
                let key = format!("{prefix}{}", e.name);
                let t = map
                    .get(&key)
                    .with_context(|| format!("{what}: missing tensor {key}"))?;
                ensure!(
                    t.dims() == e.shape.as_slice(),
                    "{what}: tensor {key} has shape {:?}, expected {:?}",
                    t.dims(),
                    e.shape
                );
                parts[k].push(
                    t.to_dtype(self.dtype)?
                        .to_device(&self.device)?
                        .flatten_all()?,
                );
            }
        }
        parts[1] = vec![self.part(1)?.copy()?];
        parts[2] = vec![self.part(2)?.copy()?];
        let all: Vec<Tensor> = parts.into_iter().flatten().collect();
        self.state = Tensor::cat(&all, 0)?.detach();
        Ok(())
    }

    /// Loads the AdamW state (`optim.<name>.{exp_avg,exp_avg_sq,step}`; absent = no state).
    fn load_optim(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let n = self.layout.n;
        let mut m = Vec::new();
        let mut v = Vec::new();
        for (i, e) in self.layout.entries.iter().enumerate() {
            let key = format!("optim.{}.step", e.name);
            match map.get(&key) {
                None => {
                    self.steps[i] = 0;
                    let z = Tensor::zeros(e.len, self.dtype, &self.device)?;
                    m.push(z.clone());
                    v.push(z);
                }
                Some(step) => {
                    let s: Vec<i64> = step
                        .flatten_all()?
                        .to_vec1()
                        .with_context(|| format!("{what}: {key}"))?;
                    self.steps[i] = s[0] as u64;
                    for (dst, k) in [(&mut m, "exp_avg"), (&mut v, "exp_avg_sq")] {
                        let key = format!("optim.{}.{k}", e.name);
                        let t = map
                            .get(&key)
                            .with_context(|| format!("{what}: missing {key}"))?;
                        ensure!(
                            t.dims() == e.shape.as_slice(),
                            "{what}: {key} has shape {:?}, expected {:?}",
                            t.dims(),
                            e.shape
                        );
                        dst.push(
                            t.to_dtype(self.dtype)?
                                .to_device(&self.device)?
                                .flatten_all()?,
                        );
                    }
                }
            }
        }
        let p = self.part(0)?.copy()?;
        let t = self.part(3)?.copy()?;
        let m = Tensor::cat(&m, 0)?;
        let v = Tensor::cat(&v, 0)?;
        ensure!(
            m.elem_count() == n && v.elem_count() == n,
            "{what}: AdamW state size"
        );
        self.state = Tensor::cat(&[&p, &m, &v, &t], 0)?.detach();
        Ok(())
    }
}

/// One forward + backward: the loss, the teacher's entropies and the flat gradient buffer (with
/// the batch centres).
struct Pass {
    loss: loss::LossParts,
    /// The teacher's mean entropies, f64 `[3]` on the device.
    teacher_entropy: Tensor,
    /// The flat gradient `[n]` followed by the batch centres c₀, c₁, c₂ (`3·K`).
    grads: Tensor,
    /// Seconds: teacher forward, student forward + loss, backward.
    timings: [f64; 3],
}

impl Explicit {
    /// Teacher forward, student forward, loss and backward of one step (nothing updated) for
    /// group `group.0` of the `group.1` groups of the global batch ([`crate::dist`]).
    fn forward_backward(
        &self,
        batch: &TrainBatch,
        epoch: u64,
        global_step: u64,
        group: (usize, usize),
    ) -> Result<Pass> {
        let ops = self.ops();
        let tau = self.schedules.teacher_temp(epoch);
        let b = batch.batch_size;
        let n_local = batch.n_local;
        // Nothing here waits for the device (stage marks do under `--profile`): the step's
        // values are read once, after the backward ([`TrainStep::step_group`]).

        // Teacher forward (nothing saved).
        let t0 = prof::mark(&self.device)?;
        let teacher = self.net(3)?;
        let t_out = self.teacher(&ops, &teacher, batch)?;
        drop(teacher);
        let t1 = prof::mark(&self.device)?;

        // Student forward, saving what the backward reads.
        let student = self.net(0)?;
        let masks = match self.drop_path {
            true => Some(crate::vit::drop_masks(
                &self.drop_rates,
                self.cfg.data.seed,
                b,
                n_local,
                global_step,
                group,
                self.dtype,
                &self.device,
            )?),
            false => None,
        };
        let bb = &student.backbone;
        let (xg, saved_g) = bb.forward(&ops, &batch.globals, masks.as_ref().map(|m| &m.0), true)?;
        let (xl, saved_l) = match &batch.locals {
            Some(l) => {
                let (x, s) = bb.forward(&ops, l, masks.as_ref().map(|m| &m.1), true)?;
                (Some(x), s)
            }
            None => (None, None),
        };
        let mut cls_parts = vec![xg.narrow(1, 0, 2)?];
        if let Some(x) = &xl {
            cls_parts.push(x.narrow(1, 0, 2)?);
        }
        let cls_in = Tensor::cat(&cls_parts, 0)?.contiguous()?; // [(2+L)B, 2, D]
        let cls_out = bb.class_outputs_of(&ops, &cls_in)?;
        let n_crops = cls_in.dim(0)?;
        let d = cls_in.dim(2)?;
        let n_tok = xg.dim(1)? - 2;
        let (z, saved_srs) =
            student
                .srs
                .forward(&ops, &xg.narrow(1, 2, n_tok)?, &batch.student_rows, true)?;
        // One head call over every row: [cls of all crops; cls+ of all crops; SRS rows].
        let head_in = Tensor::cat(
            &[
                cls_out.narrow(1, 0, 1)?.squeeze(1)?,
                cls_out.narrow(1, 1, 1)?.squeeze(1)?,
                z,
            ],
            0,
        )?;
        let dev = &self.device;
        let (z_hat, saved_head) = prof::time(dev, "engine: head forward", || {
            student.head.bottleneck(&ops, &head_in, true)
        })?;
        // Loss with the current centres; the targets first, so that the teacher's outputs are
        // gone before the student's [rows, K] logits exist.
        let targets =
            crate::loss::targets(&self.cfg.loss, batch, &t_out, &self.centres, tau, ops.fused)?;
        drop(t_out);
        let last = student.head.last_layer(&ops)?;
        let logits = prof::time(dev, "engine: head last layer forward", || {
            last.forward(&ops, &z_hat)
        })?;
        let (vals, dlogits) = prof::time(dev, "engine: loss forward + dlogits", || {
            loss::forward_backward(&ops, &self.cfg.loss, &targets, logits, b, n_local)
        })?;
        // The loss has read the targets: of them the backward needs only this batch's centres,
        // so the [rows, K] distributions go before the backward's peak.
        let crate::loss::Targets {
            cls_global,
            cls_local,
            udi,
            batch_centres,
            teacher_entropy,
        } = targets;
        drop((cls_global, cls_local, udi));
        let t2 = prof::mark(&self.device)?;

        // Backward: head → final LN of [cls]/[cls+] and SRS → blocks in reverse → embeddings.
        let k = self.cfg.model.out_dim;
        let mut grads = Grads::new(&self.layout, &ops, 3 * k, &self.device)?;
        let saved_head = saved_head.expect("saved");
        let d_in = prof::time(dev, "engine: head backward", || {
            student
                .head
                .backward(&ops, &saved_head, &last, &dlogits, &mut grads)
        })?;
        drop((dlogits, saved_head, last));
        let d_cls = Tensor::stack(
            &[
                d_in.narrow(0, 0, n_crops)?,
                d_in.narrow(0, n_crops, n_crops)?,
            ],
            1,
        )?;
        let d_cls_in = bb.class_backward(&ops, &cls_in, &d_cls, &mut grads)?;
        let dz = d_in.narrow(0, 2 * n_crops, d_in.dim(0)? - 2 * n_crops)?;
        let saved_srs = saved_srs.expect("saved");
        let d_patch_g = prof::time(dev, "engine: srs backward", || {
            student.srs.backward(&ops, &saved_srs, &dz, &mut grads)
        })?;
        let dxg = Tensor::cat(&[&d_cls_in.narrow(0, 0, 2 * b)?, &d_patch_g], 1)?;
        bb.backward(
            &ops,
            saved_g.expect("saved"),
            &dxg,
            masks.as_ref().map(|m| &m.0),
            &mut grads,
        )?;
        if let (Some(x), Some(sl)) = (&xl, saved_l) {
            // The local crops' patch tokens feed nothing (their SRS output is unused).
            let zeros = Tensor::zeros((n_local * b, x.dim(1)? - 2, d), ops.pdt, &self.device)?;
            let dxl = Tensor::cat(&[&d_cls_in.narrow(0, 2 * b, n_local * b)?, &zeros], 1)?;
            bb.backward(&ops, sl, &dxl, masks.as_ref().map(|m| &m.1), &mut grads)?;
        }
        drop(student);
        let c = &batch_centres;
        let grads = grads.finish(&[&c.cls, &c.udi, &c.patch])?;
        let t3 = prof::mark(&self.device)?;
        Ok(Pass {
            loss: vals,
            teacher_entropy,
            grads,
            timings: [
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
            ],
        })
    }

    /// Whether the state or the centres record a backprop graph: each step's tensors would then
    /// stay reachable from them and memory would grow step by step (the tests assert false).
    pub fn holds_graph(&self) -> bool {
        [
            &self.state,
            &self.centres.cls,
            &self.centres.udi,
            &self.centres.patch,
        ]
        .iter()
        .any(|t| t.track_op())
    }

    /// The loss and every parameter's raw gradient of one step, by name, without updating
    /// anything (the parity tests' view of the backward).
    pub fn gradients(
        &self,
        batch: &TrainBatch,
        epoch: u64,
        global_step: u64,
    ) -> Result<(loss::LossValues, Vec<(String, Tensor)>)> {
        let pass = self.forward_backward(batch, epoch, global_step, (0, 1))?;
        let grads = (0..self.layout.entries.len())
            .map(|i| {
                Ok((
                    self.layout.entries[i].name.clone(),
                    self.layout.view(&pass.grads, i)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((pass.loss.read()?, grads))
    }
}

impl TrainStep for Explicit {
    fn step_detailed(
        &mut self,
        batch: &TrainBatch,
        epoch: u64,
        global_step: u64,
    ) -> Result<StepReport> {
        let mut one = Some(batch.clone());
        let mut fetch = |_| one.take().context("one batch");
        self.step_group(
            &mut fetch,
            Slice::WHOLE,
            epoch,
            global_step,
            &mut Single::new(),
        )
    }

    /// Forward and backward over each of this rank's `slice.accumulate` batches (gradients
    /// and batch centres summed), then one all-reduce over the ranks and the average over all
    /// groups, the centre update, clipping, AdamW and the teacher EMA — the same on every rank.
    fn step_group(
        &mut self,
        fetch: &mut dyn FnMut(usize) -> Result<TrainBatch>,
        slice: Slice,
        epoch: u64,
        global_step: u64,
        comm: &mut dyn Collective,
    ) -> Result<StepReport> {
        let (lr, wd, mom, tau) = self.schedules.at(epoch, global_step);
        let groups = slice.group() as usize;
        let first = slice.first_group() as usize;
        // Per group: total, L_cls, L_udi, L_patch, H(P0), H(P1), H(P2).
        let mut scalars = [0f64; 7];
        let mut timings = [0f64; 3];
        let mut sum: Option<Tensor> = None;
        // Each pass's loss sums and teacher entropies, read in one transfer after the last pass.
        let mut losses = Vec::new();
        let mut reads = Vec::new();
        for m in 0..slice.accumulate as usize {
            let batch = fetch(m)?;
            let pass = self.forward_backward(&batch, epoch, global_step, (first + m, groups))?;
            reads.push(pass.loss.sums.clone());
            reads.push(pass.teacher_entropy);
            losses.push(pass.loss);
            for (a, x) in timings.iter_mut().zip(pass.timings) {
                *a += x;
            }
            // Gradients and batch centres in one buffer: one all-reduce per step.
            sum = Some(match sum {
                Some(s) => (s + pass.grads)?,
                None => pass.grads,
            });
        }
        let vals = Tensor::cat(&reads, 0)?.to_vec1::<f64>()?;
        let mut at = 0;
        for parts in &losses {
            let n = parts.sums.dim(0)?;
            let v = parts.values(&vals[at..at + n]);
            let h = &vals[at + n..at + n + 3];
            at += n + 3;
            if !v.total.is_finite() {
                bail!(
                    "non-finite loss {} at epoch {epoch}, step {global_step} (L_cls {}, L_udi {}, L_patch {})",
                    v.total,
                    v.cls,
                    v.udi,
                    v.patch
                );
            }
            for (a, x) in scalars
                .iter_mut()
                .zip([v.total, v.cls, v.udi, v.patch, h[0], h[1], h[2]])
            {
                *a += x;
            }
        }
        let t3 = prof::mark(&self.device)?;
        // The host values first: over TCP, it also finds a rank that died before NCCL waits.
        comm.all_reduce_f64(&mut scalars)?;
        let mut mean = comm.all_reduce_tensor(&sum.context("no batch in the step")?)?;
        if groups > 1 {
            mean = (mean / groups as f64)?;
            for x in &mut scalars {
                *x /= groups as f64;
            }
        }
        let (n, k) = (self.layout.n, self.cfg.model.out_dim);
        let g = mean.narrow(0, 0, n)?;
        let batch_centres = Centres {
            cls: mean.narrow(0, n, k)?,
            udi: mean.narrow(0, n + k, k)?,
            patch: mean.narrow(0, n + 2 * k, k)?,
        };
        self.centres = self
            .centres
            .ema(&batch_centres, self.cfg.loss.center_momentum)?;

        // The trainable parameters' ‖g‖² and the new centres' norms: the step's second and last
        // read (after it, the host only queues work).
        let read = [self.sq_norms.squared_norms(&g)?, self.centres.norms()?];
        let vals = Tensor::cat(&read, 0)?.to_vec1::<f64>()?;
        let (sq, norms) = vals.split_at(vals.len() - 3);

        // Clipping, last-layer freeze, AdamW and the teacher EMA in one update of the state.
        let (segs, plan) = self.clip_and_plan(sq, epoch, lr, wd)?;
        let o = &self.cfg.optim;
        self.state.inplace_op3(
            &g,
            &meta_tensor(&segs, &self.device)?,
            &AdamwEma {
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                momentum: mom,
            },
        )?;
        let t4 = prof::mark(&self.device)?;
        let [loss, loss_cls, loss_udi, loss_patch, h0, h1, h2] = scalars;
        let [t_teacher, t_student, t_backward] = timings;
        let stats = StepStats {
            epoch,
            global_step,
            loss,
            loss_cls,
            loss_udi,
            loss_patch,
            lr,
            weight_decay: wd,
            momentum: mom,
            teacher_temp: tau,
            teacher_entropy: [h0, h1, h2],
            centre_norms: [norms[0], norms[1], norms[2]],
            grad_norm: plan.norm,
            timings: [t_teacher, t_student, t_backward, (t4 - t3).as_secs_f64()],
        };
        let grad_norms = self
            .layout
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), plan.pre[i], plan.post[i]))
            .collect();
        Ok(StepReport { stats, grad_norms })
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let own = |k: usize, i: usize| -> Result<Tensor> {
            Ok(self
                .layout
                .view(&self.part(k)?, i)?
                .force_contiguous()?
                .detach())
        };
        for (prefix, k) in [("student.", 0), ("teacher.", 3)] {
            for (i, e) in self.layout.entries.iter().enumerate() {
                out.push((format!("{prefix}{}", e.name), own(k, i)?));
            }
        }
        for (n, t) in self.centres.named_tensors() {
            out.push((n, t.force_contiguous()?.detach()));
        }
        for (i, e) in self.layout.entries.iter().enumerate() {
            if self.steps[i] > 0 {
                out.push((format!("optim.{}.exp_avg", e.name), own(1, i)?));
                out.push((format!("optim.{}.exp_avg_sq", e.name), own(2, i)?));
                out.push((
                    format!("optim.{}.step", e.name),
                    Tensor::new(&[self.steps[i] as i64], &self.device)?,
                ));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        self.load_params(map, what)?;
        self.centres =
            Centres::from_map(map, self.cfg.model.out_dim, self.dtype, &self.device, what)?;
        self.load_optim(map, what)
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
