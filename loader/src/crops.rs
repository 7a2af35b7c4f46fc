//! Crop geometry of udi-spec §1.3: random-resized-crop, the overlap-constrained crop, the
//! reference box of the local crops, and the whole 2 + L crop layout of one image.
//!
//! Boxes are kept in integer pixel units ([`PixBox`]): the official signed normalised box is
//! `pixel / (H−1)`, and every place the official code rounds it back (`round(r·(H−1))`) recovers
//! these integers exactly, so working in pixels is the exact arithmetic of the float code.

use rand::Rng;
use shared::config::AugmentConfig;
use shared::geometry::CropMeta;

/// Python's `round` on floats: half to even.
pub fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// A crop as drawn before any flip: top row, left column, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub i: i64,
    pub j: i64,
    pub h: i64,
    pub w: i64,
}

/// The signed box in pixel units: (first row, first col, last row, last col), columns swapped
/// when flipped (so `c0 > c1` marks a flip when the crop is wider than one pixel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixBox {
    pub r0: i64,
    pub c0: i64,
    pub r1: i64,
    pub c1: i64,
}

impl PixBox {
    pub fn of(meta: &CropMeta) -> Self {
        let (t, l) = (meta.top as i64, meta.left as i64);
        let (b, r) = (t + meta.h as i64 - 1, l + meta.w as i64 - 1);
        if meta.hflip != 0 {
            PixBox {
                r0: t,
                c0: r,
                r1: b,
                c1: l,
            }
        } else {
            PixBox {
                r0: t,
                c0: l,
                r1: b,
                c1: r,
            }
        }
    }

    /// Step 1 of get_params_ref: sort each axis to (min, max).
    pub fn unflipped(&self) -> PixBox {
        PixBox {
            r0: self.r0.min(self.r1),
            c0: self.c0.min(self.c1),
            r1: self.r0.max(self.r1),
            c1: self.c0.max(self.c1),
        }
    }
}

/// The image size and the sampling ranges of one crop kind.
#[derive(Clone, Copy, Debug)]
pub struct CropSampler {
    pub height: i64,
    pub width: i64,
    pub scale: [f64; 2],
    pub ratio: [f64; 2],
    /// D4: use `j` (true) or the official typo `i` (false) in the horizontal span.
    pub fix_overlap_typo: bool,
}

impl CropSampler {
    /// torchvision `RandomResizedCrop.get_params`: 10 attempts, then the centre fallback.
    pub fn plain<R: Rng>(&self, rng: &mut R) -> Rect {
        let (hh, ww) = (self.height, self.width);
        let area = (hh * ww) as f64;
        let (lr0, lr1) = (self.ratio[0].ln(), self.ratio[1].ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale[0], self.scale[1]);
            let aspect = uniform(rng, lr0, lr1).exp();
            let w = py_round((target_area * aspect).sqrt()) as i64;
            let h = py_round((target_area / aspect).sqrt()) as i64;
            if 0 < w && w <= ww && 0 < h && h <= hh {
                let i = rng.random_range(0..=hh - h);
                let j = rng.random_range(0..=ww - w);
                return Rect { i, j, h, w };
            }
        }
        self.centre_fallback()
    }

    pub fn centre_fallback(&self) -> Rect {
        let (hh, ww) = (self.height, self.width);
        let in_ratio = ww as f64 / hh as f64;
        let (rmin, rmax) = (
            self.ratio[0].min(self.ratio[1]),
            self.ratio[0].max(self.ratio[1]),
        );
        let (h, w) = if in_ratio < rmin {
            (py_round(ww as f64 / rmin) as i64, ww)
        } else if in_ratio > rmax {
            (hh, py_round(hh as f64 * rmax) as i64)
        } else {
            (hh, ww)
        };
        // Rounding can overshoot by one on tiny images; keep the crop inside.
        let (h, w) = (h.clamp(1, hh), w.clamp(1, ww));
        Rect {
            i: (hh - h).div_euclid(2),
            j: (ww - w).div_euclid(2),
            h,
            w,
        }
    }

    /// `get_params_ref`: a plain crop moved toward the reference box so that both axes overlap
    /// by about half of the shorter side (udi-spec §1.3 steps 1–9).
    pub fn constrained<R: Rng>(&self, rng: &mut R, reference: PixBox) -> Rect {
        let r = reference.unflipped();
        let (a0, b0, a1, b1) = (r.r0, r.c0, r.r1, r.c1);
        let (rh, rw) = (a1 - a0, b1 - b0);
        let (rci, rcj) = ((a0 + a1) as f64 / 2.0, (b0 + b1) as f64 / 2.0);

        let Rect { mut i, mut j, h, w } = self.plain(rng);
        let (ii, jj) = (i + h - 1, j + w - 1);
        let (ci, cj) = ((i + ii) as f64 / 2.0, (j + jj) as f64 / 2.0);
        let span_i = ii.max(a1) - i.min(a0);
        // D4: the official code uses the row index here (`min(i, b0)`).
        let left = if self.fix_overlap_typo { j } else { i };
        let span_j = jj.max(b1) - left.min(b0);

        let shift_i = overlap_shift(span_i, h, rh);
        let shift_j = overlap_shift(span_j, w, rw);
        i += py_round((rci - ci) / ((rci - ci).abs() + 1e-5) * shift_i) as i64;
        j += py_round((rcj - cj) / ((rcj - cj).abs() + 1e-5) * shift_j) as i64;

        if i + h > self.height {
            i = self.height - h;
        }
        if i < 0 {
            i = 0;
        }
        if j + w > self.width {
            j = self.width - w;
        }
        if j < 0 {
            j = 0;
        }
        Rect { i, j, h, w }
    }
}

