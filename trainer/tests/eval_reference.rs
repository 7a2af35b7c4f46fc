//! The evaluation tools against independent references: the linear probe's optimiser and
//! schedule (a step-by-step f64 computation written here), the probe feature (against the
//! models' own outputs: a backbone cut after block b ends with block b's output) and the
//! attention map (a hand-built network whose attention is known or computed here).

mod common;

use candle_core::{DType, Device, Tensor};
use trainer::config::TrainConfig;
use trainer::eval::attention::{attention_maps, mass_mask};
use trainer::eval::features::{FeatureSpec, TokenSel};
use trainer::eval::linear::{cosine_lr, train_probe, LinearClassifier, ProbeOptions};
use trainer::params::ParamStore;
use trainer::vit::{ClassToken, Vit};

fn tensor(v: &[f64], shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(
        v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// Mean cross-entropy and its gradient (∂W [C][F], ∂b [C]) of a linear classifier, in f64.
#[allow(clippy::type_complexity)]
fn ce_grad(
    w: &[Vec<f64>],
    b: &[f64],
    xs: &[&[f64]],
    ys: &[usize],
) -> (f64, Vec<Vec<f64>>, Vec<f64>) {
    let (c, f) = (w.len(), w[0].len());
    let mut gw = vec![vec![0.0; f]; c];
    let mut gb = vec![0.0; c];
    let mut loss = 0.0;
    for (x, &y) in xs.iter().zip(ys) {
        let z: Vec<f64> = (0..c)
            .map(|k| b[k] + (0..f).map(|j| w[k][j] * x[j]).sum::<f64>())
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let se: f64 = z.iter().map(|v| (v - m).exp()).sum();
        loss += -(z[y] - m - se.ln());
        for k in 0..c {
            let g = ((z[k] - m).exp() / se - (k == y) as u8 as f64) / xs.len() as f64;
            gb[k] += g;
            for j in 0..f {
                gw[k][j] += g * x[j];
            }
        }
    }
    (loss / xs.len() as f64, gw, gb)
}

#[test]
fn linear_probe_follows_a_step_by_step_sgd_momentum_cosine_reference() {
    // 11 items (the last batch of 4 is short), 3 features, 3 classes; val = train.
    let x: Vec<Vec<f64>> = (0..11)
        .map(|i| {
            let t = i as f64;
            vec![(t * 0.7).sin(), (t * 1.3).cos(), 0.1 * t - 0.5]
        })
        .collect();
    let y: Vec<usize> = (0..11).map(|i| (i * 2 + i / 3) % 3).collect();
    let xt = tensor(&x.concat(), (11, 3));
    let yi: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    let opts = ProbeOptions {
        epochs: 3,
        batch_size: 4,
        lr: 2.0, // × 4/256
        momentum: 0.9,
        seed: 5,
    };
    // The reference starts from the same N(0, 0.01) draw (checked for its scale here).
    let init = LinearClassifier::new(3, 3, opts.seed, &Device::Cpu).unwrap();
    let mut w: Vec<Vec<f64>> = init.weight.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    assert!(w.concat().iter().all(|v| v.abs() < 0.05) && w.concat().iter().any(|&v| v != 0.0));
    let mut b = vec![0.0; 3];
    let (mut mw, mut mb) = (vec![vec![0.0; 3]; 3], vec![0.0; 3]);
    let mut ref_losses = Vec::new();
    for epoch in 0..3 {
        // CosineAnnealingLR(T_max = 3) stepped per epoch, from lr × batch / 256.
        let lr =
            2.0 * 4.0 / 256.0 * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / 3.0).cos());
        assert!((cosine_lr(opts.scaled_lr(), epoch, 3) - lr).abs() < 1e-15);
        let perm = shared::rng::epoch_permutation(opts.seed, epoch as u64, 11);
        let mut sum = 0.0;
        let mut n = 0;
        for items in perm.chunks(4) {
            let xs: Vec<&[f64]> = items.iter().map(|&i| x[i as usize].as_slice()).collect();
            let ys: Vec<usize> = items.iter().map(|&i| y[i as usize]).collect();
            let (loss, gw, gb) = ce_grad(&w, &b, &xs, &ys);
            for k in 0..3 {
                mb[k] = 0.9 * mb[k] + gb[k];
                b[k] -= lr * mb[k];
                for j in 0..3 {
                    mw[k][j] = 0.9 * mw[k][j] + gw[k][j];
                    w[k][j] -= lr * mw[k][j];
                }
            }
            sum += loss;
            n += 1;
        }
        ref_losses.push(sum / n as f64);
    }
    let mut batch = |_e: usize, items: &[usize]| trainer::eval::linear::gather(&xt, &yi, items);
    let r = train_probe(&opts, 11, 3, &mut batch, (&xt, &yi), "cached", &mut |_| {}).unwrap();
    for (s, rl) in r.history.iter().zip(&ref_losses) {
        assert!(
            (s.train_loss - rl).abs() < 1e-5 * rl.max(1.0),
            "epoch {}: {} vs {rl}",
            s.epoch,
            s.train_loss
        );
    }
    // The final classifier's val accuracy, from the reference weights.
    let correct = x
        .iter()
        .zip(&y)
        .filter(|(xi, &yi)| {
            let z: Vec<f64> = (0..3)
                .map(|k| b[k] + (0..3).map(|j| w[k][j] * xi[j]).sum::<f64>())
                .collect();
            (0..3).all(|k| k == yi || z[k] < z[yi])
        })
        .count();
    assert!(
        (r.last_top1 - 100.0 * correct as f64 / 11.0).abs() < 1e-9,
        "{} vs {correct}/11",
        r.last_top1
    );
    assert_eq!(r.last_top5, 100.0, "3 classes: top-5 holds every class");
    assert!(r.best_top1 >= r.last_top1);
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A backbone with the first `depth` blocks of `big`'s parameters.
fn truncated(cfg: &TrainConfig, big: &ParamStore, depth: usize) -> (ParamStore, Vit) {
    let mut c = cfg.clone();
    c.model.depth = depth;
    let store = ParamStore::init(&c, 99, DType::F32, &Device::Cpu).unwrap();
    for p in store
        .params()
        .iter()
        .filter(|p| p.name.starts_with("backbone."))
    {
        p.var
            .set(&big.get(&p.name).unwrap().var.as_tensor().clone())
            .unwrap();
    }
    let vit = Vit::new(&c, &store, false).unwrap();
    (store, vit)
}

#[test]
fn probe_features_are_the_final_norm_class_tokens_of_the_last_blocks_in_order() {
    let mut cfg = common::micro_cfg();
    cfg.model.depth = 4;
    let store = ParamStore::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let vit = Vit::new(&cfg, &store, false).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let spec = FeatureSpec {
        blocks: 3,
        token: TokenSel::Both,
    };
    let d = cfg.model.dim;
    let f = spec.extract(&vit, &x).unwrap();
    assert_eq!(f.dims(), &[3, spec.dim(d)]);
    assert_eq!(spec.dim(d), 6 * d);
    // Expected: [cls] of blocks 1, 2, 3, then [cls+] of blocks 1, 2, 3, each from a backbone
    // cut after that block (its own forward and final norm).
    let mut parts = Vec::new();
    for token in [ClassToken::Cls, ClassToken::ClsPlus] {
        for depth in 2..=4 {
            let (_s, v) = truncated(&cfg, &store, depth);
            parts.push(v.features(&x, token).unwrap());
        }
    }
    let want = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&f, &want);
    assert!(diff < 1e-5, "max diff {diff}");
    // The k-NN feature is the 1-block [cls] spec.
    let one = FeatureSpec {
        blocks: 1,
        token: TokenSel::Cls,
    }
    .extract(&vit, &x)
    .unwrap();
    let knn = vit.features(&x, ClassToken::Cls).unwrap();
    let diff = max_abs_diff(&one, &knn);
    assert!(diff < 1e-6);
    assert!(FeatureSpec {
        blocks: 5,
        token: TokenSel::Cls
    }
    .check(&vit)
    .is_err());
}

