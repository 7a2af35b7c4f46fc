//! The trainer's TOML tables: both shipped configs parse, typos are refused, and
//! `norm_last_layer` freezes g.
mod common;
use candle_core::{DType, Device};
use trainer::config::TrainConfig;
use trainer::step::Trainer;

#[test]
fn shipped_configs_parse_with_the_paper_recipe() {
    let full =
        TrainConfig::from_toml_file(&common::repo_path("configs/udi_vit_s16_in1k.toml")).unwrap();
    assert_eq!(
        (
            full.model.dim,
            full.model.depth,
            full.model.heads,
            full.model.out_dim
        ),
        (384, 12, 6, 65536)
    );
    assert_eq!(full.pos_grid(), 14);
    assert!(!full.model.norm_last_layer && full.model.srs_skip);
    assert_eq!(
        (
            full.optim.epochs,
            full.optim.warmup_epochs,
            full.optim.freeze_last_layer
        ),
        (300, 10, 1)
    );
    assert_eq!(full.loss.warmup_teacher_temp_epochs, 30);
    let tiny = common::tiny_cfg();
    assert!(tiny.model.dim <= 64 && tiny.model.out_dim <= 1024);
}

#[test]
fn typos_in_trainer_tables_are_refused() {
    let err = TrainConfig::from_toml_str("[model]\ndimm = 3\n").unwrap_err();
    assert!(format!("{err:#}").contains("dimm"), "{err:#}");
    let err = TrainConfig::from_toml_str("[model]\ndim = 10\nheads = 3\n").unwrap_err();
    assert!(format!("{err:#}").contains("heads"), "{err:#}");
    // Other top-level tables belong to other owners and are ignored here.
    assert!(TrainConfig::from_toml_str("[checkpoint]\nevery = 3\n").is_ok());
}

#[test]
fn norm_last_layer_keeps_g_at_one() {
    let mut cfg = common::micro_cfg();
    cfg.model.norm_last_layer = true;
    let batch = common::batch(&cfg, 2, 3, DType::F32);
    let mut tr = Trainer::new(&cfg, 2, &Device::Cpu).unwrap();
    let rep = tr.step_detailed(&batch, 1, 2).unwrap();
    let g = rep
        .grad_norms
        .iter()
        .find(|x| x.0 == "head.last_layer.weight_g")
        .unwrap();
    assert!(g.1.is_none() && g.2.is_none());
    for store in [&tr.student, &tr.teacher] {
        assert!(
            common::to_vec_f64(&store.tensor("head.last_layer.weight_g").unwrap())
                .iter()
                .all(|&x| x == 1.0)
        );
    }
    let v = rep
        .grad_norms
        .iter()
        .find(|x| x.0 == "head.last_layer.weight_v")
        .unwrap();
    assert!(v.2.is_some());
}
