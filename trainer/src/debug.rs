//! The reproducibility commands behind the CLI: `init-weights`, `make-batch`, `debug-step` and
//! `bench`. See the README section "Checking a step against another implementation".
//!
//! **Weights file** (`init-weights` output, `debug-step --weights` input): safetensors with
//! `student.<name>` and `teacher.<name>` for every parameter of [`crate::params`] (F32);
//! optionally `optim.<name>.{exp_avg,exp_avg_sq,step}` to start from a non-fresh AdamW state.
//!
//! **Batch file** (`make-batch` output): see [`crate::data::batch_file_tensors`]; plus
//! `center.{cls,udi,patch}` F32 [K] and `epoch`, `step` I64 [1].
//!
//! **debug-step outputs**: a JSON report (`loss`, `loss_cls`, `loss_udi`, `loss_patch`, the
//! schedule values, centre sums and norms, per-parameter gradient norms before and after
//! clipping — `null` where a parameter got no update, e.g. the last layer during epoch 0) and a
//! safetensors file with the updated `student.*`, `teacher.*`, `center.*` and the AdamW moments
//! `optim.<name>.{exp_avg,exp_avg_sq,step}`.

use crate::config::TrainConfig;
use crate::data::{batch_file_tensors, batch_from_file_tensors, synthetic_batch, TrainBatch};
use crate::engine::EngineKind;
use crate::kernels::Compute;
use crate::loss::Centres;
use crate::step::{StepStats, Trainer};
use crate::vit::ProbePart;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use shared::batch::BatchView;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

fn save(tensors: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))
}

fn load(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, dev)
        .with_context(|| format!("reading safetensors {}", path.display()))
}

/// Writes freshly initialised student and teacher (= copy) weights.
pub fn init_weights(cfg: &TrainConfig, out: &Path) -> Result<()> {
    let tr = Trainer::new(cfg, 1, &Device::Cpu)?;
    let mut t = Vec::new();
    for (n, x) in tr.student.named_tensors() {
        t.push((format!("student.{n}"), x));
    }
    for (n, x) in tr.teacher.named_tensors() {
        t.push((format!("teacher.{n}"), x));
    }
    save(t, out)
}

/// Writes a synthetic batch file (random pixels and well-formed random SRS rows), zero centres,
/// epoch 0 and step 0.
pub fn make_batch(cfg: &TrainConfig, batch_size: u32, seed: u64, out: &Path) -> Result<()> {
    let (layout, buf) = synthetic_batch(&cfg.augment, batch_size, seed);
    let view = BatchView::new(&layout, buf.bytes()).map_err(anyhow::Error::msg)?;
    let mut m = batch_file_tensors(&view, &cfg.augment, &Device::Cpu)?;
    for (n, t) in Centres::zeros(cfg.model.out_dim, DType::F32, &Device::Cpu)?.named_tensors() {
        m.insert(n, t);
    }
    m.insert("epoch".into(), Tensor::new(&[0i64], &Device::Cpu)?);
    m.insert("step".into(), Tensor::new(&[0i64], &Device::Cpu)?);
    candle_core::safetensors::save(&m, out).with_context(|| format!("writing {}", out.display()))
}

#[derive(Serialize)]
struct CentreSummary {
    sum: f64,
    norm: f64,
}

#[derive(Serialize)]
struct GradNorm {
    name: String,
    pre_clip: Option<f64>,
    post_clip: Option<f64>,
}

#[derive(Serialize)]
struct DebugReport {
    device: String,
    precision: String,
    kernels: String,
    engine: String,
    #[serde(flatten)]
    stats: StepStats,
    iters_per_epoch: u64,
    centres: BTreeMap<String, CentreSummary>,
    grad_norms: Vec<GradNorm>,
}

fn scalar_i64(m: &HashMap<String, Tensor>, k: &str, what: &str) -> Result<u64> {
    let t = m.get(k).with_context(|| format!("{what}: missing {k}"))?;
    let v: Vec<i64> = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    anyhow::ensure!(
        v.len() == 1 && v[0] >= 0,
        "{what}: {k} must hold one non-negative integer"
    );
    Ok(v[0] as u64)
}