/// LayerNorm (eps 1e-6, weight 1, bias 0) in f64.
fn ln(v: &[f64]) -> Vec<f64> {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    v.iter().map(|x| (x - m) / (var + 1e-6).sqrt()).collect()
}

#[test]
fn attention_map_of_a_hand_built_network() {
    // One block, dim 8, 2 heads of 4, a 4×4 patch grid. Patch pixels contribute nothing
    // (patch weights and bias 0), so token t is its position row p_t. Queries are the qkv bias
    // alone (Wq = 0): head 0 asks for u = 6·LN(p_target)[0..4], head 1 asks for nothing (0), so
    // its attention is uniform: 1/18 on every token. Keys are LN(p_t) (Wk = I).
    let mut cfg = common::micro_cfg();
    cfg.model.depth = 1;
    let store = ParamStore::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let (dim, t) = (8usize, 18usize);
    let target = 2 + 9; // patch 9 (row 2, col 1)
    let mut pos: Vec<Vec<f64>> = (0..t)
        .map(|i| {
            (0..dim)
                .map(|j| ((i * 7 + j * 3) as f64 * 0.37).sin())
                .collect()
        })
        .collect();
    // The target's variance sits in head 0's four dimensions, so LN(p_target)[0..4] is
    // longer than any other token's and u points at it: the target has the largest logit.
    pos[target] = vec![3.0, -3.0, 3.0, -3.0, 0.1, -0.1, 0.05, -0.05];
    let u: Vec<f64> = ln(&pos[target])[..4].iter().map(|v| 6.0 * v).collect();
    let set = |name: &str, v: Vec<f64>| {
        let p = store.get(name).unwrap();
        let shape = p.var.dims().to_vec();
        let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
        p.var
            .set(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
            .unwrap();
    };
    let zeros = |name: &str| {
        let n = store.get(name).unwrap().var.elem_count();
        set(name, vec![0.0; n]);
    };
    for n in [
        "backbone.patch_embed.proj.weight",
        "backbone.patch_embed.proj.bias",
        "backbone.cls_token",
        "backbone.reg_token",
    ] {
        zeros(n);
    }
    set("backbone.pos_embed", pos.concat());
    set("backbone.blocks.0.norm1.weight", vec![1.0; dim]);
    zeros("backbone.blocks.0.norm1.bias");
    let mut w = vec![0.0; 3 * dim * dim];
    for j in 0..dim {
        w[(dim + j) * dim + j] = 1.0; // Wk = I
    }
    set("backbone.blocks.0.attn.qkv.weight", w);
    let mut bias = vec![0.0; 3 * dim];
    bias[..4].copy_from_slice(&u);
    set("backbone.blocks.0.attn.qkv.bias", bias);
    let vit = Vit::new(&cfg, &store, false).unwrap();
    let img = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &Device::Cpu).unwrap();

    for (token, name) in [(0, "[cls]"), (1, "[cls+]")] {
        let maps = attention_maps(&vit, &img, token).unwrap();
        assert_eq!((maps.grid, maps.heads.len()), (4, 2));
        // Head 1: uniform over all 18 tokens.
        for &v in &maps.heads[1] {
            assert!((v as f64 - 1.0 / 18.0).abs() < 1e-6, "{name} head 1: {v}");
        }
        // Head 0: softmax_t(0.5 · u · LN(p_t)[0..4]), the same for every query token.
        let logits: Vec<f64> = (0..t)
            .map(|i| {
                0.5 * ln(&pos[i])[..4]
                    .iter()
                    .zip(&u)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        for (p, &v) in maps.heads[0].iter().enumerate() {
            let want = (logits[2 + p] - m).exp() / z;
            assert!(
                (v as f64 - want).abs() < 1e-5,
                "{name} head 0 patch {p}: {v} vs {want}"
            );
        }
        let argmax = (0..16)
            .max_by(|&a, &b| maps.heads[0][a].total_cmp(&maps.heads[0][b]))
            .unwrap();
        assert_eq!(argmax, target - 2);
        let mask = mass_mask(&maps.heads[0], 0.6);
        assert!(mask[target - 2]);
        // Uniform attention: 60 % of 16 equal patches needs 10 of them (9 hold 56 %).
        assert_eq!(
            mass_mask(&maps.heads[1], 0.6)
                .iter()
                .filter(|&&b| b)
                .count(),
            10
        );
    }
}
