#![allow(clippy::needless_range_loop)]
//! `TrainBatch::from_view` on batches written with the shared BatchWriter: normalisation, the
//! dense S/T row tensors, validity masks, and errors on malformed rows.
mod common;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use shared::batch::{BatchLayout, BatchView, BatchWriter, OwnedBatch};
use shared::geometry::{global_pair, local_pair};
use trainer::data::{synthetic_sample, TrainBatch, MEAN, STD};

#[test]
fn rows_and_pixels_land_where_the_layout_says() {
    let cfg = common::tiny_cfg();
    let aug = &cfg.augment;
    let b_sz = 3;
    let layout = BatchLayout::new(aug, b_sz);
    let mut buf = OwnedBatch::zeroed(&layout);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let samples: Vec<_> = (0..b_sz as u64)
        .map(|i| synthetic_sample(aug, &mut rng, i))
        .collect();
    {
        let mut w = BatchWriter::new(&layout, buf.bytes_mut(), 0, 0, aug);
        for (b, s) in samples.iter().enumerate() {
            w.write_sample(b, s);
        }
    }
    let view = BatchView::new(&layout, buf.bytes()).unwrap();
    let tb = TrainBatch::from_view_dtype(&view, aug, DType::F64, &Device::Cpu).unwrap();
    let (b, l) = (b_sz as usize, aug.n_local as usize);
    let (n_g, n_l) = (aug.global_samples() as usize, aug.local_samples() as usize);
    let gg = aug.global_grid() as usize;
    let ng2 = gg * gg;
    let sg = aug.global_size as usize;
    let rt = n_g + l * n_l;
    assert_eq!(tb.globals.dims(), &[2 * b, 3, sg, sg]);
    assert_eq!(tb.locals.as_ref().unwrap().dims()[0], l * b);
    assert_eq!(tb.teacher_rows.dims(), &[2 * b, rt, ng2]);
    let g = common::to_vec_f64(&tb.globals);
    let s = common::to_vec_f64(&tb.student_rows);
    let t = common::to_vec_f64(&tb.teacher_rows);
    let vg = common::to_vec_f64(&tb.valid_g);
    let vl = common::to_vec_f64(&tb.valid_l);
    for (bi, smp) in samples.iter().enumerate() {
        // Pixel (view 1, y 5, x 7, channel 2).
        let px = smp.globals[sg * sg * 3 + (5 * sg + 7) * 3 + 2];
        let want = ((px as f32 / 255.0 - MEAN[2]) / STD[2]) as f64;
        assert_eq!(g[(((b + bi) * 3 + 2) * sg + 5) * sg + 7], want);
        for p in 0..2 + 2 * l {
            let nv = smp.n_valid[p] as usize;
            let n = if p < 2 { n_g } else { n_l };
            let off = if p < 2 {
                p * n_g
            } else {
                2 * n_g + (p - 2) * n_l
            };
            for r in 0..n {
                let row = &smp.rows[off + r];
                let valid = r < nv;
                // Dense T-row from the four corners.
                let mut dense = vec![0.0f64; ng2];
                if valid {
                    for (c, w) in row.tgt.iter().zip(row.w) {
                        dense[*c as usize] += w as f64;
                    }
                }
                let (u, slot) = if p < 2 {
                    (1 - p, r)
                } else {
                    ((p - 2) % 2, n_g + (p - 2) / 2 * n_l + r)
                };
                let at = ((u * b + bi) * rt + slot) * ng2;
                for c in 0..ng2 {
                    assert!(
                        (t[at + c] - dense[c]).abs() < 1e-7,
                        "sample {bi} pair {p} row {r}"
                    );
                }
                if p == global_pair(0) || p == global_pair(1) {
                    let at = ((p * b + bi) * n_g + r) * ng2;
                    for c in 0..ng2 {
                        let want = if valid && c == row.src as usize {
                            1.0
                        } else {
                            0.0
                        };
                        assert_eq!(s[at + c], want);
                    }
                    assert_eq!(vg[(p * b + bi) * n_g + r], if valid { 1.0 } else { 0.0 });
                } else {
                    let (k, tv) = ((p - 2) / 2, (p - 2) % 2);
                    assert_eq!(p, local_pair(k, tv));
                    assert_eq!(
                        vl[((tv * b + bi) * l + k) * n_l + r],
                        if valid { 1.0 } else { 0.0 }
                    );
                }
            }
        }
    }
}

