//! Trainer ⇄ ring ⇄ loader: a run on packed shards, fed through the shared-memory ring by the
//! loader daemon (run on a thread here, so the test needs no binaries), stopped and resumed
//! through the ring (consumer seek), is bitwise identical to a run on batches built in-process
//! by the same crop engine.

use candle_core::{Device, Tensor};
use loader::daemon::RunArgs;
use shared::config::PipelineConfig;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use trainer::metrics::read_metrics;
use trainer::train::{train, BatchFeed, TrainOptions, TrainSummary};
use trainer::train_cli::ShardRecords;
use trainer::train_feed::{InProcessFeed, RingFeed};

const CONFIG: &str = r#"
[data]
batch_size = 4
seed = 9
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
[run]
checkpoint_every = 1
ring_slots = 4
batch_timeout_s = 120
"#;

const N: u64 = 16; // 2 classes × 8 images: 4 batches per epoch

/// A generated labelled ImageFolder, packed.
fn make_shards(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img");
    shard_tool::synth::write_imagefolder(&img, 2, 8, 40, 0).unwrap();
    let out = dir.join("shards");
    let cfg = shard_tool::pack::PackConfig {
        progress: false,
        ..Default::default()
    };
    shard_tool::pack::pack(&img, &out, &cfg).unwrap();
    out
}

fn opts(dir: &Path, resume: bool, max_steps: u64) -> TrainOptions {
    TrainOptions {
        config_toml: CONFIG.into(),
        run_dir: dir.into(),
        resume,
        max_steps: Some(max_steps),
        device: Device::Cpu,
        quiet: true,
        stop: None,
    }
}

/// Trains through ring `name`, fed by a loader daemon on a thread.
fn train_via_ring(
    name: &str,
    shards: &Path,
    cfg_path: &Path,
    dir: &Path,
    resume: bool,
    max_steps: u64,
) -> TrainSummary {
    let pipe = PipelineConfig::from_toml_str(CONFIG).unwrap();
    let ds = shared::shard::Dataset::open(shards).unwrap();
    assert_eq!(ds.len(), N);
    let mut feed = RingFeed::start(
        name,
        &pipe,
        ds.dataset_id(),
        N,
        4,
        Duration::from_secs(120),
        None,
    )
    .unwrap();
    let args = RunArgs {
        shards: Some(shards.into()),
        ring: name.into(),
        config: cfg_path.into(),
        threads: 2,
        slots: 4,
        synthetic: None,
        synthetic_work: 0,
        hold_ms: 0,
    };
    let loader = std::thread::spawn(move || loader::daemon::run(&args));
    let s = train(
        &opts(dir, resume, max_steps),
        &mut feed as &mut dyn BatchFeed,
    )
    .unwrap();
    drop(feed); // closes the ring: the loader sees it and returns
    loader.join().unwrap().unwrap();
    assert!(
        !shared::ring::segment_path(name).exists(),
        "ring segment left behind"
    );
    s
}

fn all_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let c = trainer::checkpoint::resolve(dir).unwrap();
    let (t, _) = trainer::checkpoint::load(&c, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<u32>)> = t
        .iter()
        .filter(|(_, x)| x.dtype() == candle_core::DType::F32)
        .map(|(k, x): (&String, &Tensor)| {
            (
                k.clone(),
                x.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|f| f.to_bits())
                    .collect(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn ring_fed_run_with_resume_equals_the_in_process_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("cfg.toml");
    std::fs::write(&cfg_path, CONFIG).unwrap();
    let pid = std::process::id();
    let shards = make_shards(tmp.path());

    let ring_dir = tmp.path().join("ring-run");
    train_via_ring(
        &format!("e2e-test-{pid}-a"),
        &shards,
        &cfg_path,
        &ring_dir,
        false,
        3,
    );
    // Resume through a fresh ring: the consumer seeks to epoch 0 batch 3.
    let s = train_via_ring(
        &format!("e2e-test-{pid}-b"),
        &shards,
        &cfg_path,
        &ring_dir,
        true,
        6,
    );
    assert_eq!((s.first_step, s.last_step), (3, 6));

    let ref_dir = tmp.path().join("in-process");
    let pipe = PipelineConfig::from_toml_str(CONFIG).unwrap();
    let ds = shared::shard::Dataset::open(&shards).unwrap();
    let id = ds.dataset_id();
    let engine = loader::engine::CropEngine::new(pipe.augment.clone());
    let src = loader::source::DatasetSource::new(ShardRecords(ds), engine, pipe.data.seed);
    let mut feed = InProcessFeed::new(Arc::new(src), &pipe, id, 2);
    train(&opts(&ref_dir, false, 6), &mut feed).unwrap();

    let a = read_metrics(&ring_dir.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&ref_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.step, x.epoch, x.loss.to_bits()),
            (y.step, y.epoch, y.loss.to_bits()),
            "step {}",
            x.step
        );
    }
    assert_eq!(a[5].epoch, 1, "the run crossed into epoch 1");
    assert_eq!(all_bits(&ring_dir), all_bits(&ref_dir));
}
