//! Photometric augmentation of udi-spec §1.4 on uint8 RGB crops, with PIL/torchvision semantics.
//!
//! * Brightness / contrast / saturation are `Image.blend(degenerate, img, factor)`: computed in
//!   f32 as `in1 + α·(in2 − in1)`, truncated, clipped to [0, 255] (Pillow `Blend.c`).
//! * Luma is Pillow's `rgb2l`: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`, i.e. 299/587/114
//!   with rounding.
//! * Hue goes through Pillow's `rgb2hsv`/`hsv2rgb` (same float/double mix) and adds
//!   `uint8(trunc(hue·255))` to H with uint8 wrap-around, like torchvision's numpy code.
//! * Gaussian blur is Pillow's `GaussianBlur(radius=σ)`: three extended box blurs per axis with
//!   the fractional box radius of Gwosdek et al., 24-bit fixed-point weights, rounding to uint8
//!   after each pass, edge pixels repeated (`BoxBlur.c`). Reproduced operation for operation.
//! * Solarise: values ≥ 128 become 255 − v.

use rand::seq::SliceRandom;
use rand::Rng;
use shared::config::AugmentConfig;

use crate::crops::uniform;

/// The four ColorJitter ops, in torchvision's `fn_idx` numbering.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum JitterOp {
    Brightness(f32),
    Contrast(f32),
    Saturation(f32),
    Hue(f32),
}

/// Every random decision of one crop's photometric pipeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhotoParams {
    /// Colour-jitter ops in application order (empty when the jitter did not fire).
    pub jitter: Vec<JitterOp>,
    pub grayscale: bool,
    /// Gaussian blur radius (σ), if the blur fires.
    pub blur: Option<f32>,
    pub solarize: bool,
}

impl PhotoParams {
    /// Draws the pipeline in torchvision/DINO order: RandomApply(ColorJitter) → RandomGrayscale
    /// → the three-way blur/solarise selector.
    pub fn draw<R: Rng>(aug: &AugmentConfig, rng: &mut R) -> Self {
        let mut p = PhotoParams::default();
        // RandomApply: skipped iff p < rand.
        if rng.random::<f64>() <= aug.jitter_p {
            let mut order = [0u8, 1, 2, 3];
            order.shuffle(rng);
            let b = uniform(rng, (1.0 - aug.brightness).max(0.0), 1.0 + aug.brightness) as f32;
            let c = uniform(rng, (1.0 - aug.contrast).max(0.0), 1.0 + aug.contrast) as f32;
            let s = uniform(rng, (1.0 - aug.saturation).max(0.0), 1.0 + aug.saturation) as f32;
            let h = uniform(rng, -aug.hue, aug.hue) as f32;
            for op in order {
                p.jitter.push(match op {
                    0 => JitterOp::Brightness(b),
                    1 => JitterOp::Contrast(c),
                    2 => JitterOp::Saturation(s),
                    _ => JitterOp::Hue(h),
                });
            }
        }
        p.grayscale = rng.random::<f64>() < aug.grayscale_p;
        let mut blur_p = aug.blur_p_global2;
        let mut solarize_p = 0.0;
        if rng.random::<f64>() < 0.5 {
            blur_p = if rng.random::<f64>() < 0.5 {
                aug.blur_p_local
            } else {
                aug.blur_p_global1
            };
        } else {
            solarize_p = aug.solarize_p;
        }
        // DINO's GaussianBlur fires when random() <= p.
        if rng.random::<f64>() <= blur_p {
            p.blur = Some(uniform(rng, aug.blur_sigma[0], aug.blur_sigma[1]) as f32);
        }
        if solarize_p > 0.0 {
            p.solarize = rng.random::<f64>() < solarize_p;
        }
        p
    }

