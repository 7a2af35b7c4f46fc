//! Stratified random sampling masks and cross-view projection rows (udi-spec §1.5).

use rand::Rng;
use shared::geometry::{CropMeta, SrsRow};

/// One sample per `window × window` block of a `grid × grid` patch grid, returned as row-major
/// cell indices in ascending order. The `g·s` covered block sits in one of the four corners,
/// drawn with `random() < .25/.5/.75`, when it does not fill the grid (14 = 4·3 + 2).
pub fn sampling_mask<R: Rng>(grid: u32, window: u32, rng: &mut R) -> Vec<u16> {
    let g = grid / window;
    let covered = g * window;
    let (mut off_r, mut off_c) = (0, 0);
    if grid > covered {
        let spare = grid - covered;
        let u: f64 = rng.random();
        (off_r, off_c) = if u < 0.25 {
            (0, 0)
        } else if u < 0.5 {
            (0, spare)
        } else if u < 0.75 {
            (spare, 0)
        } else {
            (spare, spare)
        };
    }
    let mut cells = Vec::with_capacity((g * g) as usize);
    for wr in 0..g {
        for wc in 0..g {
            let u = rng.random_range(0..window * window);
            let r = off_r + wr * window + u / window;
            let c = off_c + wc * window + u % window;
            cells.push((r * grid + c) as u16);
        }
    }
    cells.sort_unstable();
    cells
}

/// The bilinear corners `[⌊u⌋, ⌊v⌋, ⌈u⌉, ⌈v⌉]` (ceilings clamped to the last grid line `gt`)
/// and weights `[(⌊u⌋,⌊v⌋), (⌊u⌋,⌈v⌉), (⌈u⌉,⌊v⌋), (⌈u⌉,⌈v⌉)]` of position (u, v), or None for a
/// position on or past the last grid line, whose four weights are all 0: the official code's
/// validity test is "row sum > 0", so such a row is invalid, not a valid row of zeros. Decided
/// on the floor, not on the weights' sum: a position past the line by rounding (u = G−1 + 1e-15)
/// has weights of ±1e-16 whose f64 sum can be positive while the trainer's f32 sum is not.
fn bilinear(u: f64, v: f64, gt: f64) -> Option<([f64; 4], [f64; 4])> {
    let (fu, fv) = (u.floor(), v.floor());
    if fu >= gt || fv >= gt {
        return None;
    }
    let (cu, cv) = ((fu + 1.0).min(gt), (fv + 1.0).min(gt));
    let w = [
        (cu - u) * (cv - v),
        (cu - u) * (v - fv),
        (u - fu) * (cv - v),
        (u - fu) * (v - fv),
    ];
    Some(([fu, fv, cu, cv], w))
}

/// Fills `out` (length = mask length) with the rows of the pair (source crop → target global
/// view) and returns the number of valid rows. Valid rows come first in mask order; the rest
/// are zero. `src_grid` is the source crop's patch grid, `tgt_grid` the global grid.
pub fn project_rows(
    src: &CropMeta,
    src_grid: u32,
    tgt: &CropMeta,
    tgt_grid: u32,
    mask: &[u16],
    out: &mut [SrsRow],
) -> u32 {
    debug_assert_eq!(out.len(), mask.len());
    let c = src.signed_box();
    let t = tgt.signed_box();
    let (t_rmin, t_rmax) = (t[0].min(t[2]), t[0].max(t[2]));
    let (t_cmin, t_cmax) = (t[1].min(t[3]), t[1].max(t[3]));
    let gs = (src_grid - 1) as f64;
    let gt = (tgt_grid - 1) as f64;
    let last = tgt_grid - 1;
    let mut n = 0usize;
    for &cell in mask {
        let (r, q) = (cell as u32 / src_grid, cell as u32 % src_grid);
        // Align-corners position of the cell in normalised source-image coordinates.
        let p_row = c[0] + r as f64 / gs * (c[2] - c[0]);
        let p_col = c[1] + q as f64 / gs * (c[3] - c[1]);
        if !(t_rmin < p_row && p_row < t_rmax && t_cmin < p_col && p_col < t_cmax) {
            continue;
        }
        // Signed target box: a flipped target maps column 0 to its right edge.
        let u = (p_row - t[0]) * gt / (t[2] - t[0]);
        let v = (p_col - t[1]) * gt / (t[3] - t[1]);
        let Some(([fu, fv, cu, cv], w)) = bilinear(u, v, gt) else {
            continue;
        };
        let idx =
            |a: f64, b: f64| (a as u32 * tgt_grid + b as u32).min(last * tgt_grid + last) as u16;
        out[n] = SrsRow {
            src: cell,
            _pad: 0,
            tgt: [idx(fu, fv), idx(fu, cv), idx(cu, fv), idx(cu, cv)],
            w: w.map(|x| x as f32),
        };
        n += 1;
    }
    for row in &mut out[n..] {
        *row = SrsRow::default();
    }
    n as u32
}

#[cfg(test)]
mod tests {
    use super::bilinear;

    #[test]
    fn positions_on_or_past_the_last_grid_line_are_invalid() {
        let gt = 13.0;
        // The case that stopped a Fashion-MNIST run: past the last line by rounding. Its weights
        // are ±1e-16 and may sum to a positive f64 (the old test kept the row).
        assert!(bilinear(gt + 1e-15, 4.5, gt).is_none());
        // Here the four weights (±1.6e-14·{0.9995, 0.0005}) sum to +1.6e-30 in f64, in the
        // order the row sum used to be taken: that row was kept, and the trainer's f32 check
        // rejected the batch.
        let (u, v): (f64, f64) = (13.000000000000016, 4.0005);
        let (fu, fv) = (u.floor(), v.floor());
        let (cu, cv) = ((fu + 1.0).min(gt), (fv + 1.0).min(gt));
        let old_sum =
            (cu - u) * (cv - v) + (cu - u) * (v - fv) + (u - fu) * (cv - v) + (u - fu) * (v - fv);
        assert!(old_sum > 0.0);
        assert!(bilinear(u, v, gt).is_none());
        assert!(bilinear(4.5, gt + 1e-15, gt).is_none());
        assert!(bilinear(gt, 4.5, gt).is_none());
        assert!(bilinear(4.5, gt, gt).is_none());
        // Just inside: a valid row whose f32 weights are non-negative and sum to 1.
        for (u, v) in [(gt - 1e-9, 4.25), (0.0, 0.0), (12.5, 12.999), (3.0, 7.75)] {
            let ([fu, fv, cu, cv], w) = bilinear(u, v, gt).expect("inside the grid");
            assert!(fu <= u && u <= cu && fv <= v && v <= cv && cu <= gt && cv <= gt);
            let w32 = w.map(|x| x as f32);
            assert!(w32.iter().all(|&x| x >= 0.0), "{w32:?}");
            let s: f32 = w32.iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{u} {v}: {w32:?}");
        }
        // A hand case: (2.25, 5.5) → corners (2, 5)…(3, 6), weights 0.375, 0.375, 0.125, 0.125.
        let (c, w) = bilinear(2.25, 5.5, gt).unwrap();
        assert_eq!(c, [2.0, 5.0, 3.0, 6.0]);
        assert_eq!(w, [0.375, 0.375, 0.125, 0.125]);
    }
}
