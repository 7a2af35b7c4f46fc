#![allow(clippy::needless_range_loop)]
//! The loss and centre updates against a plain f64 loop-by-loop implementation of udi-spec §3,
//! on small hand-built logits (including a local pair with zero valid rows).
mod common;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use trainer::config::LossConfig;
use trainer::data::TrainBatch;
use trainer::loss::{udi_loss, Centres};
use trainer::model::{StudentOut, TeacherOut, TeacherRows};

const B: usize = 2;
const L: usize = 2;
const NG: usize = 3;
const NL: usize = 2;
const K: usize = 5;
const G2: usize = 4;

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn teacher_p(x: &[f64], c: &[f64], tau: f64) -> Vec<f64> {
    softmax(
        &x.iter()
            .zip(c)
            .map(|(a, b)| (a - b) / tau)
            .collect::<Vec<_>>(),
    )
}

fn h(p: &[f64], s: &[f64], tau_s: f64) -> f64 {
    let z: Vec<f64> = s.iter().map(|v| v / tau_s).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = z.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
    -p.iter()
        .zip(&z)
        .map(|(pi, zi)| pi * (zi - lse))
        .sum::<f64>()
}

fn rand_vec(rng: &mut impl Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale)
        .collect()
}

#[test]
fn loss_matches_a_loop_reference() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let dev = Device::Cpu;
    let cfg = LossConfig {
        alpha: 0.3,
        ..LossConfig::default()
    }; // α ≠ 0.5 catches a swapped blend
    let tau = 0.055;
    let rt = NG + L * NL;
    // Logits.
    let s_cls = rand_vec(&mut rng, (2 + L) * B * K, 3.0);
    let s_plus = rand_vec(&mut rng, (2 + L) * B * K, 3.0);
    let s_pat = rand_vec(&mut rng, 2 * B * NG * K, 3.0);
    let t_cls = rand_vec(&mut rng, 2 * B * K, 3.0);
    let t_rows = rand_vec(&mut rng, 2 * B * rt * K, 3.0);
    let cents: Vec<Vec<f64>> = (0..3).map(|_| rand_vec(&mut rng, K, 0.5)).collect();
    // Validity: valid rows first; local pair (k=1, t=0) of sample 1 has none.
    let nv_g = [[2usize, 3], [1, 3]]; // [pair v][b]
    let nv_l = |t: usize, b: usize, k: usize| {
        if (t, b, k) == (0, 1, 1) {
            0
        } else {
            1 + (t + b + k) % 2
        }
    };
    let mut valid_g = vec![0.0; 2 * B * NG];
    let mut valid_l = vec![0.0; 2 * B * L * NL];
    let mut trows = vec![0.0; 2 * B * rt * G2];
    let mut weight_sum = 0.0;
    let put_row = |trows: &mut Vec<f64>,
                   u: usize,
                   b: usize,
                   slot: usize,
                   rng: &mut rand_chacha::ChaCha8Rng| {
        let w: Vec<f64> = (0..G2).map(|_| rng.random::<f64>()).collect();
        let s: f64 = w.iter().sum();
        for c in 0..G2 {
            trows[((u * B + b) * rt + slot) * G2 + c] = w[c] / s;
        }
    };
    for v in 0..2 {
        for b in 0..B {
            for r in 0..nv_g[v][b] {
                valid_g[(v * B + b) * NG + r] = 1.0;
                put_row(&mut trows, 1 - v, b, r, &mut rng); // pair v is read on teacher view v̄
            }
        }
    }
    for t in 0..2 {
        for b in 0..B {
            for k in 0..L {
                for r in 0..nv_l(t, b, k) {
                    valid_l[((t * B + b) * L + k) * NL + r] = 1.0;
                    put_row(&mut trows, t, b, NG + k * NL + r, &mut rng);
                }
            }
        }
    }
    for x in &trows {
        weight_sum += x;
    }
    let t64 = |v: &Vec<f64>, s: &[usize]| Tensor::from_vec(v.clone(), s, &dev).unwrap();
    let batch = TrainBatch {
        batch_size: B,
        n_local: L,
        globals: Tensor::zeros((2 * B, 3, 1, 1), DType::F64, &dev).unwrap(),
        locals: None,
        student_rows: Tensor::zeros((2 * B, NG, G2), DType::F64, &dev).unwrap(),
        teacher_rows: t64(&trows, &[2 * B, rt, G2]),
        valid_g: t64(&valid_g, &[2, B, NG]),
        valid_l: t64(&valid_l, &[2, B, L, NL]),
        labels: vec![0; B],
    };
    let s_out = StudentOut {
        cls: t64(&s_cls, &[(2 + L) * B, K]),
        cls_plus: Some(t64(&s_plus, &[(2 + L) * B, K])),
        patch: Some(t64(&s_pat, &[2 * B, NG, K])),
    };
    let t_out = TeacherOut {
        cls: t64(&t_cls, &[2 * B, K]),
        rows: Some(TeacherRows::Logits(t64(&t_rows, &[2 * B, rt, K]))),
    };
    let centres = Centres {
        cls: t64(&cents[0], &[K]),
        udi: t64(&cents[1], &[K]),
        patch: t64(&cents[2], &[K]),
    };
    let out = udi_loss(&cfg, &batch, &s_out, &t_out, &centres, tau).unwrap();

    // ---------------- reference -----------------
    let ts = cfg.student_temp;
    let a = cfg.alpha;
    let row = |v: &Vec<f64>, i: usize| v[i * K..(i + 1) * K].to_vec();
    let tcls = |v: usize, b: usize| row(&t_cls, v * B + b);
    let tpat = |v: usize, b: usize, r: usize| row(&t_rows, ((1 - v) * B + b) * rt + r);
    let tlp =
        |k: usize, t: usize, b: usize, r: usize| row(&t_rows, (t * B + b) * rt + NG + k * NL + r);
    let n_pairs = (2 + 2 * L) as f64;
    let mix = |avg: Vec<f64>, cls: Vec<f64>| -> Vec<f64> {
        avg.iter()
            .zip(&cls)
            .map(|(x, c)| a * x + (1.0 - a) * c)
            .collect()
    };
    let mut l_cls = 0.0;
    let mut l_udi = 0.0;
    let mut mm_rows: Vec<Vec<f64>> = vec![];
    for v in 0..2 {
        for b in 0..B {
            l_cls += h(
                &teacher_p(&tcls(1 - v, b), &cents[0], tau),
                &row(&s_cls, v * B + b),
                ts,
            ) / B as f64;
            let mut sum = [0.0; K];
            for r in 0..nv_g[v][b] {
                for (s, x) in sum.iter_mut().zip(tpat(v, b, r)) {
                    *s += x;
                }
            }
            let avg: Vec<f64> = sum.iter().map(|s| s / (nv_g[v][b] as f64 + 1e-5)).collect();
            let mm = mix(avg, tcls(1 - v, b));
            l_udi += h(
                &teacher_p(&mm, &cents[1], tau),
                &row(&s_plus, v * B + b),
                ts,
            ) / B as f64;
            mm_rows.push(mm);
        }
    }
    for k in 0..L {
        for t in 0..2 {
            for b in 0..B {
                let s_row = (2 + k) * B + b;
                l_cls += h(
                    &teacher_p(&tcls(t, b), &cents[0], tau),
                    &row(&s_cls, s_row),
                    ts,
                ) / B as f64;
                let n = nv_l(t, b, k);
                let mut sum = [0.0; K];
                for r in 0..n {
                    for (s, x) in sum.iter_mut().zip(tlp(k, t, b, r)) {
                        *s += x;
                    }
                }
                let avg: Vec<f64> = sum.iter().map(|s| s / (n as f64 + 1e-5)).collect();
                let mm = mix(avg, tcls(t, b));
                l_udi += h(&teacher_p(&mm, &cents[1], tau), &row(&s_plus, s_row), ts) / B as f64;
                mm_rows.push(mm);
            }
        }
    }
    l_cls /= n_pairs;
    l_udi /= n_pairs;
    let (mut lp, mut nvalid) = (0.0, 0.0);
    let mut c2_sum = [0.0; K];
    for v in 0..2 {
        for b in 0..B {
            for r in 0..nv_g[v][b] {
                lp += h(
                    &teacher_p(&tpat(v, b, r), &cents[2], tau),
                    &s_pat[((v * B + b) * NG + r) * K..][..K],
                    ts,
                );
                nvalid += 1.0;
                for (s, x) in c2_sum.iter_mut().zip(tpat(v, b, r)) {
                    *s += x;
                }
            }
        }
    }
    for k in 0..L {
        for t in 0..2 {
            for b in 0..B {
                for r in 0..nv_l(t, b, k) {
                    for (s, x) in c2_sum.iter_mut().zip(tlp(k, t, b, r)) {
                        *s += x;
                    }
                }
            }
        }
    }
    let l_patch = lp / nvalid;
    let total = (l_cls + l_udi + l_patch) / 3.0;
    let close = |got: &Tensor, want: f64, what: &str| {
        let g = got.to_scalar::<f64>().unwrap();
        assert!(
            (g - want).abs() < 1e-10 * want.abs().max(1.0),
            "{what}: {g} vs {want}"
        );
    };
    close(&out.cls, l_cls, "L_cls");
    close(&out.udi, l_udi, "L_udi");
    close(&out.patch, l_patch, "L_patch");
    close(&out.total, total, "total");

    let mut c0 = vec![0.0; K];
    for i in 0..2 * B {
        for (c, x) in c0.iter_mut().zip(row(&t_cls, i)) {
            *c += x / (2 * B) as f64;
        }
    }
    let mut c1 = vec![0.0; K];
    for mm in &mm_rows {
        for (c, x) in c1.iter_mut().zip(mm) {
            *c += x / mm_rows.len() as f64;
        }
    }
    assert_eq!(mm_rows.len(), 2 * B + 2 * L * B);
    let upd = |old: &Vec<f64>, new: Vec<f64>| -> Vec<f64> {
        old.iter()
            .zip(new)
            .map(|(o, n)| 0.9 * o + 0.1 * n)
            .collect()
    };
    let want = [
        upd(&cents[0], c0),
        upd(&cents[1], c1),
        upd(&cents[2], c2_sum.iter().map(|s| s / weight_sum).collect()),
    ];
    let got = [
        &out.new_centres.cls,
        &out.new_centres.udi,
        &out.new_centres.patch,
    ];
    for j in 0..3 {
        let g = common::to_vec_f64(got[j]);
        for (x, y) in g.iter().zip(&want[j]) {
            assert!((x - y).abs() < 1e-12, "centre {j}: {g:?} vs {:?}", want[j]);
        }
    }
}
