//! timm's RandAugment `rand-m9-mstd0.5-inc1` on RGB8 images (the linear probe's train
//! transform, udi-spec §5): 2 ops drawn with replacement from the 15 "increasing" ops, each
//! applied with probability 0.5 at magnitude N(9, 0.5) clipped to [0, 10] (of 10).
//!
//! Each op follows its PIL definition (lookup tables, `ImageEnhance` blends, affine warps with
//! the fill colour round(255 · mean)). One departure: the geometric ops always resample
//! bilinearly, where timm picks bilinear or bicubic at random.

use image::{Rgb, RgbImage};
use rand::Rng;

/// The ops of timm's `_RAND_INCREASING_TRANSFORMS`, in its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

pub const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

/// `rand-m9-mstd0.5-inc1`.
#[derive(Clone, Copy, Debug)]
pub struct RandAugment {
    pub layers: usize,
    pub magnitude: f64,
    pub magnitude_std: f64,
    pub prob: f64,
    /// Fill of the pixels a warp uncovers.
    pub fill: [u8; 3],
}

impl Default for RandAugment {
    fn default() -> Self {
        let m = crate::knn::MEAN;
        let fill = [0, 1, 2].map(|c| (255.0 * m[c]).round() as u8);
        Self {
            layers: 2,
            magnitude: 9.0,
            magnitude_std: 0.5,
            prob: 0.5,
            fill,
        }
    }
}

/// A standard normal draw (Box–Muller; u1 in (0, 1]).
pub fn gauss<R: Rng>(rng: &mut R) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// timm's `_randomly_negate`.
fn negate<R: Rng>(rng: &mut R, v: f64) -> f64 {
    if rng.random::<f64>() > 0.5 {
        -v
    } else {
        v
    }
}

impl RandAugment {
    pub fn apply<R: Rng>(&self, img: &RgbImage, rng: &mut R) -> RgbImage {
        let mut out = img.clone();
        for _ in 0..self.layers {
            let op = OPS[rng.random_range(0..OPS.len())];
            if rng.random::<f64>() > self.prob {
                continue;
            }
            let m = (self.magnitude + self.magnitude_std * gauss(rng)).clamp(0.0, 10.0);
            out = self.op(op, &out, m, rng);
        }
        out
    }

    /// One op at magnitude `m` ∈ [0, 10] (timm's level functions).
    pub fn op<R: Rng>(&self, op: Op, img: &RgbImage, m: f64, rng: &mut R) -> RgbImage {
        let l = m / 10.0;
        match op {
            Op::AutoContrast => per_channel_lut(img, autocontrast_lut),
            Op::Equalize => per_channel_lut(img, equalize_lut),
            Op::Invert => lut(img, |p| 255 - p),
            Op::Posterize => {
                let bits = 4 - (l * 4.0) as i32;
                if bits >= 8 {
                    return img.clone();
                }
                let mask = !((1u16 << (8 - bits.max(0))) - 1) as u8;
                lut(img, |p| p & mask)
            }
            Op::Solarize => {
                let t = 256 - (l * 256.0) as i32;
                lut(img, |p| if (p as i32) < t { p } else { 255 - p })
            }
            Op::SolarizeAdd => {
                let add = (l * 110.0) as i32;
                lut(img, |p| {
                    if p < 128 {
                        (p as i32 + add).min(255) as u8
                    } else {
                        p
                    }
                })
            }
            Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => {
                let factor = 1.0 + negate(rng, l * 0.9);
                let degenerate = match op {
                    Op::Color => grey(img),
                    Op::Contrast => {
                        let g = grey(img);
                        let n = (img.width() * img.height()) as f64;
                        let mean = g.pixels().map(|p| p[0] as f64).sum::<f64>() / n;
                        RgbImage::from_pixel(
                            img.width(),
                            img.height(),
                            Rgb([(mean + 0.5) as u8; 3]),
                        )
                    }
                    Op::Brightness => RgbImage::new(img.width(), img.height()),
                    _ => smooth(img),
                };
                blend(&degenerate, img, factor)
            }
            Op::Rotate => {
                let deg = negate(rng, l * 30.0);
                let (w, h) = (img.width() as f64, img.height() as f64);
                // PIL `rotate`: counter-clockwise about the centre, inverse map for the warp.
                let a = -deg.to_radians();
                let (c, s) = (a.cos(), a.sin());
                let (cx, cy) = (w / 2.0, h / 2.0);
                let m = [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy];
                self.affine(img, m)
            }
            Op::ShearX => self.affine(img, [1.0, negate(rng, l * 0.3), 0.0, 0.0, 1.0, 0.0]),
            Op::ShearY => self.affine(img, [1.0, 0.0, 0.0, negate(rng, l * 0.3), 1.0, 0.0]),
            Op::TranslateX => {
                let px = negate(rng, l * 0.45) * img.width() as f64;
                self.affine(img, [1.0, 0.0, px, 0.0, 1.0, 0.0])
            }
            Op::TranslateY => {
                let px = negate(rng, l * 0.45) * img.height() as f64;
                self.affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, px])
            }
        }
    }

    /// PIL `Image.transform(AFFINE, m)`: output pixel centre (x, y) reads the input at
    /// (m0·x + m1·y + m2, m3·x + m4·y + m5), bilinearly; outside the image → the fill colour.
    pub fn affine(&self, img: &RgbImage, m: [f64; 6]) -> RgbImage {
        let (w, h) = img.dimensions();
        RgbImage::from_fn(w, h, |x, y| {
            let (xc, yc) = (x as f64 + 0.5, y as f64 + 0.5);
            let u = m[0] * xc + m[1] * yc + m[2];
            let v = m[3] * xc + m[4] * yc + m[5];
            if u < 0.0 || v < 0.0 || u >= w as f64 || v >= h as f64 {
                return Rgb(self.fill);
            }
            bilinear(img, u - 0.5, v - 0.5)
        })
    }
}

