//! The trainer's CUDA kernels, from their real source (`src/kernels/udi_kernels.cu`, unchanged),
//! compiled as C++ against a small CUDA emulation and run on the CPU (tests/cuda_emu), against
//! the CPU reference of the op that launches each one, with `trainer kernel-check`'s tolerances.
//! Grids come from `trainer::kernels::geometry`, as on the GPU. Each block's threads are real
//! threads, so a missing barrier or a shared-memory race changes results; shapes are chosen to
//! hit partial tiles, partial warps and blocks, and padded rows. Every output element must be
//! written, nothing outside the outputs may be.
//!
//! Without a C++ compiler this says so on stderr and passes.
mod cuda_emu;

use candle_core::{DType, Device, Tensor};
use cuda_emu::{emu, Buf, Call, Kind};
use trainer::kernels::adamw::{meta_tensor, AdamwEma, Segment};
use trainer::kernels::check::{errors, rand_t, tolerance};
use trainer::kernels::{flash, geometry, RowScale};

fn rand(shape: &[usize], seed: u64, lo: f64, hi: f64, dt: DType) -> Tensor {
    rand_t(shape, seed, lo, hi).unwrap().to_dtype(dt).unwrap()
}

fn suffix(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        d => panic!("no kernel for {d:?}"),
    }
}

/// The tolerance of an op whose activations are in any of `dts`.
fn tol(dts: &[DType]) -> f64 {
    tolerance(if dts.contains(&DType::BF16) {
        DType::BF16
    } else {
        DType::F32
    })
}

/// `got` (the emulated kernel's output) against `reference`: finite, and within `tol` of the
/// largest reference magnitude.
/// `buf`, a `shape` output, is written everywhere and close to `reference`.
fn assert_output(what: &str, buf: &Buf, shape: &[usize], reference: &Tensor, tol: f64) {
    buf.assert_written(what, 0..shape.iter().product());
    assert_close(what, reference, &buf.tensor(shape), tol);
}

fn assert_close(what: &str, reference: &Tensor, got: &Tensor, tol: f64) {
    let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let g = g.to_vec1::<f64>().unwrap();
    if let Some(i) = g.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {}", g[i]);
    }
    let reference = reference.to_dtype(DType::F64).unwrap();
    let got = got
        .to_dtype(DType::F64)
        .unwrap()
        .reshape(reference.shape())
        .unwrap();
    let (abs, rel) = errors(&reference, &got).unwrap();
    assert!(
        rel <= tol,
        "{what}: max abs error {abs:.3e}, relative {rel:.3e} > {tol:.1e}"
    );
}

/// Every element's bits, f32 or bf16.
fn bits_any(t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::F32 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        _ => bits(t).into_iter().map(u32::from).collect(),
    }
}

