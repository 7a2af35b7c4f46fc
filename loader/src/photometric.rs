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

use shared::geometry::PhotoRecord;

use crate::crops::uniform;
use crate::fused::apply_fused;
pub use crate::fused::PhotoScratch;

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

    /// The batch record of these decisions (applied on the trainer's device when
    /// `[augment] photometric = "device"`).
    pub fn record(&self) -> PhotoRecord {
        let mut r = PhotoRecord::default();
        if !self.jitter.is_empty() {
            r.flags |= PhotoRecord::JITTER;
        }
        for (slot, op) in self.jitter.iter().enumerate() {
            r.order[slot] = match *op {
                JitterOp::Brightness(f) => {
                    r.brightness = f;
                    PhotoRecord::BRIGHTNESS
                }
                JitterOp::Contrast(f) => {
                    r.contrast = f;
                    PhotoRecord::CONTRAST
                }
                JitterOp::Saturation(f) => {
                    r.saturation = f;
                    PhotoRecord::SATURATION
                }
                JitterOp::Hue(f) => {
                    r.hue = f;
                    PhotoRecord::HUE
                }
            };
        }
        if self.grayscale {
            r.flags |= PhotoRecord::GRAYSCALE;
        }
        if let Some(sigma) = self.blur {
            r.flags |= PhotoRecord::BLUR;
            r.blur_sigma = sigma;
        }
        if self.solarize {
            r.flags |= PhotoRecord::SOLARIZE;
        }
        r
    }

    /// The decisions of a batch record (inverse of [`Self::record`]).
    pub fn from_record(r: &PhotoRecord) -> Self {
        let jitter = if r.has(PhotoRecord::JITTER) {
            r.order
                .iter()
                .map(|&op| match op {
                    PhotoRecord::BRIGHTNESS => JitterOp::Brightness(r.brightness),
                    PhotoRecord::CONTRAST => JitterOp::Contrast(r.contrast),
                    PhotoRecord::SATURATION => JitterOp::Saturation(r.saturation),
                    _ => JitterOp::Hue(r.hue),
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            jitter,
            grayscale: r.has(PhotoRecord::GRAYSCALE),
            blur: r.has(PhotoRecord::BLUR).then_some(r.blur_sigma),
            solarize: r.has(PhotoRecord::SOLARIZE),
        }
    }

    /// Applies the pipeline in place to an RGB crop of `w × h` (fused passes, see
    /// [`crate::fused`]); bit-identical to [`Self::apply_reference`].
    pub fn apply(&self, img: &mut [u8], w: usize, h: usize, scratch: &mut PhotoScratch) {
        apply_fused(self, img, w, h, false, scratch);
    }

    /// Mirrors the crop horizontally when `flip`, then [`Self::apply`] (the mirror is folded into
    /// the first pass).
    pub fn apply_flipped(
        &self,
        img: &mut [u8],
        w: usize,
        h: usize,
        flip: bool,
        scratch: &mut PhotoScratch,
    ) {
        apply_fused(self, img, w, h, flip, scratch);
    }

    /// The reference: one op after the other over the whole crop, as torchvision/PIL do.
    pub fn apply_reference(&self, img: &mut [u8], w: usize, h: usize, scratch: &mut Vec<u8>) {
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
#[allow(clippy::manual_clamp)] // `clamp` keeps NaN; `max`/`min` map it to 0 (see below)
pub fn blend(in1: u8, in2: u8, alpha: f32) -> u8 {
    let t = in1 as i32 as f32 + alpha * ((in2 as i32 - in1 as i32) as f32);
    // Same as Pillow's `<= 0 → 0, >= 255 → 255, else truncate`, without branches. `max`/`min`
    // also map NaN to 0, so the value is always in [0, 255]; the unchecked truncation
    // vectorises (`cvttps2dq`) where the saturating `as u8` does not.
    let c = t.max(0.0).min(255.0);
    // SAFETY: `c` is finite and in [0, 255].
    unsafe { c.to_int_unchecked::<i32>() as u8 }
}

fn apply_lut(img: &mut [u8], lut: &[u8; 256]) {
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// `ImageEnhance.Brightness`: blend with black.
pub fn brightness(img: &mut [u8], factor: f32) {
    apply_lut(img, &brightness_lut(factor));
}

/// The per-value table of [`brightness`].
pub fn brightness_lut(factor: f32) -> [u8; 256] {
    std::array::from_fn(|v| blend(0, v as u8, factor))
}

/// `int(mean(L) + 0.5)` from Σ luma over `n` pixels (Pillow's `ImageStat` mean).
pub fn contrast_mean(luma_sum: u64, n: u64) -> u8 {
    (luma_sum as f64 / n.max(1) as f64 + 0.5) as u8
}

/// `ImageEnhance.Contrast`: blend with the uniform image at `int(mean(L) + 0.5)`.
pub fn contrast(img: &mut [u8], factor: f32) {
    // Σ luma directly (the same integer as Σ i·hist[i]); u32 per pixel is exact.
    let n = (img.len() / 3) as u64;
    let sum: u64 = img
        .chunks_exact(3)
        .map(|px| luma(px[0], px[1], px[2]) as u64)
        .sum();
    let mean = contrast_mean(sum, n);
    let lut: [u8; 256] = std::array::from_fn(|v| blend(mean, v as u8, factor));
    apply_lut(img, &lut);
}

/// `ImageEnhance.Color`: blend with the luma image converted back to RGB.
pub fn saturation(img: &mut [u8], factor: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::Simd::detect() >= crate::simd::Simd::Avx2 {
        // SAFETY: the CPU supports AVX2 (checked above).
        unsafe { saturation_avx2(img, factor) };
        return;
    }
    saturation_blocks(img, factor);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn saturation_avx2(img: &mut [u8], factor: f32) {
    saturation_blocks(img, factor)
}

/// Lumas of a block first, then the per-byte blend over a flat array (vectorises).
#[inline(always)]
fn saturation_blocks(img: &mut [u8], factor: f32) {
    const B: usize = 64;
    let mut l3 = [0u8; 3 * B];
    for chunk in img.chunks_mut(3 * B) {
        for (px, l) in chunk.chunks_exact(3).zip(l3.chunks_exact_mut(3)) {
            l.fill(luma(px[0], px[1], px[2]));
        }
        for (v, &l) in chunk.iter_mut().zip(&l3) {
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
///
/// Both tables end with 3 spare bytes, so that a SIMD gather may read a 4-byte word at any
/// entry.
pub(crate) struct HsvTables {
    /// `[case][cr][d]` → uh, case = 2·(max channel) + (min is the later of the other two).
    pub(crate) hue: Vec<u8>,
    /// `[max][cr]` → us.
    pub(crate) sat: Vec<u8>,
}

pub(crate) fn hsv_tables() -> &'static HsvTables {
    static T: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut hue = vec![0u8; 6 * 256 * 256 + 3];
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
        let mut sat = vec![0u8; 256 * 256 + 3];
        for mx in 1..256usize {
            for cr in 0..=mx {
                sat[mx * 256 + cr] = ((cr as f32 / mx as f32) as f64 * 255.0) as u8;
            }
        }
        HsvTables { hue, sat }
    })
}

/// [`rgb_to_hsv`] through the tables (bit-identical; checked by a test over all 2^24 inputs).
/// Branch-free: natural images make the max/min channel unpredictable.
#[inline]
pub fn rgb_to_hsv_fast(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    rgb_to_hsv_tab(hsv_tables(), r, g, b)
}

#[inline(always)]
fn rgb_to_hsv_tab(t: &HsvTables, r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let mx = r.max(g).max(b);
    let mn = r.min(g).min(b);
    let cr = (mx - mn) as usize;
    // Pillow tests r == max first, then g; ties between the other two do not change the value.
    // Grays (cr = 0) read the zeroed `hue[case][0][0]` and `sat[mx][0]` = 0, Pillow's (0, 0, v).
    let r_max = r == mx;
    let g_max = !r_max & (g == mx);
    let max_ch = (!r_max) as usize * (1 + (!g_max) as usize);
    let min_first = if r_max { g == mn } else { r == mn };
    let case = 2 * max_ch + (!min_first) as usize;
    let mid = r as usize + g as usize + b as usize - mx as usize - mn as usize;
    let d = mx as usize - mid;
    (
        t.hue[(case * 256 + cr) * 256 + d],
        t.sat[mx as usize * 256 + cr],
        mx,
    )
}

/// Indices into `[v, t, p, q]` per `hsv2rgb` sector, as in Pillow's switch.
pub const HSV_PICK: [[u8; 3]; 6] = [
    [0, 1, 2],
    [3, 0, 2],
    [2, 0, 1],
    [2, 3, 0],
    [1, 2, 0],
    [0, 2, 3],
];

/// Per-`h` and per-`s` values of Pillow's `hsv2rgb` (`i = floor(6h/255) % 6`, `f`, `fs`), so
/// the per-pixel work has no division and no branch.
pub(crate) struct RgbTables {
    sector: [u8; 256],
    pub(crate) f: [f32; 256],
    fs: [f32; 256],
}

pub(crate) fn rgb_tables() -> &'static RgbTables {
    static T: std::sync::OnceLock<RgbTables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = RgbTables {
            sector: [0; 256],
            f: [0.0; 256],
            fs: [0.0; 256],
        };
        for x in 0..256usize {
            // The exact expressions of `hsv_to_rgb`.
            let hx = x as u8 as f32 as f64 * 6.0 / 255.0;
            let i = hx as i32;
            t.f[x] = (hx - i as f32 as f64) as f32;
            t.sector[x] = (i % 6) as u8;
            t.fs[x] = (x as u8 as f32 as f64 / 255.0) as f32;
        }
        t
    })
}

/// [`hsv_to_rgb`] with tabulated `i`, `f`, `fs` and a branch-free sector select
/// (bit-identical; checked by a test over all 2^24 inputs). With `s = 0`, `p = q = t = v`, so
/// Pillow's gray shortcut needs no branch either.
#[inline]
pub fn hsv_to_rgb_fast(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let tb = rgb_tables();
    let f = tb.f[h as usize];
    let fs = tb.fs[s as usize];
    let vf = v as f64;
    let p = c_round(vf * (1.0 - fs as f64)).clamp(0, 255) as u8;
    let q = c_round(vf * (1.0 - (fs * f) as f64)).clamp(0, 255) as u8;
    let t = c_round(vf * (1.0 - fs as f64 * (1.0 - f as f64))).clamp(0, 255) as u8;
    let vals = [v, t, p, q];
    let k = &HSV_PICK[tb.sector[h as usize] as usize];
    (
        vals[k[0] as usize & 3],
        vals[k[1] as usize & 3],
        vals[k[2] as usize & 3],
    )
}

/// The uint8 added to H for a hue factor: numpy's float → uint8 cast truncates toward zero,
/// then wraps.
pub fn hue_shift(factor: f32) -> u8 {
    ((factor as f64 * 255.0) as i32) as u8
}

/// torchvision `adjust_hue` on PIL: H += uint8(hue·255) with wrap-around.
pub fn hue(img: &mut [u8], factor: f32) {
    let shift = hue_shift(factor);
    // Even with shift 0 PIL round-trips through HSV, which is not the identity: always do it.
    #[cfg(target_arch = "x86_64")]
    if crate::simd::Simd::detect() >= crate::simd::Simd::Avx2 {
        // SAFETY: the CPU supports AVX2 (checked above).
        unsafe { hue_avx2(img, shift) };
        return;
    }
    hue_blocks(img, shift);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hue_avx2(img: &mut [u8], shift: u8) {
    hue_blocks(img, shift)
}

/// The hue round trip in blocks of pixels: table gathers (scalar) are split from the
/// `p`/`q`/`t` float math, which then vectorises. Same expressions as [`hsv_to_rgb_fast`], so the
/// same bytes (IEEE f32/f64 ops, no contraction).
#[inline(always)]
fn hue_blocks(img: &mut [u8], shift: u8) {
    const B: usize = 64;
    let ht = hsv_tables();
    let rt = rgb_tables();
    let mut sec = [0u8; B];
    let mut vv = [0f64; B];
    let mut ff = [0f32; B];
    let mut fss = [0f32; B];
    let mut pqt = [[0u8; 4]; B];
    for chunk in img.chunks_mut(3 * B) {
        let n = chunk.len() / 3;
        for (j, px) in chunk.chunks_exact(3).enumerate() {
            let (h, s, v) = rgb_to_hsv_tab(ht, px[0], px[1], px[2]);
            let h = h.wrapping_add(shift);
            sec[j] = rt.sector[h as usize];
            ff[j] = rt.f[h as usize];
            fss[j] = rt.fs[s as usize];
            vv[j] = v as f64;
        }
        for j in 0..B {
            let (f, fs, vf) = (ff[j], fss[j], vv[j]);
            // All three factors lie in [0, 1], so the products are in [0, v]: no clamp needed.
            let p = c_round(vf * (1.0 - fs as f64)) as u8;
            let q = c_round(vf * (1.0 - (fs * f) as f64)) as u8;
            let t = c_round(vf * (1.0 - fs as f64 * (1.0 - f as f64))) as u8;
            pqt[j] = [vf as u8, t, p, q];
        }
        for (j, px) in chunk.chunks_exact_mut(3).enumerate().take(n) {
            let k = &HSV_PICK[sec[j] as usize];
            let vals = pqt[j];
            px[0] = vals[k[0] as usize & 3];
            px[1] = vals[k[1] as usize & 3];
            px[2] = vals[k[2] as usize & 3];
        }
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
        *v = if *v >= 128 { 255 - *v } else { *v };
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
    /// `(ww, fw)` split as `hi·2¹⁵ + lo` into the i16 pairs `(lo_ww, lo_fw)` and
    /// `(hi_ww, hi_fw)`, packed in an i32 each, as the SIMD passes' `madd`s take them.
    #[cfg(target_arch = "x86_64")]
    fn packed_pairs(self) -> (i32, i32) {
        let split = |k: u32| ((k & 0x7fff) as i32, (k >> 15) as i32);
        let ((wl, wh), (fl, fh)) = (split(self.ww), split(self.fw));
        (wl | fl << 16, wh | fh << 16)
    }

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

/// One vertical box pass (along columns) of an image with rows of `stride` bytes and `h` rows,
/// `src` → `dst`, edge rows repeated (Pillow `ImagingHorizontalBoxBlur` applied to columns:
/// window `[y−r, y+r]` at weight `ww`, far taps `y−r−1` and `y+r+1` at `fw`). Every byte column
/// is independent (whatever the channel count), so the inner loop runs over a whole row and
/// vectorises. `acc` is scratch for one row of sums.
fn vertical_box_pass(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    h: usize,
    bw: BoxWeights,
    acc: &mut Vec<u32>,
) {
    #[cfg(target_arch = "x86_64")]
    match crate::simd::Simd::detect() {
        // SAFETY: the CPU supports AVX-512 F/BW (part of the detected level).
        crate::simd::Simd::Avx512 => unsafe {
            vertical_box_pass_avx512(src, dst, stride, h, bw, acc)
        },
        // SAFETY: the CPU supports AVX2.
        crate::simd::Simd::Avx2 => unsafe { vertical_box_pass_avx2(src, dst, stride, h, bw, acc) },
        crate::simd::Simd::Scalar => vertical_box_pass_generic(src, dst, stride, h, bw, acc),
    }
    #[cfg(not(target_arch = "x86_64"))]
    vertical_box_pass_generic(src, dst, stride, h, bw, acc);
}

/// [`vertical_box_pass_avx2`] on 32 columns at a time (the same arithmetic, twice the lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn vertical_box_pass_avx512(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    h: usize,
    bw: BoxWeights,
    acc: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let r = bw.radius as isize;
    if 2 * r + 1 > 128 {
        return vertical_box_pass_generic(src, dst, stride, h, bw, acc);
    }
    let main = stride / 32 * 32;
    assert!(src.len() >= stride * h && dst.len() >= stride * h);
    let last = h as isize - 1;
    let rowf = |y: isize| y.clamp(0, last) as usize * stride;
    acc.clear();
    acc.resize(main.div_ceil(2), 0);
    let a16 = acc.as_mut_ptr() as *mut u16;
    let sp = src.as_ptr();
    let ld = |o: usize| _mm512_cvtepu8_epi16(_mm256_loadu_si256(sp.add(o) as *const __m256i));
    for c in (0..main).step_by(32) {
        let mut a = _mm512_setzero_si512();
        for k in -r - 1..r {
            a = _mm512_add_epi16(a, ld(rowf(k) + c));
        }
        _mm512_storeu_si512(a16.add(c) as *mut _, a);
    }
    let (kl, kh) = bw.packed_pairs();
    let (kl, kh) = (_mm512_set1_epi32(kl), _mm512_set1_epi32(kh));
    let round = _mm512_set1_epi32(1 << 23);
    for y in 0..h as isize {
        let (add, sub, far) = (rowf(y + r), rowf(y - r - 1), rowf(y + r + 1));
        let out = dst.as_mut_ptr().add(y as usize * stride);
        for c in (0..main).step_by(32) {
            let ap = a16.add(c);
            let su = ld(sub + c);
            let s = _mm512_loadu_si512(ap as *const _);
            let s = _mm512_sub_epi16(_mm512_add_epi16(s, ld(add + c)), su);
            _mm512_storeu_si512(ap as *mut _, s);
            let t = _mm512_add_epi16(su, ld(far + c));
            let v = [_mm512_unpacklo_epi16(s, t), _mm512_unpackhi_epi16(s, t)].map(|p| {
                let lo = _mm512_madd_epi16(p, kl);
                let hi = _mm512_madd_epi16(p, kh);
                let sum = _mm512_add_epi32(_mm512_slli_epi32::<15>(hi), lo);
                _mm512_srli_epi32::<24>(_mm512_add_epi32(sum, round))
            });
            // In-lane unpacks and packs cancel: the words come back in column order.
            let b = _mm512_cvtusepi16_epi8(_mm512_packus_epi32(v[0], v[1]));
            _mm256_storeu_si256(out.add(c) as *mut __m256i, b);
        }
    }
    box_columns(src, dst, stride, h, bw, main..stride);
}

/// 16 columns at a time. The window sum `s ≤ 255·(2r + 1)` and the far pair `t ≤ 510` fit i16,
/// so `s·ww + t·fw` is two `madd`s of the `(s, t)` pairs by the split weights
/// `(ww, fw) = hi·2¹⁵ + lo` (the same trick as the resize), recombined with wrapping i32 adds:
/// the true sum is below 255·2²⁴ < 2³², so the logical shift gives Pillow's u32 result. Columns
/// past the last multiple of 16 run in [`box_columns`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_box_pass_avx2(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    h: usize,
    bw: BoxWeights,
    acc: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let r = bw.radius as isize;
    if 2 * r + 1 > 128 {
        // The window sum would not fit i16 (σ far beyond the recipe's).
        return vertical_box_pass_generic(src, dst, stride, h, bw, acc);
    }
    let main = stride / 16 * 16;
    assert!(src.len() >= stride * h && dst.len() >= stride * h);
    let last = h as isize - 1;
    let rowf = |y: isize| y.clamp(0, last) as usize * stride;
    // One u16 sum per column, in the u32 scratch.
    acc.clear();
    acc.resize(main.div_ceil(2), 0);
    let a16 = acc.as_mut_ptr() as *mut u16;
    let sp = src.as_ptr();
    let ld = |o: usize| _mm256_cvtepu8_epi16(_mm_loadu_si128(sp.add(o) as *const __m128i));
    for c in (0..main).step_by(16) {
        let mut a = _mm256_setzero_si256();
        for k in -r - 1..r {
            a = _mm256_add_epi16(a, ld(rowf(k) + c));
        }
        _mm256_storeu_si256(a16.add(c) as *mut __m256i, a);
    }
    let (kl, kh) = bw.packed_pairs();
    let (kl, kh) = (_mm256_set1_epi32(kl), _mm256_set1_epi32(kh));
    let round = _mm256_set1_epi32(1 << 23);
    for y in 0..h as isize {
        let (add, sub, far) = (rowf(y + r), rowf(y - r - 1), rowf(y + r + 1));
        let out = dst.as_mut_ptr().add(y as usize * stride);
        for c in (0..main).step_by(16) {
            let ap = a16.add(c) as *mut __m256i;
            let su = ld(sub + c);
            let s = _mm256_sub_epi16(_mm256_add_epi16(_mm256_loadu_si256(ap), ld(add + c)), su);
            _mm256_storeu_si256(ap, s);
            let t = _mm256_add_epi16(su, ld(far + c));
            let v = [_mm256_unpacklo_epi16(s, t), _mm256_unpackhi_epi16(s, t)].map(|p| {
                let lo = _mm256_madd_epi16(p, kl);
                let hi = _mm256_madd_epi16(p, kh);
                let sum = _mm256_add_epi32(_mm256_slli_epi32::<15>(hi), lo);
                _mm256_srli_epi32::<24>(_mm256_add_epi32(sum, round))
            });
            // In-lane unpacks and packs cancel; the permute gathers the 16 bytes.
            let b = _mm256_packus_epi16(_mm256_packus_epi32(v[0], v[1]), _mm256_setzero_si256());
            let b = _mm256_permute4x64_epi64::<0b1000>(b);
            _mm_storeu_si128(out.add(c) as *mut __m128i, _mm256_castsi256_si128(b));
        }
    }
    box_columns(src, dst, stride, h, bw, main..stride);
}

/// [`vertical_box_pass`] on columns `cols` only, one column at a time.
#[cfg(target_arch = "x86_64")]
fn box_columns(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    h: usize,
    bw: BoxWeights,
    cols: std::ops::Range<usize>,
) {
    let r = bw.radius as isize;
    let last = h as isize - 1;
    let rowf = |y: isize| y.clamp(0, last) as usize * stride;
    for c in cols {
        let mut a: u32 = (-r - 1..r).map(|k| src[rowf(k) + c] as u32).sum();
        for y in 0..h as isize {
            let su = src[rowf(y - r - 1) + c] as u32;
            a = a + src[rowf(y + r) + c] as u32 - su;
            let bulk = a * bw.ww + (su + src[rowf(y + r + 1) + c] as u32) * bw.fw;
            dst[y as usize * stride + c] = ((bulk + (1 << 23)) >> 24) as u8;
        }
    }
}

#[inline(always)]
fn vertical_box_pass_generic(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    h: usize,
    bw: BoxWeights,
    acc: &mut Vec<u32>,
) {
    let r = bw.radius as isize;
    let (ww, fw) = (bw.ww, bw.fw);
    let last = h as isize - 1;
    let rowf = |y: isize| y.clamp(0, last) as usize * stride;
    acc.clear();
    acc.resize(stride, 0);
    for k in -r - 1..r {
        let o = rowf(k);
        for (a, &v) in acc.iter_mut().zip(&src[o..o + stride]) {
            *a += v as u32;
        }
    }
    for (y, out) in dst.chunks_exact_mut(stride).enumerate().take(h) {
        let y = y as isize;
        let add = &src[rowf(y + r)..][..stride];
        let sub = &src[rowf(y - r - 1)..][..stride];
        let far = &src[rowf(y + r + 1)..][..stride];
        for ((((a, o), &ad), &su), &fa) in acc.iter_mut().zip(out).zip(add).zip(sub).zip(far) {
            let s = *a + ad as u32 - su as u32;
            *a = s;
            let bulk = s * ww + (su as u32 + fa as u32) * fw;
            *o = ((bulk + (1 << 23)) >> 24) as u8;
        }
    }
}

/// Transposes an image of `w × h` pixels of `C` bytes into `dst` of `h × w`, in tiles so both
/// sides stay in cache. Within a tile each destination row is written in order, so 3-byte pixels
/// move as 4-byte words: the extra byte lands on the next pixel, written right after (or by a
/// later tile); only a destination row's last pixel is copied byte-wise. One-byte pixels go
/// through [`transpose_bytes`] instead.
fn transpose<const C: usize>(src: &[u8], dst: &mut [u8], w: usize, h: usize) {
    assert!(src.len() >= w * h * C && dst.len() >= w * h * C);
    #[cfg(target_arch = "x86_64")]
    if C == 1 {
        return transpose_bytes(src, dst, w, h);
    }
    transpose_tiles::<C>(src, dst, w, h, 0..w, 0..h);
}

/// [`transpose`] of the pixels in columns `xs` and rows `ys` only.
fn transpose_tiles<const C: usize>(
    src: &[u8],
    dst: &mut [u8],
    w: usize,
    h: usize,
    xs: std::ops::Range<usize>,
    ys: std::ops::Range<usize>,
) {
    const T: usize = 16;
    for y0 in ys.clone().step_by(T) {
        let y1 = (y0 + T).min(ys.end);
        for x0 in xs.clone().step_by(T) {
            for x in x0..(x0 + T).min(xs.end) {
                for y in y0..y1 {
                    let s = (y * w + x) * C;
                    let d = (x * h + y) * C;
                    if C == 3 && y + 1 < h && s + 4 <= src.len() {
                        let v = u32::from_ne_bytes(src[s..s + 4].try_into().unwrap());
                        dst[d..d + 4].copy_from_slice(&v.to_ne_bytes());
                    } else {
                        dst[d..d + C].copy_from_slice(&src[s..s + C]);
                    }
                }
            }
        }
    }
}

/// [`transpose`] of a one-byte-per-pixel plane: 16 × 16 blocks by the SSE2 unpack network
/// (4 rounds of 16 unpacks), the ragged right and bottom edges pixel by pixel.
#[cfg(target_arch = "x86_64")]
fn transpose_bytes(src: &[u8], dst: &mut [u8], w: usize, h: usize) {
    use std::arch::x86_64::*;
    let (wb, hb) = (w / 16 * 16, h / 16 * 16);
    for y0 in (0..hb).step_by(16) {
        for x0 in (0..wb).step_by(16) {
            // SAFETY: SSE2 is part of x86_64; rows y0..y0+16 and columns x0..x0+16 lie inside
            // the w × h source, and the same block transposed inside the h × w destination.
            unsafe {
                let r: [__m128i; 16] = std::array::from_fn(|i| {
                    _mm_loadu_si128(src.as_ptr().add((y0 + i) * w + x0) as *const __m128i)
                });
                // Rows 2i, 2i+1 → byte pairs; columns 0–7 in t[2i], 8–15 in t[2i+1].
                let t: [__m128i; 16] = std::array::from_fn(|k| {
                    let (a, b) = (r[k & !1], r[k | 1]);
                    if k % 2 == 0 {
                        _mm_unpacklo_epi8(a, b)
                    } else {
                        _mm_unpackhi_epi8(a, b)
                    }
                });
                // Rows 4j..4j+4 → columns of 4 bytes; u[4j + m] holds columns 4m..4m+4.
                let u: [__m128i; 16] = std::array::from_fn(|k| {
                    let (j, m) = (k / 4, k % 4);
                    let (a, b) = (t[4 * j + m / 2], t[4 * j + 2 + m / 2]);
                    if m % 2 == 0 {
                        _mm_unpacklo_epi16(a, b)
                    } else {
                        _mm_unpackhi_epi16(a, b)
                    }
                });
                // Rows 8k..8k+8 → columns of 8 bytes; v[8k + n] holds columns 2n, 2n + 1.
                let v: [__m128i; 16] = std::array::from_fn(|q| {
                    let (k, n) = (q / 8, q % 8);
                    let (a, b) = (u[8 * k + n / 2], u[8 * k + 4 + n / 2]);
                    if n % 2 == 0 {
                        _mm_unpacklo_epi32(a, b)
                    } else {
                        _mm_unpackhi_epi32(a, b)
                    }
                });
                for c in 0..16 {
                    let (a, b) = (v[c / 2], v[8 + c / 2]);
                    let col = if c % 2 == 0 {
                        _mm_unpacklo_epi64(a, b)
                    } else {
                        _mm_unpackhi_epi64(a, b)
                    };
                    _mm_storeu_si128(dst.as_mut_ptr().add((x0 + c) * h + y0) as *mut __m128i, col);
                }
            }
        }
    }
    transpose_tiles::<1>(src, dst, w, h, wb..w, 0..h);
    transpose_tiles::<1>(src, dst, w, h, 0..wb, hb..h);
}

/// Pillow `GaussianBlur(radius = sigma)` on an RGB image of `w × h`, in place.
pub fn gaussian_blur(img: &mut [u8], w: usize, h: usize, sigma: f32, scratch: &mut Vec<u8>) {
    box_blur_plane::<3>(img, w, h, sigma, scratch, &mut Vec::new());
}

/// Pillow `GaussianBlur(radius = sigma)` on a `w × h` image of `C` interleaved channels (each
/// channel is blurred on its own, so `C = 1` on a gray plane gives each channel of the gray RGB
/// image), in place.
///
/// Pillow runs three horizontal box passes, then three vertical ones. The horizontal passes are
/// done here as vertical passes on the transposed image (the same sums per channel, the same edge
/// repetition, so the same bytes) because the vertical pass vectorises across a whole row.
pub fn box_blur_plane<const C: usize>(
    img: &mut [u8],
    w: usize,
    h: usize,
    sigma: f32,
    scratch: &mut Vec<u8>,
    acc: &mut Vec<u32>,
) {
    let fr = box_radius(sigma, 3);
    if fr == 0.0 || w == 0 || h == 0 {
        return;
    }
    let bw = BoxWeights::new(fr);
    let n = img.len();
    debug_assert_eq!(n, w * h * C);
    scratch.resize(2 * n, 0);
    let (s1, s2) = scratch.split_at_mut(n);
    // Horizontal passes on the transpose (width h, height w).
    transpose::<C>(img, s1, w, h);
    vertical_box_pass(s1, s2, h * C, w, bw, acc);
    vertical_box_pass(s2, s1, h * C, w, bw, acc);
    vertical_box_pass(s1, s2, h * C, w, bw, acc);
    transpose::<C>(s2, s1, h, w);
    // Vertical passes, ending back in `img`.
    vertical_box_pass(s1, s2, w * C, h, bw, acc);
    vertical_box_pass(s2, s1, w * C, h, bw, acc);
    vertical_box_pass(s1, img, w * C, h, bw, acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SSE2 byte transpose gives the pixel-by-pixel transpose, on sizes below, at and off
    /// multiples of the 16 × 16 block, and transposing twice is the identity.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn byte_transpose_equals_the_pixel_transpose() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (w, h) in [
            (1, 1),
            (16, 16),
            (15, 17),
            (17, 15),
            (32, 48),
            (96, 96),
            (224, 37),
        ] {
            let src: Vec<u8> = (0..w * h).map(|_| rng.random()).collect();
            let (mut a, mut b) = (vec![0u8; w * h], vec![1u8; w * h]);
            transpose_bytes(&src, &mut a, w, h);
            transpose_tiles::<1>(&src, &mut b, w, h, 0..w, 0..h);
            assert!(a == b, "{w}x{h}");
            for x in 0..w {
                for y in 0..h {
                    assert_eq!(a[x * h + y], src[y * w + x], "{w}x{h} at ({x}, {y})");
                }
            }
        }
    }

    /// The AVX2 and AVX-512 box passes (16- and 32-column blocks, u16 sums, split weights) give
    /// the generic pass's bytes: saturated and random values, strides below, at and off multiples
    /// of 16, heights shorter than the window, radii from the recipe's σ range and beyond it.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_box_passes_equal_the_generic_pass() {
        if crate::simd::Simd::hardware() < crate::simd::Simd::Avx2 {
            return;
        }
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut acc = Vec::new();
        for sigma in [0.1f32, 0.7, 1.3, 2.0, 5.0, 40.0] {
            let bw = BoxWeights::new(box_radius(sigma, 3));
            for (stride, h) in [
                (3, 5),
                (16, 1),
                (17, 2),
                (48, 9),
                (100, 31),
                (288, 40),
                (96, 96),
            ] {
                let src: Vec<u8> = (0..stride * h)
                    .map(|_| match rng.random_range(0..3) {
                        0 => 255,
                        1 => rng.random(),
                        _ => 0,
                    })
                    .collect();
                let (mut a, mut b) = (vec![0u8; src.len()], vec![1u8; src.len()]);
                // SAFETY: AVX2 checked above.
                unsafe { vertical_box_pass_avx2(&src, &mut a, stride, h, bw, &mut acc) };
                vertical_box_pass_generic(&src, &mut b, stride, h, bw, &mut acc);
                assert!(a == b, "sigma {sigma}, stride {stride}, h {h}");
                if crate::simd::Simd::hardware() == crate::simd::Simd::Avx512 {
                    let mut c = vec![2u8; src.len()];
                    // SAFETY: AVX-512 F/BW are part of the detected level.
                    unsafe { vertical_box_pass_avx512(&src, &mut c, stride, h, bw, &mut acc) };
                    assert!(c == b, "AVX-512: sigma {sigma}, stride {stride}, h {h}");
                }
            }
        }
    }
}
