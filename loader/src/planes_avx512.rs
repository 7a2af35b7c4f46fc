//! AVX-512 VBMI kernels of the fused photometric passes, 64 bytes per register: RGB rows to
//! planes and back with byte permutes, and a 256-entry byte table applied to a plane (the
//! per-value ops: brightness, contrast, solarise, composed). Callers check
//! [`crate::simd::Simd::detect`] first.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// Byte indices of one permute step: `idx[i]` for lane `i`, and which lanes it fills.
struct Step {
    idx: [u8; 64],
    lanes: u64,
}

const NO_STEPS: [Step; 2] = [
    Step {
        idx: [0; 64],
        lanes: 0,
    },
    Step {
        idx: [0; 64],
        lanes: 0,
    },
];

/// Plane `c` from 192 RGB bytes: lane `i` takes byte `3i + c`, from the first two registers
/// (index < 128) or the third (index − 128).
const fn de_steps(c: usize) -> [Step; 2] {
    let mut s = NO_STEPS;
    let mut i = 0;
    while i < 64 {
        let q = 3 * i + c;
        let k = (q >= 128) as usize;
        s[k].idx[i] = (q - 128 * k) as u8;
        s[k].lanes |= 1 << i;
        i += 1;
    }
    s
}

/// RGB bytes `64·block ..` from three planes: byte `q` is channel `q % 3` of pixel `q / 3`,
/// from r and g (index + 64 for g) in the first step, from b in the second.
const fn in_steps(block: usize) -> [Step; 2] {
    let mut s = NO_STEPS;
    let mut j = 0;
    while j < 64 {
        let q = 64 * block + j;
        let (px, c) = (q / 3, q % 3);
        let k = (c == 2) as usize;
        s[k].idx[j] = (px + 64 * (c == 1) as usize) as u8;
        s[k].lanes |= 1 << j;
        j += 1;
    }
    s
}

static DE: [[Step; 2]; 3] = [de_steps(0), de_steps(1), de_steps(2)];
static IN: [[Step; 2]; 3] = [in_steps(0), in_steps(1), in_steps(2)];

#[inline(always)]
unsafe fn idx(s: &Step) -> __m512i {
    _mm512_loadu_si512(s.idx.as_ptr() as *const _)
}

/// Pixels `x .. x + 64` of an RGB row into the planes at `x`.
///
/// # Safety
/// AVX-512 F/BW/VBMI; `row` holds `3(x + 64)` bytes, each plane `x + 64`.
#[inline(always)]
pub unsafe fn deinterleave64(row: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8], x: usize) {
    debug_assert!(row.len() >= 3 * (x + 64));
    let p = row.as_ptr().add(3 * x);
    let a0 = _mm512_loadu_si512(p as *const _);
    let a1 = _mm512_loadu_si512(p.add(64) as *const _);
    let a2 = _mm512_loadu_si512(p.add(128) as *const _);
    for (plane, [s0, s1]) in [r, g, b].into_iter().zip(&DE) {
        let v = _mm512_maskz_permutex2var_epi8(s0.lanes, a0, idx(s0), a1);
        let v = _mm512_mask_permutexvar_epi8(v, s1.lanes, idx(s1), a2);
        _mm512_storeu_si512(plane[x..x + 64].as_mut_ptr() as *mut _, v);
    }
}

/// Pixels `x .. x + 64` of the planes into an RGB row.
///
/// # Safety
/// AVX-512 F/BW/VBMI; each plane holds `x + 64` bytes, `row` `3(x + 64)`.
#[inline(always)]
pub unsafe fn interleave64(r: &[u8], g: &[u8], b: &[u8], x: usize, row: &mut [u8]) {
    debug_assert!(row.len() >= 3 * (x + 64));
    let pr = _mm512_loadu_si512(r[x..x + 64].as_ptr() as *const _);
    let pg = _mm512_loadu_si512(g[x..x + 64].as_ptr() as *const _);
    let pb = _mm512_loadu_si512(b[x..x + 64].as_ptr() as *const _);
    let out = row.as_mut_ptr().add(3 * x);
    for (k, [s0, s1]) in IN.iter().enumerate() {
        let v = _mm512_maskz_permutex2var_epi8(s0.lanes, pr, idx(s0), pg);
        let v = _mm512_mask_permutexvar_epi8(v, s1.lanes, idx(s1), pb);
        _mm512_storeu_si512(out.add(64 * k) as *mut _, v);
    }
}

