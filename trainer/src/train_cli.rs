//! The `train`, `knn`, `export` and `plot` subcommands: argument structs and the single call
//! each makes into the library.

use crate::bad_records::RecordNames;
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::device::DeviceFlag;
use crate::export::{self, VitShape};
use crate::knn::KnnParams;
use crate::knn_eval;
use crate::loaders::find_loader_bin;
use crate::train::{self, BatchFeed, TrainOptions};
use crate::train_feed::{BatchSource, InProcessFeed, LoaderLaunch, RingFeed};
use crate::vit::ClassToken;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use shared::config::PipelineConfig;
use shared::ring::RingSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run config (TOML: [data] [augment] [model] [loss] [optim] [run]).
    #[arg(long)]
    pub config: PathBuf,
    /// Packed shard directory (`shard-tool pack`).
    #[arg(long)]
    pub shards: PathBuf,
    /// Run directory: config.toml, metrics.jsonl, checkpoints/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Override one config value, e.g. `--set optim.lr=1e-3` (repeatable; TOML values). The
    /// run's config.toml records the result; pass the same overrides with --resume.
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Training step implementation: explicit (hand-written backward over flat buffers) or
    /// autograd (candle's). Same as `--set run.engine=...`; default: explicit on the CPU,
    /// autograd on CUDA.
    #[arg(long, value_enum)]
    pub engine: Option<crate::engine::EngineKind>,
    /// Stop after N optimiser steps in total (with a final checkpoint).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Copy the next batch out of the ring and onto the device while a step runs (same as
    /// `--set run.prefetch=...`; default: on for the CPU, off on CUDA).
    #[arg(long, value_name = "BOOL")]
    pub prefetch: Option<bool>,
    /// Gradient accumulation: per-rank batches per optimiser step (same as
    /// `--set run.accumulate=K`); the global batch is `data.batch_size` × ranks × K.
    #[arg(long)]
    pub accumulate: Option<u32>,
    /// Loader processes to start (default: one per 8 cores, at least 1).
    #[arg(long)]
    pub loaders: Option<usize>,
    /// Worker threads per loader (default: cores / loaders).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Ring name (default: udi-train-<pid>-<time>).
    #[arg(long)]
    pub ring: Option<String>,
    /// Do not start loaders: attach to --ring, fed by `loader run` processes started by hand
    /// with `--config RUN/config.toml` (the effective config, written before the trainer waits).
    #[arg(long, requires = "ring")]
    pub external_loaders: bool,
    /// The `loader` executable (default: next to this one).
    #[arg(long)]
    pub loader_bin: Option<PathBuf>,
    /// Build batches inside the trainer process (no loaders, no ring): debugging and tests.
    #[arg(long, conflicts_with_all = ["external_loaders", "loaders"])]
    pub in_process: bool,
    /// auto (the CUDA GPU LOCAL_RANK, default 0, when this binary has CUDA support and a GPU is
    /// usable, else the CPU),
    /// cpu or cuda.
    #[arg(long, default_value_t = DeviceFlag::Auto)]
    pub device: DeviceFlag,
    /// Same as `--device cuda` (kept for older scripts).
    #[arg(long, hide = true)]
    pub cuda: bool,
}

pub fn device(flag: DeviceFlag, cuda: bool) -> Result<Device> {
    let flag = if cuda { DeviceFlag::Cuda } else { flag };
    let dev = crate::device::pick(flag)?;
    tracing::info!("device: {}", crate::device::name(&dev));
    Ok(dev)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Names a record by shard file, dataset index and source path (for bad-record messages).
pub fn shard_record_names(ds: shared::shard::Dataset) -> RecordNames {
    Box::new(move |i| match ds.record(i) {
        Ok(r) => format!("{}: record {i} ({})", ds.shard_file(r.shard), r.path),
        Err(e) => format!("record {i}: {e}"),
    })
}

/// Applies `TABLE.KEY=VALUE` overrides to a TOML document (values parsed as TOML, else taken
/// as strings); returns the new document text.
pub fn apply_overrides(text: &str, overrides: &[String]) -> Result<String> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = text.parse().context("parsing the config for --set")?;
    for o in overrides {
        let (path, val) = o
            .split_once('=')
            .with_context(|| format!("--set {o}: expected TABLE.KEY=VALUE"))?;
        let value = match format!("v = {}", val.trim()).parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap(),
            Err(_) => toml::Value::String(val.trim().to_string()),
        };
        let keys: Vec<&str> = path.trim().split('.').collect();
        let (last, tables) = keys
            .split_last()
            .with_context(|| format!("--set {o}: empty key"))?;
        let mut t = &mut doc;
        for k in tables {
            t = t
                .entry(k.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("--set {o}: {k} is not a table"))?;
        }
        t.insert(last.to_string(), value);
    }
    Ok(toml::to_string(&doc)?)
}