    /// Applies the pipeline in place to an RGB crop of `w × h`; `scratch` is reused.
    pub fn apply(&self, img: &mut [u8], w: usize, h: usize, scratch: &mut Vec<u8>) {
        for op in &self.jitter {
            match *op {
                JitterOp::Brightness(f) => brightness(img, f),
                JitterOp::Contrast(f) => contrast(img, f),
                JitterOp::Saturation(f) => saturation(img, f),
                JitterOp::Hue(f) => hue(img, f),
            }
        }
        if self.grayscale {
            grayscale(img);
        }
        if let Some(sigma) = self.blur {
            gaussian_blur(img, w, h, sigma, scratch);
        }
        if self.solarize {
            solarize(img);
        }
    }
}

/// Pillow `rgb2l`.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Pillow `ImagingBlend` for one value: `in1 + α(in2 − in1)` in f32, truncated and clipped.
#[inline]
pub fn blend(in1: u8, in2: u8, alpha: f32) -> u8 {
    let t = in1 as i32 as f32 + alpha * ((in2 as i32 - in1 as i32) as f32);
    // Same as Pillow's `<= 0 → 0, >= 255 → 255, else truncate`, without branches.
    t.clamp(0.0, 255.0) as u8
}

fn apply_lut(img: &mut [u8], lut: &[u8; 256]) {
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// `ImageEnhance.Brightness`: blend with black.
pub fn brightness(img: &mut [u8], factor: f32) {
    let lut: [u8; 256] = std::array::from_fn(|v| blend(0, v as u8, factor));
    apply_lut(img, &lut);
}

/// `ImageEnhance.Contrast`: blend with the uniform image at `int(mean(L) + 0.5)`.
pub fn contrast(img: &mut [u8], factor: f32) {
    let mut hist = [0u64; 256];
    for px in img.chunks_exact(3) {
        hist[luma(px[0], px[1], px[2]) as usize] += 1;
    }
    let n: u64 = hist.iter().sum();
    let sum: u64 = hist.iter().enumerate().map(|(i, c)| i as u64 * c).sum();
    let mean = (sum as f64 / n.max(1) as f64 + 0.5) as u8;
    let lut: [u8; 256] = std::array::from_fn(|v| blend(mean, v as u8, factor));
    apply_lut(img, &lut);
}

/// `ImageEnhance.Color`: blend with the luma image converted back to RGB.
pub fn saturation(img: &mut [u8], factor: f32) {
    for px in img.chunks_exact_mut(3) {
        let l = luma(px[0], px[1], px[2]);
        for v in px.iter_mut() {
            *v = blend(l, *v, factor);
        }
    }
}

/// Pillow `rgb2hsv_row`: (h, s, v) in uint8.
#[inline]
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    // `2.0 + rc - bc` is evaluated in double and stored to float h.
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    // fmod(h/6 + 1, 1): the argument lies in [5/6, 11/6), where fmod is one exact subtraction.
    let x = h as f64 / 6.0 + 1.0;
    let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
    let uh = ((h as f64 * 255.0) as i32).clamp(0, 255) as u8;
    let us = ((s as f64 * 255.0) as i32).clamp(0, 255) as u8;
    (uh, us, maxc)
}

/// C `round`: half away from zero.
#[inline]
fn c_round(x: f64) -> i32 {
    // Half away from zero for x >= 0 (all callers), without a libm call: x − trunc(x) is exact.
    let t = x as i32;
    t + ((x - t as f64) >= 0.5) as i32
}