fn bits(t: &Tensor) -> Vec<u16> {
    let v = t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn layer_norm_forward_and_backward() {
    let Some(emu) = emu() else { return };
    let eps = 1e-6;
    for (ti, to) in [
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
    ] {
        let tol = tol(&[ti, to]);
        let sfx = format!("{}_{}", suffix(ti), suffix(to));
        // d: under one warp, a partial last warp, more columns than threads; rows 70: a partial
        // second block of the dw/db reduction.
        for (rows, d) in [(3, 20), (3, 100), (2, 1000), (70, 40)] {
            let x = rand(&[rows, d], 10, -3.0, 3.0, ti);
            let w = rand(&[d], 11, 0.5, 1.5, DType::F32);
            let b = rand(&[d], 12, -0.5, 0.5, DType::F32);
            let dy = rand(&[rows, d], 13, -1.0, 1.0, to);
            let what = format!("ln {sfx} [{rows}, {d}]");

            let y_ref = trainer::kernels::layer_norm(&x, &w, &b, eps, to, true).unwrap();
            let (dx_ref, dw_ref, db_ref) =
                trainer::kernels::layer_norm_backward(&x, &w, &dy, eps, true).unwrap();
            let (bx, bw, bb, bdy) = (
                Buf::input(&x),
                Buf::input(&w),
                Buf::input(&b),
                Buf::input(&dy),
            );

            let y = Buf::output(Kind::of(to), rows * d);
            emu.call(&format!("ln_fwd_{sfx}"))
                .buf(&bx)
                .buf(&bw)
                .buf(&bb)
                .buf(&y)
                .i32(d as i32)
                .f32(eps as f32)
                .launch(geometry::layer_norm(rows, d));
            assert_output(&format!("{what} y"), &y, &[rows, d], &y_ref, tol);

            let dx = Buf::output(Kind::of(ti), rows * d);
            emu.call(&format!("ln_bwd_dx_{sfx}"))
                .buf(&bx)
                .buf(&bw)
                .buf(&bdy)
                .buf(&dx)
                .i32(d as i32)
                .f32(eps as f32)
                .launch(geometry::layer_norm(rows, d));
            assert_output(&format!("{what} dx"), &dx, &[rows, d], &dx_ref, tol);

            let (g, rpb) = geometry::layer_norm_wb(rows, d).unwrap();
            let dwdb = Buf::zeroed(Kind::F32, 2 * d);
            emu.call(&format!("ln_bwd_wb_{sfx}"))
                .buf(&bx)
                .buf(&bdy)
                .buf(&dwdb)
                .i32(rows as i32)
                .i32(d as i32)
                .f32(eps as f32)
                .i32(rpb as i32)
                .launch(g);
            let got = dwdb.tensor(&[2, d]);
            assert_close(&format!("{what} dw"), &dw_ref, &got.get(0).unwrap(), tol);
            assert_close(&format!("{what} db"), &db_ref, &got.get(1).unwrap(), tol);
        }
    }
}

/// The residual update fused with the next LayerNorm, and the LayerNorm backward fused with the
/// stream's gradient; samples of 50 rows: the backward's second block of 128 rows is partial.
#[test]
fn residual_layer_norm_forward_and_backward() {
    use trainer::kernels::ln_residual::{
        layer_norm_backward_residual, residual_add_layer_norm, Branch,
    };
    let Some(emu) = emu() else { return };
    let eps = 1e-6;
    for (samples, per, d) in [(3, 50, 100), (2, 5, 384)] {
        let rows = samples * per;
        let n = rows * d;
        let x = rand(&[samples, per, d], 30, -3.0, 3.0, DType::F32);
        let w = rand(&[d], 31, 0.5, 1.5, DType::F32);
        let b = rand(&[d], 32, -0.5, 0.5, DType::F32);
        let dres = rand(&[samples, per, d], 33, -1.0, 1.0, DType::F32);
        let ab = rand(&[d], 37, -0.5, 0.5, DType::F32);
        let m = (rand_t(&[samples], 34, 0.0, 1.0)
            .unwrap()
            .ge(0.3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            / 0.9)
            .unwrap();
        let bab = Buf::input(&ab);
        let (bx, bw, bb, bm, bdres) = (
            Buf::input(&x),
            Buf::input(&w),
            Buf::input(&b),
            Buf::input(&m),
            Buf::input(&dres),
        );
        for (ta, to) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ] {
            let tol = tol(&[ta, to]);
            let what = format!("residual_ln {}_{} [{rows}, {d}]", suffix(ta), suffix(to));
            let a = rand(&[samples, per, d], 35, -3.0, 3.0, ta);
            let ba = Buf::input(&a);
            let (y_ref, ln_ref) =
                residual_add_layer_norm(&x, &a, Some(&ab), Some(&m), &w, &b, eps, to, true)
                    .unwrap();
            let (y, ln) = (Buf::output(Kind::F32, n), Buf::output(Kind::of(to), n));
            emu.call(&format!("residual_ln_fwd_{}_{}", suffix(ta), suffix(to)))
                .buf(&bx)
                .buf(&ba)
                .buf(&bab)
                .buf(&bm)
                .buf(&bw)
                .buf(&bb)
                .buf(&y)
                .buf(&ln)
                .i32(d as i32)
                .i32(per as i32)
                .f32(eps as f32)
                .launch(geometry::layer_norm(rows, d));
            y.assert_written(&what, 0..n);
            ln.assert_written(&what, 0..n);
            assert_close(
                &format!("{what} y"),
                &y_ref,
                &y.tensor(&[samples, per, d]),
                tol,
            );
            assert_close(&format!("{what} ln"), &ln_ref, &ln.tensor(&[rows, d]), tol);
        }
        let x2 = x.reshape((rows, d)).unwrap();
        for to in [DType::F32, DType::BF16] {
            let tol = tol(&[to]);
            let dy = rand(&[rows, d], 36, -1.0, 1.0, to);
            let bdy = Buf::input(&dy);
            let (bx2, (g, rpb)) = (Buf::input(&x2), geometry::ln_residual(rows));
            for with_branch in [true, false] {
                let what = format!(
                    "ln_bwd_residual {} [{rows}, {d}] branch {with_branch}",
                    suffix(to)
                );
                let branch = with_branch.then_some(Branch {
                    m: Some(&m),
                    dtype: to,
                });
                let r =
                    layer_norm_backward_residual(&x2, &w, &dy, &dres, eps, branch, true).unwrap();
                let dx = Buf::output(Kind::F32, n);
                let br = Buf::output(Kind::of(to), n);
                let dwdb = Buf::zeroed(Kind::F32, 2 * d);
                let call = emu
                    .call(&format!("ln_bwd_residual_{}", suffix(to)))
                    .buf(&bx2)
                    .buf(&bw)
                    .buf(&bdy)
                    .buf(&bdres)
                    .buf(&bm)
                    .buf(&dx);
                // Without a branch the CUDA path passes dy, which the kernel must not write.
                let call = if with_branch {
                    call.buf(&br)
                } else {
                    call.buf(&bdy)
                };
                call.buf(&dwdb)
                    .i32(rows as i32)
                    .i32(d as i32)
                    .f32(eps as f32)
                    .i32(rpb as i32)
                    .i32(per as i32)
                    .i32(with_branch as i32)
                    .launch(g);
                assert_output(&format!("{what} dx"), &dx, &[samples, per, d], &r.dx, tol);
                if let Some(b_ref) = &r.branch {
                    br.assert_written(&what, 0..n);
                    assert_close(
                        &format!("{what} branch"),
                        b_ref,
                        &br.tensor(&[samples, per, d]),
                        tol,
                    );
                }
                let got = dwdb.tensor(&[2, d]);
                assert_close(&format!("{what} dw"), &r.dw, &got.get(0).unwrap(), tol);
                assert_close(&format!("{what} db"), &r.db, &got.get(1).unwrap(), tol);
            }
        }
    }
}

#[test]
fn bias_gelu_bias_add_and_column_sums() {
    let Some(emu) = emu() else { return };
    for dt in [DType::F32, DType::BF16] {
        let tol = tol(&[dt]);
        let s = suffix(dt);
        // 1500 elements: a partial last block of the elementwise grid; col_sum and the bias-GELU
        // backward over 130 rows and 300 columns: partial blocks in both grid dims.
        for (rows, d) in [(5, 300), (130, 300)] {
            let n = rows * d;
            let what = format!("{s} [{rows}, {d}]");
            let x = rand(&[rows, d], 13, -4.0, 4.0, dt);
            let b = rand(&[d], 14, -0.5, 0.5, DType::F32);
            let dy = rand(&[rows, d], 15, -1.0, 1.0, dt);
            let (bx, bb, bdy) = (Buf::input(&x), Buf::input(&b), Buf::input(&dy));
            let y_ref = trainer::kernels::bias_gelu(&x, &b, true).unwrap();
            let (dx_ref, db_ref) = trainer::kernels::bias_gelu_backward(&x, &b, &dy, true).unwrap();
            let add_ref = trainer::kernels::bias_add(&x, &b, true).unwrap();
            let sum_ref = trainer::kernels::col_sum(&x, DType::F32, true).unwrap();

            let y = Buf::output(Kind::of(dt), n);
            emu.call(&format!("bias_gelu_fwd_{s}"))
                .buf(&bx)
                .buf(&bb)
                .buf(&y)
                .usize(n)
                .i32(d as i32)
                .launch(geometry::elementwise(n));
            assert_output(&format!("bias_gelu {what}"), &y, &[rows, d], &y_ref, tol);

            // dx and its column sums (the bias gradient) in one pass, on col_sum's grid; in place,
            // x then holds the forward's output again, bit for bit the forward kernel's.
            for in_place in [false, true] {
                let what = format!("{what} gelu in place {in_place}");
                let dx = Buf::output(Kind::of(dt), n);
                let db = Buf::zeroed(Kind::F32, d);
                let x_inout = Buf::in_out(&x);
                let (g, rpb) = geometry::col_sum(rows, d);
                emu.call(&format!("bias_gelu_bwd_{s}"))
                    .buf(if in_place { &x_inout } else { &bx })
                    .buf(&bb)
                    .buf(&bdy)
                    .buf(&dx)
                    .buf(&db)
                    .i32(rows as i32)
                    .i32(d as i32)
                    .i32(rpb as i32)
                    .i32(in_place as i32)
                    .launch(g);
                assert_output(
                    &format!("bias_gelu bwd {what}"),
                    &dx,
                    &[rows, d],
                    &dx_ref,
                    tol,
                );
                assert_close(
                    &format!("bias_gelu bwd db {what}"),
                    &db_ref,
                    &db.tensor(&[d]),
                    tol,
                );
                if in_place {
                    assert_eq!(
                        bits_any(&x_inout.tensor(&[rows, d])),
                        bits_any(&y.tensor(&[rows, d])),
                        "bias_gelu bwd {what}: the output made again differs from the forward's"
                    );
                }
            }

            let y = Buf::output(Kind::of(dt), n);
            emu.call(&format!("bias_add_{s}"))
                .buf(&bx)
                .buf(&bb)
                .buf(&y)
                .usize(n)
                .i32(d as i32)
                .launch(geometry::elementwise(n));
            assert_output(&format!("bias_add {what}"), &y, &[rows, d], &add_ref, tol);

            let (g, rpb) = geometry::col_sum(rows, d);
            let out = Buf::zeroed(Kind::F32, d);
            emu.call(&format!("col_sum_{s}"))
                .buf(&bx)
                .buf(&out)
                .i32(rows as i32)
                .i32(d as i32)
                .i32(rpb as i32)
                .launch(g);
            assert_close(&format!("col_sum {what}"), &sum_ref, &out.tensor(&[d]), tol);
        }
    }
}

#[test]
fn residual_add_and_row_scale() {
    let Some(emu) = emu() else { return };
    let (rows, d) = (7, 300);
    let n = rows * d;
    let x = rand(&[rows, d], 22, -4.0, 4.0, DType::F32);
    let g = rand(&[rows, d], 25, -1.0, 1.0, DType::F32);
    // A stochastic-depth mask: 0 or 1/0.9 per row.
    let m = (rand_t(&[rows], 24, 0.0, 1.0)
        .unwrap()
        .ge(0.3)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        / 0.9)
        .unwrap();
    let (bx, bg, bm) = (Buf::input(&x), Buf::input(&g), Buf::input(&m));
    for dt in [DType::F32, DType::BF16] {
        let tol = tol(&[dt]);
        let s = suffix(dt);
        let a = rand(&[rows, d], 23, -4.0, 4.0, dt);
        let ba = Buf::input(&a);
        let y_ref = trainer::kernels::residual_add(&x, &a, Some(&m), true).unwrap();
        let y = Buf::output(Kind::F32, n);
        emu.call(&format!("residual_add_{s}"))
            .buf(&bx)
            .buf(&ba)
            .buf(&bm)
            .buf(&y)
            .usize(n)
            .usize(d)
            .launch(geometry::elementwise(n));
        assert_output(&format!("residual_add {s}"), &y, &[rows, d], &y_ref, tol);

        let r_ref = g.apply_op2_no_bwd(&m, &RowScale { out: dt }).unwrap();
        let r = Buf::output(Kind::of(dt), n);
        emu.call(&format!("row_scale_{s}"))
            .buf(&bg)
            .buf(&bm)
            .buf(&r)
            .usize(n)
            .usize(d)
            .launch(geometry::elementwise(n));
        assert_output(&format!("row_scale {s}"), &r, &[rows, d], &r_ref, tol);
    }
}

#[test]
fn attention_softmax_forward_and_backward() {
    let Some(emu) = emu() else { return };
    let scale = 0.125;
    for dt in [DType::F32, DType::BF16] {
        let tol = tol(&[dt]);
        let s = suffix(dt);
        // 21 rows: the last block has 5 of its 8 warps past the end; rows of 7 (fewer keys
        // than lanes), 70 and 198 keys.
        for (rows, n) in [(21, 7), (21, 70), (9, 198)] {
            let what = format!("attn_softmax {s} [{rows}, {n}]");
            let x = rand(&[rows, n], 15, -20.0, 20.0, dt);
            let dy = rand(&[rows, n], 16, -1.0, 1.0, dt);
            let y_ref = trainer::kernels::attn_softmax(&x, scale, true).unwrap();
            let dx_ref = trainer::kernels::attn_softmax_backward(&y_ref, &dy, scale, true).unwrap();
            let (bx, by, bdy) = (Buf::input(&x), Buf::input(&y_ref), Buf::input(&dy));
            let y = Buf::output(Kind::of(dt), rows * n);
            emu.call(&format!("attn_softmax_fwd_{s}"))
                .buf(&bx)
                .buf(&y)
                .usize(rows)
                .i32(n as i32)
                .f32(scale as f32)
                .launch(geometry::warp_rows(rows));
            assert_output(&what, &y, &[rows, n], &y_ref, tol);

            let dx = Buf::output(Kind::of(dt), rows * n);
            emu.call(&format!("attn_softmax_bwd_{s}"))
                .buf(&by)
                .buf(&bdy)
                .buf(&dx)
                .usize(rows)
                .i32(n as i32)
                .f32(scale as f32)
                .launch(geometry::warp_rows(rows));
            assert_output(&format!("{what} bwd"), &dx, &[rows, n], &dx_ref, tol);
        }
    }
}

#[test]
fn head_softmax_entropy_and_cross_entropy() {
    let Some(emu) = emu() else { return };
    let (tau_t, tau_s) = (0.04, 0.1);
    for dt in [DType::F32, DType::BF16] {
        let tol = tol(&[dt]);
        let s = suffix(dt);
        // K 40: a partial second warp; K 1500: 1024 threads, two passes per row.
        for k in [40, 1500] {
            let (rows, p_rows) = (4, 2);
            let what = format!("{s} K {k}");
            let t = rand(&[p_rows, k], 16, -1.0, 1.0, dt);
            let c = rand(&[k], 17, -0.1, 0.1, DType::F32);
            let st = rand(&[rows, k], 18, -1.0, 1.0, dt);
            let p = trainer::kernels::centered_softmax_entropy(
                &rand_t(&[p_rows, k], 19, -1.0, 1.0).unwrap(),
                &Tensor::zeros(k, DType::F32, &Device::Cpu).unwrap(),
                tau_t,
                false,
            )
            .unwrap()
            .0;
            let g = rand(&[rows], 20, 0.5, 1.5, DType::F32);
            let (bt, bc, bs, bp, bg) = (
                Buf::input(&t),
                Buf::input(&c),
                Buf::input(&st),
                Buf::input(&p),
                Buf::input(&g),
            );
            let geo = |r| geometry::head_rows(r, k);

            // The targets and their entropies in one pass.
            // Then each half's from the other half's rows (the patch targets' view swap).
            for (shift, name) in [(0, "centered_softmax"), (p_rows / 2, "other_view_softmax")] {
                let (probs_ref, h_ref) = match shift {
                    0 => trainer::kernels::centered_softmax_entropy(&t, &c, tau_t, true),
                    _ => trainer::kernels::other_view_softmax_entropy(&t, &c, tau_t, true),
                }
                .unwrap();
                let probs = Buf::output(Kind::F32, p_rows * k);
                let h = Buf::output(Kind::F32, p_rows);
                emu.call(&format!("centered_softmax_{s}"))
                    .buf(&bt)
                    .buf(&bc)
                    .buf(&probs)
                    .buf(&h)
                    .i32(k as i32)
                    .f32((1.0 / tau_t) as f32)
                    .i32(shift as i32)
                    .launch(geo(p_rows));
                assert_output(
                    &format!("{name} {what}"),
                    &probs,
                    &[p_rows, k],
                    &probs_ref,
                    tol,
                );
                assert_output(
                    &format!("{name} {what}: entropy"),
                    &h,
                    &[p_rows],
                    &h_ref,
                    tol,
                );
            }

            let loss_ref = trainer::kernels::soft_ce_rows(&st, &p, tau_s, true).unwrap();
            let loss = Buf::output(Kind::F32, rows);
            emu.call(&format!("soft_ce_fwd_{s}"))
                .buf(&bs)
                .buf(&bp)
                .buf(&loss)
                .i32(k as i32)
                .i32(p_rows as i32)
                .f32((1.0 / tau_s) as f32)
                .launch(geo(rows));
            assert_output(&format!("soft_ce {what}"), &loss, &[rows], &loss_ref, tol);

            // The reference of both halves: the one-pass op's (its loss must be soft_ce's).
            let ds_ref = st.copy().unwrap();
            let fused_loss_ref =
                trainer::kernels::soft_ce_in_place(&ds_ref, &p, &g, tau_s, true).unwrap();
            assert_close(
                &format!("soft_ce in place {what}: loss"),
                &loss_ref,
                &fused_loss_ref,
                1e-12,
            );
            let ds = Buf::output(Kind::of(dt), rows * k);
            emu.call(&format!("soft_ce_bwd_{s}"))
                .buf(&bs)
                .buf(&bp)
                .buf(&bg)
                .buf(&ds)
                .i32(k as i32)
                .i32(p_rows as i32)
                .f32((1.0 / tau_s) as f32)
                .launch(geo(rows));
            assert_output(
                &format!("soft_ce bwd {what}"),
                &ds,
                &[rows, k],
                &ds_ref,
                tol,
            );

            // Both in one pass, the gradient written over the logits.
            let s_inout = Buf::in_out(&st);
            let loss = Buf::output(Kind::F32, rows);
            emu.call(&format!("soft_ce_fused_{s}"))
                .buf(&s_inout)
                .buf(&bp)
                .buf(&bg)
                .buf(&loss)
                .i32(k as i32)
                .i32(p_rows as i32)
                .f32((1.0 / tau_s) as f32)
                .launch(geo(rows));
            assert_output(
                &format!("soft_ce fused {what}: loss"),
                &loss,
                &[rows],
                &loss_ref,
                tol,
            );
            assert_close(
                &format!("soft_ce fused {what}: ds in place"),
                &ds_ref,
                &s_inout.tensor(&[rows, k]),
                tol,
            );
        }
    }
}

#[test]
fn local_multimodal_targets_of_both_views() {
    let Some(emu) = emu() else { return };
    let (alpha, tau) = (0.3, 0.07);
    for dt in [DType::F32, DType::BF16] {
        let tol = tol(&[dt]);
        let s = suffix(dt);
        // K 40: a partial second warp; K 1500: 1024 threads, two passes per row.
        for k in [40, 1500] {
            let (b, l) = (3, 2);
            let what = format!("local_multimodal {s} K {k}");
            let avg = rand(&[2, b, l, k], 60, -3.0, 3.0, dt);
            let cls = rand(&[2, b, k], 61, -3.0, 3.0, DType::F32);
            let c = rand(&[k], 62, -0.5, 0.5, DType::F32);
            let (p_ref, h_ref) =
                trainer::kernels::local_multimodal_targets(&avg, &cls, &c, alpha, tau, true)
                    .unwrap();
            let (ba, bcls, bc) = (Buf::input(&avg), Buf::input(&cls), Buf::input(&c));
            let p = Buf::output(Kind::F32, l * b * k);
            let h = Buf::output(Kind::F32, 2 * b * l);
            emu.call(&format!("local_multimodal_{s}"))
                .buf(&ba)
                .buf(&bcls)
                .buf(&bc)
                .buf(&p)
                .buf(&h)
                .i32(b as i32)
                .i32(l as i32)
                .i32(k as i32)
                .f32(alpha as f32)
                .f32((1.0 / tau) as f32)
                .launch(geometry::head_rows(l * b, k));
            assert_output(&what, &p, &[l, b, k], &p_ref, tol);
            assert_output(&format!("{what}: entropy"), &h, &[2, b, l], &h_ref, tol);
        }
    }
}

#[test]
fn other_view_weighted_row_sums() {
    let Some(emu) = emu() else { return };
    for dt in [DType::F32, DType::BF16] {
        let tol = tol(&[dt]);
        let s = suffix(dt);
        // K 300: a partial second block of columns.
        let (b, r, k) = (3, 5, 300);
        let what = format!("weighted_rows {s}");
        let x = rand(&[2, b, r, k], 63, -3.0, 3.0, dt);
        let w = rand(&[2, b, r], 64, 0.0, 1.0, DType::F32);
        let want = trainer::kernels::other_view_weighted_sum(&x, &w, true).unwrap();
        let (bx, bw) = (Buf::input(&x), Buf::input(&w));
        let out = Buf::output(Kind::F32, 2 * b * k);
        emu.call(&format!("weighted_rows_{s}"))
            .buf(&bx)
            .buf(&bw)
            .buf(&out)
            .i32(r as i32)
            .i32(k as i32)
            .i32(b as i32)
            .launch(geometry::weighted_rows(2 * b, k));
        assert_output(&what, &out, &[2, b, k], &want, tol);
    }
}

#[test]
fn crops_normalised_bit_for_bit() {
    let Some(emu) = emu() else { return };
    // Every byte value, in 7 crops of 5×5 (a partial block).
    let (n, s) = (7, 5);
    let bytes: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 97 % 256) as u8).collect();
    let x = Tensor::from_vec(bytes, (n, s, s, 3), &Device::Cpu).unwrap();
    let (mean, std) = (trainer::data::MEAN, trainer::data::STD);
    let want = trainer::kernels::normalise_crops(&x, mean, std, false).unwrap();
    let bx = Buf::input(&x);
    let y = Buf::output(Kind::F32, n * 3 * s * s);
    let mut call = emu
        .call("normalise_crops")
        .buf(&bx)
        .buf(&y)
        .usize(n * 3 * s * s)
        .i32(s as i32);
    for v in mean.iter().chain(&std) {
        call = call.f32(*v);
    }
    call.launch(geometry::elementwise(n * 3 * s * s));
    let got = y.tensor(&[n, 3, s, s]);
    assert_eq!(bits_any(&got), bits_any(&want), "normalise_crops");
}