#[allow(clippy::too_many_arguments)]
/// Runs one training step with drop path off and writes the JSON report and the tensors.
pub fn debug_step(
    cfg: &TrainConfig,
    weights: &Path,
    batch: &Path,
    out_json: &Path,
    out_tensors: &Path,
    iters_per_epoch: u64,
    dev: &Device,
    compute: Compute,
    engine: EngineKind,
) -> Result<()> {
    let dev = dev.clone();
    let mut tr = crate::step::build(engine, cfg, iters_per_epoch, &dev, DType::F32, compute)?;
    tr.set_drop_path(false);
    let mut w = load(weights, &dev)?;
    let wname = weights.display().to_string();
    let b = load(batch, &dev)?;
    let bname = batch.display().to_string();
    let tb: TrainBatch = batch_from_file_tensors(&b, &cfg.augment, DType::F32, &dev, &bname)?;
    // The weights file's parameters and optimiser state, the batch file's centres.
    let centres = Centres::from_map(&b, cfg.model.out_dim, DType::F32, &dev, &bname)?;
    w.extend(centres.named_tensors());
    tr.load_state(&w, &wname)?;
    let epoch = scalar_i64(&b, "epoch", &bname)?;
    let step = scalar_i64(&b, "step", &bname)?;
    let rep = tr.step_detailed(&tb, epoch, step)?;
    let mut centres = BTreeMap::new();
    for (n, t) in tr.centres().named_tensors() {
        let t = t.to_dtype(DType::F64)?;
        centres.insert(
            n,
            CentreSummary {
                sum: t.sum_all()?.to_scalar()?,
                norm: t.sqr()?.sum_all()?.sqrt()?.to_scalar()?,
            },
        );
    }
    let report = DebugReport {
        device: crate::device::name(&dev),
        precision: compute.precision.to_string(),
        kernels: compute.kernels.to_string(),
        engine: engine.to_string(),
        stats: rep.stats,
        iters_per_epoch,
        centres,
        grad_norms: rep
            .grad_norms
            .into_iter()
            .map(|(name, pre_clip, post_clip)| GradNorm {
                name,
                pre_clip,
                post_clip,
            })
            .collect(),
    };
    std::fs::write(out_json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out_json.display()))?;
    save(tr.state_tensors()?, out_tensors)
}

/// Bench result (seconds are means over the timed steps).
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub device: String,
    pub precision: String,
    pub kernels: String,
    pub engine: String,
    pub batch_size: usize,
    pub steps: usize,
    pub step_s: f64,
    pub ms_per_step: f64,
    pub images_per_s: f64,
    /// Stage seconds per step: the timed steps' on the CPU; on a GPU, whose timed steps do not
    /// wait between stages, those of the `--profile` steps (None without it).
    pub teacher_fwd_s: Option<f64>,
    pub student_fwd_loss_s: Option<f64>,
    pub backward_s: Option<f64>,
    pub optim_ema_s: Option<f64>,
    /// Tensor memory in use at its highest during the timed steps: CUDA's pool high-water mark
    /// (every tensor, no allocator slack); on the CPU the same count of tensor storage, a model of
    /// the device's (`crate::device::peak_memory`).
    pub peak_mem_gib: Option<f64>,
    /// With `--profile`: forward stages over 2 more steps, each synchronised ([`crate::prof`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<ProfileRow>,
    /// With `--traffic` on the CPU: what the timed steps' ops read and write per step, as the
    /// device would run them ([`candle_core::memory`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
}

/// Memory traffic and matmul FLOPs of one step, counted op by op on the CPU.
#[derive(Debug, Serialize)]
pub struct Traffic {
    /// Storage ops (each one kernel launch or memset/upload on CUDA; a custom op may launch a few).
    pub ops: f64,
    pub read_gib: f64,
    pub written_gib: f64,
    pub matmul_tflop: f64,
    /// Per op name, the most bytes first.
    pub by_op: Vec<OpTrafficRow>,
}

#[derive(Debug, Serialize)]
pub struct OpTrafficRow {
    pub op: String,
    pub calls: f64,
    pub read_gib: f64,
    pub written_gib: f64,
    pub tflop: f64,
}

