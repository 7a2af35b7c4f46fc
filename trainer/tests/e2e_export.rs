//! `trainer export --format timm`: the export holds exactly timm's keys and shapes, and loading
//! it back into our backbone reproduces the checkpoint teacher's features bit for bit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{synth_feed, train_opts, TestConfig};
use trainer::config::TrainConfig;
use trainer::export::{from_timm, timm_keys};
use trainer::knn_eval::teacher_backbone;
use trainer::params::ParamStore;
use trainer::train::train;
use trainer::train_cli::{export_checkpoint, vit_shape};
use trainer::vit::{ClassToken, Vit};

#[test]
fn export_reloads_into_our_backbone_and_reproduces_the_features() {
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::micro(1)
        .set("optim.epochs", 1)
        .set("optim.warmup_epochs", 0)
        .toml();
    let mut feed = synth_feed(&config, 8, 3, 1, 1);
    train(&train_opts(&config, dir.path(), false, 2), &mut feed).unwrap();

    let out = dir.path().join("backbone.safetensors");
    let n = export_checkpoint(dir.path(), &out).unwrap();
    let cfg = TrainConfig::from_toml_str(&config).unwrap();
    let keys = timm_keys(vit_shape(&cfg));
    assert_eq!(n, keys.len());
    let exported = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(exported.len(), keys.len());
    for (k, shape) in &keys {
        assert_eq!(exported[k].dims(), shape.as_slice(), "{k}");
        assert_eq!(exported[k].dtype(), DType::F32);
    }

    // Reference: the teacher of the checkpoint, as `trainer knn` builds it.
    let c = trainer::checkpoint::resolve(dir.path()).unwrap();
    let (tensors, _) = trainer::checkpoint::load(&c, &Device::Cpu).unwrap();
    let (_s, teacher) = teacher_backbone(&cfg, Some(&tensors), &Device::Cpu).unwrap();

    // Re-load: timm names → our names, into a freshly initialised store (different values).
    let store = ParamStore::init(&cfg, 999, DType::F32, &Device::Cpu).unwrap();
    let ours = from_timm(&exported, "backbone.", false).unwrap();
    let mut set = 0;
    for p in store.params() {
        if let Some(t) = ours.get(&p.name) {
            p.var.set(t).unwrap();
            set += 1;
        }
    }
    assert_eq!(
        set,
        keys.len(),
        "every exported tensor maps onto a backbone parameter"
    );
    let reloaded = Vit::new(&cfg, &store, false).unwrap();

    let x: Vec<f32> = (0..3 * 3 * 32 * 32)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (3, 3, 32, 32), &Device::Cpu).unwrap();
    for token in [ClassToken::Cls, ClassToken::ClsPlus] {
        let a: Vec<f32> = teacher
            .features(&x, token)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = reloaded
            .features(&x, token)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), 3 * 32);
        assert_eq!(a, b, "{token:?} features differ after export → reload");
    }
    // And the export is not just the initial weights: training moved the teacher.
    let init = ParamStore::init(&cfg, cfg.data.seed, DType::F32, &Device::Cpu).unwrap();
    let w0: Vec<f32> = init
        .tensor("backbone.blocks.0.attn.qkv.weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w1: Vec<f32> = exported["blocks.0.attn.qkv.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(w0, w1);
}
