//! The training loop of `trainer train`: batches from a [`BatchFeed`] (the shared-memory ring
//! fed by loader processes, or an in-process source in tests), one [`Trainer::step`] each,
//! metrics every step, checkpoints every `checkpoint_every` steps and at the end, exact resume.
//!
//! Exact resume rests on three facts: every tensor that evolves (student, teacher, centres,
//! AdamW moments and per-parameter step counts) is checkpointed bit for bit; every random stream
//! is keyed by (seed, step) or (seed, epoch, index) rather than carried state; and the data
//! cursor (epoch, batch) is saved, so the ring is sought to the very next batch.

use crate::bad_records::BadRecords;
use crate::checkpoint::{self, CheckpointManager, CheckpointState, DataCursor, FORMAT_VERSION};
use crate::config::TrainConfig;
use crate::data::TrainBatch;
use crate::dist::Collective;
use crate::metrics::{self, EntropyGuard, MetricsLog, StepMetrics};
use crate::run_dir::RunDir;
use crate::schedule::Schedules;
use crate::step::TrainStep;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use shared::config::AugmentConfig;
use shared::rng::Slice;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `[run]` table of a config: how a run is driven (not what is trained). Not part of the
/// config fingerprint, so changing it never invalidates a ring or a resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Save a checkpoint every N steps (and always at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (newest first).
    pub keep_last: usize,
    /// Print the console line every N steps (the JSONL gets every step).
    pub log_every: u64,
    /// Ring slots (batches in flight between loaders and trainer).
    pub ring_slots: u32,
    /// Give up when no batch arrives for this long (seconds).
    pub batch_timeout_s: f64,
    /// A loader process whose heartbeat (refreshed per sample, and at least every second while
    /// it waits) is older than this (seconds) is killed and restarted like a dead one.
    pub loader_heartbeat_timeout_s: f64,
    /// Steps before the teacher-entropy warnings are armed.
    pub entropy_grace_steps: u64,
    /// `bf16` or `f32` forward (default: bf16 on CUDA, f32 on the CPU; `crate::kernels`).
    pub precision: Option<crate::kernels::Precision>,
    /// `fused` or `candle` kernels (default: fused on CUDA, candle on the CPU).
    pub kernels: Option<crate::kernels::Kernels>,
    /// Bad records (failed CRC32C or undecodable, replaced by the loaders) tolerated before the
    /// run stops (default: 0.1 % of the records of an epoch).
    pub max_bad_records: Option<u64>,
    /// `explicit` or `autograd` training step (default: [`crate::engine::EngineKind::for_device`]).
    pub engine: Option<crate::engine::EngineKind>,
    /// Gradient accumulation: per-rank batches per optimiser step (`--accumulate`). The global
    /// batch is `data.batch_size` × ranks × `accumulate`.
    pub accumulate: u32,
    /// Data-parallel training: seconds a rank waits for the others in a collective before the
    /// job stops with an error naming the missing rank (rank 0's checkpoint writes included).
    pub collective_timeout_s: f64,
    /// Copy the next batch out of the ring and onto the device while the current step runs
    /// (`crate::prefetch`); same batches, same order. Default: on for the CPU; off on CUDA until
    /// the GPU check has compared its copy-stream path with the synchronous upload
    /// ([`RunConfig::prefetch_on`]).
    pub prefetch: Option<bool>,
    /// The explicit step keeps the blocks' LayerNorm and GELU outputs for its backward instead of
    /// recomputing them ([`crate::kernels::Compute::keep_activations`]).
    pub keep_activations: bool,
}

impl RunConfig {
    /// `prefetch`, or its default on `device`.
    pub fn prefetch_on(&self, device: &Device) -> bool {
        self.prefetch.unwrap_or(!device.is_cuda())
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 500,
            keep_last: 3,
            log_every: 10,
            ring_slots: 8,
            batch_timeout_s: 600.0,
            loader_heartbeat_timeout_s: 60.0,
            entropy_grace_steps: 100,
            precision: None,
            kernels: None,
            max_bad_records: None,
            engine: None,
            accumulate: 1,
            collective_timeout_s: 600.0,
            prefetch: None,
            keep_activations: false,
        }
    }
}

