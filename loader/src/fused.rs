//! The photometric pipeline of one crop in as few passes over its pixels as the semantics allow,
//! bit-identical to the op-by-op reference ([`PhotoParams::apply_reference`]).
//!
//! Every op before the blur is pixel-local except contrast, which blends with the mean luma of
//! the image *as it is at that point*. So the jitter splits at the contrast op:
//! * ops before it that are per-value (brightness) run in a read-only pass that sums the luma of
//!   their result, and are redone in the writing pass;
//! * ops before it that are not (saturation, hue) run in a first writing pass that also sums the
//!   luma of its output;
//! * everything after (the contrast blend, remaining jitter ops, grayscale, and solarise when
//!   there is no blur) runs in one more pass.
//!
//! A pass deinterleaves each row into planes (mirrored when the crop is flipped, so the flip
//! costs nothing), runs its stages on the planes (vectorised; hue by the AVX-512 or AVX2 kernel
//! when the CPU has one), and interleaves back. A crop that is blurred is blurred as planes (the
//! blur treats each channel on its own), interleaved after the blur; a grayscale one as a single
//! plane (R = G = B, so the three channel blurs are the same), a third of the work.

use crate::photometric::{
    blend, box_blur_plane, contrast_mean, hsv_to_rgb_fast, rgb_to_hsv_fast, JitterOp, PhotoParams,
};
pub use crate::simd::Simd;

/// Buffers reused across crops (one per worker thread).
#[derive(Clone, Debug, Default)]
pub struct PhotoScratch {
    r: Vec<u8>,
    g: Vec<u8>,
    b: Vec<u8>,
    /// Whole-crop planes: the luma plane of a gray crop, or the three channels, to be blurred.
    planes: [Vec<u8>; 3],
    pub(crate) blur: Vec<u8>,
    pub(crate) acc: Vec<u32>,
}

/// One per-pixel step of a pass. Brightness, contrast and solarise are per-value functions;
/// they are evaluated arithmetically (vectorised), or at the AVX-512 level composed into one
/// table per run of them (a 64-byte permute applies it; a scalar table look-up would be slower
/// than the SIMD blend).
#[derive(Clone, Copy, Debug)]
#[allow(clippy::large_enum_variant)] // a handful per pass, on the stack: boxing would allocate
enum Stage {
    /// `blend(base, v, factor)` on every channel (brightness: base 0; contrast: base the mean).
    Blend(u8, f32),
    Solarize,
    Saturation(f32),
    /// Hue shift as the uint8 added to H.
    Hue(u8),
    Gray,
    /// A composition of per-value stages.
    Lut([u8; 256]),
}

impl Stage {
    /// The stage's function of one value, if it is per-value.
    fn per_value(&self, v: u8) -> Option<u8> {
        match *self {
            Stage::Blend(base, f) => Some(blend(base, v, f)),
            Stage::Solarize => Some(solarize_v(v)),
            Stage::Lut(ref t) => Some(t[v as usize]),
            _ => None,
        }
    }
}

/// `stages` with each run of per-value stages composed into one [`Stage::Lut`].
fn tabulate(stages: &[Stage]) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::with_capacity(stages.len());
    for st in stages {
        if st.per_value(0).is_none() {
            out.push(*st);
            continue;
        }
        let prev = match out.last() {
            Some(Stage::Lut(t)) => *t,
            _ => std::array::from_fn(|v| v as u8),
        };
        let next = Stage::Lut(prev.map(|v| st.per_value(v).expect("per-value")));
        match out.last_mut() {
            Some(last @ Stage::Lut(_)) => *last = next,
            _ => out.push(next),
        }
    }
    out
}

fn jitter_stage(op: JitterOp) -> Stage {
    match op {
        JitterOp::Brightness(f) => Stage::Blend(0, f),
        JitterOp::Saturation(f) => Stage::Saturation(f),
        JitterOp::Hue(f) => Stage::Hue(crate::photometric::hue_shift(f)),
        JitterOp::Contrast(_) => unreachable!("contrast is planned separately"),
    }
}

/// Solarise at threshold 128 as `min(v, 255 − v)` (branch-free, vectorises).
#[inline(always)]
fn solarize_v(v: u8) -> u8 {
    v.min(255 - v)
}