pub fn train_main(a: &TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading config {}", a.config.display()))?;
    let mut overrides = a.overrides.clone();
    if let Some(e) = a.engine {
        overrides.push(format!("run.engine=\"{e}\""));
    }
    if let Some(k) = a.accumulate {
        overrides.push(format!("run.accumulate={k}"));
    }
    if let Some(p) = a.prefetch {
        overrides.push(format!("run.prefetch={p}"));
    }
    let text = apply_overrides(&text, &overrides)?;
    let (cfg, run) = train::parse_config(&text, &a.config.display().to_string())?;
    // Data-parallel: this process's rank (torchrun / SLURM / `trainer launch` variables) and the
    // rendezvous with the other ranks.
    let dev = device(a.device, a.cuda)?;
    let mut comm = crate::dist::join(Duration::from_secs_f64(run.collective_timeout_s), &dev)?;
    let world = comm.world().clone();
    let slice = train::data_slice(comm.as_ref(), &run)?;
    if world.size > 1 {
        eprintln!(
            "rank {} of {} (local rank {}): per-rank batch {}, accumulate {}, global batch {}",
            world.rank,
            world.size,
            world.local_rank,
            cfg.data.batch_size,
            slice.accumulate,
            cfg.data.batch_size as u64 * slice.group()
        );
    }
    // Before anything is started: the lock, the resume point, and RUN/config.toml, the effective
    // config every loader of this run reads (rank 0 prepares it, the other ranks follow).
    let run_dir = crate::dist::open_run(comm.as_mut(), &a.out, &text, a.resume)?;
    let pipe = PipelineConfig {
        data: cfg.data.clone(),
        augment: cfg.augment.clone(),
    };
    let open = || {
        shared::shard::Dataset::open(&a.shards)
            .with_context(|| format!("opening shards {}", a.shards.display()))
    };
    let ds = open()?;
    let (n, id) = (ds.len(), ds.dataset_id());
    let names = shard_record_names(open()?);
    let source: Box<dyn BatchSource> = if a.in_process {
        let engine = loader::engine::CropEngine::new(cfg.augment.clone());
        let src = loader::source::DatasetSource::new(ds, engine, cfg.data.seed);
        Box::new(
            InProcessFeed::new(Arc::new(src), &pipe, id, cores())
                .with_slice(slice)
                .with_record_names(names),
        )
    } else {
        drop(ds);
        let name = a
            .ring
            .clone()
            .unwrap_or_else(crate::train_feed::own_ring_name);
        let config = run_dir.config_path();
        let launch = if a.external_loaders {
            eprintln!(
                "waiting for loaders on ring '{name}': loader run --shards {} --ring {name} --config {}{}",
                a.shards.display(),
                config.display(),
                if slice == shared::rng::Slice::WHOLE {
                    String::new()
                } else {
                    format!(
                        " --rank {} --world {} --accumulate {}",
                        slice.rank, slice.world, slice.accumulate
                    )
                }
            );
            None
        } else {
            let processes = a.loaders.unwrap_or((cores() / 8).max(1));
            let threads = a.threads.unwrap_or((cores() / processes).max(1));
            let l = LoaderLaunch {
                loader_bin: find_loader_bin(a.loader_bin.as_deref())?,
                shards: a.shards.clone(),
                config,
                processes,
                threads,
                slots: run.ring_slots,
                slice,
                heartbeat_timeout: Duration::from_secs_f64(run.loader_heartbeat_timeout_s),
            };
            eprintln!(
                "starting {processes} loader process(es) × {threads} thread(s): {}",
                l.loader_bin.display()
            );
            Some(l)
        };
        Box::new(
            RingFeed::start(
                &name,
                &RingSpec::new(&pipe, id, n, run.ring_slots).with_slice(slice),
                Duration::from_secs_f64(run.batch_timeout_s),
                launch.as_ref(),
            )?
            .with_record_names(names),
        )
    };
    let mut feed: Box<dyn BatchFeed> = match run.prefetch_on(&dev) {
        true => Box::new(crate::prefetch::Prefetch::new(source, &dev)),
        false => Box::new(source),
    };
    // Ctrl-C / SIGTERM: finish the step, checkpoint, stop; a second one exits at once.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let opts = TrainOptions {
        config_toml: text,
        run_dir: a.out.clone(),
        resume: a.resume,
        max_steps: a.max_steps,
        device: dev,
        quiet: false,
        stop: Some(stop),
    };
    let s = train::train_in(&run_dir, &opts, feed.as_mut(), comm.as_mut())?;
    if world.rank > 0 {
        return Ok(());
    }
    if world.master.is_some() && s.last_step > s.first_step {
        eprintln!(
            "all-reduce: {:.2} ms per step over {} steps (world size {})",
            1e3 * comm.reduce_seconds() / (s.last_step - s.first_step) as f64,
            s.last_step - s.first_step,
            world.size
        );
    }
    eprintln!(
        "done: steps {}..{} of {}; mean {:.1} img/s, data wait {:.1}% of step time; checkpoint {}",
        s.first_step,
        s.last_step,
        s.total_steps,
        s.mean_images_per_s,
        100.0 * s.mean_data_wait,
        s.last_checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
    Ok(())
}

