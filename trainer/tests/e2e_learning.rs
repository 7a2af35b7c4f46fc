//! The learning check (heavy: `cargo test --release -p trainer --test e2e_learning -- --ignored`,
//! run by scripts/test.sh): a short CPU pretraining raises the weighted k-NN top-1 of the teacher
//! clearly above the same network at random init.
//!
//! Data: `../shared/data/fashion-mnist` (10 classes, 500 train + 100 val per class) when present,
//! else a generated set (`shard-tool synth`: 10 classes of shapes/textures). Batches are built
//! in-process by the loader's crop engine (the ring path is covered by e2e_ring).

use candle_core::Device;
use shared::config::PipelineConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use trainer::config::TrainConfig;
use trainer::knn::KnnParams;
use trainer::knn_eval::{evaluate, teacher_backbone, FolderImages};
use trainer::train::{train, TrainOptions};
use trainer::train_feed::InProcessFeed;
use trainer::vit::ClassToken;

const CONFIG: &str = include_str!("../../configs/tiny.toml");

fn data() -> (PathBuf, PathBuf, Option<tempfile::TempDir>, &'static str) {
    let fm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fashion-mnist");
    if fm.join("train").is_dir() && fm.join("val").is_dir() {
        return (fm.join("train"), fm.join("val"), None, "fashion-mnist");
    }
    let tmp = tempfile::tempdir().unwrap();
    shard_tool::synth::write_imagefolder(&tmp.path().join("train"), 10, 100, 64, 0).unwrap();
    shard_tool::synth::write_imagefolder(&tmp.path().join("val"), 10, 30, 64, 1).unwrap();
    (
        tmp.path().join("train"),
        tmp.path().join("val"),
        Some(tmp),
        "generated shapes",
    )
}

/// configs/tiny.toml (architecture, crops, loss) with the schedule of a short run: the whole
/// cosine fits in `steps`, and the teacher EMA is fast enough to follow the student within it
/// (with 0.996 the teacher would still be mostly its random init after a few hundred steps).
fn short_run_config(steps: u64) -> String {
    let mut doc: toml::Table = CONFIG.parse().unwrap();
    let optim = doc.get_mut("optim").unwrap().as_table_mut().unwrap();
    optim.insert("epochs".into(), toml::Value::Integer(1));
    optim.insert("warmup_epochs".into(), toml::Value::Integer(0));
    optim.insert("lr".into(), toml::Value::Float(LR));
    optim.insert("momentum_teacher".into(), toml::Value::Float(MOMENTUM));
    let _ = steps;
    let mut run = toml::Table::new();
    run.insert("log_every".into(), toml::Value::Integer(25));
    run.insert("checkpoint_every".into(), toml::Value::Integer(1_000_000));
    doc.insert("run".into(), toml::Value::Table(run));
    toml::to_string(&doc).unwrap()
}

const LR: f64 = 5e-3;
const MOMENTUM: f64 = 0.99;

#[test]
#[ignore = "heavy: a few minutes of CPU pretraining (scripts/test.sh runs it in release)"]
fn learning_pretraining_beats_random_init_on_knn() {
    let (train_dir, val_dir, _keep, name) = data();
    let steps: u64 = std::env::var("LEARNING_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(250);
    let text = short_run_config(steps);
    let cfg = TrainConfig::from_toml_str(&text).unwrap();
    let pipe = PipelineConfig::from_toml_str(&text).unwrap();
    // Pretraining ignores labels: every class folder's images, in one record set.
    let mut records = loader::folder::MemRecords::default();
    let mut classes: Vec<PathBuf> = std::fs::read_dir(&train_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    for c in classes {
        for r in loader::folder::MemRecords::from_dir(&c).unwrap().records {
            records.push(r);
        }
    }
    let engine = loader::engine::CropEngine::new(pipe.augment.clone());
    let src = loader::source::DatasetSource::new(records, engine, pipe.data.seed);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut feed = InProcessFeed::new(Arc::new(src), &pipe, 1, threads);
    let run = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        config_toml: text.clone(),
        run_dir: run.path().into(),
        resume: false,
        max_steps: Some(steps),
        device: Device::Cpu,
        quiet: false,
        stop: None,
    };
    let s = train(&opts, &mut feed).unwrap();
    assert_eq!(s.last_step, steps.min(s.total_steps));

    let tr = FolderImages::open(&train_dir).unwrap();
    let va = FolderImages::open(&val_dir).unwrap();
    let p = KnnParams::default();
    let crop = cfg.augment.global_size;
    let (_s0, random) = teacher_backbone(&cfg, None, &Device::Cpu).unwrap();
    let before = evaluate(
        &random,
        &tr,
        &va,
        crop,
        256,
        ClassToken::Cls,
        p,
        &Device::Cpu,
    )
    .unwrap();
    let c = trainer::checkpoint::resolve(run.path()).unwrap();
    let (t, _) = trainer::checkpoint::load(&c, &Device::Cpu).unwrap();
    let (_s1, trained) = teacher_backbone(&cfg, Some(&t), &Device::Cpu).unwrap();
    let after = evaluate(
        &trained,
        &tr,
        &va,
        crop,
        256,
        ClassToken::Cls,
        p,
        &Device::Cpu,
    )
    .unwrap();
    let after_plus = evaluate(
        &trained,
        &tr,
        &va,
        crop,
        256,
        ClassToken::ClsPlus,
        p,
        &Device::Cpu,
    )
    .unwrap();
    println!(
        "learning check on {name} ({} train / {} val), {} steps of configs/tiny.toml: k-NN top-1 random init {:.2}% → pretrained {:.2}% ([cls+]: {:.2}%); top-5 {:.2}% → {:.2}%",
        before.n_train, before.n_val, s.last_step, before.top1, after.top1, after_plus.top1, before.top5, after.top5
    );
    assert!(
        after.top1 >= before.top1 + 10.0,
        "pretraining did not raise k-NN top-1 clearly: {:.2}% → {:.2}%",
        before.top1,
        after.top1
    );
}