impl Traffic {
    /// The totals recorded over `steps` steps, per step.
    fn per_step(ops: Vec<(&'static str, candle_core::memory::OpTraffic)>, steps: f64) -> Self {
        const GIB: f64 = (1u64 << 30) as f64;
        let mut by_op: Vec<OpTrafficRow> = ops
            .into_iter()
            .map(|(op, t)| OpTrafficRow {
                op: op.to_string(),
                calls: t.calls as f64 / steps,
                read_gib: t.read_bytes as f64 / GIB / steps,
                written_gib: t.written_bytes as f64 / GIB / steps,
                tflop: t.flops as f64 / 1e12 / steps,
            })
            .collect();
        by_op.sort_by(|a, b| (b.read_gib + b.written_gib).total_cmp(&(a.read_gib + a.written_gib)));
        Traffic {
            ops: by_op.iter().map(|r| r.calls).sum(),
            read_gib: by_op.iter().map(|r| r.read_gib).sum(),
            written_gib: by_op.iter().map(|r| r.written_gib).sum(),
            matmul_tflop: by_op.iter().map(|r| r.tflop).sum(),
            by_op,
        }
    }
}

/// The loss alone: forward and backward with the student's logits as leaf variables (seconds,
/// synchronised), i.e. the part of the backward phase that is the loss's.
fn loss_backward_probe(tr: &Trainer, batch: &TrainBatch, fused: bool) -> Result<(f64, f64)> {
    use crate::model::StudentOut;
    let dev = &tr.device;
    let t_out = tr.teacher_net().teacher(batch)?;
    let s_out = tr.student_net().student(batch, None)?;
    let leaf = |t: &Tensor| -> Result<Tensor> {
        Ok(candle_core::Var::from_tensor(&t.detach())?
            .as_tensor()
            .clone())
    };
    let s_leaf = StudentOut {
        cls: leaf(&s_out.cls)?,
        cls_plus: s_out.cls_plus.as_ref().map(leaf).transpose()?,
        patch: s_out.patch.as_ref().map(leaf).transpose()?,
    };
    drop(s_out);
    dev.synchronize()?;
    let t0 = Instant::now();
    let loss = crate::loss::udi_loss_with(
        &tr.cfg.loss,
        batch,
        &s_leaf,
        &t_out,
        &tr.centres,
        tr.cfg.loss.teacher_temp,
        fused,
    )?;
    dev.synchronize()?;
    let t1 = Instant::now();
    let grads = loss.total.backward()?;
    dev.synchronize()?;
    let t2 = Instant::now();
    drop(grads);
    Ok(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()))
}

/// Block-0 part `part` of the student on random `[n, t, D]` input (a leaf variable): seconds of
/// the forward and of the backward of `Σ y·r`, synchronised (after one untimed round).
fn block_probe(tr: &Trainer, part: ProbePart, n: usize, t: usize) -> Result<(f64, f64)> {
    let dev = &tr.device;
    let d = tr.cfg.model.dim;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, t, d), dev)?)?;
    let vit = &tr.student_net().backbone;
    let mut times = (0.0, 0.0);
    for _ in 0..2 {
        dev.synchronize()?;
        let t0 = Instant::now();
        let y = vit.probe(part, x.as_tensor())?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let r = Tensor::ones(y.dims(), DType::F32, dev)?;
        let loss = (y.to_dtype(DType::F32)? * &r)?.sum_all()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        let grads = loss.backward()?;
        dev.synchronize()?;
        times = ((t1 - t0).as_secs_f64(), t2.elapsed().as_secs_f64());
        drop(grads);
    }
    Ok(times)
}

/// One [`crate::prof`] scope: milliseconds and calls per step.
#[derive(Debug, Serialize)]
pub struct ProfileRow {
    pub scope: String,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
}

