//! Photometric ops against hand-computed PIL values and a direct convolution.

use loader::photometric::*;
use shared::config::AugmentConfig;
use shared::rng::sample_rng;

#[test]
fn solarize_hand_values() {
    let mut px = vec![0u8, 127, 128, 200, 255, 64];
    solarize(&mut px);
    assert_eq!(px, vec![0, 127, 127, 55, 0, 64]);
}

#[test]
fn grayscale_luma_299_587_114() {
    // (299 R + 587 G + 114 B) / 1000, rounded (Pillow computes it in 16-bit fixed point).
    let cases = [
        ((255, 0, 0), 76),
        ((0, 255, 0), 150),
        ((0, 0, 255), 29),
        ((100, 150, 200), 141),
        ((255, 255, 255), 255),
    ];
    for ((r, g, b), want) in cases {
        assert_eq!(luma(r, g, b), want, "{r} {g} {b}");
        let exact = (299.0 * r as f64 + 587.0 * g as f64 + 114.0 * b as f64) / 1000.0;
        assert!((luma(r, g, b) as f64 - exact).abs() <= 0.5 + 1e-9);
        let mut px = vec![r, g, b];
        grayscale(&mut px);
        assert_eq!(px, vec![want; 3]);
    }
}

#[test]
fn brightness_blends_with_black_and_truncates() {
    let mut px = vec![201u8, 101, 200, 0, 255, 10];
    brightness(&mut px, 0.5);
    assert_eq!(px, vec![100, 50, 100, 0, 127, 5]);
    let mut px = vec![101u8, 200, 0, 170, 171, 1];
    brightness(&mut px, 1.5);
    assert_eq!(px, vec![151, 255, 0, 255, 255, 1]);
}

#[test]
fn contrast_blends_with_the_rounded_mean_luma() {
    // Two gray pixels 100 and 201: luma mean 150.5 → int(151.0) = 151.
    let mut px = vec![100u8, 100, 100, 201, 201, 201];
    contrast(&mut px, 0.5);
    // 151 + .5(100 − 151) = 125.5 → 125; 151 + .5(201 − 151) = 176.
    assert_eq!(px, vec![125, 125, 125, 176, 176, 176]);
    let mut px = vec![100u8, 100, 100, 201, 201, 201];
    contrast(&mut px, 1.4);
    // 151 + 1.4(−51) = 79.6 → 79; 151 + 1.4·50 = 221.
    assert_eq!(px, vec![79, 79, 79, 221, 221, 221]);
    let mut flat = vec![77u8; 30];
    contrast(&mut flat, 0.6);
    assert!(flat.iter().all(|&v| v == 77));
}

#[test]
fn saturation_zero_is_grayscale_and_one_is_identity() {
    let img: Vec<u8> = (0..300u32).map(|i| (i * 37 % 256) as u8).collect();
    let mut a = img.clone();
    saturation(&mut a, 0.0);
    let mut g = img.clone();
    grayscale(&mut g);
    assert_eq!(a, g);
    let mut b = img.clone();
    saturation(&mut b, 1.0);
    assert_eq!(b, img);
    // (200, 100, 0): luma = (19595·200 + 38470·100 + 0x8000) >> 16 = 118 (exact 118.5):
    // 118 + 1.2(200 − 118) = 216.4 → 216,
    // 118 + 1.2(−18) = 96.4 → 96, 118 − 141.6 < 0 → 0.
    let mut px = vec![200u8, 100, 0];
    saturation(&mut px, 1.2);
    assert_eq!(px, vec![216, 96, 0]);
}

