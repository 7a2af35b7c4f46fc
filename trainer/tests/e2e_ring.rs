//! Trainer ⇄ ring ⇄ loader: a run on packed shards, fed through the shared-memory ring by the
//! loader daemon (run on a thread here, so the test needs no binaries), stopped and resumed
//! through the ring (consumer seek), is bitwise identical to a run on batches built in-process
//! by the same crop engine.

mod common;

use common::{checkpoint_bits, ring_with_loader, synth_shards, train_opts, TestConfig};
use shared::config::PipelineConfig;
use std::path::Path;
use std::sync::Arc;
use trainer::metrics::read_metrics;
use trainer::train::{train, BatchFeed, TrainSummary};
use trainer::train_feed::InProcessFeed;

fn config() -> String {
    TestConfig::micro(9)
        .set("run.checkpoint_every", 1)
        .set("run.ring_slots", 4)
        .set("run.batch_timeout_s", 120)
        .toml()
}

const N: u64 = 16; // 2 classes × 8 images: 4 batches per epoch

/// Trains through ring `name`, fed by a loader daemon on a thread.
fn train_via_ring(
    name: &str,
    shards: &Path,
    cfg_path: &Path,
    dir: &Path,
    resume: bool,
    max_steps: u64,
) -> TrainSummary {
    let config = config();
    assert_eq!(shared::shard::Dataset::open(shards).unwrap().len(), N);
    let (mut feed, loader) = ring_with_loader(name, shards, &config, cfg_path);
    let s = train(
        &train_opts(&config, dir, resume, max_steps),
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

#[test]
fn ring_fed_run_with_resume_equals_the_in_process_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("cfg.toml");
    std::fs::write(&cfg_path, config()).unwrap();
    let pid = std::process::id();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 0);

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
    let pipe = PipelineConfig::from_toml_str(&config()).unwrap();
    let ds = shared::shard::Dataset::open(&shards).unwrap();
    let id = ds.dataset_id();
    let engine = loader::engine::CropEngine::new(pipe.augment.clone());
    let src = loader::source::DatasetSource::new(ds, engine, pipe.data.seed);
    let mut feed = InProcessFeed::new(Arc::new(src), &pipe, id, 2);
    train(&train_opts(&config(), &ref_dir, false, 6), &mut feed).unwrap();

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
    assert_eq!(checkpoint_bits(&ring_dir), checkpoint_bits(&ref_dir));
}
