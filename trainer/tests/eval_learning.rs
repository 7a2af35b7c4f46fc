//! The evaluation tools end to end on images: the features file, the linear probe's two modes
//! (determinism, labelling) and, on Fashion-MNIST, the check that a pretrained teacher's linear
//! probe beats the same network at random init.
//!
//! `fashion_mnist_linear_probe_beats_random_init` (ignored because it is heavy: it pretrains
//! with configs/fashion_tiny.toml first, 5.5 min on 2 idle cores): reads
//! `$UDI_FASHION_MNIST` or `../shared/data/fashion-mnist` and skips with a message when both are
//! absent. It prints both probes' numbers (cached 100 epochs and augmented 10 epochs).

mod common;

use candle_core::{DType, Device};
use std::path::Path;
use trainer::config::TrainConfig;
use trainer::dist::Single;
use trainer::eval::features::{extract_set, write, FeatureSpec, TokenSel};
use trainer::eval::linear::{evaluate, ProbeOptions, ProbeResult, AUGMENTED, CACHED};
use trainer::knn_eval::{teacher_backbone, FolderImages, LabelledImages};
use trainer::vit::Vit;

fn micro() -> TrainConfig {
    let mut c = common::micro_cfg();
    c.model.dim = 16;
    c
}

#[test]
fn features_file_holds_features_labels_indices_and_sources() {
    let tmp = tempfile::tempdir().unwrap();
    shard_tool::synth::write_imagefolder(tmp.path(), 3, 4, 40, 0).unwrap();
    let set = FolderImages::open(tmp.path()).unwrap();
    let cfg = micro();
    let (_s, vit) = teacher_backbone(&cfg, None, &Device::Cpu).unwrap();
    let spec = FeatureSpec {
        blocks: 2,
        token: TokenSel::Both,
    };
    // Chunks of 5 over 12 images: chunking must not change a feature.
    let fs = extract_set(&vit, spec, &set, 32, 5, &Device::Cpu, &mut Single::new()).unwrap();
    let whole = extract_set(&vit, spec, &set, 32, 64, &Device::Cpu, &mut Single::new()).unwrap();
    let out = tmp.path().join("f.safetensors");
    write(&fs, spec, &out).unwrap();

    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let sources: Vec<String> = serde_json::from_str(&meta["sources"]).unwrap();
    let classes: Vec<String> = serde_json::from_str(&meta["classes"]).unwrap();
    assert_eq!(classes, set.class_names());
    assert_eq!(sources.len(), 12);
    for (i, s) in sources.iter().enumerate() {
        // The path names the class folder of the item's label.
        let (label, _) = set.get(i).unwrap();
        assert!(
            Path::new(s).starts_with(tmp.path().join(&classes[label as usize])),
            "{s}"
        );
    }
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["features"].dims(), &[12, 4 * 16]);
    let got: Vec<f32> = t["features"].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = whole.features.flatten_all().unwrap().to_vec1().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
    let labels: Vec<i64> = t["labels"].to_vec1().unwrap();
    assert_eq!(labels, (0..12).map(|i| i / 4).collect::<Vec<i64>>());
    assert_eq!(
        t["indices"].to_vec1::<i64>().unwrap(),
        (0..12).collect::<Vec<i64>>()
    );
    assert_eq!(t["features"].dtype(), DType::F32);
}

