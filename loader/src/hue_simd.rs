//! AVX2 kernels for the hue round trip of [`crate::photometric`], 8 pixels at a time on planar
//! rows, the same arithmetic as the AVX-512 kernels ([`crate::hue_avx512`]) at half the width:
//! rgb2hsv gathers Pillow's exact bytes from the scalar path's lookup tables (no division, no
//! f64); hsv2rgb gathers `f` per `h` and evaluates `p`, `q`, `t` in f32, which gives Pillow's
//! double-precision bytes on every input. "Same bytes" is not argued but checked: each half of
//! the round trip is compared with the scalar reference on all 2^24 inputs by
//! `tests/photometric_fused.rs` (the domain is finite, so the check is a proof). Callers check
//! [`crate::simd::Simd::detect`] first.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::photometric::{hsv_tables, rgb_tables, HsvTables, RgbTables};

#[inline(always)]
unsafe fn load8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// Low bytes of the 8 i32 lanes (each in 0..=255) to 8 bytes at `p`.
#[inline(always)]
unsafe fn store8(p: *mut u8, x: __m256i) {
    let m = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1,
    );
    let s = _mm256_shuffle_epi8(x, m);
    let s = _mm256_unpacklo_epi32(s, _mm256_permute2x128_si256::<0x11>(s, s));
    _mm_storel_epi64(p as *mut __m128i, _mm256_castsi256_si128(s));
}

/// Pillow rgb2hsv for 8 pixels (i32 lanes in 0..=255), by the lookup tables of
/// [`crate::photometric::rgb_to_hsv_fast`] (Pillow's exact bytes per (max channel, min channel,
/// max − min, max − mid)), gathered: no division and no f64, as the AVX-512 kernel.
#[inline(always)]
unsafe fn rgb_to_hsv8(t: &HsvTables, r: __m256i, g: __m256i, b: __m256i) -> [__m256i; 3] {
    let mx = _mm256_max_epi32(r, _mm256_max_epi32(g, b));
    let mn = _mm256_min_epi32(r, _mm256_min_epi32(g, b));
    let cr = _mm256_sub_epi32(mx, mn);
    let r_max = _mm256_cmpeq_epi32(r, mx);
    let g_max = _mm256_andnot_si256(r_max, _mm256_cmpeq_epi32(g, mx));
    // case = 2·(max channel) + 1 unless the min is the first of the other two channels.
    let min_first = _mm256_blendv_epi8(_mm256_cmpeq_epi32(r, mn), _mm256_cmpeq_epi32(g, mn), r_max);
    let case = _mm256_add_epi32(
        _mm256_blendv_epi8(
            _mm256_blendv_epi8(_mm256_set1_epi32(4), _mm256_set1_epi32(2), g_max),
            _mm256_setzero_si256(),
            r_max,
        ),
        _mm256_andnot_si256(min_first, _mm256_set1_epi32(1)),
    );
    // d = max − mid, mid = r + g + b − max − min.
    let sum = _mm256_add_epi32(r, _mm256_add_epi32(g, b));
    let d = _mm256_sub_epi32(_mm256_add_epi32(mx, _mm256_add_epi32(mx, mn)), sum);
    let hi = _mm256_add_epi32(_mm256_slli_epi32::<8>(case), cr);
    let hi = _mm256_add_epi32(_mm256_slli_epi32::<8>(hi), d);
    let si = _mm256_add_epi32(_mm256_slli_epi32::<8>(mx), cr);
    let byte = _mm256_set1_epi32(255);
    // 4-byte reads at byte offsets: the tables carry 3 spare bytes at the end.
    let uh = _mm256_and_si256(
        _mm256_i32gather_epi32::<1>(t.hue.as_ptr() as *const i32, hi),
        byte,
    );
    let us = _mm256_and_si256(
        _mm256_i32gather_epi32::<1>(t.sat.as_ptr() as *const i32, si),
        byte,
    );
    [uh, us, mx]
}

/// C `round` (half away from zero) of x ≥ 0, to i32.
#[inline(always)]
unsafe fn c_round8(x: __m256) -> __m256i {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
    let up = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_sub_ps(x, t), _mm256_set1_ps(0.5)),
        _mm256_set1_ps(1.0),
    );
    _mm256_cvttps_epi32(_mm256_add_ps(t, up))
}

#[inline(always)]
unsafe fn pick(pk: __m256i, sec: __m256i, tab: __m256i) -> __m256i {
    let sh = _mm256_permutevar8x32_epi32(tab, sec);
    _mm256_and_si256(_mm256_srlv_epi32(pk, sh), _mm256_set1_epi32(255))
}

