//! AVX-512 kernels for the hue round trip, 16 pixels at a time, with a masked tail (a row of any
//! length needs no padding). The forward half gathers from the lookup tables of the scalar path
//! (Pillow's exact results per (max channel, min channel, max − min, max − mid)), so it has no
//! division and no f64; the backward half gathers `f` per `h` and evaluates `p`, `q`, `t` in f32
//! as the AVX2 kernel does ([`crate::hue_simd`]). Checked against the scalar reference on all
//! 2^24 inputs of each half by `tests/photometric_fused.rs`.
//! Callers check [`crate::simd::Simd::detect`] first.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::photometric::{hsv_tables, rgb_tables, HsvTables, RgbTables};

/// 16 bytes (or the first `n` of them) at `p` as i32 lanes.
#[inline(always)]
unsafe fn load16(p: *const u8, n: usize) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(tail(n), p as *const i8))
}

/// The low bytes of the lanes (each in 0..=255) to `p` (the first `n` of them).
#[inline(always)]
unsafe fn store16(p: *mut u8, x: __m512i, n: usize) {
    _mm_mask_storeu_epi8(p as *mut i8, tail(n), _mm512_cvtepi32_epi8(x));
}

#[inline(always)]
fn tail(n: usize) -> __mmask16 {
    if n >= 16 {
        !0
    } else {
        (1u16 << n) - 1
    }
}

/// Pillow rgb2hsv for 16 pixels (i32 lanes in 0..=255), by the tables of
/// [`crate::photometric::rgb_to_hsv_fast`] (gathered, no division and no f64 here).
#[inline(always)]
unsafe fn rgb_to_hsv16(t: &HsvTables, r: __m512i, g: __m512i, b: __m512i) -> [__m512i; 3] {
    let mx = _mm512_max_epi32(r, _mm512_max_epi32(g, b));
    let mn = _mm512_min_epi32(r, _mm512_min_epi32(g, b));
    let cr = _mm512_sub_epi32(mx, mn);
    let r_max = _mm512_cmpeq_epi32_mask(r, mx);
    let g_max = !r_max & _mm512_cmpeq_epi32_mask(g, mx);
    // case = 2·(max channel) + 1 unless the min is the first of the other two channels.
    let min_first =
        (r_max & _mm512_cmpeq_epi32_mask(g, mn)) | (!r_max & _mm512_cmpeq_epi32_mask(r, mn));
    let case = _mm512_add_epi32(
        select(
            r_max,
            g_max,
            _mm512_setzero_si512(),
            _mm512_set1_epi32(2),
            _mm512_set1_epi32(4),
        ),
        _mm512_mask_mov_epi32(_mm512_set1_epi32(1), min_first, _mm512_setzero_si512()),
    );
    // d = max − mid, mid = r + g + b − max − min.
    let sum = _mm512_add_epi32(r, _mm512_add_epi32(g, b));
    let d = _mm512_sub_epi32(_mm512_add_epi32(mx, _mm512_add_epi32(mx, mn)), sum);
    let hi = _mm512_add_epi32(_mm512_slli_epi32::<8>(case), cr);
    let hi = _mm512_add_epi32(_mm512_slli_epi32::<8>(hi), d);
    let si = _mm512_add_epi32(_mm512_slli_epi32::<8>(mx), cr);
    let byte = _mm512_set1_epi32(255);
    // 4-byte reads at byte offsets: the tables carry 3 spare bytes at the end.
    let uh = _mm512_and_si512(
        _mm512_i32gather_epi32::<1>(hi, t.hue.as_ptr() as *const i32),
        byte,
    );
    let us = _mm512_and_si512(
        _mm512_i32gather_epi32::<1>(si, t.sat.as_ptr() as *const i32),
        byte,
    );
    [uh, us, mx]
}

/// `if_r` where `r_max`, else `if_g` where `g_max`, else `other`.
#[inline(always)]
unsafe fn select(
    r_max: __mmask16,
    g_max: __mmask16,
    if_r: __m512i,
    if_g: __m512i,
    other: __m512i,
) -> __m512i {
    _mm512_mask_blend_epi32(r_max, _mm512_mask_blend_epi32(g_max, other, if_g), if_r)
}

/// C `round` (half away from zero) of x ≥ 0, to i32.
#[inline(always)]
unsafe fn c_round16(x: __m512) -> __m512i {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_sub_ps(x, t), _mm512_set1_ps(0.5));
    _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0)))
}

