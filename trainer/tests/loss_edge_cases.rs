//! Degenerate SRS batches: pairs without valid rows.
mod common;
use candle_core::Device;
use rand::SeedableRng;
use shared::batch::{BatchLayout, BatchView, BatchWriter, OwnedBatch};
use trainer::data::{synthetic_sample, TrainBatch};
use trainer::step::Trainer;

fn batch_with(
    cfg: &trainer::config::TrainConfig,
    edit: impl Fn(&mut shared::geometry::Sample),
) -> (BatchLayout, OwnedBatch) {
    let aug = &cfg.augment;
    let layout = BatchLayout::new(aug, 2);
    let mut buf = OwnedBatch::zeroed(&layout);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    {
        let mut w = BatchWriter::new(&layout, buf.bytes_mut(), 0, 0, aug);
        for b in 0..2 {
            let mut s = synthetic_sample(aug, &mut rng, b as u64);
            edit(&mut s);
            w.write_sample(b, &s);
        }
    }
    (layout, buf)
}

fn zero_pair(s: &mut shared::geometry::Sample, p: usize, n_g: usize, n_l: usize) {
    s.n_valid[p] = 0;
    let (off, n) = if p < 2 {
        (p * n_g, n_g)
    } else {
        (2 * n_g + (p - 2) * n_l, n_l)
    };
    for r in &mut s.rows[off..off + n] {
        *r = Default::default();
    }
}

#[test]
fn local_pairs_without_valid_rows_train_normally() {
    let cfg = common::micro_cfg();
    let (n_g, n_l) = (
        cfg.augment.global_samples() as usize,
        cfg.augment.local_samples() as usize,
    );
    let n_pairs = cfg.augment.n_pairs() as usize;
    let (layout, buf) = batch_with(&cfg, |s| {
        (2..n_pairs).for_each(|p| zero_pair(s, p, n_g, n_l))
    });
    let view = BatchView::new(&layout, buf.bytes()).unwrap();
    let batch = TrainBatch::from_view(&view, &cfg.augment, &Device::Cpu).unwrap();
    let mut tr = Trainer::new(&cfg, 2, &Device::Cpu).unwrap();
    let s = tr.step(&batch, 1, 2).unwrap();
    assert!(
        s.loss.is_finite()
            && s.loss_udi.is_finite()
            && s.centre_norms.iter().all(|c| c.is_finite())
    );
}

#[test]
fn a_batch_without_any_valid_global_row_stops_with_an_error() {
    let cfg = common::micro_cfg();
    let (n_g, n_l) = (
        cfg.augment.global_samples() as usize,
        cfg.augment.local_samples() as usize,
    );
    let (layout, buf) = batch_with(&cfg, |s| (0..2).for_each(|p| zero_pair(s, p, n_g, n_l)));
    let view = BatchView::new(&layout, buf.bytes()).unwrap();
    let batch = TrainBatch::from_view(&view, &cfg.augment, &Device::Cpu).unwrap();
    let mut tr = Trainer::new(&cfg, 2, &Device::Cpu).unwrap();
    let before = common::to_vec_f64(&tr.student.tensor("backbone.pos_embed").unwrap());
    let err = tr.step(&batch, 1, 2).unwrap_err().to_string();
    assert!(err.contains("non-finite loss"), "{err}");
    // Nothing was updated.
    assert_eq!(
        before,
        common::to_vec_f64(&tr.student.tensor("backbone.pos_embed").unwrap())
    );
}