impl RunConfig {
    /// Reads the `[run]` table of a whole config document (other tables are ignored).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        #[derive(Deserialize, Default)]
        struct Doc {
            #[serde(default)]
            run: RunConfig,
        }
        let d: Doc = toml::from_str(text).context("[run]")?;
        ensure!(
            d.run.checkpoint_every > 0,
            "[run]: checkpoint_every must be > 0"
        );
        ensure!(d.run.log_every > 0, "[run]: log_every must be > 0");
        ensure!(d.run.ring_slots >= 2, "[run]: ring_slots must be >= 2");
        ensure!(d.run.accumulate >= 1, "[run]: accumulate must be >= 1");
        ensure!(
            d.run.collective_timeout_s > 0.0,
            "[run]: collective_timeout_s must be > 0"
        );
        Ok(d.run)
    }
}

/// One batch handed to the trainer.
pub struct FedBatch {
    pub batch: TrainBatch,
    pub epoch: u64,
    /// Batch number within the epoch.
    pub index: u64,
    /// The dataset index of each sample (the batch's `indices` section).
    pub indices: Vec<u64>,
}

impl FedBatch {
    /// Makes a staged batch's tensors through `up` (f32, training).
    pub fn upload(
        s: crate::staging::Staged,
        up: &dyn crate::staging::Upload,
        aug: &AugmentConfig,
    ) -> Result<Self> {
        let batch = TrainBatch::from_staged(&s, up, aug, candle_core::DType::F32)?;
        Ok(Self {
            batch,
            epoch: s.epoch,
            index: s.index,
            indices: s.indices,
        })
    }
}

/// Where batches come from. Batch `b` of epoch `e` is a pure function of (seed, e, b) for every
/// implementation, so a seek reproduces the stream exactly.
pub trait BatchFeed {
    fn n_samples(&self) -> u64;
    /// Identity of the dataset (checked on resume).
    fn dataset_id(&self) -> u64;
    /// The next batch returned is batch `batch` of epoch `epoch`.
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()>;
    fn next(&mut self, aug: &AugmentConfig, device: &Device) -> Result<FedBatch>;
    /// A record's name for messages (shard file, record, path where the feed knows them).
    fn record_name(&self, index: u64) -> String {
        format!("sample {index}")
    }
}

/// What `trainer train` was asked to do.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The whole config text (`[data] [augment] [model] [loss] [optim] [run]`).
    pub config_toml: String,
    pub run_dir: PathBuf,
    /// Continue from the newest checkpoint in `run_dir` (error if there is none).
    pub resume: bool,
    /// Stop after this many optimiser steps in total (with a final checkpoint).
    pub max_steps: Option<u64>,
    pub device: Device,
    /// No console lines (tests).
    pub quiet: bool,
    /// Set (e.g. by SIGINT/SIGTERM) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub first_step: u64,
    pub last_step: u64,
    pub total_steps: u64,
    pub last_checkpoint: Option<PathBuf>,
    pub last: Option<StepMetrics>,
    /// Mean fraction of step time spent waiting for data, over this invocation.
    pub mean_data_wait: f64,
    pub mean_images_per_s: f64,
}

/// Reads the config text of a run and checks both halves parse.
pub fn parse_config(text: &str, what: &str) -> Result<(TrainConfig, RunConfig)> {
    let cfg = TrainConfig::from_toml_str(text).map_err(|e| anyhow::anyhow!("{what}: {e:#}"))?;
    let run = RunConfig::from_toml_str(text).map_err(|e| anyhow::anyhow!("{what}: {e:#}"))?;
    Ok((cfg, run))
}

/// The next cursor after consuming batch `index` of `epoch`.
pub fn advance(epoch: u64, index: u64, batches_per_epoch: u64) -> DataCursor {
    if index + 1 >= batches_per_epoch {
        DataCursor {
            epoch: epoch + 1,
            batch: 0,
        }
    } else {
        DataCursor {
            epoch,
            batch: index + 1,
        }
    }
}

/// Runs (or resumes) training in one process until `max_steps` or the end of the schedule.
pub fn train(opts: &TrainOptions, feed: &mut dyn BatchFeed) -> Result<TrainSummary> {
    let run = RunDir::open(&opts.run_dir, &opts.config_toml, opts.resume)?;
    train_in(&run, opts, feed, &mut crate::dist::Single::new())
}

/// This rank's share of the sample order under `comm`'s world and `[run] accumulate`.
pub fn data_slice(comm: &dyn Collective, run: &RunConfig) -> Result<Slice> {
    let w = comm.world();
    Slice::new(w.size, w.rank, run.accumulate).map_err(anyhow::Error::msg)
}

