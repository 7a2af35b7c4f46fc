use candle_core::Device;
use shared::batch::BatchView;
use trainer::config::TrainConfig;
use trainer::data::{synthetic_batch, TrainBatch};
use trainer::step::Trainer;

#[test]
fn tiny_step_runs() {
    let cfg = TrainConfig::from_toml_file(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.toml"))).unwrap();
    let (layout, buf) = synthetic_batch(&cfg.augment, 4, 1);
    let view = BatchView::new(&layout, buf.bytes()).unwrap();
    let batch = TrainBatch::from_view(&view, &cfg.augment, &Device::Cpu).unwrap();
    let mut tr = Trainer::new(&cfg, 10, &Device::Cpu).unwrap();
    let s = tr.step(&batch, 0, 0).unwrap();
    println!("{s:?}");
    let s = tr.step(&batch, 1, 10).unwrap();
    println!("{s:?}");
}
