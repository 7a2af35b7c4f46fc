//! The explicit engine (hand-written backward over flat buffers) against the autograd step it
//! replaces, on the micro config: the three losses, every parameter's gradient, the per-parameter
//! clipped norms, and over several steps (a frozen last layer, then a trained one) the updated
//! student, teacher, AdamW moments and centres. Both engines start from the same state, with a
//! teacher that differs from the student, non-zero centres and invalid SRS rows in the batch.
mod common;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use trainer::config::TrainConfig;
use trainer::data::TrainBatch;
use trainer::engine::Explicit;
use trainer::kernels::{Compute, Kernels, Precision};
use trainer::loss::udi_loss_with;
use trainer::step::{TrainStep, Trainer};

const COMPOSED: Compute = Compute {
    precision: Precision::F32,
    kernels: Kernels::Candle,
    keep_activations: false,
};
const FUSED: Compute = Compute {
    precision: Precision::F32,
    kernels: Kernels::Fused,
    keep_activations: false,
};
/// The fused ops with the blocks' attention composed (the fused softmax) instead of flash.
const FUSED_NO_FLASH: Compute = Compute {
    precision: Precision::F32,
    kernels: Kernels::FusedNoFlash,
    keep_activations: false,
};

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (common::to_vec_f64(a), common::to_vec_f64(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn rel_f(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

fn with_freeze(mut c: TrainConfig) -> TrainConfig {
    c.optim.freeze_last_layer = 1;
    c
}

fn micro() -> TrainConfig {
    with_freeze(common::micro_cfg())
}

fn tiny() -> TrainConfig {
    with_freeze(common::tiny_cfg())
}

/// A start state shared by both engines: the fresh init with the teacher moved away from the
/// student, non-zero centres, and the head's bottleneck at a well-conditioned point (at init
/// the L2 normalisation of a near-zero vector makes the loss extremely curved).
fn start_state(cfg: &TrainConfig, dtype: DType) -> HashMap<String, Tensor> {
    let tr = Trainer::with_dtype(cfg, 10, &Device::Cpu, dtype).unwrap();
    let mut map: HashMap<String, Tensor> = tr.state_tensors().unwrap().into_iter().collect();
    let k = cfg.model.out_dim;
    for (name, t) in map.iter_mut() {
        if name.starts_with("teacher.") {
            *t = (&*t * 0.9).unwrap();
        }
        if name.ends_with("head.mlp.4.weight") || name.ends_with("head.mlp.4.bias") {
            *t = ((&*t * 40.0).unwrap() + 0.01).unwrap();
        }
    }
    for (i, name) in ["center.cls", "center.udi", "center.patch"]
        .iter()
        .enumerate()
    {
        let v: Vec<f64> = (0..k)
            .map(|j| ((j as f64) * (0.7 + i as f64)).sin() * 0.3)
            .collect();
        let t = Tensor::from_vec(v, k, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        map.insert(name.to_string(), t);
    }
    map
}

/// The synthetic batch with one invalid global row (pair 0, sample 0, row 0) and one invalid
/// local row (local crop 0 → view 0, sample 0, row 0): all-zero rows, validity 0.
fn batch_with_invalid_rows(cfg: &TrainConfig, dtype: DType) -> TrainBatch {
    let mut b = common::batch(cfg, 2, 5, dtype);
    let (bs, n_g) = (b.batch_size, b.student_rows.dim(1).unwrap());
    let zero_row = |t: &Tensor, idx: &[usize]| -> Tensor {
        let dims = t.dims().to_vec();
        let mut v = common::to_vec_f64(t);
        let mut off = 0;
        for (i, &x) in idx.iter().enumerate() {
            off = off * dims[i] + x;
        }
        let inner: usize = dims[idx.len()..].iter().product();
        v[off * inner..(off + 1) * inner]
            .iter_mut()
            .for_each(|x| *x = 0.0);
        Tensor::from_vec(v, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    // Student view 0's S-row 0; its T-row is read on teacher view 1 (slot 0).
    b.student_rows = zero_row(&b.student_rows, &[0, 0]);
    b.valid_g = zero_row(&b.valid_g, &[0, 0, 0]);
    b.teacher_rows = zero_row(&b.teacher_rows, &[bs, 0]);
    // Local crop 0 → view 0, row 0: teacher view 0, slot n_g.
    if b.n_local > 0 {
        b.valid_l = zero_row(&b.valid_l, &[0, 0, 0, 0]);
        b.teacher_rows = zero_row(&b.teacher_rows, &[0, n_g]);
    }
    b
}

fn engines(cfg: &TrainConfig, dtype: DType, compute: Compute) -> (Explicit, Trainer) {
    let map = start_state(cfg, dtype);
    let mut e = Explicit::new(cfg, 10, &Device::Cpu, dtype, compute).unwrap();
    e.load_state(&map, "start").unwrap();
    let mut a = Trainer::with_options(cfg, 10, &Device::Cpu, dtype, compute).unwrap();
    a.load_state(&map, "start").unwrap();
    (e, a)
}

/// One step's loss and gradients of both engines (drop path on: the same masks).
fn check_gradients(cfg: TrainConfig, dtype: DType, compute: Compute, tol: f64) {
    let batch = batch_with_invalid_rows(&cfg, dtype);
    let (e, a) = engines(&cfg, dtype, compute);
    let (epoch, step) = (1, 3);
    let (vals, grads) = e.gradients(&batch, epoch, step).unwrap();

    let masks = a.drop_masks(&batch, step).unwrap();
    let s_out = a.student_net().student(&batch, Some(&masks)).unwrap();
    let t_out = a.teacher_net().teacher(&batch).unwrap();
    let tau = a.schedules.teacher_temp(epoch);
    let loss = udi_loss_with(
        &cfg.loss,
        &batch,
        &s_out,
        &t_out,
        &a.centres,
        tau,
        compute.kernels == Kernels::Fused,
    )
    .unwrap();
    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    for (what, x, y) in [
        ("L", vals.total, scalar(&loss.total)),
        ("L_cls", vals.cls, scalar(&loss.cls)),
        ("L_udi", vals.udi, scalar(&loss.udi)),
        ("L_patch", vals.patch, scalar(&loss.patch)),
    ] {
        assert!(rel_f(x, y) <= tol, "{what}: explicit {x} vs autograd {y}");
    }
    let reference = loss.total.backward().unwrap();
    let mut worst = (0.0, String::new());
    let mut bad = Vec::new();
    for (name, g) in &grads {
        let p = a.student.get(name).unwrap();
        let r = reference
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("autograd gives {name} no gradient"));
        let err = rel(g, r);
        if err > tol {
            bad.push(format!("{name}: {err:e}"));
        }
        assert!(
            common::to_vec_f64(g).iter().any(|x| *x != 0.0),
            "{name}: zero gradient"
        );
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!(
        "{dtype:?} {compute:?}: worst gradient relative error {:e} ({})",
        worst.0, worst.1
    );
    assert!(
        bad.is_empty(),
        "gradient relative error above {tol:e}: {bad:#?}"
    );
}

#[test]
fn gradients_match_autograd_f64() {
    check_gradients(micro(), DType::F64, COMPOSED, 1e-10);
    check_gradients(micro(), DType::F64, FUSED, 1e-10);
    check_gradients(micro(), DType::F64, FUSED_NO_FLASH, 1e-10);
    check_gradients(tiny(), DType::F64, COMPOSED, 1e-10);
    // Without local crops (L = 0): no local pass, no local SRS pairs.
    let mut globals_only = micro();
    globals_only.augment.n_local = 0;
    check_gradients(globals_only, DType::F64, FUSED, 1e-10);
}

#[test]
fn gradients_match_autograd_f32() {
    check_gradients(micro(), DType::F32, COMPOSED, 1e-5);
    check_gradients(tiny(), DType::F32, COMPOSED, 1e-5);
}

/// bf16 matmuls (f32 masters, statistics and loss), as on a GPU: the same casts in both engines,
/// so they agree to bf16 rounding; this also runs every dtype combination the CUDA path sees.
#[test]
fn gradients_match_autograd_bf16() {
    let bf16 = |kernels| Compute {
        precision: Precision::Bf16,
        kernels,
        keep_activations: false,
    };
    check_gradients(micro(), DType::F32, bf16(Kernels::Candle), 3e-2);
    check_gradients(micro(), DType::F32, bf16(Kernels::Fused), 3e-2);
}

/// Several whole steps (epoch 0 with the last layer frozen, then epoch 1) of both engines:
/// reported values, per-parameter norms before/after clipping, and the whole state after each
/// step. The update runs the same fused AdamW + EMA in both (`--kernels fused`), so f64 agrees
/// to rounding.
fn check_steps(mut cfg: TrainConfig, dtype: DType, compute: Compute, tol: f64) {
    cfg.optim.clip_grad = 0.05; // small enough that some tensors are clipped
                                // The key bias of softmax attention has a gradient of exactly 0 in exact arithmetic; in f32
                                // both engines leave rounding noise of ~1e-9 there, which Adam's m/(√v + ε) with ε = 1e-8
                                // turns into updates of ~0.1·lr of either sign. A larger ε keeps the comparison about the
                                // step's arithmetic (f64 runs with the config's ε).
    if dtype == DType::F32 {
        cfg.optim.eps = 1e-4;
    }
    let batch = batch_with_invalid_rows(&cfg, dtype);
    let (mut e, mut a) = engines(&cfg, dtype, compute);
    assert!(
        !e.holds_graph(),
        "the explicit state records a backprop graph"
    );
    let mut clipped = 0;
    for (epoch, step) in [(0, 0), (0, 1), (1, 10), (1, 11)] {
        let re = e.step_detailed(&batch, epoch, step).unwrap();
        let ra = a.step_detailed(&batch, epoch, step).unwrap();
        let (se, sa) = (&re.stats, &ra.stats);
        for (what, x, y) in [
            ("loss", se.loss, sa.loss),
            ("loss_cls", se.loss_cls, sa.loss_cls),
            ("loss_udi", se.loss_udi, sa.loss_udi),
            ("loss_patch", se.loss_patch, sa.loss_patch),
            ("grad_norm", se.grad_norm, sa.grad_norm),
            ("entropy 0", se.teacher_entropy[0], sa.teacher_entropy[0]),
            ("entropy 1", se.teacher_entropy[1], sa.teacher_entropy[1]),
            ("entropy 2", se.teacher_entropy[2], sa.teacher_entropy[2]),
            ("‖c₂‖", se.centre_norms[2], sa.centre_norms[2]),
        ] {
            assert!(
                rel_f(x, y) <= tol,
                "step {step} {what}: explicit {x} vs autograd {y}"
            );
        }
        for ((n, pe, qe), (m, pa, qa)) in re.grad_norms.iter().zip(&ra.grad_norms) {
            assert_eq!(n, m);
            assert_eq!(
                pe.is_some(),
                pa.is_some(),
                "step {step} {n}: pre-clip norm presence"
            );
            assert_eq!(
                qe.is_some(),
                qa.is_some(),
                "step {step} {n}: post-clip norm presence"
            );
            if let (Some(x), Some(y)) = (pe, pa) {
                assert!(
                    rel_f(*x, *y) <= tol,
                    "step {step} {n}: pre-clip norm {x} vs {y}"
                );
            }
            if let (Some(x), Some(y)) = (qe, qa) {
                assert!(
                    rel_f(*x, *y) <= tol,
                    "step {step} {n}: post-clip norm {x} vs {y}"
                );
                clipped += usize::from(*x < pe.unwrap() * (1.0 - 1e-9));
            }
            if epoch == 0 && n.starts_with("head.last_layer") {
                assert!(qe.is_none(), "step {step}: {n} updated while frozen");
            }
        }
        assert!(
            !e.holds_graph(),
            "step {step}: the explicit state records a backprop graph"
        );
        let se: HashMap<String, Tensor> = e.state_tensors().unwrap().into_iter().collect();
        let sa: HashMap<String, Tensor> = a.state_tensors().unwrap().into_iter().collect();
        let mut ke: Vec<&String> = se.keys().collect();
        let mut ka: Vec<&String> = sa.keys().collect();
        ke.sort();
        ka.sort();
        assert_eq!(ke, ka, "step {step}: checkpoint names differ");
        for (name, t) in &se {
            let err = rel(t, &sa[name]);
            assert!(
                err <= tol,
                "step {step} {name}: relative error {err:e} > {tol:e}"
            );
        }
    }
    assert!(
        clipped > 0,
        "no gradient was clipped: the clipping path is untested"
    );
}

#[test]
fn steps_match_autograd_f64() {
    check_steps(micro(), DType::F64, FUSED, 1e-10);
    check_steps(tiny(), DType::F64, FUSED, 1e-10);
}

#[test]
fn steps_match_autograd_f32() {
    check_steps(micro(), DType::F32, FUSED, 1e-5);
}

/// A checkpoint of the explicit engine resumes bit-identically (in either engine's names).
#[test]
fn explicit_resume_is_bitwise() {
    let cfg = micro();
    let batch = batch_with_invalid_rows(&cfg, DType::F32);
    let (mut e, _) = engines(&cfg, DType::F32, COMPOSED);
    e.step(&batch, 1, 10).unwrap();
    let saved: HashMap<String, Tensor> = e.state_tensors().unwrap().into_iter().collect();
    let mut r = Explicit::new(&cfg, 10, &Device::Cpu, DType::F32, COMPOSED).unwrap();
    r.load_state(&saved, "saved").unwrap();
    let x = e.step(&batch, 1, 11).unwrap();
    let y = r.step(&batch, 1, 11).unwrap();
    assert_eq!(x.loss.to_bits(), y.loss.to_bits());
    let (se, sr) = (e.state_tensors().unwrap(), r.state_tensors().unwrap());
    for ((n, a), (m, b)) in se.iter().zip(&sr) {
        assert_eq!(n, m);
        assert_eq!(
            common::to_vec_f64(a),
            common::to_vec_f64(b),
            "{n} differs after resume"
        );
    }
}

/// Keeping the blocks' LayerNorm and GELU outputs instead of recomputing them in the backward
/// changes no value: the same losses and state bit for bit over three steps (drop path on,
/// invalid SRS rows, the last layer frozen in the first epoch), composed and fused, bf16 too.
#[test]
fn kept_activations_equal_recomputed_ones() {
    let cfg = micro();
    let batch = batch_with_invalid_rows(&cfg, DType::F32);
    let bf16 = Compute {
        precision: Precision::Bf16,
        ..FUSED
    };
    for compute in [COMPOSED, FUSED, bf16] {
        let kept = Compute {
            keep_activations: true,
            ..compute
        };
        let mut a = Explicit::new(&cfg, 10, &Device::Cpu, DType::F32, compute).unwrap();
        let mut b = Explicit::new(&cfg, 10, &Device::Cpu, DType::F32, kept).unwrap();
        let start: HashMap<String, Tensor> = start_state(&cfg, DType::F32);
        a.load_state(&start, "start").unwrap();
        b.load_state(&start, "start").unwrap();
        for (epoch, step) in [(0, 3), (1, 12), (1, 13)] {
            let x = a.step(&batch, epoch, step).unwrap();
            let y = b.step(&batch, epoch, step).unwrap();
            assert_eq!(
                x.loss.to_bits(),
                y.loss.to_bits(),
                "{compute:?} step {step}"
            );
        }
        for ((n, ta), (_, tb)) in a
            .state_tensors()
            .unwrap()
            .iter()
            .zip(&b.state_tensors().unwrap())
        {
            assert_eq!(
                common::to_vec_f64(ta),
                common::to_vec_f64(tb),
                "{n} differs ({compute:?})"
            );
        }
    }
}

/// The state carries no backprop graph from a fresh start, and a step adds none: otherwise every
/// step's tensors stay reachable and memory grows without bound.
#[test]
fn fresh_state_records_no_graph() {
    let cfg = micro();
    let batch = batch_with_invalid_rows(&cfg, DType::F32);
    let mut e = Explicit::new(&cfg, 10, &Device::Cpu, DType::F32, COMPOSED).unwrap();
    assert!(!e.holds_graph());
    e.step(&batch, 1, 10).unwrap();
    assert!(!e.holds_graph());
}