/// [`train`] in a run directory already opened (rank 0: locked, config written, resume point
/// chosen; see [`crate::dist::open_run`]) before `feed` was started, as one rank of `comm`'s
/// world. A rank that fails tells the others, which then stop too.
pub fn train_in(
    run_dir: &RunDir,
    opts: &TrainOptions,
    feed: &mut dyn BatchFeed,
    comm: &mut dyn Collective,
) -> Result<TrainSummary> {
    let r = train_rank(run_dir, opts, feed, comm);
    if let Err(e) = &r {
        comm.abort(&format!("{e:#}"));
    }
    r
}

fn train_rank(
    run_dir: &RunDir,
    opts: &TrainOptions,
    feed: &mut dyn BatchFeed,
    comm: &mut dyn Collective,
) -> Result<TrainSummary> {
    let (cfg, run) = parse_config(&opts.config_toml, "config")?;
    let slice = data_slice(comm, &run)?;
    let lead = slice.rank == 0;
    let quiet = opts.quiet || !lead;
    let k = slice.accumulate as u64;
    let global_batch = cfg.data.batch_size as u64 * slice.group();
    // Optimiser steps per epoch: drop_last on the global batch.
    let bpe = slice.steps_per_epoch(feed.n_samples(), cfg.data.batch_size);
    ensure!(
        bpe > 0,
        "the dataset has {} samples, fewer than one global batch of {global_batch} ({} per rank × {} rank(s) × accumulate {k})",
        feed.n_samples(),
        cfg.data.batch_size,
        slice.world
    );
    let schedule_steps = cfg.optim.epochs * bpe;
    let end_step = opts
        .max_steps
        .map_or(schedule_steps, |m| m.min(schedule_steps));

    if !cfg.augment.photometric.is_loader() && opts.device.is_cpu() && !quiet {
        eprintln!(
            "warning: [augment] photometric = \"device\" on a CPU trainer: candle's CPU ops run the \
             photometric pipeline ~65x slower than the loader does (cargo bench -p trainer --bench photometric_device); \
             it pays only where the trainer's device is a GPU. Use \"loader\" here."
        );
    }
    let compute = crate::kernels::Compute {
        keep_activations: run.keep_activations,
        ..crate::kernels::Compute::for_device(&opts.device, run.precision, run.kernels)
    };
    // Data-parallel training and accumulation are built on the explicit step's flat buffers.
    let engine = match (run.engine, slice == Slice::WHOLE) {
        (None, false) => crate::engine::EngineKind::Explicit,
        (chosen, _) => crate::engine::EngineKind::for_device(&opts.device, chosen),
    };
    let mut trainer = crate::step::build(
        engine,
        &cfg,
        bpe,
        &opts.device,
        candle_core::DType::F32,
        compute,
    )?;
    // The peak lr follows the global batch (udi-spec §4: lr × global batch / 256).
    *trainer.schedules_mut() = Schedules::new(&cfg, bpe).with_global_batch(global_batch);
    let ckpts = CheckpointManager::new(run_dir.path(), run.keep_last)?;
    let mut step = 0u64;
    let mut cursor = DataCursor::default();
    if !quiet {
        for s in &run_dir.skipped {
            eprintln!("{s}");
        }
    }
    let mut bad = BadRecords::new(
        cfg.data.seed,
        feed.n_samples(),
        cfg.data.batch_size,
        run.max_bad_records,
    )
    .with_slice(slice);
    if let Some((c, state)) = &run_dir.resume_from {
        if let Some(known) = state.extra.get("bad_records").and_then(|v| v.as_array()) {
            bad.extend(known.iter().filter_map(|v| v.as_u64()));
        }
        // Checkpoints from before data-parallel training: one rank, no accumulation.
        let saved_global = state
            .extra
            .get("global_batch")
            .and_then(|v| v.as_u64())
            .unwrap_or(cfg.data.batch_size as u64);
        if saved_global != global_batch {
            bail!(
                "--resume: {} was trained with a global batch of {saved_global}, this run has {global_batch}                  ({} per rank × {} rank(s) × accumulate {k}): keep ranks × accumulate the same                  (e.g. half the GPUs with --accumulate twice as large)",
                c.dir.display(),
                cfg.data.batch_size,
                slice.world
            );
        }
        let saved_id = state.extra.get("dataset_id").and_then(|v| v.as_u64());
        if saved_id.is_some_and(|id| id != feed.dataset_id()) {
            bail!(
                "--resume: {} was trained on dataset {:016x}, these shards are {:016x}",
                c.dir.display(),
                saved_id.unwrap(),
                feed.dataset_id()
            );
        }
        let tensors = candle_core::safetensors::load(c.tensors(), &opts.device)
            .with_context(|| format!("reading {}", c.tensors().display()))?;
        trainer.load_state(&tensors, &format!("{}", c.tensors().display()))?;
        step = state.step;
        cursor = state.cursor;
        if !quiet {
            eprintln!(
                "resuming from {} (step {step}, next batch: epoch {} batch {})",
                c.dir.display(),
                cursor.epoch,
                cursor.batch
            );
        }
    }
    // The cursor counts optimiser steps; this rank reads `accumulate` batches per step.
    feed.seek(cursor.epoch, cursor.batch * k)?;
    let mut log = match lead {
        true => Some(MetricsLog::open(run_dir.path(), Some(step))?),
        false => None,
    };
    let mut guard = EntropyGuard::new(run.entropy_grace_steps);
    let first_step = step;
    let started = Instant::now();
    let ln_k = (cfg.model.out_dim as f32).ln();
    let mut last_ckpt = None;
    let mut last = None;
    let (mut wait_sum, mut ips_sum, mut n) = (0.0, 0.0, 0u64);
    let dataset_id = feed.dataset_id();
    let save = |trainer: &dyn TrainStep,
                step: u64,
                epoch: u64,
                cursor: DataCursor,
                bad: &BadRecords|
     -> Result<PathBuf> {
        let tensors: HashMap<String, Tensor> = trainer.state_tensors()?.into_iter().collect();
        // A checkpoint must be resumable: refuse to replace good ones with non-finite weights.
        if let Some(bad) = first_non_finite(&tensors)? {
            bail!(
                "tensor {bad} became non-finite at step {step}: not saving it; the last good checkpoint is {}",
                last_ckpt_display(&ckpts)
            );
        }
        let state = CheckpointState {
            format_version: FORMAT_VERSION,
            step,
            epoch,
            cursor,
            seed: cfg.data.seed,
            config_toml: opts.config_toml.clone(),
            files: Default::default(),
            extra: serde_json::json!({
                "dataset_id": dataset_id,
                "batches_per_epoch": bpe,
                "global_batch": global_batch,
                "world_size": slice.world,
                "accumulate": slice.accumulate,
                "bad_records": bad.all().collect::<Vec<u64>>(),
                "note": "centres are the tensors center.{cls,udi,patch}; RNG streams are keyed by (seed, step)",
            }),
        };
        // A failed write leaves the previous checkpoints as they were: say which to resume from.
        let saved = ckpts.save(&tensors, &state).map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\nTraining stopped at step {step}; the last good checkpoint is {}",
                last_ckpt_display(&ckpts)
            )
        })?;
        Ok(saved.dir)
    };
    while step < end_step {
        let t0 = Instant::now();
        let (epoch, in_epoch) = (cursor.epoch, cursor.batch);
        let global_step = epoch * bpe + in_epoch;
        let mut wait = Duration::ZERO;
        let mut found = Vec::new();
        let mut fetch = |m: usize| -> Result<TrainBatch> {
            // The step waits for its batch: to be produced, copied out of the ring and uploaded.
            let asked = Instant::now();
            let fed = feed.next(&cfg.augment, &opts.device)?;
            wait += asked.elapsed();
            let want = in_epoch * k + m as u64;
            ensure!(
                (fed.epoch, fed.index) == (epoch, want),
                "data feed returned epoch {} batch {}, expected epoch {epoch} batch {want}",
                fed.epoch,
                fed.index,
            );
            for i in bad.observe(fed.epoch, fed.index, &fed.indices) {
                if !opts.quiet {
                    eprintln!(
                        "trainer: bad record replaced by the loader (epoch {} batch {}): {}",
                        fed.epoch,
                        fed.index,
                        feed.record_name(i)
                    );
                }
                found.push(i);
            }
            Ok(fed.batch)
        };
        let stats = trainer
            .step_group(&mut fetch, slice, epoch, global_step, comm)
            .map(|r| r.stats)
            .map_err(|e| {
                anyhow::anyhow!(
                "training stopped at step {} (epoch {epoch}): {e:#}\nThe last good checkpoint is intact: {}",
                step + 1,
                last_ckpt_display(&ckpts)
            )
            })?;
        step += 1;
        cursor = advance(epoch, in_epoch, bpe);
        let dt = t0.elapsed().as_secs_f64();
        // One decision for all ranks: stop when any was asked to; every rank learns the bad
        // records the others met (so all hold the same set, and the limit stops all of them at
        // once); the data wait is averaged over the ranks.
        let asked = opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed));
        let mut shared = [asked as u8 as f64, wait.as_secs_f64() / dt.max(1e-9)];
        let after = |e: anyhow::Error| {
            anyhow::anyhow!(
                "{e:#}\nTraining stopped after step {step}; the last good checkpoint is {}",
                last_ckpt_display(&ckpts)
            )
        };
        comm.all_reduce_f64(&mut shared).map_err(after)?;
        if slice.world > 1 {
            let met = comm.all_gather_u64(&found).map_err(after)?;
            bad.extend(met.into_iter().flatten());
        }
        bad.check(&|i| feed.record_name(i)).map_err(after)?;
        let stopping = shared[0] > 0.0;
        let m = StepMetrics {
            step,
            epoch,
            loss: stats.loss as f32,
            loss_cls: stats.loss_cls as f32,
            loss_udi: stats.loss_udi as f32,
            loss_patch: stats.loss_patch as f32,
            lr: stats.lr,
            wd: stats.weight_decay,
            momentum: stats.momentum,
            teacher_temp: stats.teacher_temp,
            teacher_entropy: stats.teacher_entropy.map(|x| x as f32),
            ln_k,
            centre_norm: stats.centre_norms.map(|x| x as f32),
            images_per_s: global_batch as f64 / dt.max(1e-9),
            data_wait_frac: (shared[1] / slice.world as f64).min(1.0),
            elapsed_s: started.elapsed().as_secs_f64(),
            bad_records: bad.count(),
        };
        metrics::check_finite(&m).map_err(|e| {
            anyhow::anyhow!("{e:#}\nLast good checkpoint: {}", last_ckpt_display(&ckpts))
        })?;
        if let Some(log) = &mut log {
            log.write(&m)?;
        }
        wait_sum += m.data_wait_frac;
        ips_sum += m.images_per_s;
        n += 1;
        if !quiet {
            for w in guard.check(&m) {
                eprintln!("{w}");
            }
            if step.is_multiple_of(run.log_every) || step == end_step || step == first_step + 1 {
                eprintln!("{}", metrics::console_line(&m, end_step, first_step));
            }
        }
        if lead && (step.is_multiple_of(run.checkpoint_every) || step == end_step || stopping) {
            let p = save(trainer.as_ref(), step, epoch, cursor, &bad)?;
            if stopping && !quiet {
                eprintln!(
                    "stopped at step {step}; checkpoint {} (continue with --resume)",
                    p.display()
                );
            }
            last_ckpt = Some(p);
        }
        last = Some(m);
        if stopping {
            break;
        }
    }
    Ok(TrainSummary {
        first_step,
        last_step: step,
        total_steps: end_step,
        last_checkpoint: last_ckpt.or(ckpts.latest()?.map(|c| c.dir)),
        last,
        mean_data_wait: if n > 0 { wait_sum / n as f64 } else { 0.0 },
        mean_images_per_s: if n > 0 { ips_sum / n as f64 } else { 0.0 },
    })
}

/// The name of the first float tensor holding a NaN or an infinity (0·x + 0 is 0 iff x is finite).
pub fn first_non_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for k in names {
        let t = &tensors[k];
        if !t.dtype().is_float() {
            continue;
        }
        let s = t
            .affine(0.0, 0.0)?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        if !s.is_finite() {
            return Ok(Some(k.clone()));
        }
    }
    Ok(None)
}

fn last_ckpt_display(c: &CheckpointManager) -> String {
    match c.latest() {
        Ok(Some(p)) => format!("{} (step {})", p.dir.display(), p.step),
        _ => "none yet".into(),
    }
}

/// Checks a run directory holds what a finished or interrupted run leaves.
pub fn run_dir_summary(run_dir: &Path) -> Result<String> {
    let c = checkpoint::resolve(run_dir)?;
    Ok(format!("{} (step {})", c.dir.display(), c.step))
}