#[test]
fn hue_rotates_primaries_and_keeps_grays() {
    // Shift by a third of the circle: trunc(255/3) = 85 → red becomes green.
    let mut px = vec![255u8, 0, 0, 0, 255, 0, 90, 90, 90];
    hue(&mut px, 1.0 / 3.0);
    assert_eq!(&px[0..3], &[0, 255, 0]);
    assert_eq!(&px[3..6], &[0, 0, 255]);
    assert_eq!(&px[6..9], &[90, 90, 90]);
    // Negative shift wraps in uint8: −85 ≡ 171, one step past blue (170): i = 4,
    // f = 171·6/255 − 4 = 6/255 → t = round(255·f) = 6.
    let mut px = vec![255u8, 0, 0];
    hue(&mut px, -1.0 / 3.0);
    assert_eq!(px, vec![6, 0, 255]);
    // Pillow's HSV of (200, 100, 50): h = (100−50)/150/6 = .0556 → 14, s = 150/200 → 191.
    assert_eq!(rgb_to_hsv(200, 100, 50), (14, 191, 200));
    // A zero shift still round-trips through uint8 HSV: H is quantised to 1/255 of the circle,
    // worth up to 6 levels of a channel, so close to but not always the identity.
    let mut px: Vec<u8> = (0..3000u32).map(|i| (i * 91 % 256) as u8).collect();
    let orig = px.clone();
    hue(&mut px, 0.0);
    assert!(px
        .iter()
        .zip(&orig)
        .all(|(a, b)| (*a as i32 - *b as i32).abs() <= 6));
}

/// Reference: the PIL blur as one direct convolution per axis with the composed kernel of the
/// three extended boxes (no intermediate rounding), edges repeated.
fn reference_blur(img: &[u8], w: usize, h: usize, sigma: f32) -> Vec<f64> {
    let bw = BoxWeights::new(box_radius(sigma, 3));
    let r = bw.radius as isize;
    let mut k1 = vec![0f64; (2 * r + 3) as usize];
    let n1 = k1.len();
    for (i, k) in k1.iter_mut().enumerate() {
        *k = if i == 0 || i == n1 - 1 {
            bw.fw as f64
        } else {
            bw.ww as f64
        } / (1u64 << 24) as f64;
    }
    let mut kernel = vec![1.0f64];
    for _ in 0..3 {
        let mut next = vec![0f64; kernel.len() + k1.len() - 1];
        for (i, a) in kernel.iter().enumerate() {
            for (j, b) in k1.iter().enumerate() {
                next[i + j] += a * b;
            }
        }
        kernel = next;
    }
    let half = (kernel.len() / 2) as isize;
    let conv = |get: &dyn Fn(isize) -> f64| -> f64 {
        kernel
            .iter()
            .enumerate()
            .map(|(i, k)| k * get(i as isize - half))
            .sum()
    };
    let mut tmp = vec![0f64; img.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                tmp[(y * w + x) * 3 + c] = conv(&|d| {
                    img[(y * w + (x as isize + d).clamp(0, w as isize - 1) as usize) * 3 + c] as f64
                });
            }
        }
    }
    let mut out = vec![0f64; img.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                out[(y * w + x) * 3 + c] = conv(&|d| {
                    tmp[(((y as isize + d).clamp(0, h as isize - 1) as usize) * w + x) * 3 + c]
                });
            }
        }
    }
    out
}

/// Pillow's blur written as direct sums: each pass is out[x] = round(Σ_{|k|≤r} ww·in[x+k] +
/// fw·(in[x−r−1] + in[x+r+1])) in 24-bit fixed point with clamped indices (no running sum).
fn pillow_blur_direct(img: &[u8], w: usize, h: usize, sigma: f32) -> Vec<u8> {
    let bw = BoxWeights::new(box_radius(sigma, 3));
    let r = bw.radius as isize;
    let mut cur = img.to_vec();
    for horizontal in [true, true, true, false, false, false] {
        let prev = cur.clone();
        type At<'a> = Box<dyn Fn(usize, usize, isize, usize) -> u32 + 'a>;
        let (n, at): (isize, At<'_>) = if horizontal {
            (
                w as isize,
                Box::new(|x, y, d, c| {
                    prev[(y * w + (x as isize + d).clamp(0, w as isize - 1) as usize) * 3 + c]
                        as u32
                }),
            )
        } else {
            (
                h as isize,
                Box::new(|x, y, d, c| {
                    prev[(((y as isize + d).clamp(0, h as isize - 1) as usize) * w + x) * 3 + c]
                        as u32
                }),
            )
        };
        let _ = n;
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let inner: u32 = (-r..=r).map(|d| at(x, y, d, c)).sum();
                    let bulk = inner * bw.ww + (at(x, y, -r - 1, c) + at(x, y, r + 1, c)) * bw.fw;
                    cur[(y * w + x) * 3 + c] = ((bulk + (1 << 23)) >> 24) as u8;
                }
            }
        }
    }
    cur
}

