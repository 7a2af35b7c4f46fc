#![allow(dead_code)]
use candle_core::{DType, Device};
use shared::batch::BatchView;
use trainer::config::TrainConfig;
use trainer::data::{synthetic_batch, TrainBatch};

pub fn repo_path(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

pub fn tiny_cfg() -> TrainConfig {
    TrainConfig::from_toml_file(&repo_path("configs/tiny.toml")).unwrap()
}

/// An even smaller config for f64 finite differences: 4×4 global grid, 2×2 local grid
/// (so the bicubic pos-embed resampling is exercised), 2 local crops, K = 24.
pub fn micro_cfg() -> TrainConfig {
    let mut c = tiny_cfg();
    c.augment.global_size = 32;
    c.augment.local_size = 16;
    c.augment.patch_size = 8;
    c.augment.n_local = 2;
    c.augment.global_window = 2;
    c.augment.local_window = 1;
    c.model.dim = 8;
    c.model.heads = 2;
    c.model.depth = 2;
    c.model.mlp_ratio = 2;
    c.model.head_hidden = 12;
    c.model.head_bottleneck = 6;
    c.model.out_dim = 24;
    c.validate().unwrap();
    c
}

pub fn batch(cfg: &TrainConfig, b: u32, seed: u64, dtype: DType) -> TrainBatch {
    let (layout, buf) = synthetic_batch(&cfg.augment, b, seed);
    let view = BatchView::new(&layout, buf.bytes()).unwrap();
    TrainBatch::from_view_dtype(&view, &cfg.augment, dtype, &Device::Cpu).unwrap()
}

pub fn to_vec_f64(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

// ---- end-to-end set-up shared by the e2e_* tests ------------------------------------------

/// A run config as a TOML document with per-test overrides: `micro` (the e2e tests' config:
/// batch 4, 32-px globals, 2 locals, a 2-block dim-32 ViT, K = 128, lr 0.05) or `tiny`
/// (configs/tiny.toml).
#[derive(Clone, Debug)]
pub struct TestConfig {
    doc: toml::Table,
}

impl TestConfig {
    pub fn micro(seed: u64) -> Self {
        let text = format!(
            r#"
[data]
batch_size = 4
seed = {seed}
[augment]
global_size = 32
local_size = 16
n_local = 2
patch_size = 8
global_window = 2
local_window = 2
[model]
dim = 32
depth = 2
heads = 2
head_hidden = 64
head_bottleneck = 16
out_dim = 128
[optim]
epochs = 2
warmup_epochs = 1
lr = 0.05
"#
        );
        Self {
            doc: text.parse().unwrap(),
        }
    }

    pub fn tiny() -> Self {
        Self::from_file("configs/tiny.toml")
    }

    /// A config file of the repo (path relative to the workspace root).
    pub fn from_file(rel: &str) -> Self {
        let text = std::fs::read_to_string(repo_path(rel)).unwrap();
        Self {
            doc: text.parse().unwrap(),
        }
    }

    /// Sets `TABLE.KEY` (the table is created if missing).
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let (table, k) = key.split_once('.').expect("TABLE.KEY");
        self.doc
            .entry(table)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap()
            .insert(k.into(), value.into());
        self
    }

    pub fn toml(&self) -> String {
        toml::to_string(&self.doc).unwrap()
    }

    /// Writes the config to `path` and returns it.
    pub fn write(&self, path: &std::path::Path) -> std::path::PathBuf {
        std::fs::write(path, self.toml()).unwrap();
        path.to_path_buf()
    }
}

/// The micro config for runs through the `trainer` binary: checkpoints and console lines every
/// step, a small ring.
pub fn cli_config(seed: u64) -> TestConfig {
    TestConfig::micro(seed)
        .set("run.checkpoint_every", 1)
        .set("run.log_every", 1)
        .set("run.ring_slots", 2)
        .set("run.batch_timeout_s", 120)
}

/// `trainer train --config CFG --shards SHARDS --out RUN` (add the rest).
pub fn train_command(
    cfg: &std::path::Path,
    shards: &std::path::Path,
    run: &std::path::Path,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.arg("train")
        .arg("--config")
        .arg(cfg)
        .arg("--shards")
        .arg(shards)
        .arg("--out")
        .arg(run);
    c
}

/// The `loader` binary beside the `trainer` one, if built.
pub fn loader_bin() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_trainer"))
        .parent()?
        .join("loader");
    p.is_file().then_some(p)
}

/// The child processes of `pid` (e.g. the loaders a trainer started).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// A generated labelled ImageFolder (`shard-tool synth`) at `dir/img`, packed into `dir/shards`.
pub fn synth_shards(
    dir: &std::path::Path,
    classes: usize,
    per_class: usize,
    size: u32,
    seed: u64,
) -> std::path::PathBuf {
    let img = dir.join("img");
    shard_tool::synth::write_imagefolder(&img, classes, per_class, size, seed).unwrap();
    let out = dir.join("shards");
    let cfg = shard_tool::pack::PackConfig {
        progress: false,
        ..Default::default()
    };
    shard_tool::pack::pack(&img, &out, &cfg).unwrap();
    out
}

/// `n` random but well-formed samples, a pure function of (key, epoch, index).
pub struct SynthSamples {
    pub aug: shared::config::AugmentConfig,
    pub n: u64,
    pub key: u64,
}

impl shared::geometry::SampleSource for SynthSamples {
    fn len(&self) -> u64 {
        self.n
    }
    fn produce(&self, epoch: u64, index: u64) -> anyhow::Result<shared::geometry::Sample> {
        let mut rng = shared::rng::rng_for(self.key, shared::rng::Domain::Crops, epoch, index);
        Ok(trainer::data::synthetic_sample(&self.aug, &mut rng, index))
    }
}

