#![allow(clippy::needless_range_loop)]
//! The model's forward pass against a plain f64 loop implementation written from udi-spec §2
//! (conv patch embedding, two class tokens with their own position rows, bicubic position
//! resampling for local crops, pre-norm blocks, final LN, SRS, DINO head).
mod common;
use candle_core::{DType, Device};
use trainer::step::Trainer;
use trainer::vit::ClassToken;

type M = Vec<Vec<f64>>;

struct P<'a>(&'a Trainer);
impl P<'_> {
    fn v(&self, n: &str) -> Vec<f64> {
        common::to_vec_f64(&self.0.student.tensor(n).unwrap())
    }
    /// Row-major `[out][in]` matrix.
    fn m(&self, n: &str) -> M {
        let t = self.0.student.tensor(n).unwrap();
        let (o, i) = (t.dim(0).unwrap(), t.elem_count() / t.dim(0).unwrap());
        let v = common::to_vec_f64(&t);
        (0..o).map(|r| v[r * i..(r + 1) * i].to_vec()).collect()
    }
}

fn erf(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    // Maclaurin series; enough terms for f64 accuracy at |x| ≤ 5 (cancellation ~1e-6 there).
    let mut sum = 0.0f64;
    let mut term = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
        if n > 200.0 {
            break;
        }
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}
fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / 2f64.sqrt()))
}
fn linear(x: &[f64], w: &M, b: Option<&[f64]>) -> Vec<f64> {
    w.iter()
        .enumerate()
        .map(|(o, row)| {
            row.iter().zip(x).map(|(a, c)| a * c).sum::<f64>() + b.map_or(0.0, |b| b[o])
        })
        .collect()
}
fn ln(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mu) / (var + 1e-6).sqrt() * w[i] + b[i])
        .collect()
}
fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}
/// Multi-head attention of queries `q` over keys/values (all already projected), `heads` heads.
fn mha(q: &M, k: &M, v: &M, heads: usize) -> M {
    let d = q[0].len();
    let dh = d / heads;
    q.iter()
        .map(|qi| {
            let mut out = vec![0.0; d];
            for h in 0..heads {
                let r = h * dh..(h + 1) * dh;
                let logits: Vec<f64> = k
                    .iter()
                    .map(|kj| {
                        qi[r.clone()]
                            .iter()
                            .zip(&kj[r.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let a = softmax(&logits);
                for (j, aj) in a.iter().enumerate() {
                    for c in r.clone() {
                        out[c] += aj * v[j][c];
                    }
                }
            }
            out
        })
        .collect()
}
fn cubic_weights(src: usize, dst: usize) -> M {
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
    (0..dst)
        .map(|o| {
            let x = (o as f64 + 0.5) * src as f64 / (dst as f64 + 0.1) - 0.5;
            let mut row = vec![0.0; src];
            for i in (x.floor() as i64 - 1)..=(x.floor() as i64 + 2) {
                row[i.clamp(0, src as i64 - 1) as usize] += k(x - i as f64);
            }
            row
        })
        .collect()
}

/// Last-block tokens of one image `x` ([3][S][S] flattened).
fn vit_tokens(p: &P, cfg: &trainer::config::TrainConfig, x: &[f64], s: usize) -> M {
    let d = cfg.model.dim;
    let ps = cfg.augment.patch_size as usize;
    let g = s / ps;
    let g0 = cfg.pos_grid();
    let w = p.v("backbone.patch_embed.proj.weight");
    let b = p.v("backbone.patch_embed.proj.bias");
    let pos = p.v("backbone.pos_embed");
    let posr = |r: usize| pos[r * d..(r + 1) * d].to_vec();
    let mut toks: M = vec![p.v("backbone.cls_token"), p.v("backbone.reg_token")];
    for t in 0..2 {
        toks[t] = toks[t].iter().zip(posr(t)).map(|(a, c)| a + c).collect();
    }
    let cw = cubic_weights(g0, g);
    for gi in 0..g {
        for gj in 0..g {
            let mut e = vec![0.0; d];
            for (o, eo) in e.iter_mut().enumerate() {
                let mut acc = b[o];
                for c in 0..3 {
                    for py in 0..ps {
                        for px in 0..ps {
                            acc += w[((o * 3 + c) * ps + py) * ps + px]
                                * x[(c * s + gi * ps + py) * s + gj * ps + px];
                        }
                    }
                }
                *eo = acc;
            }
            // Position: the learned grid itself, or its separable bicubic resampling.
            for si in 0..g0 {
                for sj in 0..g0 {
                    let wt = if g == g0 {
                        if si == gi && sj == gj {
                            1.0
                        } else {
                            0.0
                        }
                    } else {
                        cw[gi][si] * cw[gj][sj]
                    };
                    if wt != 0.0 {
                        for (o, eo) in e.iter_mut().enumerate() {
                            *eo += wt * pos[(2 + si * g0 + sj) * d + o];
                        }
                    }
                }
            }
            toks.push(e);
        }
    }
    for blk in 0..cfg.model.depth {
        let n = |s: &str| format!("backbone.blocks.{blk}.{s}");
        let h: M = toks
            .iter()
            .map(|t| ln(t, &p.v(&n("norm1.weight")), &p.v(&n("norm1.bias"))))
            .collect();
        let qkv: M = h
            .iter()
            .map(|t| {
                linear(
                    t,
                    &p.m(&n("attn.qkv.weight")),
                    Some(&p.v(&n("attn.qkv.bias"))),
                )
            })
            .collect();
        let split =
            |i: usize| -> M { qkv.iter().map(|r| r[i * d..(i + 1) * d].to_vec()).collect() };
        let o = mha(&split(0), &split(1), &split(2), cfg.model.heads);
        for (t, oi) in toks.iter_mut().zip(o) {
            let y = linear(
                &oi,
                &p.m(&n("attn.proj.weight")),
                Some(&p.v(&n("attn.proj.bias"))),
            );
            t.iter_mut().zip(y).for_each(|(a, c)| *a += c);
        }
        for t in toks.iter_mut() {
            let h = ln(t, &p.v(&n("norm2.weight")), &p.v(&n("norm2.bias")));
            let h: Vec<f64> = linear(
                &h,
                &p.m(&n("mlp.fc1.weight")),
                Some(&p.v(&n("mlp.fc1.bias"))),
            )
            .into_iter()
            .map(gelu)
            .collect();
            let y = linear(
                &h,
                &p.m(&n("mlp.fc2.weight")),
                Some(&p.v(&n("mlp.fc2.bias"))),
            );
            t.iter_mut().zip(y).for_each(|(a, c)| *a += c);
        }
    }
    toks
}

fn srs(p: &P, cfg: &trainer::config::TrainConfig, toks: &M, row: &[f64]) -> Vec<f64> {
    let d = cfg.model.dim;
    let xh: M = toks[2..]
        .iter()
        .map(|t| ln(t, &p.v("srs.norm1.weight"), &p.v("srs.norm1.bias")))
        .collect();
    let qkv: M = xh
        .iter()
        .map(|t| {
            linear(
                t,
                &p.m("srs.attn.qkv.weight"),
                Some(&p.v("srs.attn.qkv.bias")),
            )
        })
        .collect();
    let split = |i: usize| -> M { qkv.iter().map(|r| r[i * d..(i + 1) * d].to_vec()).collect() };
    let (q, k, v) = (split(0), split(1), split(2));
    let mut qr = vec![0.0; d];
    let mut skip = vec![0.0; d];
    for (n, w) in row.iter().enumerate() {
        for c in 0..d {
            qr[c] += w * q[n][c];
            skip[c] += w * xh[n][c];
        }
    }
    let o = &mha(&vec![qr], &k, &v, cfg.model.heads)[0];
    let y: Vec<f64> = linear(
        o,
        &p.m("srs.attn.proj.weight"),
        Some(&p.v("srs.attn.proj.bias")),
    )
    .iter()
    .zip(&skip)
    .map(|(a, b)| if cfg.model.srs_skip { a + b } else { *a })
    .collect();
    ln(&y, &p.v("srs.attn.norm.weight"), &p.v("srs.attn.norm.bias"))
}

fn head(p: &P, x: &[f64]) -> Vec<f64> {
    let h: Vec<f64> = linear(x, &p.m("head.mlp.0.weight"), Some(&p.v("head.mlp.0.bias")))
        .into_iter()
        .map(gelu)
        .collect();
    let h: Vec<f64> = linear(&h, &p.m("head.mlp.2.weight"), Some(&p.v("head.mlp.2.bias")))
        .into_iter()
        .map(gelu)
        .collect();
    let z = linear(&h, &p.m("head.mlp.4.weight"), Some(&p.v("head.mlp.4.bias")));
    let nz = z.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
    let z: Vec<f64> = z.iter().map(|a| a / nz).collect();
    let g = p.v("head.last_layer.weight_g");
    p.m("head.last_layer.weight_v")
        .iter()
        .enumerate()
        .map(|(k, vr)| {
            let nv = vr.iter().map(|a| a * a).sum::<f64>().sqrt();
            g[k] * vr.iter().zip(&z).map(|(a, b)| a * b).sum::<f64>() / nv
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() < 1e-9 * b.abs().max(1.0),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn forward_matches_a_loop_reference() {
    check(true);
}

#[test]
fn forward_without_srs_skip_matches_the_reference() {
    check(false);
}

fn check(srs_skip: bool) {
    let mut cfg = common::micro_cfg();
    cfg.model.srs_skip = srs_skip;
    cfg.model.pos_grid = Some(3); // globals (4×4) are resampled too, locals 3 → 2
    let dev = Device::Cpu;
    let batch = common::batch(&cfg, 2, 8, DType::F64);
    let tr = Trainer::with_dtype(&cfg, 10, &dev, DType::F64).unwrap();
    // Non-trivial g and LayerNorm affine parameters.
    for n in [
        "head.last_layer.weight_g",
        "backbone.norm.weight",
        "srs.attn.norm.bias",
    ] {
        let v = &tr.student.get(n).unwrap().var;
        let t = v.as_tensor();
        let bump = candle_core::Tensor::rand(0.5f64, 1.5, t.dims(), &dev).unwrap();
        let new = (t * bump).unwrap().affine(1.0, 0.1).unwrap();
        v.set(&new).unwrap();
        tr.teacher.get(n).unwrap().var.set(&new).unwrap(); // the teacher is a copy
    }
    let p = P(&tr);
    let (sg, sl) = (
        cfg.augment.global_size as usize,
        cfg.augment.local_size as usize,
    );
    let b = 2;
    let img = |t: &candle_core::Tensor, i: usize| common::to_vec_f64(&t.get(i).unwrap());
    let s_out = tr.student_net().student(&batch, None).unwrap();
    let t_out = tr.teacher_net().teacher(&batch).unwrap();
    let k = cfg.model.out_dim;
    let n_g = cfg.augment.global_samples() as usize;
    // Global view 1, sample 1 (crop index v·B + b = 3).
    let toks = vit_tokens(&p, &cfg, &img(&batch.globals, 3), sg);
    let cls = ln(
        &toks[0],
        &p.v("backbone.norm.weight"),
        &p.v("backbone.norm.bias"),
    );
    let clsp = ln(
        &toks[1],
        &p.v("backbone.norm.weight"),
        &p.v("backbone.norm.bias"),
    );
    let feats = tr
        .student_net()
        .backbone
        .features(&batch.globals, ClassToken::ClsPlus)
        .unwrap();
    assert_close(
        &common::to_vec_f64(&feats.get(3).unwrap()),
        &clsp,
        "[cls+] feature",
    );
    let row = |t: &candle_core::Tensor, i: usize| common::to_vec_f64(&t.get(i).unwrap());
    assert_close(
        &row(&s_out.cls, 3),
        &head(&p, &cls),
        "student [cls] logits g1",
    );
    assert_close(
        &row(s_out.cls_plus.as_ref().unwrap(), 3),
        &head(&p, &clsp),
        "student [cls+] logits g1",
    );
    // Student patch row 0 of view 1 (one-hot S-row) and a teacher bilinear T-row on view 1.
    let srow = common::to_vec_f64(&batch.student_rows.get(3).unwrap().get(0).unwrap());
    let pat = common::to_vec_f64(
        &s_out
            .patch
            .as_ref()
            .unwrap()
            .get(3)
            .unwrap()
            .get(0)
            .unwrap(),
    );
    assert_close(
        &pat,
        &head(&p, &srs(&p, &cfg, &toks, &srow)),
        "student patch logits",
    );
    let rt = batch.teacher_rows.dim(1).unwrap();
    for r in [0, n_g, rt - 1] {
        let trow = common::to_vec_f64(&batch.teacher_rows.get(3).unwrap().get(r).unwrap());
        let got = common::to_vec_f64(
            &t_out
                .rows
                .as_ref()
                .unwrap()
                .logits()
                .unwrap()
                .get(3)
                .unwrap()
                .get(r)
                .unwrap(),
        );
        assert_close(
            &got,
            &head(&p, &srs(&p, &cfg, &toks, &trow)),
            "teacher patch logits",
        );
    }
    assert_close(&row(&t_out.cls, 3), &head(&p, &cls), "teacher [cls] logits");
    // A local crop (k = 1, sample 0): crop index 2B + k·B + b.
    let ltoks = vit_tokens(&p, &cfg, &img(batch.locals.as_ref().unwrap(), b), sl);
    let lcls = ln(
        &ltoks[0],
        &p.v("backbone.norm.weight"),
        &p.v("backbone.norm.bias"),
    );
    assert_close(
        &row(&s_out.cls, 2 * b + b),
        &head(&p, &lcls),
        "student [cls] logits local",
    );
    assert_eq!(s_out.cls.dims(), &[(2 + 2) * b, k]);
}

/// The teacher's local T-rows are pooled in the head's bottleneck space (`TeacherRows::Factored`,
/// the training path); the loss must equal the one computed from every T-row's logits
/// (`TeacherRows::Logits`, the spec's order of operations), here in f64 with random centres.
#[test]
fn factored_teacher_rows_give_the_same_loss_as_materialised_logits() {
    use trainer::loss::{udi_loss, Centres};
    use trainer::model::{TeacherOut, TeacherRows};
    let cfg = common::micro_cfg();
    let dev = Device::Cpu;
    let batch = common::batch(&cfg, 2, 8, DType::F64);
    let tr = Trainer::with_dtype(&cfg, 10, &dev, DType::F64).unwrap();
    let s_out = tr.student_net().student(&batch, None).unwrap();
    let t_out = tr.teacher_net().teacher(&batch).unwrap();
    assert!(matches!(t_out.rows, Some(TeacherRows::Factored { .. })));
    let t_logits = TeacherOut {
        cls: t_out.cls.clone(),
        rows: Some(TeacherRows::Logits(
            t_out.rows.as_ref().unwrap().logits().unwrap(),
        )),
    };
    let k = cfg.model.out_dim;
    let c = |s: f64| candle_core::Tensor::rand(-s, s, k, &dev).unwrap();
    let centres = Centres {
        cls: c(0.5),
        udi: c(0.5),
        patch: c(0.5),
    };
    let a = udi_loss(&cfg.loss, &batch, &s_out, &t_out, &centres, 0.05).unwrap();
    let b = udi_loss(&cfg.loss, &batch, &s_out, &t_logits, &centres, 0.05).unwrap();
    let s = |t: &candle_core::Tensor| t.to_scalar::<f64>().unwrap();
    for (x, y, what) in [
        (&a.cls, &b.cls, "L_cls"),
        (&a.udi, &b.udi, "L_udi"),
        (&a.patch, &b.patch, "L_patch"),
        (&a.total, &b.total, "total"),
    ] {
        assert!(
            (s(x) - s(y)).abs() <= 1e-12 * s(y).abs().max(1.0),
            "{what}: {} vs {}",
            s(x),
            s(y)
        );
    }
    assert!(s(&a.udi) > 0.0 && s(&a.patch) > 0.0);
    let v = |t: &candle_core::Tensor| common::to_vec_f64(t);
    for (x, y, what) in [
        (&a.new_centres.udi, &b.new_centres.udi, "c1"),
        (&a.new_centres.patch, &b.new_centres.patch, "c2"),
    ] {
        for (p, q) in v(x).iter().zip(v(y)) {
            assert!(
                (p - q).abs() <= 1e-12 * q.abs().max(1.0),
                "{what}: {p} vs {q}"
            );
        }
    }
    let (ha, hb) = (
        a.teacher_entropy.to_vec1::<f64>().unwrap(),
        b.teacher_entropy.to_vec1::<f64>().unwrap(),
    );
    for i in 0..3 {
        assert!(
            (ha[i] - hb[i]).abs() <= 1e-12,
            "entropy {i}: {ha:?} vs {hb:?}"
        );
    }
}