/// The fused pipeline; `flip` mirrors the crop first (the engine's flip after resize).
pub fn apply_fused(
    p: &PhotoParams,
    img: &mut [u8],
    w: usize,
    h: usize,
    flip: bool,
    sc: &mut PhotoScratch,
) {
    apply_fused_with(Simd::detect(), p, img, w, h, flip, sc);
}

/// [`apply_fused`] at a given level (at most [`Simd::detect`]'s: tests run every level the CPU
/// has); the bytes are the same at every level.
pub fn apply_fused_with(
    simd: Simd,
    p: &PhotoParams,
    img: &mut [u8],
    w: usize,
    h: usize,
    flip: bool,
    sc: &mut PhotoScratch,
) {
    assert!(
        simd <= Simd::hardware(),
        "{simd:?} is not available on this CPU"
    );
    match simd {
        // SAFETY: the CPU has the level (asserted above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { apply_avx512(p, img, w, h, flip, sc) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { apply_avx2(p, img, w, h, flip, sc) },
        _ => apply_impl::<SCALAR>(p, img, w, h, flip, sc),
    }
}

/// [`apply_fused`] without SIMD kernels (the path of CPUs without AVX2), for tests.
pub fn apply_fused_scalar(
    p: &PhotoParams,
    img: &mut [u8],
    w: usize,
    h: usize,
    flip: bool,
    sc: &mut PhotoScratch,
) {
    apply_fused_with(Simd::Scalar, p, img, w, h, flip, sc);
}

