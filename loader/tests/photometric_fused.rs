//! The fused photometric pipeline and its SIMD kernels against the op-by-op reference.

use loader::engine::flip_rows;
use loader::fused::{apply_fused_with, Simd};
use loader::photometric::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random params over wider ranges than the recipe (factors 0–2, any hue shift), every op order,
/// grayscale / blur / solarise each on or off.
fn random_params(rng: &mut ChaCha8Rng) -> PhotoParams {
    let mut p = PhotoParams::default();
    if rng.random::<f64>() < 0.85 {
        let mut ops = vec![
            JitterOp::Brightness(rng.random_range(0.0..2.0)),
            JitterOp::Contrast(rng.random_range(0.0..2.0)),
            JitterOp::Saturation(rng.random_range(0.0..2.0)),
            JitterOp::Hue(rng.random_range(-0.5..0.5)),
        ];
        ops.shuffle(rng);
        // Sometimes a subset, to reach every prefix shape before the contrast op.
        let keep = if rng.random::<f64>() < 0.3 {
            rng.random_range(0..=4)
        } else {
            4
        };
        ops.truncate(keep);
        p.jitter = ops;
    }
    p.grayscale = rng.random::<f64>() < 0.3;
    if rng.random::<f64>() < 0.5 {
        p.blur = Some(rng.random_range(0.1..2.5));
    }
    p.solarize = rng.random::<f64>() < 0.3;
    p
}

/// Smooth gradients plus noise, with runs of exact grays and saturated colours (the special
/// cases of the HSV round trip).
fn random_image(rng: &mut ChaCha8Rng, w: usize, h: usize) -> Vec<u8> {
    let mut img = Vec::with_capacity(w * h * 3);
    let base: [u8; 3] = rng.random();
    for y in 0..h {
        for x in 0..w {
            match rng.random_range(0..10) {
                0 => {
                    let v: u8 = rng.random();
                    img.extend_from_slice(&[v, v, v]);
                }
                1 => img.extend_from_slice(&[255, rng.random(), 0]),
                _ => {
                    for (c, b) in base.iter().enumerate() {
                        let g = b.wrapping_add((x * (c + 1) + y * 2) as u8);
                        img.push(g.wrapping_add(rng.random_range(0..24)));
                    }
                }
            }
        }
    }
    img
}

/// Every level this CPU has (the scalar one included).
fn levels() -> Vec<Simd> {
    [Simd::Scalar, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|&s| s <= Simd::hardware())
        .collect()
}

#[test]
fn fused_pipeline_equals_the_reference_ops() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut scratch = PhotoScratch::default();
    let mut blur = Vec::new();
    let mut fired = [0u32; 4];
    for case in 0..1500 {
        let (w, h) = if case % 50 == 0 {
            (96, 96)
        } else {
            (rng.random_range(1..41), rng.random_range(1..41))
        };
        let img = random_image(&mut rng, w, h);
        let p = random_params(&mut rng);
        let flip = rng.random::<bool>();
        let mut want = img.clone();
        if flip {
            flip_rows(&mut want, w, h);
        }
        p.apply_reference(&mut want, w, h, &mut blur);
        for simd in levels() {
            let mut got = img.clone();
            apply_fused_with(simd, &p, &mut got, w, h, flip, &mut scratch);
            assert_eq!(
                got, want,
                "case {case} ({simd:?}): {w}x{h} flip {flip} {p:?}"
            );
        }
        // The three plan shapes around contrast, and gray + blur, are all exercised.
        let ci = p
            .jitter
            .iter()
            .position(|o| matches!(o, JitterOp::Contrast(_)));
        if let Some(k) = ci {
            let pre_lut = p.jitter[..k]
                .iter()
                .all(|o| matches!(o, JitterOp::Brightness(_)));
            fired[if k == 0 {
                0
            } else if pre_lut {
                1
            } else {
                2
            }] += 1;
        }
        fired[3] += (p.grayscale && p.blur.is_some()) as u32;
    }
    assert!(fired.iter().all(|&n| n > 20), "plan shapes {fired:?}");
}

#[test]
fn fused_pipeline_equals_the_reference_on_recipe_draws() {
    // The recipe's own parameter draws on crop-sized images.
    let aug = shared::config::AugmentConfig::default();
    let mut rng = shared::rng::sample_rng(99, 0, 0);
    let mut img_rng = ChaCha8Rng::seed_from_u64(3);
    let mut scratch = PhotoScratch::default();
    let mut blur = Vec::new();
    for case in 0..60 {
        let size = if case % 6 == 0 { 224 } else { 96 };
        let img = random_image(&mut img_rng, size, size);
        let p = PhotoParams::draw(&aug, &mut rng);
        let mut want = img.clone();
        p.apply_reference(&mut want, size, size, &mut blur);
        for simd in levels() {
            let mut got = img.clone();
            apply_fused_with(simd, &p, &mut got, size, size, false, &mut scratch);
            assert_eq!(got, want, "case {case} ({simd:?}): {p:?}");
        }
    }
}