#[test]
fn weight_norm_forward_and_backward() {
    let Some(emu) = emu() else { return };
    // E 40: a partial second pass of the warp; K 11: a partial block of 8 warps.
    let (k, e) = (11, 40);
    let v = rand(&[k, e], 65, -1.0, 1.0, DType::F32);
    let g = rand(&[k, 1], 66, 0.5, 2.0, DType::F32);
    let dw = rand(&[k, e], 67, -1.0, 1.0, DType::F32);
    let (bv, bg, bdw) = (Buf::input(&v), Buf::input(&g), Buf::input(&dw));
    for dt in [DType::F32, DType::BF16] {
        let want = trainer::kernels::weight_norm(&v, &g, dt, true).unwrap();
        let w = Buf::output(Kind::of(dt), k * e);
        emu.call(&format!("weight_norm_{}", suffix(dt)))
            .buf(&bv)
            .buf(&bg)
            .buf(&w)
            .usize(k)
            .i32(e as i32)
            .launch(geometry::warp_rows(k));
        assert_output(
            &format!("weight_norm {}", suffix(dt)),
            &w,
            &[k, e],
            &want,
            tol(&[dt]),
        );
    }
    let (dg_ref, dv_ref) = trainer::kernels::weight_norm_backward(&dw, &v, &g, true).unwrap();
    let (dv, dg) = (Buf::output(Kind::F32, k * e), Buf::output(Kind::F32, k));
    emu.call("weight_norm_bwd")
        .buf(&bdw)
        .buf(&bv)
        .buf(&bg)
        .buf(&dv)
        .buf(&dg)
        .usize(k)
        .i32(e as i32)
        .launch(geometry::warp_rows(k));
    let tol = tol(&[DType::F32]);
    assert_output("weight_norm_bwd dV", &dv, &[k, e], &dv_ref, tol);
    assert_output("weight_norm_bwd dg", &dg, &[k, 1], &dg_ref, tol);
}