/// Pillow `hsv2rgb`.
#[inline]
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let hx = h as f32 as f64 * 6.0 / 255.0;
    let i = hx as i32; // hx >= 0: truncation is floor
    let f = (hx - i as f32 as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let p = c_round(vf * (1.0 - fs as f64)).clamp(0, 255) as u8;
    let q = c_round(vf * (1.0 - (fs * f) as f64)).clamp(0, 255) as u8;
    let t = c_round(vf * (1.0 - fs as f64 * (1.0 - f as f64))).clamp(0, 255) as u8;
    match i % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Lookup tables for [`rgb_to_hsv`] without per-pixel divisions. Pillow's float expressions
/// depend only on `cr = max − min`, on which channel is the max and which the min, and on the
/// remaining difference `d = max − mid`; the tables hold Pillow's exact results per key.
struct HsvTables {
    /// `[case][cr][d]` → uh, case = 2·(max channel) + (min is the later of the other two).
    hue: Vec<u8>,
    /// `[max][cr]` → us.
    sat: Vec<u8>,
}

fn hsv_tables() -> &'static HsvTables {
    static T: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut hue = vec![0u8; 6 * 256 * 256];
        for case in 0..6usize {
            for cr in 1..256usize {
                for d in 0..=cr {
                    let (mx, mn, mid) = (cr as u8, 0u8, (cr - d) as u8);
                    let rgb = match case {
                        0 => (mx, mn, mid), // r max, g min
                        1 => (mx, mid, mn), // r max, b min
                        2 => (mn, mx, mid), // g max, r min
                        3 => (mid, mx, mn), // g max, b min
                        4 => (mn, mid, mx), // b max, r min
                        _ => (mid, mn, mx), // b max, g min
                    };
                    hue[(case * 256 + cr) * 256 + d] = rgb_to_hsv(rgb.0, rgb.1, rgb.2).0;
                }
            }
        }
        let mut sat = vec![0u8; 256 * 256];
        for mx in 1..256usize {
            for cr in 0..=mx {
                sat[mx * 256 + cr] = ((cr as f32 / mx as f32) as f64 * 255.0) as u8;
            }
        }
        HsvTables { hue, sat }
    })
}

/// [`rgb_to_hsv`] through the tables (bit-identical; checked by a test over all cases).
#[inline]
pub fn rgb_to_hsv_fast(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let t = hsv_tables();
    let mx = r.max(g).max(b);
    let mn = r.min(g).min(b);
    if mx == mn {
        return (0, 0, mx);
    }
    let cr = (mx - mn) as usize;
    // Pillow tests r == max first, then g; ties between the other two do not change the value.
    let (case, mid) = if r == mx {
        if g == mn {
            (0, b)
        } else {
            (1, g)
        }
    } else if g == mx {
        if r == mn {
            (2, b)
        } else {
            (3, r)
        }
    } else if r == mn {
        (4, g)
    } else {
        (5, r)
    };
    let d = (mx - mid) as usize;
    (
        t.hue[(case * 256 + cr) * 256 + d],
        t.sat[mx as usize * 256 + cr],
        mx,
    )
}

/// torchvision `adjust_hue` on PIL: H += uint8(hue·255) with wrap-around.
pub fn hue(img: &mut [u8], factor: f32) {
    // numpy's float → uint8 cast truncates toward zero then wraps.
    let shift = ((factor as f64 * 255.0) as i32) as u8;
    // Even with shift 0 PIL round-trips through HSV, which is not the identity: always do it.
    for px in img.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv_fast(px[0], px[1], px[2]);
        let (r, g, b) = hsv_to_rgb(h.wrapping_add(shift), s, v);
        px[0] = r;
        px[1] = g;
        px[2] = b;
    }
}

/// torchvision `rgb_to_grayscale(num_output_channels=3)`.
pub fn grayscale(img: &mut [u8]) {
    for px in img.chunks_exact_mut(3) {
        let l = luma(px[0], px[1], px[2]);
        px.fill(l);
    }
}

/// DINO's `Solarization` = `ImageOps.solarize(img, 128)`.
pub fn solarize(img: &mut [u8]) {
    for v in img.iter_mut() {
        if *v >= 128 {
            *v = 255 - *v;
        }
    }
}

/// Pillow `_gaussian_blur_radius`: the fractional box radius for `passes` box blurs (f32/f64 mix
/// as in the C code).
pub fn box_radius(sigma: f32, passes: i32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// Fixed-point weights of one extended box pass: `ww` for the 2r+1 inner taps, `fw` for the two
/// fractional outer taps (Pillow `ImagingHorizontalBoxBlur`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoxWeights {
    pub radius: usize,
    pub ww: u32,
    pub fw: u32,
}