/// An in-process feed of [`SynthSamples`] for `config`.
pub fn synth_feed(
    config: &str,
    n: u64,
    key: u64,
    dataset_id: u64,
    threads: usize,
) -> trainer::train_feed::InProcessFeed {
    let pipe = shared::config::PipelineConfig::from_toml_str(config).unwrap();
    let src = SynthSamples {
        aug: pipe.augment.clone(),
        n,
        key,
    };
    trainer::train_feed::InProcessFeed::new(std::sync::Arc::new(src), &pipe, dataset_id, threads)
}

/// Quiet CPU training options.
pub fn train_opts(
    config: &str,
    dir: &std::path::Path,
    resume: bool,
    max_steps: u64,
) -> trainer::train::TrainOptions {
    trainer::train::TrainOptions {
        config_toml: config.to_string(),
        run_dir: dir.to_path_buf(),
        resume,
        max_steps: Some(max_steps),
        device: Device::Cpu,
        quiet: true,
        stop: None,
    }
}

/// The bits of a tensor's values (f32 or i64), for bitwise comparisons.
pub fn bits(t: &candle_core::Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|x| *x as u64)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// Step and tensors of the newest checkpoint of a run.
pub fn final_tensors(
    dir: &std::path::Path,
) -> (u64, std::collections::HashMap<String, candle_core::Tensor>) {
    let c = trainer::checkpoint::resolve(dir).unwrap();
    (
        c.step,
        trainer::checkpoint::load(&c, &Device::Cpu).unwrap().0,
    )
}

/// Every tensor of the newest checkpoint as (name, bits), sorted by name.
pub fn checkpoint_bits(dir: &std::path::Path) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<(String, Vec<u64>)> = final_tensors(dir)
        .1
        .iter()
        .map(|(k, t)| (k.clone(), bits(t)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// (step, loss bits) of every line of a run's metrics.jsonl.
pub fn loss_bits(run: &std::path::Path) -> Vec<(u64, u32)> {
    trainer::metrics::read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| (m.step, m.loss.to_bits()))
        .collect()
}

// ---- pretraining on an ImageFolder and the Fashion-MNIST subset (learning checks) ---------

fn sorted_dirs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Pretrains on every image of `train_dir` (labels unused) into `run`, batches built
/// in-process by the loader's crop engine.
pub fn pretrain(
    config: &str,
    train_dir: &std::path::Path,
    run: &std::path::Path,
) -> trainer::train::TrainSummary {
    let pipe = shared::config::PipelineConfig::from_toml_str(config).unwrap();
    let mut records = loader::folder::MemRecords::default();
    for class in sorted_dirs(train_dir) {
        for r in loader::folder::MemRecords::from_dir(&class)
            .unwrap()
            .records
        {
            records.push(r);
        }
    }
    let engine = loader::engine::CropEngine::new(pipe.augment.clone());
    let src = loader::source::DatasetSource::new(records, engine, pipe.data.seed);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut feed =
        trainer::train_feed::InProcessFeed::new(std::sync::Arc::new(src), &pipe, 1, threads);
    let mut opts = train_opts(config, run, false, u64::MAX);
    opts.max_steps = None;
    opts.quiet = false;
    trainer::train::train(&opts, &mut feed).unwrap()
}

/// The Fashion-MNIST subset (`train/` and `val/` ImageFolders): `$UDI_FASHION_MNIST` when set
/// (it must hold the data: e.g. from a git worktree, whose `..` has no shared/), else
/// `../shared/data/fashion-mnist`; `None` (with a message) when that is absent too.
pub fn fashion_mnist_root() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("UDI_FASHION_MNIST") {
        let root = std::path::PathBuf::from(p);
        assert!(
            root.join("train").is_dir() && root.join("val").is_dir(),
            "UDI_FASHION_MNIST={} has no train/ and val/ ImageFolders",
            root.display()
        );
        return Some(root);
    }
    let root = repo_path("../shared/data/fashion-mnist");
    if root.join("train").is_dir() && root.join("val").is_dir() {
        Some(root)
    } else {
        println!(
            "skipped: {} is absent and UDI_FASHION_MNIST is unset \
             (this check needs the Fashion-MNIST subset)",
            root.display()
        );
        None
    }
}

/// A ring `name` for the run config `config` (written at `cfg_path`) on `shards`, with 4 slots,
/// filled by a loader daemon on a thread (2 threads; no binaries needed). Dropping the feed
/// closes the ring and the daemon returns.
pub fn ring_with_loader(
    name: &str,
    shards: &std::path::Path,
    config: &str,
    cfg_path: &std::path::Path,
) -> (
    trainer::train_feed::RingFeed,
    std::thread::JoinHandle<anyhow::Result<()>>,
) {
    let pipe = shared::config::PipelineConfig::from_toml_str(config).unwrap();
    let ds = shared::shard::Dataset::open(shards).unwrap();
    let feed = trainer::train_feed::RingFeed::start(
        name,
        &shared::ring::RingSpec::new(&pipe, ds.dataset_id(), ds.len(), 4),
        std::time::Duration::from_secs(120),
        None,
    )
    .unwrap();
    let args = loader::daemon::RunArgs {
        shards: Some(shards.into()),
        ring: name.into(),
        config: cfg_path.into(),
        threads: 2,
        slots: 4,
        synthetic: None,
        synthetic_work: 0,
        hold_ms: 0,
        rank: 0,
        world: 1,
        accumulate: 1,
    };
    (feed, std::thread::spawn(move || loader::daemon::run(&args)))
}