#[test]
fn blur_matches_a_direct_convolution() {
    let (w, h) = (37usize, 23usize);
    let img: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    for sigma in [0.1f32, 0.5, 1.0, 1.7, 2.0, 6.0] {
        let mut out = img.clone();
        gaussian_blur(&mut out, w, h, sigma, &mut Vec::new());
        assert_eq!(out, pillow_blur_direct(&img, w, h, sigma), "sigma {sigma}");
    }
}

#[test]
fn blur_is_close_to_the_unrounded_gaussian() {
    let (w, h) = (48usize, 40usize);
    let img: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    for sigma in [0.1f32, 0.5, 1.0, 1.7, 2.0] {
        let mut out = img.clone();
        gaussian_blur(&mut out, w, h, sigma, &mut Vec::new());
        let want = reference_blur(&img, w, h, sigma);
        // Edge repetition per pass differs from one composed kernel near the border: compare
        // the interior only.
        let m = 3 * (BoxWeights::new(box_radius(sigma, 3)).radius + 1) + 1;
        let mut errs = Vec::new();
        for y in m..h - m {
            for x in m..w - m {
                for c in 0..3 {
                    let i = (y * w + x) * 3 + c;
                    errs.push((out[i] as f64 - want[i]).abs());
                }
            }
        }
        let max_err = errs.iter().cloned().fold(0.0, f64::max);
        let mean_err = errs.iter().sum::<f64>() / errs.len() as f64;
        // Six passes each rounding to uint8 (±0.5 each) on a noisy image.
        assert!(max_err <= 3.0, "sigma {sigma}: max error {max_err}");
        // At σ = 0.1 every pass moves values by < 0.5 and rounds back: Pillow's result is the
        // identity while the unrounded kernel is not, so only the max bound applies there.
        assert!(
            sigma < 0.2 || mean_err < 1.0,
            "sigma {sigma}: mean error {mean_err}"
        );
    }
    // A constant image is unchanged.
    let mut flat = vec![93u8; 20 * 10 * 3];
    gaussian_blur(&mut flat, 20, 10, 1.3, &mut Vec::new());
    assert!(flat.iter().all(|&v| v == 93));
}

#[test]
fn box_radius_gives_the_requested_variance() {
    // Three extended boxes of radius l + a: each has variance σ²/3 (Gwosdek et al.).
    for sigma in [0.3f32, 0.8, 1.0, 1.5, 2.0] {
        let fr = box_radius(sigma, 3) as f64;
        let l = fr.floor();
        let a = fr - l;
        // Extended box: weight 1 on |x| ≤ l, weight a on |x| = l + 1, normalised.
        let norm = 2.0 * l + 1.0 + 2.0 * a;
        let var = (2.0 * (1..=l as i64).map(|x| (x * x) as f64).sum::<f64>()
            + 2.0 * a * (l + 1.0).powi(2))
            / norm;
        assert!(
            (3.0 * var - (sigma as f64).powi(2)).abs() < 1e-3,
            "sigma {sigma}: 3·var {}",
            3.0 * var
        );
    }
}

#[test]
fn selector_rates_match_the_spec() {
    // Marginal rates per crop: jitter .8, grayscale .2, blur .425, solarise .10.
    let aug = AugmentConfig::default();
    let n = 20000;
    let (mut j, mut g, mut b, mut s) = (0, 0, 0, 0);
    let mut rng = sample_rng(5, 0, 0);
    for _ in 0..n {
        let p = PhotoParams::draw(&aug, &mut rng);
        j += !p.jitter.is_empty() as usize;
        g += p.grayscale as usize;
        b += p.blur.is_some() as usize;
        s += p.solarize as usize;
        if let Some(sig) = p.blur {
            assert!((0.1..=2.0).contains(&sig));
        }
        if !p.jitter.is_empty() {
            assert_eq!(p.jitter.len(), 4);
        }
    }
    let rate = |x: usize| x as f64 / n as f64;
    assert!((rate(j) - 0.8).abs() < 0.015);
    assert!((rate(g) - 0.2).abs() < 0.015);
    assert!((rate(b) - 0.425).abs() < 0.015);
    assert!((rate(s) - 0.10).abs() < 0.01);
}

