//! Schedules against closed forms, AdamW against the PyTorch formula, clipping, last-layer
//! freeze, teacher EMA after k steps, and bitwise resume.
mod common;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use trainer::optim::{clip_factor, AdamW};
use trainer::schedule::{cosine, Schedules};
use trainer::step::Trainer;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn schedules_match_closed_forms() {
    let mut cfg = trainer::config::TrainConfig::default();
    cfg.data.batch_size = 1024;
    let ipe = 100;
    let s = Schedules::new(&cfg, ipe);
    let peak = 2e-3; // 5e-4 · 1024/256
    let w = 10 * ipe; // warm-up iterations
    let t = 300 * ipe - w;
    assert_eq!(s.lr(0), 0.0);
    assert!(close(s.lr(1), peak / (w - 1) as f64, 1e-12));
    assert!(close(s.lr(w - 1), peak, 1e-12)); // np.linspace includes the end point
    assert!(close(s.lr(w), peak, 1e-12)); // cos(0) = 1
    assert!(close(s.lr(w + t / 2), 1e-5 + 0.5 * (peak - 1e-5), 1e-12));
    let last = 1e-5
        + 0.5 * (peak - 1e-5) * (1.0 + (std::f64::consts::PI * (t - 1) as f64 / t as f64).cos());
    assert!(close(s.lr(300 * ipe - 1), last, 1e-12));
    assert!(s.lr(300 * ipe - 1) > 1e-5);
    // Weight decay: cosine 0.04 → 0.1 over all 30 000 iterations, no warm-up.
    assert_eq!(s.weight_decay(0), 0.04);
    assert!(close(s.weight_decay(15_000), 0.07, 1e-12));
    assert!(close(
        s.weight_decay(7_500),
        0.1 + 0.5 * (0.04 - 0.1) * (1.0 + (std::f64::consts::FRAC_PI_4).cos()),
        1e-12
    ));
    // EMA momentum 0.996 → 1.
    assert_eq!(s.momentum(0), 0.996);
    assert!(close(s.momentum(15_000), 0.998, 1e-12));
    // Teacher temperature: linspace(0.04, 0.07, 30) per epoch, then 0.07.
    assert_eq!(s.teacher_temp(0), 0.04);
    assert!(close(s.teacher_temp(1), 0.04 + 0.03 / 29.0, 1e-12));
    assert!(close(s.teacher_temp(29), 0.07, 1e-12));
    assert_eq!(s.teacher_temp(30), 0.07);
    assert_eq!(s.teacher_temp(299), 0.07);
    assert_eq!(cosine(1.0, 0.0, 10, 0, 0.0, 5), 0.5);
}

#[test]
fn clip_factor_is_torchs() {
    assert_eq!(clip_factor(2.0, 3.0), 1.0);
    assert!(close(clip_factor(6.0, 3.0), 3.0 / (6.0 + 1e-6), 1e-15));
    assert_eq!(clip_factor(1e9, 0.0), 1.0);
}

#[test]
fn adamw_matches_the_pytorch_formula_over_three_steps() {
    let dev = Device::Cpu;
    let p0 = vec![0.5f64, -1.0, 2.0, 0.0];
    let var = Var::from_tensor(&Tensor::new(p0.as_slice(), &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(1, 0.9, 0.999, 1e-8);
    let grads = [
        [0.1f64, -0.2, 0.0, 3.0],
        [0.3, 0.1, -0.5, 1.0],
        [-0.2, 0.0, 0.4, 2.0],
    ];
    let (lr, wd) = (0.01, 0.05);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; 4], vec![0.0; 4]);
    for (t, g) in grads.iter().enumerate() {
        opt.update(0, &var, &Tensor::new(g, &dev).unwrap(), lr, wd)
            .unwrap();
        let t = (t + 1) as i32;
        for i in 0..4 {
            p[i] *= 1.0 - lr * wd;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
    }
    let got = common::to_vec_f64(var.as_tensor());
    for i in 0..4 {
        assert!((got[i] - p[i]).abs() < 1e-12, "{got:?} vs {p:?}");
    }
    assert_eq!(opt.states[0].as_ref().unwrap().step, 3);
}

fn snapshot(store: &trainer::params::ParamStore) -> HashMap<String, Vec<f64>> {
    store
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, common::to_vec_f64(&t)))
        .collect()
}