/// Pillow hsv2rgb for 8 pixels. Pillow evaluates `p`, `q`, `t` in double; f32 gives the same
/// rounded bytes on every input (checked exhaustively), at twice the lanes.
#[inline(always)]
unsafe fn hsv_to_rgb8(t: &RgbTables, h: __m256i, s: __m256i, v: __m256i) -> [__m256i; 3] {
    // f = float(6h/255 − i) from the table; i = floor(6h/255) as (x + 1 + x/256)/256 of
    // x = 6h (exact for x < 2^16).
    let f = _mm256_i32gather_ps::<4>(t.f.as_ptr(), h);
    let x = _mm256_mullo_epi32(h, _mm256_set1_epi32(6));
    let i = _mm256_srli_epi32::<8>(_mm256_add_epi32(
        _mm256_add_epi32(x, _mm256_set1_epi32(1)),
        _mm256_srli_epi32::<8>(x),
    ));
    let fs = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(1.0 / 255.0));
    let one = _mm256_set1_ps(1.0);
    let vf = _mm256_cvtepi32_ps(v);
    let p = c_round8(_mm256_mul_ps(vf, _mm256_sub_ps(one, fs)));
    let q = c_round8(_mm256_mul_ps(vf, _mm256_sub_ps(one, _mm256_mul_ps(fs, f))));
    let t = c_round8(_mm256_mul_ps(
        vf,
        _mm256_sub_ps(one, _mm256_mul_ps(fs, _mm256_sub_ps(one, f))),
    ));
    // i = 6 only for h = 255 (sector 0).
    let sec = _mm256_andnot_si256(_mm256_cmpeq_epi32(i, _mm256_set1_epi32(6)), i);
    // Bytes of `pk`: v, t, p, q; per sector the byte each channel takes (Pillow's switch).
    let pk = _mm256_or_si256(
        _mm256_or_si256(v, _mm256_slli_epi32::<8>(t)),
        _mm256_or_si256(_mm256_slli_epi32::<16>(p), _mm256_slli_epi32::<24>(q)),
    );
    [
        pick(pk, sec, _mm256_setr_epi32(0, 24, 16, 16, 8, 0, 0, 0)),
        pick(pk, sec, _mm256_setr_epi32(8, 0, 0, 24, 16, 16, 0, 0)),
        pick(pk, sec, _mm256_setr_epi32(16, 16, 8, 0, 0, 24, 0, 0)),
    ]
}

/// Applies `f` to 8 pixels of three equal-length planes at a time, in place (the length a
/// multiple of 8).
#[inline(always)]
unsafe fn planes8(
    a: &mut [u8],
    b: &mut [u8],
    c: &mut [u8],
    f: impl Fn(__m256i, __m256i, __m256i) -> [__m256i; 3],
) {
    let n = a.len();
    assert!(n.is_multiple_of(8) && b.len() == n && c.len() == n);
    let (a, b, c) = (a.as_mut_ptr(), b.as_mut_ptr(), c.as_mut_ptr());
    for k in (0..n).step_by(8) {
        let [x, y, z] = f(load8(a.add(k)), load8(b.add(k)), load8(c.add(k)));
        store8(a.add(k), x);
        store8(b.add(k), y);
        store8(c.add(k), z);
    }
}

/// The hue op on planar rows: H += `shift` (uint8 wrap) through Pillow's HSV round trip.
/// `r`, `g`, `b` have the same length, a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn hue_planes(r: &mut [u8], g: &mut [u8], b: &mut [u8], shift: u8) {
    let sh = _mm256_set1_epi32(shift as i32);
    let m = _mm256_set1_epi32(255);
    let (ht, rt) = (hsv_tables(), rgb_tables());
    planes8(r, g, b, |r, g, b| {
        let [h, s, v] = rgb_to_hsv8(ht, r, g, b);
        hsv_to_rgb8(rt, _mm256_and_si256(_mm256_add_epi32(h, sh), m), s, v)
    });
}

/// Pillow `rgb2hsv` on planar rows, in place ((r, g, b) → (h, s, v)); for tests.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn rgb_to_hsv_planes(r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let t = hsv_tables();
    planes8(r, g, b, |r, g, b| rgb_to_hsv8(t, r, g, b));
}

/// Pillow `hsv2rgb` on planar rows, in place ((h, s, v) → (r, g, b)); for tests.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn hsv_to_rgb_planes(h: &mut [u8], s: &mut [u8], v: &mut [u8]) {
    let t = rgb_tables();
    planes8(h, s, v, |h, s, v| hsv_to_rgb8(t, h, s, v));
}
