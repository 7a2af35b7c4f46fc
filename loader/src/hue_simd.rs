//! AVX2 kernels for the hue round trip of [`crate::photometric`], 8 pixels at a time on planar
//! rows. The expressions are Pillow's (`rgb2hsv` / `hsv2rgb`); where a cheaper evaluation gives
//! the same bytes it is used: the constant divisions (by 6 and by 255) are multiplications by
//! the rounded reciprocal, and some double expressions are evaluated in f32 (8 lanes instead of
//! 4). "Same bytes" is not argued but checked: each half of the round trip is compared with the
//! scalar reference on all 2^24 inputs by `tests/photometric_fused.rs` (the domain is finite, so
//! the check is a proof). Callers check `is_x86_feature_detected!("avx2")` first.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

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

#[inline(always)]
unsafe fn lo(x: __m256i) -> __m128i {
    _mm256_castsi256_si128(x)
}
#[inline(always)]
unsafe fn hi(x: __m256i) -> __m128i {
    _mm256_extracti128_si256::<1>(x)
}
#[inline(always)]
unsafe fn lops(x: __m256) -> __m128 {
    _mm256_castps256_ps128(x)
}
#[inline(always)]
unsafe fn hips(x: __m256) -> __m128 {
    _mm256_extractf128_ps::<1>(x)
}
#[inline(always)]
unsafe fn join(l: __m128i, h: __m128i) -> __m256i {
    _mm256_set_m128i(h, l)
}
#[inline(always)]
unsafe fn joinps(l: __m128, h: __m128) -> __m256 {
    _mm256_set_m128(h, l)
}

/// The f64 tail of rgb2hsv's hue for 4 lanes: `h = c0 + a − b` (exact in f64, rounded once to
/// f32 as Pillow's float `h`), `h/6 + 1` wrapped to [0, 1) in double, to float, `× 255` in
/// double, truncated. This part needs f64: in f32 ~63k of the 2^24 inputs come out different.
#[inline(always)]
unsafe fn hue_half(a: __m128, b: __m128, c0: __m128i) -> __m128i {
    let h = _mm256_sub_pd(
        _mm256_add_pd(_mm256_cvtepi32_pd(c0), _mm256_cvtps_pd(a)),
        _mm256_cvtps_pd(b),
    );
    let h = _mm256_cvtps_pd(_mm256_cvtpd_ps(h));
    let one = _mm256_set1_pd(1.0);
    let x = _mm256_add_pd(_mm256_mul_pd(h, _mm256_set1_pd(1.0 / 6.0)), one);
    let x = _mm256_sub_pd(x, _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(x, one), one));
    let x = _mm256_cvtps_pd(_mm256_cvtpd_ps(x));
    _mm256_cvttpd_epi32(_mm256_mul_pd(x, _mm256_set1_pd(255.0)))
}

/// Pillow rgb2hsv for 8 pixels (i32 lanes in 0..=255).
#[inline(always)]
unsafe fn rgb_to_hsv8(r: __m256i, g: __m256i, b: __m256i) -> (__m256i, __m256i, __m256i) {
    let mx = _mm256_max_epi32(r, _mm256_max_epi32(g, b));
    let mn = _mm256_min_epi32(r, _mm256_min_epi32(g, b));
    let cr = _mm256_sub_epi32(mx, mn);
    let r_max = _mm256_cmpeq_epi32(r, mx);
    let g_max = _mm256_andnot_si256(r_max, _mm256_cmpeq_epi32(g, mx));
    let (dr, dg, db) = (
        _mm256_sub_epi32(mx, r),
        _mm256_sub_epi32(mx, g),
        _mm256_sub_epi32(mx, b),
    );
    // r max: bc − gc; g max: 2 + rc − bc; b max: 4 + gc − rc (xc = (max − x)/cr in f32).
    let na = _mm256_blendv_epi8(_mm256_blendv_epi8(dg, dr, g_max), db, r_max);
    let nb = _mm256_blendv_epi8(_mm256_blendv_epi8(dr, db, g_max), dg, r_max);
    let c0 = _mm256_blendv_epi8(
        _mm256_blendv_epi8(_mm256_set1_epi32(4), _mm256_set1_epi32(2), g_max),
        _mm256_setzero_si256(),
        r_max,
    );
    let crf = _mm256_cvtepi32_ps(cr);
    let a = _mm256_div_ps(_mm256_cvtepi32_ps(na), crf);
    let bq = _mm256_div_ps(_mm256_cvtepi32_ps(nb), crf);
    // s = cr/max in f32; Pillow truncates s·255 in double, which f32 reproduces on all inputs.
    let s = _mm256_div_ps(crf, _mm256_cvtepi32_ps(mx));
    let us = _mm256_cvttps_epi32(_mm256_mul_ps(s, _mm256_set1_ps(255.0)));
    let uh = join(
        hue_half(lops(a), lops(bq), lo(c0)),
        hue_half(hips(a), hips(bq), hi(c0)),
    );
    let zero = _mm256_setzero_si256();
    let top = _mm256_set1_epi32(255);
    // Grays (cr = 0) divide 0/0: NaN converts to INT_MIN; Pillow returns (0, 0, v) for them.
    let gray = _mm256_cmpeq_epi32(cr, zero);
    let uh = _mm256_andnot_si256(gray, _mm256_min_epi32(_mm256_max_epi32(uh, zero), top));
    let us = _mm256_andnot_si256(gray, _mm256_min_epi32(_mm256_max_epi32(us, zero), top));
    (uh, us, mx)
}