/// Bilinear sample at pixel coordinates (x, y) (pixel centres at integers), edges clamped.
fn bilinear(img: &RgbImage, x: f64, y: f64) -> Rgb<u8> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |xi: i64, yi: i64| img.get_pixel(xi.clamp(0, w - 1) as u32, yi.clamp(0, h - 1) as u32);
    let (x0, y0) = (x0 as i64, y0 as i64);
    let (p00, p10, p01, p11) = (
        at(x0, y0),
        at(x0 + 1, y0),
        at(x0, y0 + 1),
        at(x0 + 1, y0 + 1),
    );
    Rgb([0, 1, 2].map(|c| {
        let top = p00[c] as f64 * (1.0 - fx) + p10[c] as f64 * fx;
        let bot = p01[c] as f64 * (1.0 - fx) + p11[c] as f64 * fx;
        (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8
    }))
}

fn lut(img: &RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    let table: Vec<u8> = (0..=255u8).map(f).collect();
    let mut out = img.clone();
    out.iter_mut().for_each(|p| *p = table[*p as usize]);
    out
}

/// A table per channel, built from that channel's histogram.
fn per_channel_lut(img: &RgbImage, build: fn(&[u64; 256]) -> [u8; 256]) -> RgbImage {
    let mut hist = [[0u64; 256]; 3];
    for p in img.pixels() {
        for c in 0..3 {
            hist[c][p[c] as usize] += 1;
        }
    }
    let tables = [build(&hist[0]), build(&hist[1]), build(&hist[2])];
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for c in 0..3 {
            p[c] = tables[c][p[c] as usize];
        }
    }
    out
}

/// PIL `ImageOps.autocontrast` (cutoff 0): the channel's [min, max] stretched to [0, 255].
pub fn autocontrast_lut(h: &[u64; 256]) -> [u8; 256] {
    let mut t = [0u8; 256];
    let lo = h.iter().position(|&n| n > 0);
    let hi = h.iter().rposition(|&n| n > 0);
    for (i, v) in t.iter_mut().enumerate() {
        *v = match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                ((i as f64 * scale - lo as f64 * scale) as i64).clamp(0, 255) as u8
            }
            _ => i as u8,
        };
    }
    t
}

/// PIL `ImageOps.equalize`.
pub fn equalize_lut(h: &[u64; 256]) -> [u8; 256] {
    let mut t = [0u8; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as u8;
    }
    let nonzero: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
    if nonzero.len() <= 1 {
        return t;
    }
    let step = (nonzero.iter().sum::<u64>() - nonzero[nonzero.len() - 1]) / 255;
    if step == 0 {
        return t;
    }
    let mut n = step / 2;
    for (i, v) in t.iter_mut().enumerate() {
        *v = (n / step).min(255) as u8;
        n += h[i];
    }
    t
}

