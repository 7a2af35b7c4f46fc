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
