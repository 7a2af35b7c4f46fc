//! SRS masks and projection rows (udi-spec §1.5).

use loader::crops::sample_crops;
use loader::srs::{project_rows, sampling_mask};
use shared::config::AugmentConfig;
use shared::geometry::{CropMeta, SrsRow};
use shared::rng::sample_rng;

#[test]
fn one_sample_per_window_sorted_with_corner_block() {
    let mut corners = [0usize; 4];
    for seed in 0..400u64 {
        let m = sampling_mask(14, 3, &mut sample_rng(seed, 0, 0));
        assert_eq!(m.len(), 16);
        assert!(m.windows(2).all(|w| w[0] < w[1]), "ascending {m:?}");
        let rows: Vec<u16> = m.iter().map(|c| c / 14).collect();
        let cols: Vec<u16> = m.iter().map(|c| c % 14).collect();
        // The block is [0,12) or [2,14) on each axis, with exactly one cell per 3×3 window.
        let fits = |rb: u16, cb: u16| {
            let mut count = [[0u8; 4]; 4];
            for (&r, &c) in rows.iter().zip(&cols) {
                if r < rb || r >= rb + 12 || c < cb || c >= cb + 12 {
                    return false;
                }
                count[((r - rb) / 3) as usize][((c - cb) / 3) as usize] += 1;
            }
            count.iter().flatten().all(|&n| n == 1)
        };
        let corner = [(0, 0), (0, 2), (2, 0), (2, 2)]
            .iter()
            .position(|&(rb, cb)| fits(rb, cb));
        let corner = corner.unwrap_or_else(|| panic!("no block placement fits {m:?}"));
        // Count placements that only the shifted blocks explain (cells in row/col 12-13).
        if rows.iter().any(|&r| r >= 12) || cols.iter().any(|&c| c >= 12) {
            corners[corner] += 1;
        } else {
            corners[0] += 1;
        }
    }
    // Shifted corners occur (each with probability 1/4; a shifted block whose samples avoid
    // rows/cols 12-13 is indistinguishable from top-left, so only check presence).
    assert!(corners.iter().all(|&n| n > 0), "{corners:?}");

    // 6×6 with window 2: full coverage, 9 samples; 8×8 with window 2: 16, no corner shift.
    for (g, s, n) in [(6u32, 2u32, 9usize), (8, 2, 16), (4, 2, 4)] {
        let m = sampling_mask(g, s, &mut sample_rng(1, 0, 0));
        assert_eq!(m.len(), n);
        let mut seen = std::collections::HashSet::new();
        for c in &m {
            let (r, q) = (*c as u32 / g, *c as u32 % g);
            assert!(seen.insert((r / s, q / s)));
        }
    }
}

fn meta(top: u32, left: u32, h: u32, w: u32, hflip: u32) -> CropMeta {
    CropMeta {
        img_h: 11,
        img_w: 11,
        top,
        left,
        h,
        w,
        hflip,
    }
}