/// PIL `convert("L").convert("RGB")`: ITU-R 601-2 luma, fixed point as PIL rounds it.
fn grey(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let l =
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8;
        *p = Rgb([l; 3]);
    }
    out
}

/// PIL `ImageFilter.SMOOTH` (3×3, centre 5, others 1, /13); the border pixels are kept.
fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let mut acc = [0u32; 3];
            for dy in 0..3 {
                for dx in 0..3 {
                    let k = if dx == 1 && dy == 1 { 5 } else { 1 };
                    let p = img.get_pixel(x + dx - 1, y + dy - 1);
                    for c in 0..3 {
                        acc[c] += k * p[c] as u32;
                    }
                }
            }
            out.put_pixel(x, y, Rgb(acc.map(|a| ((a as f64 / 13.0).round()) as u8)));
        }
    }
    out
}

/// PIL `Image.blend(degenerate, img, factor)`: degenerate + factor·(img − degenerate), clipped.
fn blend(degenerate: &RgbImage, img: &RgbImage, factor: f64) -> RgbImage {
    let mut out = img.clone();
    for (o, (&d, &i)) in out.iter_mut().zip(degenerate.iter().zip(img.iter())) {
        *o = (d as f64 + factor * (i as f64 - d as f64)).clamp(0.0, 255.0) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn tables_follow_their_pil_definitions() {
        // A channel with values 50..=100 once each: autocontrast maps 50 → 0 and 100 to
        // PIL's int(100 · 5.1 − 50 · 5.1) = int(254.99999999999997) = 254 (its float rounding).
        let mut h = [0u64; 256];
        (50..=100).for_each(|i| h[i] = 1);
        let t = autocontrast_lut(&h);
        assert_eq!((t[50], t[75], t[100], t[101]), (0, 127, 254, 255));
        // Equalize of 4 equally filled values 0, 1, 2, 3 (×255 each): step = 765/255 = 3,
        // PIL's table gives 0, 85, 170, 255 (n/step with n starting at step/2).
        let mut h = [0u64; 256];
        (0..4).for_each(|i| h[i] = 255);
        let t = equalize_lut(&h);
        assert_eq!(&t[..4], &[0, 85, 170, 255]);
        // A single value is left alone.
        let mut h = [0u64; 256];
        h[7] = 10;
        assert_eq!(equalize_lut(&h)[7], 7);
    }

    #[test]
    fn warps_move_pixels_as_their_matrices_say() {
        let ra = RandAugment::default();
        let img = RgbImage::from_fn(8, 6, |x, y| Rgb([(x * 30) as u8, (y * 40) as u8, 7]));
        // Translate by +2 px in x: output (x, y) reads input (x + 2, y); the last 2 columns
        // fall outside and take the fill colour.
        let t = ra.affine(&img, [1.0, 0.0, 2.0, 0.0, 1.0, 0.0]);
        assert_eq!(t.get_pixel(0, 3), img.get_pixel(2, 3));
        assert_eq!(t.get_pixel(5, 1), img.get_pixel(7, 1));
        assert_eq!(t.get_pixel(6, 1).0, ra.fill);
        // Rotation by 180°: a point reflection about the centre.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let r = ra.op(Op::Rotate, &img, 0.0, &mut rng);
        assert_eq!(r, img, "magnitude 0 rotates by 0°");
        let m = [-1.0, 0.0, 8.0, 0.0, -1.0, 6.0];
        let r = ra.affine(&img, m);
        assert_eq!(r.get_pixel(0, 0), img.get_pixel(7, 5));
        assert_eq!(r.get_pixel(3, 2), img.get_pixel(4, 3));
    }

    #[test]
    fn every_op_keeps_the_size_and_draws_are_reproducible() {
        // Irregular content within [40, 190): every op has something to change.
        let img = RgbImage::from_fn(20, 14, |x, y| {
            let h = (x * 7919 + y * 104_729) ^ (x * y * 31);
            Rgb([0, 1, 2].map(|c| 40 + ((h >> (3 * c)) % 150) as u8))
        });
        let ra = RandAugment::default();
        for op in OPS {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let out = ra.op(op, &img, 9.0, &mut rng);
            assert_eq!(out.dimensions(), img.dimensions(), "{op:?}");
            // Every op changes this image at magnitude 9.
            assert_ne!(out, img, "{op:?}");
        }
        let a = ra.apply(&img, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
        let b = ra.apply(&img, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
        assert_eq!(a, b);
    }
}