#[test]
fn clipping_freeze_and_ema_over_steps() {
    let cfg = common::micro_cfg();
    let batch = common::batch(&cfg, 2, 21, DType::F32);
    let ipe = 3;
    let mut tr = Trainer::new(&cfg, ipe, &Device::Cpu).unwrap();
    let mut teacher = snapshot(&tr.teacher);
    let mut saw_clipping = false;
    for (epoch, step) in [(0u64, 0u64), (0, 1), (1, 3), (1, 4)] {
        let student_before = snapshot(&tr.student);
        let rep = tr.step_detailed(&batch, epoch, step).unwrap();
        let m = tr.schedules.momentum(step);
        assert_eq!(rep.stats.momentum, m);
        // Clipping: post = min(pre, 3) per parameter (cls tokens: on their joint norm).
        let norm_of = |n: &str| rep.grad_norms.iter().find(|g| g.0 == n).unwrap().1.unwrap();
        let joint =
            (norm_of("backbone.cls_token").powi(2) + norm_of("backbone.reg_token").powi(2)).sqrt();
        for (name, pre, post) in &rep.grad_norms {
            let pre = pre.unwrap();
            let group = if name == "backbone.cls_token" || name == "backbone.reg_token" {
                joint
            } else {
                pre
            };
            let f = clip_factor(group, 3.0);
            saw_clipping |= f < 1.0;
            match post {
                Some(post) => assert!(close(*post, pre * f, 1e-5), "{name}: {post} vs {}", pre * f),
                None => assert!(epoch == 0 && name.starts_with("head.last_layer."), "{name}"),
            }
        }
        // The clipped gradient really is what AdamW saw: on the first update m = (1 − β₁)·g.
        if step == 0 {
            for (i, p) in tr.student.params().iter().enumerate() {
                if let Some(st) = &tr.optim.states[i] {
                    let m = common::to_vec_f64(&st.exp_avg)
                        .iter()
                        .map(|x| x * x)
                        .sum::<f64>()
                        .sqrt();
                    let (_, pre, post) = rep.grad_norms.iter().find(|g| g.0 == p.name).unwrap();
                    let group = if p.name == "backbone.cls_token" || p.name == "backbone.reg_token"
                    {
                        joint
                    } else {
                        pre.unwrap()
                    };
                    let want = 0.1 * pre.unwrap() * clip_factor(group, 3.0);
                    assert!(close(m, want, 1e-4), "{}: |m| {m} vs {want}", p.name);
                    assert!(close(post.unwrap(), want / 0.1, 1e-9));
                }
            }
        }
        // Last layer frozen in epoch 0: unchanged and without Adam state; updated after.
        let after = snapshot(&tr.student);
        for (i, p) in tr.student.params().iter().enumerate() {
            let changed = after[&p.name] != student_before[&p.name];
            if p.name.starts_with("head.last_layer.") {
                assert_eq!(changed, epoch >= 1, "{}", p.name);
                let st = tr.optim.states[i].as_ref().map(|s| s.step);
                assert_eq!(
                    st,
                    if epoch == 0 { None } else { Some(step - 2) },
                    "{}",
                    p.name
                );
            } else {
                assert!(changed || step == 0, "{} unchanged at step {step}", p.name);
                // lr(0) = 0
            }
        }
        // EMA: θ_t ← m θ_t + (1 − m) θ_s (θ_s after the optimiser step), checked in f64.
        for (n, t) in teacher.iter_mut() {
            for (x, s) in t.iter_mut().zip(&after[n]) {
                *x = m * *x + (1.0 - m) * s;
            }
        }
        let got = snapshot(&tr.teacher);
        for (n, t) in &teacher {
            for (a, b) in got[n].iter().zip(t) {
                assert!(
                    (a - b).abs() < 1e-6 * b.abs().max(1.0),
                    "teacher {n}: {a} vs {b}"
                );
            }
        }
        teacher = got; // continue from the f32 values
    }
    assert!(
        saw_clipping,
        "the tiny batch should trigger clipping somewhere"
    );
}

#[test]
fn resume_from_state_tensors_is_bitwise() {
    let cfg = common::micro_cfg();
    let b1 = common::batch(&cfg, 2, 31, DType::F32);
    let b2 = common::batch(&cfg, 2, 32, DType::F32);
    let mut a = Trainer::new(&cfg, 3, &Device::Cpu).unwrap();
    a.step(&b1, 1, 3).unwrap();
    let state: HashMap<String, Tensor> = a.state_tensors().unwrap().into_iter().collect();
    let mut c = cfg.clone();
    c.data.seed = 99; // different init, fully overwritten by the state
    let mut r = Trainer::new(&c, 3, &Device::Cpu).unwrap();
    r.load_state(&state, "state").unwrap();
    r.cfg.data.seed = cfg.data.seed; // drop-path stream of the original run
    let sa = a.step(&b2, 1, 4).unwrap();
    let sr = r.step(&b2, 1, 4).unwrap();
    assert_eq!(sa.loss.to_bits(), sr.loss.to_bits());
    let (x, y) = (a.state_tensors().unwrap(), r.state_tensors().unwrap());
    assert_eq!(x.len(), y.len());
    for ((n1, t1), (n2, t2)) in x.iter().zip(&y) {
        assert_eq!(n1, n2);
        let (v1, v2) = (common::to_vec_f64(t1), common::to_vec_f64(t2));
        assert!(
            v1.iter().zip(&v2).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{n1} differs after resume"
        );
    }
}

#[test]
fn drop_path_masks_are_keyed_by_step() {
    let cfg = common::tiny_cfg();
    let batch = common::batch(&cfg, 8, 1, DType::F32);
    let tr = Trainer::new(&cfg, 3, &Device::Cpu).unwrap();
    let v = |s: u64| -> Vec<f64> {
        let (g, l) = tr.drop_masks(&batch, s).unwrap();
        g.iter()
            .chain(&l)
            .flat_map(|(a, m)| [common::to_vec_f64(a), common::to_vec_f64(m)])
            .flatten()
            .collect()
    };
    assert_eq!(v(5), v(5));
    assert_ne!(v(5), v(6));
    // Block 0 has rate 0; the last block 0.1: values are 0 or 1/0.9.
    let (g, _) = tr.drop_masks(&batch, 5).unwrap();
    assert!(common::to_vec_f64(&g[0].0).iter().all(|&x| x == 1.0));
    let last = common::to_vec_f64(&g[g.len() - 1].1);
    assert!(
        last.iter()
            .all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6),
        "{last:?}"
    );
}