/// `v = lut[v]` over a plane: two 128-entry permutes, picked by the index's top bit.
///
/// # Safety
/// AVX-512 F/BW/VBMI.
#[inline(always)]
pub unsafe fn lookup(plane: &mut [u8], lut: &[u8; 256]) {
    let t = lut.as_ptr();
    let t = [
        _mm512_loadu_si512(t as *const _),
        _mm512_loadu_si512(t.add(64) as *const _),
        _mm512_loadu_si512(t.add(128) as *const _),
        _mm512_loadu_si512(t.add(192) as *const _),
    ];
    for chunk in plane.chunks_mut(64) {
        let m = if chunk.len() == 64 {
            !0
        } else {
            (1u64 << chunk.len()) - 1
        };
        let p = chunk.as_mut_ptr() as *mut i8;
        let x = _mm512_maskz_loadu_epi8(m, p);
        let lo = _mm512_permutex2var_epi8(t[0], x, t[1]);
        let hi = _mm512_permutex2var_epi8(t[2], x, t[3]);
        let y = _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), lo, hi);
        _mm512_mask_storeu_epi8(p, m, y);
    }
}

/// Saturation, `v = blend(luma, v, f)` on each channel, 16 pixels at a time. Pillow's luma
/// `(19595 r + 38470 g + 7471 b + 2¹⁵) >> 16` is evaluated in f32, where every partial sum is
/// an integer below 2²⁴ and so exact; the blend is [`crate::photometric::blend`]'s multiply,
/// then add (two roundings, as in Pillow), truncated and clipped.
///
/// # Safety
/// AVX-512 F/BW/VL; the planes have equal lengths.
#[inline(always)]
pub unsafe fn saturation(r: &mut [u8], g: &mut [u8], b: &mut [u8], f: f32) {
    let n = r.len();
    assert!(g.len() == n && b.len() == n);
    let (zero, top, fv) = (
        _mm512_setzero_ps(),
        _mm512_set1_ps(255.0),
        _mm512_set1_ps(f),
    );
    for k in (0..n).step_by(16) {
        let m: __mmask16 = if n - k >= 16 { !0 } else { (1 << (n - k)) - 1 };
        let p = [r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr()].map(|p| p.add(k) as *mut i8);
        let rf = load16(m, p[0]);
        let gf = load16(m, p[1]);
        let bf = load16(m, p[2]);
        let l = _mm512_fmadd_ps(bf, _mm512_set1_ps(7471.0), _mm512_set1_ps(32768.0));
        let l = _mm512_fmadd_ps(gf, _mm512_set1_ps(38470.0), l);
        let l = _mm512_fmadd_ps(rf, _mm512_set1_ps(19595.0), l);
        let l = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(_mm512_mul_ps(
            l,
            _mm512_set1_ps(1.0 / 65536.0),
        )));
        for (p, v) in p.into_iter().zip([rf, gf, bf]) {
            let t = _mm512_add_ps(l, _mm512_mul_ps(fv, _mm512_sub_ps(v, l)));
            let t = _mm512_min_ps(_mm512_max_ps(t, zero), top);
            _mm_mask_storeu_epi8(p, m, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t)));
        }
    }
}

/// The bytes under `m` at `p` as f32 lanes.
#[inline(always)]
unsafe fn load16(m: __mmask16, p: *const i8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)))
}