impl BoxWeights {
    pub fn new(float_radius: f32) -> Self {
        let radius = float_radius as i32;
        let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
        let fw = ((1u32 << 24) - (radius as u32 * 2 + 1) * ww) / 2;
        Self {
            radius: radius as usize,
            ww,
            fw,
        }
    }
}

/// One box pass along rows (`horizontal`) or columns, `src` → `dst`, edges repeated.
/// `pad` is scratch for one edge-extended row.
fn box_pass(
    src: &[u8],
    dst: &mut [u8],
    w: usize,
    h: usize,
    bw: BoxWeights,
    horizontal: bool,
    pad: &mut Vec<u32>,
) {
    let r = bw.radius;
    let (ww, fw) = (bw.ww, bw.fw);
    if horizontal {
        // Row extended by r+1 repeated pixels on the left and r+2 on the right; padded index
        // of pixel x is x + r + 1.
        let ext = w + 2 * r + 3;
        pad.resize(ext * 3, 0);
        for y in 0..h {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            let out = &mut dst[y * w * 3..(y + 1) * w * 3];
            for (k, p) in pad.chunks_exact_mut(3).enumerate() {
                let x = k.saturating_sub(r + 1).min(w - 1);
                p[0] = row[x * 3] as u32;
                p[1] = row[x * 3 + 1] as u32;
                p[2] = row[x * 3 + 2] as u32;
            }
            // Window centred on pixel −1: padded indices 0 ..= 2r.
            let mut acc = [0u32; 3];
            for k in 0..=2 * r {
                for c in 0..3 {
                    acc[c] += pad[k * 3 + c];
                }
            }
            for x in 0..w {
                // Pixel x: window padded [x+1, x+2r+1]; far taps x and x+2r+2.
                let (sub, add, far) = (x * 3, (x + 2 * r + 1) * 3, (x + 2 * r + 2) * 3);
                for c in 0..3 {
                    acc[c] = acc[c] + pad[add + c] - pad[sub + c];
                    let bulk = acc[c] * ww + (pad[sub + c] + pad[far + c]) * fw;
                    out[x * 3 + c] = ((bulk + (1 << 23)) >> 24) as u8;
                }
            }
        }
    } else {
        let last = h as isize - 1;
        let r = r as isize;
        let stride = w * 3;
        let rowf = |y: isize| y.clamp(0, last) as usize * stride;
        pad.clear();
        pad.resize(stride, 0);
        let acc = pad;
        for k in -r - 1..r {
            let o = rowf(k);
            for (a, &v) in acc.iter_mut().zip(&src[o..o + stride]) {
                *a += v as u32;
            }
        }
        for y in 0..h as isize {
            let add = &src[rowf(y + r)..][..stride];
            let sub = &src[rowf(y - r - 1)..][..stride];
            let far = &src[rowf(y + r + 1)..][..stride];
            let out = &mut dst[y as usize * stride..(y as usize + 1) * stride];
            for x in 0..stride {
                let a = acc[x] + add[x] as u32 - sub[x] as u32;
                acc[x] = a;
                let bulk = a * ww + (sub[x] as u32 + far[x] as u32) * fw;
                out[x] = ((bulk + (1 << 23)) >> 24) as u8;
            }
        }
    }
}

/// Pillow `GaussianBlur(radius = sigma)` on an RGB image of `w × h`, in place.
pub fn gaussian_blur(img: &mut [u8], w: usize, h: usize, sigma: f32, scratch: &mut Vec<u8>) {
    let fr = box_radius(sigma, 3);
    if fr == 0.0 || w == 0 || h == 0 {
        return;
    }
    let bw = BoxWeights::new(fr);
    scratch.resize(img.len(), 0);
    let mut pad = Vec::new();
    // 3 horizontal passes, then 3 vertical ones, ping-ponging; six passes end back in `img`.
    for (k, horizontal) in [true, true, true, false, false, false]
        .into_iter()
        .enumerate()
    {
        if k % 2 == 0 {
            box_pass(img, scratch, w, h, bw, horizontal, &mut pad);
        } else {
            box_pass(scratch, img, w, h, bw, horizontal, &mut pad);
        }
    }
}