/// `trainer checkpoint verify RUN`: one line per checkpoint; an error if any is damaged.
pub fn checkpoint_verify_main(run: &Path) -> Result<()> {
    let all = checkpoint::verify_run(run)?;
    let mut damaged = 0;
    for (c, r) in &all {
        match r {
            Ok(s) => println!(
                "ok       {} (step {}, {} file(s) checked)",
                c.dir.display(),
                s.step,
                s.files.len() + 1
            ),
            Err(e) => {
                damaged += 1;
                println!("DAMAGED  {}: {e:#}", c.dir.display());
            }
        }
    }
    let newest = all.iter().rev().find(|(_, r)| r.is_ok());
    if damaged > 0 {
        bail!(
            "{damaged} of {} checkpoint(s) damaged; --resume would continue from {}",
            all.len(),
            newest.map_or("none".into(), |(c, _)| c.dir.display().to_string())
        );
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TokenArg {
    Cls,
    ClsPlus,
}

#[derive(Args, Debug)]
pub struct KnnArgs {
    /// A checkpoint dir, or a run dir (its newest checkpoint).
    #[arg(long, required_unless_present_any = ["random_init", "raw_pixels"])]
    pub checkpoint: Option<PathBuf>,
    /// Train images: a packed shard dir or an ImageFolder (DIR/<class>/<image>).
    #[arg(long)]
    pub train: PathBuf,
    /// Val images, same forms.
    #[arg(long)]
    pub val: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f32,
    #[arg(long, value_enum, default_value_t = TokenArg::Cls)]
    pub token: TokenArg,
    /// Evaluate a randomly initialised backbone (the config's seed) instead of the checkpoint's.
    #[arg(long)]
    pub random_init: bool,
    /// Evaluate the student's backbone instead of the teacher's (diagnostics).
    #[arg(long)]
    pub student: bool,
    /// Baseline without any network: k-NN on the normalised eval-transformed pixels
    /// (the crop size comes from --config or the checkpoint's config).
    #[arg(long, conflicts_with_all = ["random_init", "student"])]
    pub raw_pixels: bool,
    /// Config (default: the one saved in the checkpoint).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// auto, cpu or cuda (as for `train`).
    #[arg(long, default_value_t = DeviceFlag::Auto)]
    pub device: DeviceFlag,
    #[arg(long, hide = true)]
    pub cuda: bool,
}

pub(crate) fn load_config(
    config: Option<&Path>,
    ckpt: Option<&checkpoint::CheckpointPath>,
) -> Result<TrainConfig> {
    match (config, ckpt) {
        (Some(p), _) => TrainConfig::from_toml_file(p),
        (None, Some(c)) => {
            let s = checkpoint::load_state(c)?;
            TrainConfig::from_toml_str(&s.config_toml)
                .map_err(|e| anyhow::anyhow!("{}: config: {e:#}", c.state().display()))
        }
        (None, None) => bail!("--random-init or --raw-pixels without --checkpoint needs --config"),
    }
}

pub fn knn_main(a: &KnnArgs) -> Result<()> {
    let dev = device(a.device, a.cuda)?;
    // Under `trainer launch` / torchrun / SLURM the ranks share the feature extraction.
    let mut comm = crate::dist::join(crate::dist::EVAL_TIMEOUT, &dev)?;
    let ckpt = a
        .checkpoint
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let cfg = load_config(a.config.as_deref(), ckpt.as_ref())?;
    let tensors = match (&ckpt, a.random_init || a.raw_pixels) {
        (Some(c), false) => Some(checkpoint::load(c, &dev)?.0),
        _ => None,
    };
    let prefix = if a.student { "student." } else { "teacher." };
    let (_store, vit) = knn_eval::backbone_from(&cfg, tensors.as_ref(), prefix, &dev)?;
    let train = knn_eval::open_images(&a.train)?;
    let val = knn_eval::open_images(&a.val)?;
    let token = match a.token {
        TokenArg::Cls => ClassToken::Cls,
        TokenArg::ClsPlus => ClassToken::ClsPlus,
    };
    let p = KnnParams {
        k: a.k,
        temperature: a.temperature,
    };
    let extractor = if a.raw_pixels {
        knn_eval::Extractor::RawPixels
    } else {
        knn_eval::Extractor::Backbone(&vit, token)
    };
    let r = knn_eval::evaluate_shared(
        extractor,
        train.as_ref(),
        val.as_ref(),
        cfg.augment.global_size,
        a.chunk.max(1),
        p,
        &dev,
        comm.as_mut(),
    )?;
    if comm.world().rank > 0 {
        return Ok(());
    }
    let what = match &ckpt {
        _ if a.raw_pixels => "raw pixels".to_string(),
        Some(c) if !a.random_init => c.dir.display().to_string(),
        _ => "random init".to_string(),
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["token"] = serde_json::json!(format!("{:?}", a.token).to_lowercase());
        v["weights"] = serde_json::json!(what);
        println!("{v}");
    } else {
        println!(
            "k-NN ({what}, token {:?}, k {}, T {}): top-1 {:.2}%  top-5 {:.2}%  ({} train, {} val)",
            a.token, r.k, r.temperature, r.top1, r.top5, r.n_train, r.n_val
        );
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    Timm,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Timm)]
    pub format: ExportFormat,
    #[arg(long)]
    pub out: PathBuf,
}

/// The timm shape of a config's backbone.
pub fn vit_shape(cfg: &TrainConfig) -> VitShape {
    let g = cfg.pos_grid();
    VitShape {
        depth: cfg.model.depth,
        dim: cfg.model.dim,
        mlp_hidden: cfg.model.mlp_ratio * cfg.model.dim,
        patch: cfg.augment.patch_size as usize,
        n_patches: g * g,
    }
}

/// Writes the teacher backbone of `ckpt` with timm's names; returns the tensor count.
pub fn export_checkpoint(ckpt: &Path, out: &Path) -> Result<usize> {
    let c = checkpoint::resolve(ckpt)?;
    let (tensors, state) = checkpoint::load(&c, &Device::Cpu)?;
    let cfg = TrainConfig::from_toml_str(&state.config_toml)?;
    let t = export::to_timm(&tensors, "teacher.backbone.", vit_shape(&cfg))?;
    export::save(&t, out)?;
    Ok(t.len())
}

pub fn export_main(a: &ExportArgs) -> Result<()> {
    let ExportFormat::Timm = a.format;
    let n = export_checkpoint(&a.checkpoint, &a.out)?;
    println!("wrote {} ({n} tensors, timm names; load with timm.create_model('vit_small_patch16_224', reg_tokens=1, num_classes=0) for ViT-S/16 configs)", a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (reads metrics.jsonl).
    pub run_dir: PathBuf,
    /// Output PNG (default RUN_DIR/curves.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn plot_main(a: &PlotArgs) -> Result<()> {
    let p = crate::plot::plot_run(&a.run_dir, a.out.as_deref())?;
    println!("wrote {}", p.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_nested_values_and_keep_the_rest() {
        let text = "[data]\nbatch_size = 16\n[optim]\nlr = 5e-4\nepochs = 4\n";
        let out = apply_overrides(
            text,
            &[
                "optim.lr=1e-2".into(),
                "run.keep_last=2".into(),
                "optim.epochs = 7".into(),
            ],
        )
        .unwrap();
        let doc: toml::Table = out.parse().unwrap();
        assert_eq!(doc["optim"]["lr"].as_float(), Some(1e-2));
        assert_eq!(doc["optim"]["epochs"].as_integer(), Some(7));
        assert_eq!(doc["run"]["keep_last"].as_integer(), Some(2));
        assert_eq!(doc["data"]["batch_size"].as_integer(), Some(16));
        assert!(apply_overrides(text, &["optim.lr".into()]).is_err());
        assert!(apply_overrides(text, &["data.batch_size.x=1".into()]).is_err());
    }
}