#[test]
fn table_hsv_is_bit_identical_to_pillow_formula() {
    // Every (r, g, b) with a coarse step plus all the pure-case extremes.
    for r in (0..=255u32).step_by(3) {
        for g in (0..=255u32).step_by(5) {
            for b in (0..=255u32).step_by(7) {
                let (r, g, b) = (r as u8, g as u8, b as u8);
                assert_eq!(rgb_to_hsv_fast(r, g, b), rgb_to_hsv(r, g, b), "{r} {g} {b}");
            }
        }
    }
    for v in [0u8, 1, 128, 254, 255] {
        for (r, g, b) in [
            (v, 0, 0),
            (0, v, 0),
            (0, 0, v),
            (v, v, 0),
            (v, 0, v),
            (0, v, v),
            (v, 3, 3),
            (3, v, 3),
            (3, 3, v),
        ] {
            assert_eq!(rgb_to_hsv_fast(r, g, b), rgb_to_hsv(r, g, b), "{r} {g} {b}");
        }
    }
}

#[test]
fn fast_hsv_round_trip_is_bit_identical_on_all_2_pow_24_inputs() {
    for x in 0..1u32 << 24 {
        let (a, b, c) = ((x >> 16) as u8, (x >> 8) as u8, x as u8);
        assert_eq!(
            rgb_to_hsv_fast(a, b, c),
            rgb_to_hsv(a, b, c),
            "rgb {a} {b} {c}"
        );
        assert_eq!(
            hsv_to_rgb_fast(a, b, c),
            hsv_to_rgb(a, b, c),
            "hsv {a} {b} {c}"
        );
    }
}

/// The per-pixel formula `hue` used before the table-driven rewrite.
fn reference_hue(img: &mut [u8], factor: f32) {
    let shift = ((factor as f64 * 255.0) as i32) as u8;
    for px in img.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(px[0], px[1], px[2]);
        let (r, g, b) = hsv_to_rgb(h.wrapping_add(shift), s, v);
        px.copy_from_slice(&[r, g, b]);
    }
}

#[test]
fn hue_matches_the_reference_formula_on_random_pixels() {
    use rand::Rng;
    let mut rng = sample_rng(5, 0, 0);
    let img: Vec<u8> = (0..3 * 20_000).map(|_| rng.random::<u8>()).collect();
    for factor in [-0.5f32, -0.1, -0.0371, 0.0, 0.004, 0.05, 0.1, 0.5] {
        let (mut fast, mut slow) = (img.clone(), img.clone());
        hue(&mut fast, factor);
        reference_hue(&mut slow, factor);
        assert_eq!(fast, slow, "factor {factor}");
    }
}

#[test]
fn photo_records_round_trip_every_drawn_decision() {
    // The batch carries PhotoRecords; the trainer rebuilds the decisions from them.
    let aug = AugmentConfig::default();
    let (mut jitter, mut blur, mut gray, mut sol) = (0, 0, 0, 0);
    for i in 0..2000 {
        let p = PhotoParams::draw(&aug, &mut sample_rng(3, 1, i));
        let r = p.record();
        assert_eq!(PhotoParams::from_record(&r), p, "sample {i}: {r:?}");
        jitter += !p.jitter.is_empty() as u32;
        blur += p.blur.is_some() as u32;
        gray += p.grayscale as u32;
        sol += p.solarize as u32;
    }
    // Every kind of decision was exercised (recipe probabilities 0.8, ~0.5, 0.2, ~0.1).
    assert!(
        jitter > 1400 && blur > 700 && gray > 300 && sol > 100,
        "{jitter} {blur} {gray} {sol}"
    );
}
