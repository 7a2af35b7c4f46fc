//! `[run] prefetch`: the prefetched feed hands out the plain feed's batches, bit for bit and in
//! the same order (across epoch boundaries, seeks, replaced records and a failing batch), and a
//! run trained through it — in process, or fed through the shared-memory ring — has the plain
//! run's losses and weights bit for bit. Built with `--features cuda` on a GPU machine, the
//! CUDA path (page-locked staging, the copy stream and its events) is checked the same way.

mod common;

use candle_core::Device;
use common::{
    bits, checkpoint_bits, ring_with_loader, synth_feed, synth_shards, train_opts, SynthSamples,
    TestConfig,
};
use shared::config::PipelineConfig;
use shared::geometry::{Sample, SampleSource};
use std::path::Path;
use std::sync::Arc;
use trainer::metrics::read_metrics;
use trainer::prefetch::Prefetch;
use trainer::train::{train, BatchFeed, FedBatch};
use trainer::train_feed::InProcessFeed;

fn config() -> String {
    TestConfig::micro(5)
        .set("run.checkpoint_every", 100)
        .set("run.ring_slots", 4)
        .set("run.batch_timeout_s", 120)
        .toml()
}

/// Everything a step reads from a fed batch, as bits.
fn fingerprint(f: &FedBatch) -> Vec<Vec<u64>> {
    let b = &f.batch;
    let mut v = vec![
        vec![f.epoch, f.index],
        f.indices.clone(),
        b.labels.iter().map(|&x| x as u64).collect(),
        bits(&b.globals),
        bits(&b.student_rows),
        bits(&b.teacher_rows),
        bits(&b.valid_g),
        bits(&b.valid_l),
    ];
    v.extend(b.locals.as_ref().map(bits));
    v
}

/// `n` results of `next` (a failing batch as its message).
fn take(
    feed: &mut dyn BatchFeed,
    aug: &shared::config::AugmentConfig,
    n: usize,
) -> Vec<Result<Vec<Vec<u64>>, String>> {
    (0..n)
        .map(|_| {
            feed.next(aug, &Device::Cpu)
                .map(|f| fingerprint(&f))
                .map_err(|e| format!("{e:#}"))
        })
        .collect()
}

#[test]
fn prefetched_batches_are_the_plain_feeds_across_epochs_and_seeks() {
    let cfg = config();
    let aug = PipelineConfig::from_toml_str(&cfg).unwrap().augment;
    // 10 samples, batch 4: 2 batches per epoch (drop_last).
    let mut plain = synth_feed(&cfg, 10, 7, 1, 2);
    let mut pre = Prefetch::new(Box::new(synth_feed(&cfg, 10, 7, 1, 2)), &Device::Cpu);
    for feed in [&mut plain as &mut dyn BatchFeed, &mut pre] {
        feed.seek(0, 1).unwrap();
    }
    let a = take(&mut plain, &aug, 5);
    let b = take(&mut pre, &aug, 5);
    assert!(a.iter().all(|r| r.is_ok()));
    let epochs: Vec<u64> = a.iter().map(|r| r.as_ref().unwrap()[0][0]).collect();
    assert_eq!(
        epochs,
        [0, 1, 1, 2, 2],
        "the batches cross two epoch boundaries"
    );
    assert_eq!(a, b);
    // A seek while the worker is a batch ahead: it restarts at the new position.
    for feed in [&mut plain as &mut dyn BatchFeed, &mut pre] {
        feed.seek(1, 1).unwrap();
    }
    let (a, b) = (take(&mut plain, &aug, 3), take(&mut pre, &aug, 3));
    assert_eq!(a[0].as_ref().unwrap()[0], [1, 1]);
    assert_eq!(a, b);
}

/// [`SynthSamples`] with the loader's treatment of bad records: record 3 is replaced by record
/// 4 (a damaged payload), and record 6 cannot be built in epoch 1 (the batch fails).
struct Damaged(SynthSamples);

impl SampleSource for Damaged {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn produce(&self, epoch: u64, index: u64) -> anyhow::Result<Sample> {
        match (epoch, index) {
            (1, 6) => anyhow::bail!("record 6: undecodable"),
            (_, 3) => self.0.produce(epoch, 4),
            _ => self.0.produce(epoch, index),
        }
    }
}

fn damaged_feed(cfg: &str) -> InProcessFeed {
    let pipe = PipelineConfig::from_toml_str(cfg).unwrap();
    let src = SynthSamples {
        aug: pipe.augment.clone(),
        n: 8,
        key: 3,
    };
    InProcessFeed::new(Arc::new(Damaged(src)), &pipe, 1, 2)
}

#[test]
fn prefetched_batches_keep_replaced_records_and_a_failing_batch_in_place() {
    let cfg = config();
    let aug = PipelineConfig::from_toml_str(&cfg).unwrap().augment;
    let mut plain = damaged_feed(&cfg);
    let mut pre = Prefetch::new(Box::new(damaged_feed(&cfg)), &Device::Cpu);
    // 8 samples, batch 4: epochs of 2 batches; record 6 fails in one batch of epoch 1.
    let a = take(&mut plain, &aug, 6);
    let b = take(&mut pre, &aug, 6);
    assert_eq!(a, b);
    let served: Vec<u64> = a[..2]
        .iter()
        .flat_map(|r| r.as_ref().unwrap()[1].clone())
        .collect();
    assert_eq!(
        (
            served.contains(&3),
            served.iter().filter(|&&i| i == 4).count()
        ),
        (false, 2),
        "record 3 served as record 4 in epoch 0: {served:?}"
    );
    // Epoch 1 fails at the batch holding record 6, and fails again when asked again (neither
    // feed moves past a failed batch).
    let failed = a
        .iter()
        .position(|r| r.is_err())
        .expect("a batch of epoch 1 fails");
    assert!((2..4).contains(&failed));
    assert!(a[failed]
        .as_ref()
        .unwrap_err()
        .contains("record 6: undecodable"));
    assert!(a[failed..].iter().all(|r| r == &a[failed]));
    // After a seek past it, both go on alike.
    for feed in [&mut plain as &mut dyn BatchFeed, &mut pre] {
        feed.seek(2, 0).unwrap();
    }
    assert_eq!(take(&mut plain, &aug, 2), take(&mut pre, &aug, 2));
}