/// Times `steps` training steps (after `warmup` untimed ones) on a synthetic batch.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    cfg: &TrainConfig,
    device: &Device,
    batch_size: u32,
    warmup: usize,
    steps: usize,
    compute: Compute,
    engine: EngineKind,
    profile: bool,
    traffic: bool,
) -> Result<BenchResult> {
    anyhow::ensure!(
        !traffic || device.is_cpu(),
        "--traffic counts the ops of a CPU run (a model of the device's traffic): use --device cpu"
    );
    let (layout, buf) = synthetic_batch(&cfg.augment, batch_size, 7);
    let view = BatchView::new(&layout, buf.bytes()).map_err(anyhow::Error::msg)?;
    let batch = TrainBatch::from_view(&view, &cfg.augment, device)?;
    // Epoch 1 so that the last layer is trained too (the expensive case).
    let mut tr = crate::step::build(engine, cfg, 1000, device, DType::F32, compute)?;
    for i in 0..warmup {
        tr.step(&batch, 1, 1000 + i as u64)?;
    }
    // The timed steps as one run between two synchronisations: a step returns once its work is
    // queued, before the device has finished it.
    device.synchronize()?;
    crate::device::reset_peak_memory(device);
    if traffic {
        candle_core::memory::start_traffic();
    }
    let mut acc = [0.0; 4];
    let t = Instant::now();
    for i in warmup..warmup + steps {
        let s = tr.step(&batch, 1, 1000 + i as u64)?;
        for (a, x) in acc.iter_mut().zip(s.timings) {
            *a += x;
        }
    }
    device.synchronize()?;
    let wall = t.elapsed().as_secs_f64();
    let n = steps.max(1) as f64;
    let peak = crate::device::peak_memory(device);
    let traffic = traffic
        .then(|| Traffic::per_step(candle_core::memory::stop_traffic(), steps.max(1) as f64));
    // Stage times: exact on the CPU; on a GPU only from the profiled (synchronised) steps.
    let mut stages = device.is_cpu().then(|| acc.map(|a| a / n));
    let mut rows = Vec::new();
    if profile {
        const P: usize = 2;
        crate::prof::enable(true);
        let mut phases = [0.0; 4];
        for i in 0..P {
            let s = tr.step(&batch, 1, 2000 + i as u64)?;
            for (a, x) in phases.iter_mut().zip(s.timings) {
                *a += x;
            }
        }
        let scopes = crate::prof::take();
        crate::prof::enable(false);
        let p = P as f64;
        stages.get_or_insert(phases.map(|x| x / p));
        // (scope, seconds per step, calls per step)
        let row = |scope: &str, s: f64, calls: f64| ProfileRow {
            scope: scope.to_string(),
            ms_per_step: 1e3 * s,
            calls_per_step: calls,
        };
        for (name, s) in [
            ("phase: teacher forward", phases[0]),
            ("phase: student forward + loss", phases[1]),
            ("phase: backward", phases[2]),
            ("phase: optimiser + EMA", phases[3]),
        ] {
            rows.push(row(name, s / p, 1.0));
        }
        for (name, s, calls) in scopes {
            rows.push(row(name, s / p, calls as f64 / p));
        }
        // The probes isolate parts of the autograd step (any weights time the same).
        drop(tr);
        let tr = Trainer::with_options(cfg, 1000, device, DType::F32, compute)?;
        let (loss_fwd, loss_bwd) = loss_backward_probe(&tr, &batch, compute.fused())?;
        rows.push(row(
            "probe: loss forward (student logits as leaves)",
            loss_fwd,
            1.0,
        ));
        rows.push(row("probe: loss backward to the logits", loss_bwd, 1.0));
        // One block (and its two halves) at the student's global and local token shapes,
        // forward then backward, × depth for the whole backbone.
        let depth = cfg.model.depth as f64;
        let (sg, sl, pz) = (
            cfg.augment.global_size,
            cfg.augment.local_size,
            cfg.augment.patch_size,
        );
        let prefix = if cfg.loss.dino_only { 1 } else { 2 };
        let tokens = |side: u32| ((side / pz) * (side / pz)) as usize + prefix;
        let groups = [
            ("global", 2 * batch_size as usize, tokens(sg)),
            (
                "local",
                cfg.augment.n_local as usize * batch_size as usize,
                tokens(sl),
            ),
        ];
        for (group, n, t) in groups {
            if n == 0 {
                continue;
            }
            for (part, what) in [
                (ProbePart::Block, "block"),
                (ProbePart::AttentionCore, "qkv + attention core"),
                (ProbePart::Mlp, "mlp"),
            ] {
                let (f, b) = block_probe(&tr, part, n, t)?;
                let name =
                    |dir: &str| format!("probe ×{depth}: {what} {dir}, {group} [{n}, {t}, D]");
                rows.push(row(&name("forward"), f * depth, 1.0));
                rows.push(row(&name("backward"), b * depth, 1.0));
            }
        }
    }
    Ok(BenchResult {
        device: crate::device::name(device),
        precision: compute.precision.to_string(),
        kernels: compute.kernels.to_string(),
        engine: engine.to_string(),
        batch_size: batch_size as usize,
        steps,
        step_s: wall / n,
        ms_per_step: 1000.0 * wall / n,
        images_per_s: batch_size as f64 * n / wall,
        teacher_fwd_s: stages.map(|s| s[0]),
        student_fwd_loss_s: stages.map(|s| s[1]),
        backward_s: stages.map(|s| s[2]),
        optim_ema_s: stages.map(|s| s[3]),
        peak_mem_gib: peak.map(|b| b as f64 / (1u64 << 30) as f64),
        profile: rows,
        traffic,
    })
}
