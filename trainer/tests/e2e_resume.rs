//! Exact resume and the non-finite guard rail, on CPU, with batches built in-process from a
//! deterministic synthetic source (the ring and loader processes are exercised by e2e_cli).

use candle_core::{Device, Tensor};
use shared::config::{AugmentConfig, PipelineConfig};
use shared::geometry::{Sample, SampleSource};
use shared::rng::{rng_for, Domain};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use trainer::checkpoint;
use trainer::metrics::read_metrics;
use trainer::train::{train, TrainOptions};
use trainer::train_feed::InProcessFeed;

const CONFIG: &str = r#"
[data]
batch_size = 4
seed = 5

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

[loss]
warmup_teacher_temp_epochs = 1

[optim]
epochs = 2
warmup_epochs = 1
lr = 0.05

[run]
checkpoint_every = 1
keep_last = 20
log_every = 1
"#;

/// Random but well-formed samples, a pure function of (epoch, index).
struct Synth {
    aug: AugmentConfig,
    n: u64,
}

impl SampleSource for Synth {
    fn len(&self) -> u64 {
        self.n
    }
    fn produce(&self, epoch: u64, index: u64) -> anyhow::Result<Sample> {
        let mut rng = rng_for(77, Domain::Crops, epoch, index);
        Ok(trainer::data::synthetic_sample(&self.aug, &mut rng, index))
    }
}

fn feed(config: &str) -> InProcessFeed {
    let pipe = PipelineConfig::from_toml_str(config).unwrap();
    // 24 samples, batch 4: 6 batches per epoch, 12 steps in the 2-epoch schedule.
    let src = Synth {
        aug: pipe.augment.clone(),
        n: 24,
    };
    InProcessFeed::new(Arc::new(src), &pipe, 0xABCD, 2)
}

fn run(
    dir: &Path,
    config: &str,
    resume: bool,
    max_steps: u64,
) -> anyhow::Result<trainer::train::TrainSummary> {
    let opts = TrainOptions {
        config_toml: config.to_string(),
        run_dir: dir.to_path_buf(),
        resume,
        max_steps: Some(max_steps),
        device: Device::Cpu,
        quiet: true,
        stop: None,
    };
    train(&opts, &mut feed(config))
}

fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        candle_core::DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        candle_core::DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|x| *x as u64)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

fn final_tensors(dir: &Path) -> (u64, HashMap<String, Tensor>) {
    let c = checkpoint::resolve(dir).unwrap();
    (c.step, checkpoint::load(&c, &Device::Cpu).unwrap().0)
}

#[test]
fn killed_and_resumed_run_is_bitwise_identical_to_an_uninterrupted_one() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    // Uninterrupted: 8 steps, crossing the epoch boundary after step 6 (where the last layer
    // unfreezes and the teacher temperature reaches its final value).
    run(a.path(), CONFIG, false, 8).unwrap();
    // Interrupted after step 5, then resumed to step 8.
    let s = run(b.path(), CONFIG, false, 5).unwrap();
    assert_eq!(s.last_step, 5);
    // A restart without --resume must refuse to overwrite the run.
    assert!(run(b.path(), CONFIG, false, 8)
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    let s = run(b.path(), CONFIG, true, 8).unwrap();
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
    run(a.path(), CONFIG, false, 1).unwrap();
    let changed = CONFIG.replace("lr = 0.05", "lr = 0.01");
    let e = run(a.path(), &changed, true, 2).unwrap_err().to_string();
    assert!(e.contains("config differs"), "{e}");
    // [run] may change.
    let run_changed = CONFIG.replace("log_every = 1", "log_every = 5");
    run(a.path(), &run_changed, true, 2).unwrap();
}

#[test]
fn non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint() {
    let a = tempfile::tempdir().unwrap();
    // An absurd learning rate overflows the weights within a few steps.
    let bad = CONFIG
        .replace("lr = 0.05", "lr = 1e36")
        .replace("warmup_epochs = 1", "warmup_epochs = 0");
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
    let held = trainer::train::lock_run_dir(a.path()).unwrap();
    let e = run(a.path(), CONFIG, false, 1).unwrap_err().to_string();
    assert!(e.contains("in use by another trainer"), "{e}");
    drop(held);
    run(a.path(), CONFIG, false, 1).unwrap();
}