#[test]
fn gray_blur_on_one_plane_equals_blur_of_each_channel() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..40 {
        let (w, h) = (rng.random_range(1..50), rng.random_range(1..50));
        let gray: Vec<u8> = (0..w * h).map(|_| rng.random()).collect();
        let sigma = rng.random_range(0.1..3.0);
        let mut rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
        gaussian_blur(&mut rgb, w, h, sigma, &mut Vec::new());
        let mut plane = gray.clone();
        box_blur_plane::<1>(&mut plane, w, h, sigma, &mut Vec::new(), &mut Vec::new());
        let want: Vec<u8> = plane.iter().flat_map(|&v| [v, v, v]).collect();
        assert_eq!(rgb, want, "{w}x{h} sigma {sigma}");
    }
}

#[test]
fn table_helpers_match_the_ops() {
    let all: Vec<u8> = (0..=255).collect();
    for f in [0.0f32, 0.6, 1.0, 1.37, 2.0] {
        let mut b = all.clone();
        brightness(&mut b, f);
        assert_eq!(b, brightness_lut(f).to_vec());
    }
    assert_eq!(hue_shift(0.1), 25);
    assert_eq!(hue_shift(-0.1), 231); // -25 wrapped
    assert_eq!(hue_shift(-0.001), 0); // truncation toward zero, not floor
    assert_eq!(contrast_mean(301, 2), 151);
}

/// One SIMD hue kernel set: the two halves of the round trip and the whole op.
type Planes = unsafe fn(&mut [u8], &mut [u8], &mut [u8]);
type HueOp = unsafe fn(&mut [u8], &mut [u8], &mut [u8], u8);

/// The SIMD hue kernels the CPU has, by name.
#[cfg(target_arch = "x86_64")]
fn hue_kernels() -> Vec<(&'static str, Planes, Planes, HueOp)> {
    use loader::{hue_avx512 as k512, hue_simd as k2};
    let mut out: Vec<(&'static str, Planes, Planes, HueOp)> = Vec::new();
    if Simd::hardware() >= Simd::Avx2 {
        out.push((
            "avx2",
            k2::rgb_to_hsv_planes,
            k2::hsv_to_rgb_planes,
            k2::hue_planes,
        ));
    }
    if Simd::hardware() >= Simd::Avx512 {
        out.push((
            "avx512",
            k512::rgb_to_hsv_planes,
            k512::hsv_to_rgb_planes,
            k512::hue_planes,
        ));
    }
    if out.is_empty() {
        eprintln!("no AVX2 on this CPU: no SIMD hue kernel is used, nothing to check");
    }
    out
}

/// The SIMD HSV kernels against Pillow's scalar expressions on every input: all 2^24 (r, g, b)
/// for the forward half and all 2^24 (h, s, v) for the backward half.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_hsv_round_trip_halves_equal_the_reference_on_all_inputs() {
    let n = 1usize << 24;
    let a0: Vec<u8> = (0..n).map(|i| (i >> 16) as u8).collect();
    let b0: Vec<u8> = (0..n).map(|i| (i >> 8) as u8).collect();
    let c0: Vec<u8> = (0..n).map(|i| i as u8).collect();
    for (name, fwd, bwd, _) in hue_kernels() {
        let (mut a, mut b, mut c) = (a0.clone(), b0.clone(), c0.clone());
        // SAFETY: the CPU has the kernel's instructions (`hue_kernels`); equal lengths, a
        // multiple of 16.
        unsafe { fwd(&mut a, &mut b, &mut c) };
        for i in 0..n {
            let want = rgb_to_hsv(a0[i], b0[i], c0[i]);
            let inp = (a0[i], b0[i], c0[i]);
            assert_eq!((a[i], b[i], c[i]), want, "{name} rgb2hsv {inp:?}");
        }
        let (mut a, mut b, mut c) = (a0.clone(), b0.clone(), c0.clone());
        // SAFETY: as above.
        unsafe { bwd(&mut a, &mut b, &mut c) };
        for i in 0..n {
            let want = hsv_to_rgb(a0[i], b0[i], c0[i]);
            let inp = (a0[i], b0[i], c0[i]);
            assert_eq!((a[i], b[i], c[i]), want, "{name} hsv2rgb {inp:?}");
        }
    }
}

/// The whole SIMD hue op (with the shift between the halves) against the scalar op, every
/// shift; 4096 pixels and 4091 (the AVX-512 kernel's masked tail).
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_hue_equals_scalar_hue_for_every_shift() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, _, _, hue) in hue_kernels() {
        let n = if name == "avx512" { 4091 } else { 4096 };
        let px: Vec<u8> = random_image(&mut rng, n, 1);
        for shift in 0..=255u8 {
            let (mut r, mut g, mut b): (Vec<u8>, Vec<u8>, Vec<u8>) = (
                px.iter().step_by(3).copied().collect(),
                px.iter().skip(1).step_by(3).copied().collect(),
                px.iter().skip(2).step_by(3).copied().collect(),
            );
            // SAFETY: the CPU has the kernel's instructions; equal lengths (a multiple of 8
            // for the AVX2 kernel, which needs it).
            unsafe { hue(&mut r, &mut g, &mut b, shift) };
            for (i, p) in px.chunks_exact(3).enumerate() {
                let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
                let want = hsv_to_rgb(h.wrapping_add(shift), s, v);
                assert_eq!((r[i], g[i], b[i]), want, "{name} shift {shift} pixel {p:?}");
            }
        }
    }
}