#[inline(always)]
unsafe fn pick(pk: __m512i, sec: __m512i, tab: [i32; 6]) -> __m512i {
    let [a, b, c, d, e, f] = tab;
    let tab = _mm512_setr_epi32(a, b, c, d, e, f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    let sh = _mm512_permutexvar_epi32(sec, tab);
    _mm512_and_si512(_mm512_srlv_epi32(pk, sh), _mm512_set1_epi32(255))
}

/// Pillow hsv2rgb for 16 pixels (`p`, `q`, `t` in f32, as in the AVX2 kernel).
#[inline(always)]
unsafe fn hsv_to_rgb16(t: &RgbTables, h: __m512i, s: __m512i, v: __m512i) -> [__m512i; 3] {
    // f = float(6h/255 − i) from the table; i = floor(6h/255) as (x + 1 + x/256)/256 of
    // x = 6h (exact for x < 2^16).
    let f = _mm512_i32gather_ps::<4>(h, t.f.as_ptr());
    let x = _mm512_mullo_epi32(h, _mm512_set1_epi32(6));
    let i = _mm512_srli_epi32::<8>(_mm512_add_epi32(
        _mm512_add_epi32(x, _mm512_set1_epi32(1)),
        _mm512_srli_epi32::<8>(x),
    ));
    let fs = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(1.0 / 255.0));
    let one = _mm512_set1_ps(1.0);
    let vf = _mm512_cvtepi32_ps(v);
    let p = c_round16(_mm512_mul_ps(vf, _mm512_sub_ps(one, fs)));
    let q = c_round16(_mm512_mul_ps(vf, _mm512_sub_ps(one, _mm512_mul_ps(fs, f))));
    let t = c_round16(_mm512_mul_ps(
        vf,
        _mm512_sub_ps(one, _mm512_mul_ps(fs, _mm512_sub_ps(one, f))),
    ));
    // i = 6 only for h = 255 (sector 0).
    let sec = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(i, _mm512_set1_epi32(6)), i);
    // Bytes of `pk`: v, t, p, q; per sector the byte each channel takes (Pillow's switch).
    let pk = _mm512_or_si512(
        _mm512_or_si512(v, _mm512_slli_epi32::<8>(t)),
        _mm512_or_si512(_mm512_slli_epi32::<16>(p), _mm512_slli_epi32::<24>(q)),
    );
    [
        pick(pk, sec, [0, 24, 16, 16, 8, 0]),
        pick(pk, sec, [8, 0, 0, 24, 16, 16]),
        pick(pk, sec, [16, 16, 8, 0, 0, 24]),
    ]
}

/// Applies `f` to 16 pixels of three equal-length planes at a time, in place.
#[inline(always)]
unsafe fn planes16(
    a: &mut [u8],
    b: &mut [u8],
    c: &mut [u8],
    f: impl Fn(__m512i, __m512i, __m512i) -> [__m512i; 3],
) {
    let n = a.len();
    assert!(b.len() == n && c.len() == n);
    let (a, b, c) = (a.as_mut_ptr(), b.as_mut_ptr(), c.as_mut_ptr());
    for k in (0..n).step_by(16) {
        let m = n - k;
        let [x, y, z] = f(
            load16(a.add(k), m),
            load16(b.add(k), m),
            load16(c.add(k), m),
        );
        store16(a.add(k), x, m);
        store16(b.add(k), y, m);
        store16(c.add(k), z, m);
    }
}

/// The hue op on planar rows of any (equal) length: H += `shift` (uint8 wrap) through Pillow's
/// HSV round trip.
///
/// # Safety
/// The CPU must have [`crate::simd::Simd::Avx512`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn hue_planes(r: &mut [u8], g: &mut [u8], b: &mut [u8], shift: u8) {
    let sh = _mm512_set1_epi32(shift as i32);
    let m = _mm512_set1_epi32(255);
    let (ht, rt) = (hsv_tables(), rgb_tables());
    planes16(r, g, b, |r, g, b| {
        let [h, s, v] = rgb_to_hsv16(ht, r, g, b);
        hsv_to_rgb16(rt, _mm512_and_si512(_mm512_add_epi32(h, sh), m), s, v)
    });
}

/// Pillow `rgb2hsv` on planar rows, in place; for tests.
///
/// # Safety
/// As [`hue_planes`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn rgb_to_hsv_planes(r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let t = hsv_tables();
    planes16(r, g, b, |r, g, b| rgb_to_hsv16(t, r, g, b));
}

/// Pillow `hsv2rgb` on planar rows, in place; for tests.
///
/// # Safety
/// As [`hue_planes`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn hsv_to_rgb_planes(h: &mut [u8], s: &mut [u8], v: &mut [u8]) {
    let t = rgb_tables();
    planes16(h, s, v, |h, s, v| hsv_to_rgb16(t, h, s, v));
}