fn close(a: [f32; 4], b: [f64; 4]) {
    for (x, y) in a.iter().zip(b) {
        assert!((*x as f64 - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

#[test]
fn hand_computed_projection_cases() {
    // Source: the whole 11×11 image on a 5-grid (positions 0, .25, .5, .75, 1).
    // Target: rows/cols 2..8 → signed box (.2, .2, .8, .8), a 3-grid.
    // Mask: cell 0 (position (0,0): outside, invalid) and cell 6 = (1,1) at (.25,.25).
    let src = meta(0, 0, 11, 11, 0);
    let tgt = meta(2, 2, 7, 7, 0);
    let mask = [0u16, 6];
    let mut rows = [SrsRow::default(); 2];

    // No flip: u = v = (.25 − .2)·2/.6 = 1/6.
    let n = project_rows(&src, 5, &tgt, 3, &mask, &mut rows);
    assert_eq!(n, 1);
    assert_eq!(rows[0].src, 6);
    assert_eq!(rows[0].tgt, [0, 1, 3, 4]);
    let (u, v) = (1.0 / 6.0, 1.0 / 6.0);
    close(
        rows[0].w,
        [(1.0 - u) * (1.0 - v), (1.0 - u) * v, u * (1.0 - v), u * v],
    );
    assert_eq!(rows[1], SrsRow::default());

    // Flipped target (.2, .8, .8, .2): v = (.25 − .8)·2/(.2 − .8) = 11/6 → fv 1, cv 2.
    let n = project_rows(&src, 5, &meta(2, 2, 7, 7, 1), 3, &mask, &mut rows);
    assert_eq!(n, 1);
    assert_eq!(rows[0].tgt, [1, 2, 4, 5]);
    let v = 11.0 / 6.0 - 1.0;
    close(
        rows[0].w,
        [(1.0 - u) * (1.0 - v), (1.0 - u) * v, u * (1.0 - v), u * v],
    );

    // Flipped source (0, 1, 1, 0): cell (1,1) sits at column .75 → v = (.75 − .2)·2/.6 = 11/6.
    let n = project_rows(&meta(0, 0, 11, 11, 1), 5, &tgt, 3, &mask, &mut rows);
    assert_eq!(n, 1);
    assert_eq!(rows[0].src, 6);
    assert_eq!(rows[0].tgt, [1, 2, 4, 5]);
    close(
        rows[0].w,
        [(1.0 - u) * (1.0 - v), (1.0 - u) * v, u * (1.0 - v), u * v],
    );

    // Both flipped: the flips cancel → same as no flip.
    let n = project_rows(
        &meta(0, 0, 11, 11, 1),
        5,
        &meta(2, 2, 7, 7, 1),
        3,
        &mask,
        &mut rows,
    );
    assert_eq!(n, 1);
    assert_eq!(rows[0].tgt, [0, 1, 3, 4]);
}

#[test]
fn rows_are_valid_first_sum_to_one_and_local_zero_pairs_occur() {
    let aug = AugmentConfig::default();
    let (mut zero_local, mut local_pairs) = (0usize, 0usize);
    let (mut valid_g, mut valid_l) = (0usize, 0usize);
    let n_img = 600u64;
    for seed in 0..n_img {
        let mut rng = sample_rng(seed, 0, 0);
        let crops = sample_crops(&aug, 375, 500, &mut rng);
        let gm = sampling_mask(14, 3, &mut rng);
        let lm = sampling_mask(6, 2, &mut rng);
        for (k, c) in crops.iter().enumerate() {
            let (mask, grid) = if k < 2 { (&gm, 14) } else { (&lm, 6) };
            let targets: Vec<usize> = if k < 2 { vec![1 - k] } else { vec![0, 1] };
            for t in targets {
                let mut rows = vec![
                    SrsRow {
                        src: 99,
                        ..Default::default()
                    };
                    mask.len()
                ];
                let n = project_rows(c, grid, &crops[t], 14, mask, &mut rows) as usize;
                // S rows: valid sources are mask cells in mask order; T rows sum to 1.
                let srcs: Vec<u16> = rows[..n].iter().map(|r| r.src).collect();
                assert!(srcs.windows(2).all(|w| w[0] < w[1]));
                assert!(srcs.iter().all(|s| mask.contains(s)));
                for r in &rows[..n] {
                    let s: f32 = r.w.iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{r:?}");
                    assert!(r.w.iter().all(|&w| w >= -1e-7));
                    assert!(r.tgt.iter().all(|&t| t < 196));
                    let mut dense = vec![0f32; 196];
                    r.dense_t(&mut dense);
                    assert!((dense.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
                assert!(rows[n..].iter().all(|r| *r == SrsRow::default()));
                if k < 2 {
                    valid_g += n;
                } else {
                    valid_l += n;
                    local_pairs += 1;
                    zero_local += (n == 0) as usize;
                }
            }
        }
    }
    let mean_g = valid_g as f64 / (2 * n_img) as f64;
    let mean_l = valid_l as f64 / local_pairs as f64;
    let zero = zero_local as f64 / local_pairs as f64;
    // Spec (375×500): 11.6 of 16, 6.6 of 9, 2.8 % zero-valid local pairs.
    assert!((10.8..12.4).contains(&mean_g), "global valid mean {mean_g}");
    assert!((6.0..7.2).contains(&mean_l), "local valid mean {mean_l}");
    assert!(
        (0.015..0.045).contains(&zero),
        "zero-valid local pairs {zero}"
    );
}