#[test]
fn adamw_with_teacher_ema() {
    let Some(emu) = emu() else { return };
    // Odd segment lengths, some frozen, clipped and unclipped.
    let lens = [384usize, 1, 1000, 77, 1536, 3];
    let n: usize = lens.iter().sum();
    let mut segs = Vec::new();
    let mut off = 0;
    for (i, &len) in lens.iter().enumerate() {
        segs.push(Segment {
            offset: off,
            len,
            update: i % 3 != 1,
            decay: 1.0 - 1e-3 * 0.04,
            step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
            bc2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
            clip: if i % 2 == 0 { 1.0 } else { 0.3 },
        });
        off += len;
    }
    let parts = [
        rand_t(&[n], 1, -0.1, 0.1).unwrap(),
        rand_t(&[n], 2, -1e-3, 1e-3).unwrap(),
        rand_t(&[n], 3, 1e-8, 1e-6).unwrap(),
        rand_t(&[n], 4, -0.1, 0.1).unwrap(),
    ];
    let before = Tensor::cat(&parts, 0).unwrap();
    let g = rand_t(&[n], 5, -1e-2, 1e-2).unwrap();
    let meta = meta_tensor(&segs, &Device::Cpu).unwrap();
    let op = AdamwEma {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        momentum: 0.996,
    };
    let reference = before.copy().unwrap();
    reference.inplace_op3(&g, &meta, &op).unwrap();

    let state = Buf::in_out(&before);
    let (bg, bmeta) = (Buf::input(&g), Buf::input(&meta));
    emu.call("adamw_ema")
        .buf(&state)
        .buf(&bg)
        .buf(&bmeta)
        .i32(segs.len() as i32)
        .usize(n)
        .f32(op.beta1 as f32)
        .f32(op.beta2 as f32)
        .f32(op.eps as f32)
        .f32(op.momentum as f32)
        .launch(geometry::elementwise(n));
    // As kernel-check: relative to the largest change the step makes.
    let got = state.tensor(&[4 * n]);
    let (abs, _) = errors(&reference, &got).unwrap();
    let (change, _) = errors(&reference, &before).unwrap();
    assert!(
        abs.is_finite() && abs / change <= 1e-4,
        "adamw_ema: error {abs:.3e} of a change {change:.3e}"
    );
}