/// [`Simd`] levels as the const parameter of the passes.
const SCALAR: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_avx2(
    p: &PhotoParams,
    img: &mut [u8],
    w: usize,
    h: usize,
    flip: bool,
    sc: &mut PhotoScratch,
) {
    apply_impl::<AVX2>(p, img, w, h, flip, sc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")]
unsafe fn apply_avx512(
    p: &PhotoParams,
    img: &mut [u8],
    w: usize,
    h: usize,
    flip: bool,
    sc: &mut PhotoScratch,
) {
    apply_impl::<AVX512>(p, img, w, h, flip, sc);
}

#[inline(always)]
fn apply_impl<const L: u8>(
    p: &PhotoParams,
    img: &mut [u8],
    w: usize,
    h: usize,
    mut flip: bool,
    sc: &mut PhotoScratch,
) {
    debug_assert_eq!(img.len(), w * h * 3);
    let mut stages: Vec<Stage> = Vec::with_capacity(6);
    let ci = p
        .jitter
        .iter()
        .position(|op| matches!(op, JitterOp::Contrast(_)));
    let rest = match ci {
        None => &p.jitter[..],
        Some(k) => {
            let JitterOp::Contrast(cf) = p.jitter[k] else {
                unreachable!()
            };
            stages.extend(p.jitter[..k].iter().map(|&op| jitter_stage(op)));
            let pointwise = stages.iter().all(|s| matches!(s, Stage::Blend(..)));
            let sum = if pointwise {
                // Read-only: the mean of the image after these per-value ops; they are redone
                // in the writing pass below (cheaper than writing twice).
                pass::<L>(img, w, h, false, &stages, Out::SumOnly, sc)
            } else {
                let s = pass::<L>(img, w, h, flip, &stages, Out::RgbSum, sc);
                flip = false;
                stages.clear();
                s
            };
            stages.push(Stage::Blend(contrast_mean(sum, (w * h) as u64), cf));
            &p.jitter[k + 1..]
        }
    };
    stages.extend(rest.iter().map(|&op| jitter_stage(op)));
    if p.grayscale {
        stages.push(Stage::Gray);
    }
    match p.blur {
        None => {
            if p.solarize {
                stages.push(Stage::Solarize);
            }
            if flip || !stages.is_empty() {
                pass::<L>(img, w, h, flip, &stages, Out::Rgb, sc);
            }
        }
        Some(sigma) if p.grayscale => {
            // All three channels equal: blur one plane, expand (and solarise) on the way back.
            stages.pop(); // the Gray stage: the pass writes the luma plane instead
            pass::<L>(img, w, h, flip, &stages, Out::Luma, sc);
            let mut gray = std::mem::take(&mut sc.planes[0]);
            box_blur_plane::<1>(&mut gray, w, h, sigma, &mut sc.blur, &mut sc.acc);
            if p.solarize {
                gray.iter_mut().for_each(|v| *v = solarize_v(*v));
            }
            for (px, &l) in img.chunks_exact_mut(3).zip(&gray) {
                px.fill(l);
            }
            sc.planes[0] = gray;
        }
        Some(sigma) => {
            // Each channel is blurred on its own: blur the planes the pass leaves (byte planes
            // transpose faster than RGB), solarise and interleave them on the way back.
            pass::<L>(img, w, h, flip, &stages, Out::Planes, sc);
            let mut planes = std::mem::take(&mut sc.planes);
            for plane in &mut planes {
                box_blur_plane::<1>(plane, w, h, sigma, &mut sc.blur, &mut sc.acc);
                if p.solarize {
                    plane.iter_mut().for_each(|v| *v = solarize_v(*v));
                }
            }
            let [r, g, b] = &planes;
            for (y, row) in img.chunks_exact_mut(3 * w).enumerate() {
                let at = y * w..(y + 1) * w;
                interleave::<L>(&r[at.clone()], &g[at.clone()], &b[at], row);
            }
            sc.planes = planes;
        }
    }
}

/// What a pass writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Nothing: only Σ luma of the staged pixels (read-only pass).
    SumOnly,
    /// The pixels back into the image.
    Rgb,
    /// The pixels, and Σ luma of them.
    RgbSum,
    /// The luma of the staged pixels into `scratch.planes[0]` (a `w × h` plane).
    Luma,
    /// The pixels into `scratch.planes` (three `w × h` planes).
    Planes,
}

#[inline(always)]
fn luma_lane(r: u8, g: u8, b: u8) -> u32 {
    (r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16
}

/// One pass over the rows; returns Σ luma when `out` asks for it.
#[inline(always)]
fn pass<const L: u8>(
    img: &mut [u8],
    w: usize,
    h: usize,
    flip: bool,
    stages: &[Stage],
    out: Out,
    sc: &mut PhotoScratch,
) -> u64 {
    // Planes padded to a multiple of 8 for the 8-lane kernels; the padding is never read back.
    let wp = w.div_ceil(8) * 8;
    for v in [&mut sc.r, &mut sc.g, &mut sc.b] {
        v.clear();
        v.resize(wp, 0);
    }
    let planes = match out {
        Out::Luma => 1,
        Out::Planes => 3,
        _ => 0,
    };
    for plane in &mut sc.planes[..planes] {
        // Every byte is written below: set the length (the blur reads it), never clear.
        if plane.len() != w * h {
            plane.resize(w * h, 0);
        }
    }
    let (r, g, b) = (&mut sc.r[..], &mut sc.g[..], &mut sc.b[..]);
    let tabulated;
    let stages = if L >= AVX512 {
        tabulated = tabulate(stages);
        &tabulated[..]
    } else {
        stages
    };
    let mut sum = 0u64;
    for y in 0..h {
        let row = &mut img[y * w * 3..(y + 1) * w * 3];
        deinterleave::<L>(row, r, g, b);
        if flip {
            for plane in [&mut *r, &mut *g, &mut *b] {
                plane[..w].reverse();
            }
        }
        for st in stages {
            match *st {
                Stage::Lut(ref t) => {
                    for plane in [&mut *r, &mut *g, &mut *b] {
                        lookup::<L>(plane, t);
                    }
                }
                Stage::Blend(base, f) => {
                    for plane in [&mut *r, &mut *g, &mut *b] {
                        plane.iter_mut().for_each(|v| *v = blend(base, *v, f));
                    }
                }
                Stage::Solarize => {
                    for plane in [&mut *r, &mut *g, &mut *b] {
                        plane.iter_mut().for_each(|v| *v = solarize_v(*v));
                    }
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `L` is AVX512 only on the path entered after the runtime check.
                Stage::Saturation(f) if L >= AVX512 => unsafe {
                    crate::planes_avx512::saturation(r, g, b, f)
                },
                Stage::Saturation(f) => {
                    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                        let l = luma_lane(*r, *g, *b) as u8;
                        *r = blend(l, *r, f);
                        *g = blend(l, *g, f);
                        *b = blend(l, *b, f);
                    }
                }
                Stage::Hue(shift) => hue_planes::<L>(r, g, b, shift),
                Stage::Gray => {
                    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                        let l = luma_lane(*r, *g, *b) as u8;
                        (*r, *g, *b) = (l, l, l);
                    }
                }
            }
        }
        if matches!(out, Out::SumOnly | Out::RgbSum) {
            let s: u32 = r[..w]
                .iter()
                .zip(&g[..w])
                .zip(&b[..w])
                .map(|((&r, &g), &b)| luma_lane(r, g, b))
                .sum();
            sum += s as u64;
        }
        match out {
            Out::SumOnly => {}
            Out::Rgb | Out::RgbSum => interleave::<L>(r, g, b, row),
            Out::Planes => {
                for (plane, src) in sc.planes.iter_mut().zip([&*r, &*g, &*b]) {
                    plane[y * w..(y + 1) * w].copy_from_slice(&src[..w]);
                }
            }
            Out::Luma => {
                let dst = &mut sc.planes[0][y * w..(y + 1) * w];
                for (x, d) in dst.iter_mut().enumerate() {
                    *d = luma_lane(r[x], g[x], b[x]) as u8;
                }
            }
        }
    }
    sum
}

/// `v = t[v]` over a plane.
#[inline(always)]
fn lookup<const L: u8>(plane: &mut [u8], t: &[u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    if L >= AVX512 {
        // SAFETY: `L` is AVX512 only on the path entered after the runtime check.
        unsafe { crate::planes_avx512::lookup(plane, t) };
        return;
    }
    plane.iter_mut().for_each(|v| *v = t[*v as usize]);
}

/// RGB row → planes (the first `row.len() / 3` entries of each).
#[inline(always)]
fn deinterleave<const L: u8>(row: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let w = row.len() / 3;
    let mut x = 0;
    #[cfg(target_arch = "x86_64")]
    if L >= AVX512 {
        while x + 64 <= w {
            // SAFETY: AVX-512 VBMI checked by the caller's dispatch; x + 64 ≤ w.
            unsafe { crate::planes_avx512::deinterleave64(row, r, g, b, x) };
            x += 64;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if L >= AVX2 {
        while x + 16 <= w {
            // SAFETY: AVX2 (hence SSSE3) checked by the caller's dispatch; 48 bytes from
            // `row[3x..]` and 16 into each plane at `x` are in bounds (x + 16 ≤ w).
            unsafe { shuffle::deinterleave16(row.as_ptr().add(3 * x), r, g, b, x) };
            x += 16;
        }
    }
    for (x, px) in row.chunks_exact(3).enumerate().skip(x) {
        (r[x], g[x], b[x]) = (px[0], px[1], px[2]);
    }
}

/// Planes → RGB row.
#[inline(always)]
fn interleave<const L: u8>(r: &[u8], g: &[u8], b: &[u8], row: &mut [u8]) {
    let w = row.len() / 3;
    let mut x = 0;
    #[cfg(target_arch = "x86_64")]
    if L >= AVX512 {
        while x + 64 <= w {
            // SAFETY: as in `deinterleave`.
            unsafe { crate::planes_avx512::interleave64(r, g, b, x, row) };
            x += 64;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if L >= AVX2 {
        while x + 16 <= w {
            // SAFETY: as in `deinterleave`.
            unsafe { shuffle::interleave16(r, g, b, x, row.as_mut_ptr().add(3 * x)) };
            x += 16;
        }
    }
    for (x, px) in row.chunks_exact_mut(3).enumerate().skip(x) {
        px.copy_from_slice(&[r[x], g[x], b[x]]);
    }
}

/// 16 RGB pixels ↔ three planes of 16 bytes with `pshufb` (3 shuffles + 2 ors per output).
#[cfg(target_arch = "x86_64")]
mod shuffle {
    use std::arch::x86_64::*;

    /// Byte `i` of plane `c` is byte `3i + c` of the 48: in block `(3i + c) / 16`.
    const fn de_mask(block: usize, c: usize) -> [i8; 16] {
        let mut m = [-1i8; 16];
        let mut i = 0;
        while i < 16 {
            let q = 3 * i + c;
            if q / 16 == block {
                m[i] = (q % 16) as i8;
            }
            i += 1;
        }
        m
    }

    /// Byte `k` of output block `block` is channel `q % 3` of pixel `q / 3`, `q = 16·block + k`.
    const fn in_mask(block: usize, c: usize) -> [i8; 16] {
        let mut m = [-1i8; 16];
        let mut k = 0;
        while k < 16 {
            let q = 16 * block + k;
            if q % 3 == c {
                m[k] = (q / 3) as i8;
            }
            k += 1;
        }
        m
    }

    macro_rules! masks {
        ($f:ident) => {
            [
                [$f(0, 0), $f(1, 0), $f(2, 0)],
                [$f(0, 1), $f(1, 1), $f(2, 1)],
                [$f(0, 2), $f(1, 2), $f(2, 2)],
            ]
        };
    }
    /// `DE[c][block]`, `IN[c][block]`.
    static DE: [[[i8; 16]; 3]; 3] = masks!(de_mask);
    static IN: [[[i8; 16]; 3]; 3] = masks!(in_mask);

    #[inline(always)]
    unsafe fn m(t: &[i8; 16]) -> __m128i {
        _mm_loadu_si128(t.as_ptr() as *const __m128i)
    }

    /// # Safety
    /// SSSE3; `src` points at 48 readable bytes; the planes hold `x + 16` bytes.
    #[inline(always)]
    pub unsafe fn deinterleave16(
        src: *const u8,
        r: &mut [u8],
        g: &mut [u8],
        b: &mut [u8],
        x: usize,
    ) {
        let blk = [
            _mm_loadu_si128(src as *const __m128i),
            _mm_loadu_si128(src.add(16) as *const __m128i),
            _mm_loadu_si128(src.add(32) as *const __m128i),
        ];
        for (c, plane) in [r, g, b].into_iter().enumerate() {
            let v = _mm_or_si128(
                _mm_or_si128(
                    _mm_shuffle_epi8(blk[0], m(&DE[c][0])),
                    _mm_shuffle_epi8(blk[1], m(&DE[c][1])),
                ),
                _mm_shuffle_epi8(blk[2], m(&DE[c][2])),
            );
            _mm_storeu_si128(plane[x..x + 16].as_mut_ptr() as *mut __m128i, v);
        }
    }

    /// # Safety
    /// SSSE3; the planes hold `x + 16` bytes; `dst` points at 48 writable bytes.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `blk` indexes three mask tables and the output
    pub unsafe fn interleave16(r: &[u8], g: &[u8], b: &[u8], x: usize, dst: *mut u8) {
        let p = [
            _mm_loadu_si128(r[x..x + 16].as_ptr() as *const __m128i),
            _mm_loadu_si128(g[x..x + 16].as_ptr() as *const __m128i),
            _mm_loadu_si128(b[x..x + 16].as_ptr() as *const __m128i),
        ];
        for blk in 0..3 {
            let v = _mm_or_si128(
                _mm_or_si128(
                    _mm_shuffle_epi8(p[0], m(&IN[0][blk])),
                    _mm_shuffle_epi8(p[1], m(&IN[1][blk])),
                ),
                _mm_shuffle_epi8(p[2], m(&IN[2][blk])),
            );
            _mm_storeu_si128(dst.add(16 * blk) as *mut __m128i, v);
        }
    }
}

#[inline(always)]
fn hue_planes<const L: u8>(r: &mut [u8], g: &mut [u8], b: &mut [u8], shift: u8) {
    #[cfg(target_arch = "x86_64")]
    if L >= AVX512 {
        // SAFETY: `L` is AVX512 only on the path entered after the runtime check.
        unsafe { crate::hue_avx512::hue_planes(r, g, b, shift) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if L >= AVX2 {
        // SAFETY: `L` is AVX2 or more only on the path entered after the runtime AVX2 check; the
        // planes have equal lengths, a multiple of 8.
        unsafe { crate::hue_simd::hue_planes(r, g, b, shift) };
        return;
    }
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (hh, s, v) = rgb_to_hsv_fast(*r, *g, *b);
        (*r, *g, *b) = hsv_to_rgb_fast(hh.wrapping_add(shift), s, v);
    }
}