fn probe(vit: &Vit, dir: &Path, cached: bool, epochs: usize) -> ProbeResult {
    let tr = FolderImages::open(&dir.join("train")).unwrap();
    let va = FolderImages::open(&dir.join("val")).unwrap();
    let spec = FeatureSpec {
        blocks: 2,
        token: TokenSel::Cls,
    };
    let opts = ProbeOptions {
        epochs,
        batch_size: 8,
        lr: 0.5,
        momentum: 0.9,
        seed: 3,
    };
    evaluate(
        vit,
        spec,
        &tr,
        &va,
        32,
        16,
        cached,
        &opts,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn both_probe_modes_are_deterministic_and_labelled() {
    let tmp = tempfile::tempdir().unwrap();
    shard_tool::synth::write_imagefolder(&tmp.path().join("train"), 3, 6, 40, 0).unwrap();
    shard_tool::synth::write_imagefolder(&tmp.path().join("val"), 3, 3, 40, 1).unwrap();
    let (_s, vit) = teacher_backbone(&micro(), None, &Device::Cpu).unwrap();
    for (cached, mode) in [(true, CACHED), (false, AUGMENTED)] {
        let a = probe(&vit, tmp.path(), cached, 3);
        let b = probe(&vit, tmp.path(), cached, 3);
        assert_eq!(a.mode, mode);
        assert_eq!(a.history.len(), 3);
        assert_eq!((a.n_train, a.n_val, a.feature_dim), (18, 9, 32));
        let key = |r: &ProbeResult| {
            r.history
                .iter()
                .map(|s| (s.train_loss.to_bits(), s.top1.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b), "{mode}: same seed, same run");
    }
    // Augmentation changes what the classifier sees, so the losses differ from the cached run.
    let c = probe(&vit, tmp.path(), true, 3);
    let g = probe(&vit, tmp.path(), false, 3);
    assert_ne!(c.history[1].train_loss, g.history[1].train_loss);
}

#[test]
#[ignore = "heavy: pretrains with configs/fashion_tiny.toml first (5.5 min on 2 idle cores, ~10 on a \
            busy machine); needs ../shared/data/fashion-mnist or UDI_FASHION_MNIST"]
fn fashion_mnist_linear_probe_beats_random_init() {
    let Some(root) = common::fashion_mnist_root() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = common::TestConfig::from_file("configs/fashion_tiny.toml")
        .set("run.log_every", 156)
        .set("run.checkpoint_every", 1_000_000)
        .toml();
    let cfg = TrainConfig::from_toml_str(&config).unwrap();
    let run = tmp.path().join("run");
    common::pretrain(&config, &root.join("train"), &run);
    let (t, _) =
        trainer::checkpoint::load(&trainer::checkpoint::resolve(&run).unwrap(), &Device::Cpu)
            .unwrap();
    let (_s0, random) = teacher_backbone(&cfg, None, &Device::Cpu).unwrap();
    let (_s1, trained) = teacher_backbone(&cfg, Some(&t), &Device::Cpu).unwrap();
    let tr = FolderImages::open(&root.join("train")).unwrap();
    let va = FolderImages::open(&root.join("val")).unwrap();
    // fashion_tiny has 2 blocks: the probe reads both; the spec's lr and batch.
    let spec = FeatureSpec {
        blocks: 2,
        token: TokenSel::Cls,
    };
    let run_probe = |vit: &Vit, cached: bool, epochs: usize| {
        let opts = ProbeOptions {
            epochs,
            ..ProbeOptions::default()
        };
        let crop = cfg.augment.global_size;
        evaluate(
            vit,
            spec,
            &tr,
            &va,
            crop,
            256,
            cached,
            &opts,
            &Device::Cpu,
            &mut |_| {},
        )
        .unwrap()
    };
    let before = run_probe(&random, true, 100);
    let after = run_probe(&trained, true, 100);
    let after_aug = run_probe(&trained, false, 10);
    let before_aug = run_probe(&random, false, 10);
    println!(
        "linear probe on Fashion-MNIST (5000 train / 1000 val), last 2 blocks [cls]: \
         cached 100 epochs: random init best {:.2}% (last {:.2}%) → pretrained best {:.2}% \
         (last {:.2}%); augmented 10 epochs: random init best {:.2}% → pretrained best {:.2}%",
        before.best_top1,
        before.last_top1,
        after.best_top1,
        after.last_top1,
        before_aug.best_top1,
        after_aug.best_top1
    );
    assert!(
        after.best_top1 > before.best_top1 + 2.0,
        "pretrained {:.2}% vs random init {:.2}%",
        after.best_top1,
        before.best_top1
    );
    assert!(after_aug.best_top1 > before_aug.best_top1);
}
