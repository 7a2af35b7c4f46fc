#![allow(clippy::needless_range_loop)]
//! Parameter counts (udi-spec §8), timm names, and the pos-embed resampling weights (§2.2).
mod common;
use trainer::config::TrainConfig;
use trainer::params::{backbone_specs, head_specs, param_specs, srs_specs};
use trainer::vit::{bicubic_matrix_2d, bicubic_weights_1d};

fn count(v: &[trainer::params::ParamSpec]) -> usize {
    v.iter().map(|s| s.numel()).sum()
}

#[test]
fn vit_s16_parameter_counts_match_the_spec() {
    let cfg =
        TrainConfig::from_toml_file(&common::repo_path("configs/udi_vit_s16_in1k.toml")).unwrap();
    assert_eq!(count(&backbone_specs(&cfg)), 21_666_432);
    assert_eq!(count(&srs_specs(&cfg)), 592_896);
    assert_eq!(count(&head_specs(&cfg)), 22_352_128);
    assert_eq!(count(&param_specs(&cfg)), 21_666_432 + 592_896 + 22_352_128);
}

#[test]
fn backbone_names_are_timm_reg_token_names() {
    let cfg = TrainConfig::default();
    let specs = backbone_specs(&cfg);
    assert_eq!(specs.len(), 151);
    let get = |n: &str| {
        specs
            .iter()
            .find(|s| s.name == format!("backbone.{n}"))
            .unwrap_or_else(|| panic!("{n}"))
            .shape
            .clone()
    };
    assert_eq!(get("cls_token"), vec![1, 1, 384]);
    assert_eq!(get("reg_token"), vec![1, 1, 384]);
    assert_eq!(get("pos_embed"), vec![1, 198, 384]);
    assert_eq!(get("patch_embed.proj.weight"), vec![384, 3, 16, 16]);
    assert_eq!(get("blocks.11.mlp.fc2.weight"), vec![384, 1536]);
    assert_eq!(get("norm.bias"), vec![384]);
    // Extra check against the key list when the material beside the repo is present.
    let keys = common::repo_path("../shared/timm-vit-s16-keys.json");
    if let Ok(text) = std::fs::read_to_string(&keys) {
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut expect: std::collections::BTreeMap<String, Vec<usize>> = j["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect();
        for (k, v) in j["udi_export_variant"]["changes"].as_object().unwrap() {
            expect.insert(
                k.clone(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect(),
            );
        }
        let ours: std::collections::BTreeMap<String, Vec<usize>> = specs
            .iter()
            .map(|s| {
                (
                    s.name.trim_start_matches("backbone.").to_string(),
                    s.shape.clone(),
                )
            })
            .collect();
        assert_eq!(ours, expect);
    }
}

#[test]
fn decay_groups_follow_the_official_rule() {
    let cfg = TrainConfig::default();
    for s in param_specs(&cfg) {
        let expect = !(s.name.ends_with(".bias") || s.shape.len() < 2);
        assert_eq!(s.decays(), expect, "{}", s.name);
    }
    let specs = param_specs(&cfg);
    for n in [
        "backbone.cls_token",
        "backbone.reg_token",
        "backbone.pos_embed",
        "head.last_layer.weight_g",
        "head.last_layer.weight_v",
    ] {
        assert!(specs.iter().find(|s| s.name == n).unwrap().decays(), "{n}");
    }
}

#[test]
fn pos_embed_14_to_6_first_row_taps() {
    let w = bicubic_weights_1d(14, 6);
    let first = &w[0];
    for (got, want) in first[..3].iter().zip([0.3356, 0.7752, -0.1108]) {
        assert!((got - want).abs() < 5e-5, "{first:?}");
    }
    assert!(first[3..].iter().all(|&x| x == 0.0));
    for row in &w {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    // The 2-D matrix is the outer product of the 1-D rows.
    let m = bicubic_matrix_2d(14, 6);
    assert_eq!(m.len(), 36 * 196);
    assert!((m[0] - 0.3356 * 0.3356).abs() < 1e-4);
    assert!((m[(6 + 2) * 196 + 3 * 14 + 5] - w[1][3] * w[2][5]).abs() < 1e-15);
}

#[test]
fn pos_embed_resampling_against_an_independent_cubic_convolution() {
    // Keys' cubic convolution written directly from its piecewise definition (A = −0.75),
    // sampling x = (o + 0.5)·14/6.1 − 0.5 with border clamping.
    let a = -0.75f64;
    let k = |s: f64| {
        let s = s.abs();
        if s <= 1.0 {
            (a + 2.0) * s.powi(3) - (a + 3.0) * s.powi(2) + 1.0
        } else if s < 2.0 {
            a * s.powi(3) - 5.0 * a * s.powi(2) + 8.0 * a * s - 4.0 * a
        } else {
            0.0
        }
    };
    let w = bicubic_weights_1d(14, 6);
    for o in 0..6 {
        let x = (o as f64 + 0.5) * 14.0 / 6.1 - 0.5;
        let mut row = [0.0; 14];
        for i in (x.floor() as i64 - 1)..=(x.floor() as i64 + 2) {
            row[i.clamp(0, 13) as usize] += k(x - i as f64);
        }
        for s in 0..14 {
            assert!((row[s] - w[o][s]).abs() < 1e-12, "o={o} s={s}");
        }
    }
}