/// Pillow's `hx = h·6/255` (double), its sector `i` and `f = float(hx − i)` for 4 lanes (f32
/// here changes ~0.01% of the outputs, so this stays double).
#[inline(always)]
unsafe fn hx_half(h: __m128i) -> (__m128i, __m128) {
    let hx = _mm256_mul_pd(
        _mm256_mul_pd(_mm256_cvtepi32_pd(h), _mm256_set1_pd(6.0)),
        _mm256_set1_pd(1.0 / 255.0),
    );
    let i = _mm256_cvttpd_epi32(hx);
    let f = _mm256_cvtpd_ps(_mm256_sub_pd(hx, _mm256_cvtepi32_pd(i)));
    (i, f)
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
unsafe fn hsv_to_rgb8(h: __m256i, s: __m256i, v: __m256i) -> (__m256i, __m256i, __m256i) {
    let (i0, f0) = hx_half(lo(h));
    let (i1, f1) = hx_half(hi(h));
    let (i, f) = (join(i0, i1), joinps(f0, f1));
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
    (
        pick(pk, sec, _mm256_setr_epi32(0, 24, 16, 16, 8, 0, 0, 0)),
        pick(pk, sec, _mm256_setr_epi32(8, 0, 0, 24, 16, 16, 0, 0)),
        pick(pk, sec, _mm256_setr_epi32(16, 16, 8, 0, 0, 24, 0, 0)),
    )
}

/// The hue op on planar rows: H += `shift` (uint8 wrap) through Pillow's HSV round trip.
/// `r`, `g`, `b` have the same length, a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn hue_planes(r: &mut [u8], g: &mut [u8], b: &mut [u8], shift: u8) {
    let n = r.len();
    assert!(n.is_multiple_of(8) && g.len() == n && b.len() == n);
    let sh = _mm256_set1_epi32(shift as i32);
    let m = _mm256_set1_epi32(255);
    let (r, g, b) = (r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr());
    for k in (0..n).step_by(8) {
        let (h, s, v) = rgb_to_hsv8(load8(r.add(k)), load8(g.add(k)), load8(b.add(k)));
        let h = _mm256_and_si256(_mm256_add_epi32(h, sh), m);
        let (r2, g2, b2) = hsv_to_rgb8(h, s, v);
        store8(r.add(k), r2);
        store8(g.add(k), g2);
        store8(b.add(k), b2);
    }
}

/// Pillow `rgb2hsv` on planar rows, in place ((r, g, b) → (h, s, v)); for tests.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn rgb_to_hsv_planes(r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let n = r.len();
    assert!(n.is_multiple_of(8) && g.len() == n && b.len() == n);
    let (r, g, b) = (r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr());
    for k in (0..n).step_by(8) {
        let (h, s, v) = rgb_to_hsv8(load8(r.add(k)), load8(g.add(k)), load8(b.add(k)));
        store8(r.add(k), h);
        store8(g.add(k), s);
        store8(b.add(k), v);
    }
}

/// Pillow `hsv2rgb` on planar rows, in place ((h, s, v) → (r, g, b)); for tests.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn hsv_to_rgb_planes(h: &mut [u8], s: &mut [u8], v: &mut [u8]) {
    let n = h.len();
    assert!(n.is_multiple_of(8) && s.len() == n && v.len() == n);
    let (h, s, v) = (h.as_mut_ptr(), s.as_mut_ptr(), v.as_mut_ptr());
    for k in (0..n).step_by(8) {
        let (r, g, b) = hsv_to_rgb8(load8(h.add(k)), load8(s.add(k)), load8(v.add(k)));
        store8(h.add(k), r);
        store8(s.add(k), g);
        store8(v.add(k), b);
    }
}