#[test]
fn malformed_rows_are_refused_with_the_sample_and_pair() {
    let cfg = common::tiny_cfg();
    let aug = &cfg.augment;
    let layout = BatchLayout::new(aug, 2);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for bad in 0..2 {
        let mut buf = OwnedBatch::zeroed(&layout);
        {
            let mut w = BatchWriter::new(&layout, buf.bytes_mut(), 0, 0, aug);
            for b in 0..2 {
                let mut s = synthetic_sample(aug, &mut rng, b as u64);
                if b == 1 {
                    if bad == 0 {
                        s.n_valid[3] = 99;
                    } else {
                        s.n_valid[0] = 1;
                        s.rows[0].src = 10_000;
                    }
                }
                w.write_sample(b, &s);
            }
        }
        let view = BatchView::new(&layout, buf.bytes()).unwrap();
        let err = TrainBatch::from_view(&view, aug, &Device::Cpu)
            .err()
            .expect("must fail")
            .to_string();
        let want = if bad == 0 {
            "sample 1 pair 3"
        } else {
            "sample 1 pair 0 row 0"
        };
        assert!(err.contains(want), "{err}");
    }
}

/// The loader's SyntheticSource (ring tests, `bench-ring`) writes batches in the documented row
/// format, so the trainer accepts them: local-pair sources index the local grid, invalid rows are zero.
#[test]
fn loader_synthetic_batches_are_valid_training_input() {
    let cfg = common::tiny_cfg();
    let pc = shared::config::PipelineConfig {
        data: cfg.data.clone(),
        augment: cfg.augment.clone(),
    };
    let layout = BatchLayout::new(&pc.augment, pc.data.batch_size);
    let src = loader::produce::SyntheticSource::new(&pc, 64);
    let perm = shared::rng::epoch_permutation(pc.data.seed, 0, 64);
    for batch in 0..2 {
        let mut buf = OwnedBatch::zeroed(&layout);
        loader::produce::fill_batch(&src, &pc, &layout, &perm, 0, batch, 2, buf.bytes_mut())
            .unwrap();
        let view = BatchView::new(&layout, buf.bytes()).unwrap();
        TrainBatch::from_view(&view, &pc.augment, &Device::Cpu)
            .unwrap_or_else(|e| panic!("batch {batch} refused: {e:#}"));
    }
}

/// Without local crops (L = 0), building a batch asks its device for no empty tensor: the CUDA
/// driver refuses zero-byte allocations. The empty `valid_l` is made on the host instead (nothing
/// reads it), and the drop-path masks have no local part; the global masks are the same draws as
/// with local crops, which are drawn after them.
#[test]
fn without_local_crops_nothing_empty_goes_to_the_device() {
    use std::cell::RefCell;
    use std::ops::Range;
    use trainer::staging::{StageLayout, Staged, Upload};
    struct Recording(RefCell<Vec<(Range<usize>, Vec<usize>)>>);
    impl Upload for Recording {
        fn pixels(&self, range: Range<usize>, shape: &[usize]) -> anyhow::Result<Tensor> {
            self.0.borrow_mut().push((range, shape.to_vec()));
            Ok(Tensor::zeros(shape, DType::U8, &Device::Cpu)?)
        }
        fn rows(&self, range: Range<usize>, shape: &[usize]) -> anyhow::Result<Tensor> {
            self.0.borrow_mut().push((range, shape.to_vec()));
            Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?)
        }
    }
    let mut cfg = common::micro_cfg();
    cfg.augment.n_local = 0;
    let b = 2;
    let staged = Staged {
        batch_size: b,
        epoch: 0,
        index: 0,
        photo: None,
        labels: vec![-1; b],
        indices: (0..b as u64).collect(),
    };
    let up = Recording(RefCell::new(Vec::new()));
    let tb = TrainBatch::from_staged(&staged, &up, &cfg.augment, DType::F32).unwrap();
    let asked = up.0.into_inner();
    // The globals' pixels and three row parts; none of them empty.
    assert_eq!(asked.len(), 4, "{asked:?}");
    for (range, shape) in &asked {
        assert!(!range.is_empty(), "an empty upload: {range:?} {shape:?}");
    }
    let sl = StageLayout::new(&cfg.augment, b);
    assert_eq!(tb.valid_l.dims(), &sl.row_parts[3].1[..]);
    assert_eq!(tb.valid_l.elem_count(), 0);
    assert!(tb.locals.is_none());

    let rates = [0.0, 0.1, 0.2];
    let draw =
        |l| trainer::vit::drop_masks(&rates, 7, b, l, 3, (0, 1), DType::F32, &Device::Cpu).unwrap();
    let (g0, l0) = draw(0);
    let (g2, l2) = draw(2);
    assert!(l0.is_empty(), "local masks without local crops");
    assert_eq!((g0.len(), l2.len()), (rates.len(), rates.len()));
    for ((a0, m0), (a2, m2)) in g0.iter().zip(&g2) {
        assert_eq!(common::to_vec_f64(a0), common::to_vec_f64(a2));
        assert_eq!(common::to_vec_f64(m0), common::to_vec_f64(m2));
    }
}
