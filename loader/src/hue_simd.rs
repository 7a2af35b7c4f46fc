//! AVX2 kernels for the hue round trip of [`crate::photometric`], 8 pixels at a time on planar
//! rows. Every expression is Pillow's (`rgb2hsv` / `hsv2rgb`) evaluated with the same IEEE
//! f32/f64 operations and roundings, so the bytes equal the scalar reference; the three constant
//! divisions (by 6 and by 255) are multiplications by the rounded reciprocal, which gives the
//! same bytes for every input (checked over all 2^24 inputs of each half by
//! `tests/photometric_fused.rs`). Callers check `is_x86_feature_detected!("avx2")` first.

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

/// The f64 tail of rgb2hsv for 4 lanes: (uh, us) unclamped.
#[inline(always)]
unsafe fn hsv_half(a: __m128, b: __m128, c0: __m128i, s: __m128) -> (__m128i, __m128i) {
    let h = _mm256_sub_pd(
        _mm256_add_pd(_mm256_cvtepi32_pd(c0), _mm256_cvtps_pd(a)),
        _mm256_cvtps_pd(b),
    );
    let h = _mm256_cvtps_pd(_mm256_cvtpd_ps(h));
    let one = _mm256_set1_pd(1.0);
    let x = _mm256_add_pd(_mm256_mul_pd(h, _mm256_set1_pd(1.0 / 6.0)), one);
    let x = _mm256_sub_pd(x, _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(x, one), one));
    let x = _mm256_cvtps_pd(_mm256_cvtpd_ps(x));
    let uh = _mm256_cvttpd_epi32(_mm256_mul_pd(x, _mm256_set1_pd(255.0)));
    let us = _mm256_cvttpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(s), _mm256_set1_pd(255.0)));
    (uh, us)
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
    // r max: bc − gc; g max: 2 + rc − bc; b max: 4 + gc − rc.
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
    let s = _mm256_div_ps(crf, _mm256_cvtepi32_ps(mx));
    let (uh0, us0) = hsv_half(lops(a), lops(bq), lo(c0), lops(s));
    let (uh1, us1) = hsv_half(hips(a), hips(bq), hi(c0), hips(s));
    let zero = _mm256_setzero_si256();
    let top = _mm256_set1_epi32(255);
    // Grays (cr = 0) divide 0/0: NaN converts to INT_MIN; Pillow returns (0, 0, v) for them.
    let gray = _mm256_cmpeq_epi32(cr, zero);
    let uh = _mm256_andnot_si256(
        gray,
        _mm256_min_epi32(_mm256_max_epi32(join(uh0, uh1), zero), top),
    );
    let us = _mm256_andnot_si256(
        gray,
        _mm256_min_epi32(_mm256_max_epi32(join(us0, us1), zero), top),
    );
    (uh, us, mx)
}

#[inline(always)]
unsafe fn hx_half(h: __m128i, s: __m128i) -> (__m128i, __m128, __m128) {
    let hx = _mm256_mul_pd(
        _mm256_mul_pd(_mm256_cvtepi32_pd(h), _mm256_set1_pd(6.0)),
        _mm256_set1_pd(1.0 / 255.0),
    );
    let i = _mm256_cvttpd_epi32(hx);
    let f = _mm256_cvtpd_ps(_mm256_sub_pd(hx, _mm256_cvtepi32_pd(i)));
    let fs = _mm256_cvtpd_ps(_mm256_mul_pd(
        _mm256_cvtepi32_pd(s),
        _mm256_set1_pd(1.0 / 255.0),
    ));
    (i, f, fs)
}

/// C `round` (half away from zero) of x ≥ 0, to i32.
#[inline(always)]
unsafe fn c_round4(x: __m256d) -> __m128i {
    let t = _mm256_round_pd::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
    let up = _mm256_and_pd(
        _mm256_cmp_pd::<_CMP_GE_OQ>(_mm256_sub_pd(x, t), _mm256_set1_pd(0.5)),
        _mm256_set1_pd(1.0),
    );
    _mm256_cvttpd_epi32(_mm256_add_pd(t, up))
}

#[inline(always)]
unsafe fn pqt_half(v: __m128i, f: __m128, fs: __m128, fsf: __m128) -> (__m128i, __m128i, __m128i) {
    let one = _mm256_set1_pd(1.0);
    let vf = _mm256_cvtepi32_pd(v);
    let fs = _mm256_cvtps_pd(fs);
    let p = c_round4(_mm256_mul_pd(vf, _mm256_sub_pd(one, fs)));
    let q = c_round4(_mm256_mul_pd(vf, _mm256_sub_pd(one, _mm256_cvtps_pd(fsf))));
    let t = c_round4(_mm256_mul_pd(
        vf,
        _mm256_sub_pd(
            one,
            _mm256_mul_pd(fs, _mm256_sub_pd(one, _mm256_cvtps_pd(f))),
        ),
    ));
    (p, q, t)
}

#[inline(always)]
unsafe fn pick(pk: __m256i, sec: __m256i, tab: __m256i) -> __m256i {
    let sh = _mm256_permutevar8x32_epi32(tab, sec);
    _mm256_and_si256(_mm256_srlv_epi32(pk, sh), _mm256_set1_epi32(255))
}

/// Pillow hsv2rgb for 8 pixels.
#[inline(always)]
unsafe fn hsv_to_rgb8(h: __m256i, s: __m256i, v: __m256i) -> (__m256i, __m256i, __m256i) {
    let (i0, f0, fs0) = hx_half(lo(h), lo(s));
    let (i1, f1, fs1) = hx_half(hi(h), hi(s));
    let (i, f, fs) = (join(i0, i1), joinps(f0, f1), joinps(fs0, fs1));
    let fsf = _mm256_mul_ps(fs, f);
    let (p0, q0, t0) = pqt_half(lo(v), lops(f), lops(fs), lops(fsf));
    let (p1, q1, t1) = pqt_half(hi(v), hips(f), hips(fs), hips(fsf));
    let (p, q, t) = (join(p0, p1), join(q0, q1), join(t0, t1));
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
    assert!(n % 8 == 0 && g.len() == n && b.len() == n);
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
    assert!(n % 8 == 0 && g.len() == n && b.len() == n);
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
    assert!(n % 8 == 0 && s.len() == n && v.len() == n);
    let (h, s, v) = (h.as_mut_ptr(), s.as_mut_ptr(), v.as_mut_ptr());
    for k in (0..n).step_by(8) {
        let (r, g, b) = hsv_to_rgb8(load8(h.add(k)), load8(s.add(k)), load8(v.add(k)));
        store8(h.add(k), r);
        store8(s.add(k), g);
        store8(v.add(k), b);
    }
}