/// Gradient accumulation into the flat f32 buffer, from f32 and bf16 gradients: in place,
/// exactly the f32 sums, nothing outside the slice written.
#[test]
fn grad_accumulate_in_place() {
    let Some(emu) = emu() else { return };
    for dt in [DType::F32, DType::BF16] {
        let n = 1000;
        let flat = rand(&[n], 41, -1.0, 1.0, DType::F32);
        let g = rand(&[n], 42, -1.0, 1.0, dt);
        let want = (&flat + g.to_dtype(DType::F32).unwrap()).unwrap();
        let dst = Buf::in_out(&flat);
        let bg = Buf::input(&g);
        emu.call(&format!("grad_accumulate_{}", suffix(dt)))
            .buf(&dst)
            .buf(&bg)
            .usize(n)
            .launch(geometry::elementwise(n));
        let got = dst.tensor(&[n]);
        let (abs, _) = errors(&want, &got).unwrap();
        assert_eq!(abs, 0.0, "grad_accumulate_{}", suffix(dt));
    }
}

/// The per-parameter squared gradient norms: the two launches against the CPU reference, on
/// segments shorter than, equal to and several chunks long, leaving gaps in the buffer.
#[test]
fn squared_norms_per_segment() {
    use trainer::kernels::sq_norms::{SqNormPlan, CHUNK};
    let Some(emu) = emu() else { return };
    let segs = [
        (5, 3),
        (8, CHUNK),
        (CHUNK + 8, 2 * CHUNK + 1),
        (3 * CHUNK + 20, 257),
    ];
    let n = 3 * CHUNK + 300;
    let plan = SqNormPlan::new(&segs, &Device::Cpu).unwrap();
    let g = rand(&[n], 31, -3.0, 3.0, DType::F32);
    let reference = plan.squared_norms(&g).unwrap();
    let n_chunks = plan.chunks.elem_count() / 2;
    let (bg, bchunks, bfirst) = (
        Buf::input(&g),
        Buf::input(&plan.chunks),
        Buf::input(&plan.first),
    );
    let part = Buf::output(Kind::F64, n_chunks);
    emu.call("sq_norm_chunks")
        .buf(&bg)
        .buf(&bchunks)
        .buf(&part)
        .launch(geometry::sq_norm_chunks(n_chunks));
    part.assert_written("sq_norm_chunks", 0..n_chunks);
    let out = Buf::output(Kind::F64, segs.len());
    emu.call("sq_norm_segments")
        .buf(&part)
        .buf(&bfirst)
        .i32(segs.len() as i32)
        .buf(&out)
        .launch(geometry::sq_norm_segments(segs.len()));
    out.assert_written("sq_norm_segments", 0..segs.len());
    let (want, got) = (
        reference.to_vec1::<f64>().unwrap(),
        out.tensor(&[segs.len()]).to_vec1::<f64>().unwrap(),
    );
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!((w - g).abs() <= 1e-12 * w, "segment {k}: {g} vs {w}");
    }
}