#[test]
fn a_run_with_prefetch_has_the_plain_runs_losses_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config();
    // 12 samples: 3 steps per epoch, so 5 steps cross into epoch 1.
    let plain_dir = tmp.path().join("plain");
    train(
        &train_opts(&cfg, &plain_dir, false, 5),
        &mut synth_feed(&cfg, 12, 9, 1, 2),
    )
    .unwrap();
    let pre_dir = tmp.path().join("prefetch");
    let mut pre = Prefetch::new(Box::new(synth_feed(&cfg, 12, 9, 1, 2)), &Device::Cpu);
    let s = train(&train_opts(&cfg, &pre_dir, false, 5), &mut pre).unwrap();
    assert!((0.0..=1.0).contains(&s.mean_data_wait));
    let a = read_metrics(&plain_dir.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&pre_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), 5);
    assert_eq!(a.last().unwrap().epoch, 1);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.step, x.epoch, x.loss.to_bits()),
            (y.step, y.epoch, y.loss.to_bits())
        );
    }
    assert_eq!(checkpoint_bits(&plain_dir), checkpoint_bits(&pre_dir));
}

/// A run fed through the ring by a loader daemon on a thread, with or without prefetch.
fn ring_run(name: &str, shards: &Path, dir: &Path, prefetch: bool) {
    let cfg = config();
    let cfg_path = dir.with_extension("toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let (ring, loader) = ring_with_loader(name, shards, &cfg, &cfg_path);
    let mut feed: Box<dyn BatchFeed> = match prefetch {
        true => Box::new(Prefetch::new(Box::new(ring), &Device::Cpu)),
        false => Box::new(ring),
    };
    train(&train_opts(&cfg, dir, false, 6), feed.as_mut()).unwrap();
    drop(feed); // closes the ring (after the worker stopped): the loader sees it and returns
    loader.join().unwrap().unwrap();
    assert!(
        !shared::ring::segment_path(name).exists(),
        "ring segment left behind"
    );
}

#[test]
fn a_ring_fed_run_with_prefetch_has_the_plain_runs_losses_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 0); // 16 images: 4 batches per epoch
    let pid = std::process::id();
    let (plain, pre) = (tmp.path().join("plain"), tmp.path().join("prefetch"));
    ring_run(&format!("prefetch-test-{pid}-a"), &shards, &plain, false);
    ring_run(&format!("prefetch-test-{pid}-b"), &shards, &pre, true);
    let a = read_metrics(&plain.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&pre.join("metrics.jsonl")).unwrap();
    assert_eq!((a.len(), a[5].epoch), (6, 1));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.step, x.epoch, x.loss.to_bits()),
            (y.step, y.epoch, y.loss.to_bits())
        );
    }
    assert_eq!(checkpoint_bits(&plain), checkpoint_bits(&pre));
}

#[test]
fn the_cli_switch_turns_prefetch_off_and_the_losses_do_not_change() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 1);
    let cfg = common::cli_config(4).write(&tmp.path().join("cfg.toml"));
    let run = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let o = common::train_command(&cfg, &shards, &dir)
            .args(["--in-process", "--device", "cpu", "--max-steps", "5"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let recorded = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        let losses: Vec<(u64, u32)> = read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|m| (m.epoch, m.loss.to_bits()))
            .collect();
        (recorded.contains("prefetch = false"), losses)
    };
    let (off_recorded, off) = run("off", &["--prefetch", "false"]);
    let (on_recorded, on) = run("on", &[]);
    assert_eq!((off_recorded, on_recorded), (true, false));
    assert_eq!((on.len(), on[4].0), (5, 1), "5 steps into epoch 1");
    assert_eq!(on, off);
}

/// Built with `--features cuda` on a machine with a GPU (skipped otherwise): batches copied on
/// the prefetch's own stream are the synchronously uploaded ones, bit for bit, while candle's
/// stream is kept busy, so that a missing wait between the two streams (or a slot refilled
/// before candle's stream read it) would show as different bytes.
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_prefetched_batches_are_the_synchronously_uploaded_ones() {
    use candle_core::{DType, Tensor};
    let dev = match trainer::device::pick(trainer::device::DeviceFlag::Cuda) {
        Ok(d) => d,
        Err(e) => return eprintln!("SKIPPED: no CUDA GPU ({e})"),
    };
    let cfg = config();
    let aug = PipelineConfig::from_toml_str(&cfg).unwrap().augment;
    let mut pre = Prefetch::new(Box::new(synth_feed(&cfg, 10, 7, 1, 2)), &dev);
    let busy = Tensor::ones((2048, 2048), DType::F32, &dev).unwrap();
    let mut got = Vec::new();
    for _ in 0..8 {
        for _ in 0..4 {
            busy.matmul(&busy).unwrap();
        }
        got.push(pre.next(&aug, &dev).unwrap());
    }
    let mut plain = synth_feed(&cfg, 10, 7, 1, 2);
    for (i, fed) in got.iter().enumerate() {
        let want = fingerprint(&plain.next(&aug, &dev).unwrap());
        assert!(fingerprint(fed) == want, "batch {i} differs");
    }
}
