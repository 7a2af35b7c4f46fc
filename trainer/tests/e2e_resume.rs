//! Exact resume and the non-finite guard rail, on CPU, with batches built in-process from a
//! deterministic synthetic source (the ring and loader processes are exercised by e2e_cli).

mod common;

use candle_core::{Device, Tensor};
use common::{bits, final_tensors, synth_feed, train_opts, TestConfig};
use std::collections::HashMap;
use std::path::Path;
use trainer::checkpoint;
use trainer::metrics::read_metrics;
use trainer::train::train;

/// The micro config with checkpoints every step; 24 samples at batch 4: 6 batches per epoch,
/// 12 steps in the 2-epoch schedule.
fn config() -> TestConfig {
    TestConfig::micro(5)
        .set("loss.warmup_teacher_temp_epochs", 1)
        .set("run.checkpoint_every", 1)
        .set("run.keep_last", 20)
        .set("run.log_every", 1)
}

fn run(
    dir: &Path,
    config: &str,
    resume: bool,
    max_steps: u64,
) -> anyhow::Result<trainer::train::TrainSummary> {
    let mut feed = synth_feed(config, 24, 77, 0xABCD, 2);
    train(&train_opts(config, dir, resume, max_steps), &mut feed)
}

#[test]
fn killed_and_resumed_run_is_bitwise_identical_to_an_uninterrupted_one() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let cfg = config().toml();
    let cfg = cfg.as_str();
    // Uninterrupted: 8 steps, crossing the epoch boundary after step 6 (where the last layer
    // unfreezes and the teacher temperature reaches its final value).
    run(a.path(), cfg, false, 8).unwrap();
    // Interrupted after step 5, then resumed to step 8.
    let s = run(b.path(), cfg, false, 5).unwrap();
    assert_eq!(s.last_step, 5);
    // A restart without --resume must refuse to overwrite the run.
    assert!(run(b.path(), cfg, false, 8)
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    let s = run(b.path(), cfg, true, 8).unwrap();
    assert_eq!((s.first_step, s.last_step), (5, 8));

    let ma = read_metrics(&a.path().join("metrics.jsonl")).unwrap();
    let mb = read_metrics(&b.path().join("metrics.jsonl")).unwrap();
    assert_eq!(ma.len(), 8);
    assert_eq!(mb.len(), 8);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x.step, y.step);
        assert_eq!(
            [x.loss, x.loss_cls, x.loss_udi, x.loss_patch].map(f32::to_bits),
            [y.loss, y.loss_cls, y.loss_udi, y.loss_patch].map(f32::to_bits),
            "losses differ at step {}",
            x.step
        );
        assert_eq!(
            x.teacher_entropy.map(f32::to_bits),
            y.teacher_entropy.map(f32::to_bits),
            "step {}",
            x.step
        );
        assert_eq!(
            (x.lr, x.wd, x.momentum, x.teacher_temp, x.epoch),
            (y.lr, y.wd, y.momentum, y.teacher_temp, y.epoch)
        );
    }
    // The run learns something (losses move), so equality is not trivially true.
    assert_ne!(ma[0].loss.to_bits(), ma[7].loss.to_bits());
    assert_eq!(ma[6].epoch, 1);

    let (sa, ta) = final_tensors(a.path());
    let (sb, tb) = final_tensors(b.path());
    assert_eq!((sa, sb), (8, 8));
    assert_eq!(ta.len(), tb.len());
    let mut checked = 0;
    for (k, v) in &ta {
        assert_eq!(bits(v), bits(&tb[k]), "tensor {k} differs");
        checked += 1;
    }
    assert!(ta.contains_key("teacher.backbone.cls_token") && ta.contains_key("center.patch"));
    assert!(ta
        .keys()
        .any(|k| k.starts_with("optim.") && k.ends_with("exp_avg_sq")));
    assert!(checked > 50, "{checked}");
}

#[test]
fn resume_refuses_a_changed_config() {
    let a = tempfile::tempdir().unwrap();
    run(a.path(), &config().toml(), false, 1).unwrap();
    let changed = config().set("optim.lr", 0.01).toml();
    let e = run(a.path(), &changed, true, 2).unwrap_err().to_string();
    assert!(e.contains("config differs"), "{e}");
    // [run] may change.
    let run_changed = config().set("run.log_every", 5).toml();
    run(a.path(), &run_changed, true, 2).unwrap();
}

#[test]
fn non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint() {
    let a = tempfile::tempdir().unwrap();
    // An absurd learning rate overflows the weights within a few steps.
    let bad = config()
        .set("optim.lr", 1e36)
        .set("optim.warmup_epochs", 0)
        .toml();
    let e = run(a.path(), &bad, false, 12).unwrap_err().to_string();
    assert!(e.contains("non-finite"), "{e}");
    assert!(e.contains("checkpoint"), "{e}");
    let c = checkpoint::resolve(a.path()).unwrap();
    let logged = read_metrics(&a.path().join("metrics.jsonl")).unwrap();
    // The newest checkpoint is the last step that was logged (finite), and it loads.
    assert_eq!(c.step, logged.last().unwrap().step);
    assert!(logged.iter().all(|m| m.loss.is_finite()));
    checkpoint::load(&c, &Device::Cpu).unwrap();
}

#[test]
fn non_finite_weights_are_detected_by_name() {
    let d = Device::Cpu;
    let mut m = HashMap::new();
    m.insert("a".to_string(), Tensor::new(&[1.0f32, 2.0], &d).unwrap());
    m.insert("n".to_string(), Tensor::new(&[7i64], &d).unwrap());
    assert_eq!(trainer::train::first_non_finite(&m).unwrap(), None);
    m.insert(
        "b".to_string(),
        Tensor::new(&[1.0f32, f32::INFINITY], &d).unwrap(),
    );
    m.insert("c".to_string(), Tensor::new(&[f32::NAN], &d).unwrap());
    assert_eq!(
        trainer::train::first_non_finite(&m).unwrap().as_deref(),
        Some("b")
    );
}

#[test]
fn a_run_dir_is_used_by_one_trainer_at_a_time() {
    let a = tempfile::tempdir().unwrap();
    let held = trainer::run_dir::lock_run_dir(a.path()).unwrap();
    let cfg = config().toml();
    let e = run(a.path(), &cfg, false, 1).unwrap_err().to_string();
    assert!(e.contains("in use by another trainer"), "{e}");
    drop(held);
    run(a.path(), &cfg, false, 1).unwrap();
}