/// Steps 5–6: the gap to close plus the half-overlap top-up, along one axis.
fn overlap_shift(span: i64, size: i64, ref_size: i64) -> f64 {
    let mut shift = if span > size + ref_size {
        (span - size - ref_size) as f64
    } else {
        0.0
    };
    let m = ref_size.min(size) as f64;
    if span as f64 >= (size + ref_size) as f64 - 0.5 * m {
        shift += 0.5 * m;
    }
    shift
}

/// U[lo, hi) as torch's `uniform_` draws it.
pub fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// The reference box of the local crops (`_crop_intersection`, D3): elementwise
/// (min, min, max, max) of the two *signed* global boxes — the official behaviour — or, with
/// `true_intersection`, the intersection of the un-flipped boxes. An empty intersection (only
/// possible with the D4 typo) comes out inverted and is re-sorted by `unflipped()`, which then
/// spans the gap between the two views.
pub fn local_reference(g0: PixBox, g1: PixBox, true_intersection: bool) -> PixBox {
    if true_intersection {
        let (a, b) = (g0.unflipped(), g1.unflipped());
        PixBox {
            r0: a.r0.max(b.r0),
            c0: a.c0.max(b.c0),
            r1: a.r1.min(b.r1),
            c1: a.c1.min(b.c1),
        }
    } else {
        PixBox {
            r0: g0.r0.min(g1.r0),
            c0: g0.c0.min(g1.c0),
            r1: g0.r1.max(g1.r1),
            c1: g0.c1.max(g1.c1),
        }
    }
}

fn meta(height: i64, width: i64, r: Rect, hflip: bool) -> CropMeta {
    CropMeta {
        img_h: height as u32,
        img_w: width as u32,
        top: r.i as u32,
        left: r.j as u32,
        h: r.h as u32,
        w: r.w as u32,
        hflip: hflip as u32,
    }
}

/// Draws the 2 + L crops of one image in the official order: view 0 (plain), its flip; view 1
/// (constrained to view 0's signed box), its flip; then per local: constrained crop w.r.t. the
/// reference box, its flip. `torch.rand(1) < p` is the flip test.
pub fn sample_crops<R: Rng>(
    aug: &AugmentConfig,
    height: u32,
    width: u32,
    rng: &mut R,
) -> Vec<CropMeta> {
    let (hh, ww) = (height as i64, width as i64);
    let global = CropSampler {
        height: hh,
        width: ww,
        scale: aug.global_scale,
        ratio: aug.ratio,
        fix_overlap_typo: aug.fix_overlap_typo,
    };
    let local = CropSampler {
        scale: aug.local_scale,
        ..global
    };
    let mut out = Vec::with_capacity(2 + aug.n_local as usize);

    let r0 = global.plain(rng);
    let f0 = rng.random::<f64>() < aug.hflip_p;
    out.push(meta(hh, ww, r0, f0));
    let r1 = global.constrained(rng, PixBox::of(&out[0]));
    let f1 = rng.random::<f64>() < aug.hflip_p;
    out.push(meta(hh, ww, r1, f1));

    let reference = local_reference(
        PixBox::of(&out[0]),
        PixBox::of(&out[1]),
        aug.true_intersection,
    );
    for _ in 0..aug.n_local {
        let r = local.constrained(rng, reference);
        let f = aug.local_hflip && rng.random::<f64>() < aug.hflip_p;
        out.push(meta(hh, ww, r, f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!(py_round(0.5), 0.0);
        assert_eq!(py_round(1.5), 2.0);
        assert_eq!(py_round(2.5), 2.0);
        assert_eq!(py_round(-0.5), 0.0);
        assert_eq!(py_round(-1.5), -2.0);
    }

    #[test]
    fn overlap_shift_hand_cases() {
        // Disjoint by 10 px: close the gap (10) and top up by half the shorter side (20).
        assert_eq!(overlap_shift(110, 40, 60), 10.0 + 20.0);
        // Heavy overlap: span 70 < 100 − 20, no shift.
        assert_eq!(overlap_shift(70, 40, 60), 0.0);
        // Touching at the threshold: span = 100 − 20 → top-up only.
        assert_eq!(overlap_shift(80, 40, 60), 20.0);
    }
}