/// Flash attention on packed qkv rows at token counts that leave partial tiles (7: a query tile
/// whose second warp has no rows; 38, 70, 198: 6 rows into the last tile; 198 and 38 are
/// ViT-S/16's global and local crops) and one exact tile (32): forward O and lse (and the
/// teacher's launch without lse), the D row sums, then dq and dk/dv against the f64 reference.
/// The flash kernels' qkv-bias argument: the buffer, or null.
fn with_qkv_bias<'a>(c: Call<'a>, bias: Option<&'a Buf>) -> Call<'a> {
    match bias {
        Some(b) => c.buf(b),
        None => c.null(Kind::F32),
    }
}

#[test]
fn flash_attention_forward_and_backward() {
    let Some(emu) = emu() else { return };
    let (b, heads, dh) = (2, 2, flash::CUDA_HEAD_DIM);
    let hd = heads * dh;
    let scale = (dh as f64).powf(-0.5);
    let tol = tolerance(DType::BF16);
    for t in [7, 32, 38, 70, 198] {
        let rows = b * t;
        let n_o = rows * hd;
        let n_stats = b * heads * t;
        let qkv = rand(&[rows, 3 * hd], 20 + t as u64, -2.0, 2.0, DType::BF16);
        let d_o = rand(&[rows, hd], 21 + t as u64, -1.0, 1.0, DType::BF16);
        // The qkv bias, added by the kernels as they load the tiles (null for T 32 and 70).
        let with_bias = ![32, 70].contains(&t);
        let bias = rand(&[3 * hd], 22 + t as u64, -0.5, 0.5, DType::F32);
        let bbias = Buf::input(&bias);
        let qkv_bias = |c| with_qkv_bias(c, with_bias.then_some(&bbias));
        // The f64 reference on the same (bf16) values, the bias added and rounded to bf16 as a
        // bias add would: [O | lse] in one f64 buffer.
        let qkv_ref = match with_bias {
            true => qkv
                .to_dtype(DType::F64)
                .unwrap()
                .broadcast_add(&bias.to_dtype(DType::F64).unwrap())
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
            false => qkv.to_dtype(DType::F64).unwrap(),
        };
        let packed = flash::forward(&qkv_ref, None, b, heads, scale, true)
            .unwrap()
            .packed
            .unwrap();
        let o_ref = packed.narrow(0, 0, n_o).unwrap();
        let lse_ref = packed.narrow(0, n_o, n_stats).unwrap();
        let (bqkv, bdo) = (Buf::input(&qkv), Buf::input(&d_o));
        let geo = geometry::flash(b, t, heads);
        let what = format!("flash T {t} bias {with_bias}");

        let o = Buf::output(Kind::Bf16, n_o);
        let lse = Buf::output(Kind::F32, n_stats);
        qkv_bias(emu.call("flash_fwd_bf16").buf(&bqkv))
            .buf(&o)
            .buf(&lse)
            .i32(t as i32)
            .i32(heads as i32)
            .f32(scale as f32)
            .launch(geo);
        o.assert_written(&what, 0..n_o);
        lse.assert_written(&what, 0..n_stats);
        assert_close(&format!("{what} O"), &o_ref, &o.tensor(&[n_o]), tol);
        // lse is f32 arithmetic on exact bf16 products: f32's tolerance.
        assert_close(
            &format!("{what} lse"),
            &lse_ref,
            &lse.tensor(&[n_stats]),
            tolerance(DType::F32),
        );
        let o_teacher = Buf::output(Kind::Bf16, n_o);
        qkv_bias(emu.call("flash_fwd_bf16").buf(&bqkv))
            .buf(&o_teacher)
            .null(Kind::F32)
            .i32(t as i32)
            .i32(heads as i32)
            .f32(scale as f32)
            .launch(geo);
        assert!(
            bits(&o_teacher.tensor(&[n_o])) == bits(&o.tensor(&[n_o])),
            "{what}: O differs without lse"
        );

        // The backward reads the forward's outputs: here the reference's, as the kernel
        // stores them (O in bf16, lse in f32).
        let o_in = o_ref
            .to_dtype(DType::BF16)
            .unwrap()
            .reshape((rows, hd))
            .unwrap();
        let lse_in = lse_ref.to_dtype(DType::F32).unwrap();
        let (bo, blse) = (Buf::input(&o_in), Buf::input(&lse_in));
        let dsum = Buf::output(Kind::F32, n_stats);
        emu.call("flash_bwd_dot_bf16")
            .buf(&bo)
            .buf(&bdo)
            .buf(&dsum)
            .usize(rows)
            .i32(t as i32)
            .i32(heads as i32)
            .launch(geometry::flash_bwd_dot(rows, heads));
        dsum.assert_written(&what, 0..n_stats);
        // D[b, h, i] = Σ dO·O over the head's 64 columns.
        let prod = (d_o.to_dtype(DType::F64).unwrap() * o_in.to_dtype(DType::F64).unwrap())
            .unwrap()
            .reshape((b, t, heads, dh))
            .unwrap()
            .sum(3)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_close(
            &format!("{what} D"),
            &prod,
            &dsum.tensor(&[n_stats]),
            tolerance(DType::F32),
        );

        let dqkv_ref = flash::backward(
            &qkv_ref,
            None,
            &Tensor::cat(
                &[
                    o_in.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
                    lse_in.to_dtype(DType::F64).unwrap(),
                ],
                0,
            )
            .unwrap(),
            &d_o.to_dtype(DType::F64).unwrap(),
            b,
            heads,
            scale,
        )
        .unwrap();
        let dqkv = Buf::output(Kind::Bf16, 3 * n_o);
        let bwd = |name: &str| {
            qkv_bias(emu.call(name).buf(&bqkv))
                .buf(&bdo)
                .buf(&blse)
                .buf(&dsum)
                .buf(&dqkv)
                .i32(t as i32)
                .i32(heads as i32)
                .f32(scale as f32)
                .launch(geo)
        };
        // Element ranges of part 0 (q), 1 (k), 2 (v) of every row.
        let part = |p: usize| {
            (0..rows).flat_map(move |r| (r * 3 * hd + p * hd)..(r * 3 * hd + (p + 1) * hd))
        };
        bwd("flash_bwd_dq_bf16");
        assert!(
            part(0).all(|i| !dqkv.unwritten(i)),
            "{what}: dq not all written"
        );
        assert!(
            part(1).chain(part(2)).all(|i| dqkv.unwritten(i)),
            "{what}: flash_bwd_dq_bf16 wrote into dk or dv"
        );
        let dq = dqkv.tensor(&[rows, 3, hd]).narrow(1, 0, 1).unwrap();
        bwd("flash_bwd_dkdv_bf16");
        dqkv.assert_written(&what, 0..3 * n_o);
        let got = dqkv.tensor(&[rows, 3, hd]);
        assert!(
            bits(&got.narrow(1, 0, 1).unwrap()) == bits(&dq),
            "{what}: flash_bwd_dkdv_bf16 wrote into dq"
        );
        let want = dqkv_ref.reshape((rows, 3, hd)).unwrap();
        for (p, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close(
                &format!("{what} {name}"),
                &want.narrow(1, p, 1).unwrap(),
                &got.narrow(1, p, 1).unwrap(),
                tol,
            );
        }
    }
}
