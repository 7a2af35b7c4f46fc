//! `trainer::photometric::apply` (candle ops, any device; run here on the CPU) against the
//! loader's CPU reference `PhotoParams::apply_reference`, byte for byte: drawn records, every op
//! alone, hue/contrast/saturation/blur edge cases, several sizes and non-square crops; plus the
//! HSV round trip over all 2^24 inputs of each direction. Built with `--features cuda` on a machine
//! with a GPU, every check runs on CUDA too.

use candle_core::{DType, Device, Tensor};
use loader::photometric::{box_radius, hsv_to_rgb, rgb_to_hsv, BoxWeights, PhotoParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::config::AugmentConfig;
use shared::geometry::PhotoRecord;
use shared::rng::sample_rng;
use trainer::photometric::{self, apply};

/// A test crop: `h × w` RGB bytes.
#[derive(Clone)]
struct Crop {
    h: usize,
    w: usize,
    px: Vec<u8>,
}

fn random_crop(h: usize, w: usize, seed: u64) -> Crop {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let px = (0..h * w * 3).map(|_| rng.random::<u8>()).collect();
    Crop { h, w, px }
}

/// Smooth and sharp content, asymmetric in x and y: gradients per channel, a saturated blob off
/// centre, a checkerboard corner, gray ramps and some noise.
fn structured_crop(h: usize, w: usize, seed: u64) -> Crop {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (cx, cy) = (w as f64 * 0.3, h as f64 * 0.65);
    let mut px = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 / w as f64, y as f64 / h as f64);
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            let rgb: [u8; 3] = if d < w.min(h) as f64 * 0.2 {
                [230, 20 + (y % 7) as u8, 40]
            } else if x < w / 4 && y < h / 4 {
                let c = if (x / 2 + y / 2) % 2 == 0 { 250 } else { 5 };
                [c, c, c]
            } else if y > h * 3 / 4 {
                let g = (fx * 255.0) as u8;
                [g, g, g]
            } else {
                let noise = rng.random_range(0..9) as f64 - 4.0;
                [
                    (fx * 255.0).clamp(0.0, 255.0) as u8,
                    ((1.0 - fy) * 200.0 + noise).clamp(0.0, 255.0) as u8,
                    ((fx * fy) * 255.0 + 2.0 * noise).clamp(0.0, 255.0) as u8,
                ]
            };
            px.extend_from_slice(&rgb);
        }
    }
    Crop { h, w, px }
}

fn constant_crop(h: usize, w: usize, rgb: [u8; 3]) -> Crop {
    Crop {
        h,
        w,
        px: rgb.iter().copied().cycle().take(h * w * 3).collect(),
    }
}

fn gray_crop(h: usize, w: usize, seed: u64) -> Crop {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut px = Vec::with_capacity(h * w * 3);
    for _ in 0..h * w {
        let v = rng.random::<u8>();
        px.extend_from_slice(&[v, v, v]);
    }
    Crop { h, w, px }
}

fn reference(crop: &Crop, r: &PhotoRecord) -> Vec<u8> {
    let mut img = crop.px.clone();
    PhotoParams::from_record(r).apply_reference(&mut img, crop.w, crop.h, &mut Vec::new());
    img
}

/// The CPU, and a CUDA GPU too when built with `--features cuda` on a machine that has one (the
/// same checks then cover candle's CUDA kernels).
fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if let Ok(cuda) = Device::cuda_if_available(0) {
        if cuda.is_cuda() {
            d.push(cuda);
        }
    }
    d
}

/// `apply` on a batch of same-size crops on `dev`; the result as bytes (checked to be integers
/// 0..=255).
fn device(crops: &[Crop], records: &[PhotoRecord], dev: &Device) -> Vec<Vec<u8>> {
    let (h, w) = (crops[0].h, crops[0].w);
    let flat: Vec<u8> = crops.iter().flat_map(|c| c.px.iter().copied()).collect();
    let x = Tensor::from_vec(flat, (crops.len(), h, w, 3), dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let y = apply(&x, records).unwrap();
    assert_eq!(y.dims(), x.dims());
    assert_eq!(y.dtype(), DType::F32);
    assert!(y.device().same_device(dev));
    let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    v.chunks(h * w * 3)
        .map(|c| {
            c.iter()
                .map(|&f| {
                    assert!(
                        f.fract() == 0.0 && (0.0..=255.0).contains(&f),
                        "non-byte output value {f}"
                    );
                    f as u8
                })
                .collect()
        })
        .collect()
}

/// Asserts `apply` == the reference on every crop and device, naming the first differing
/// crop/pixel.
fn check(crops: &[Crop], records: &[PhotoRecord]) {
    for dev in devices() {
        check_on(crops, records, &dev);
    }
}

fn check_on(crops: &[Crop], records: &[PhotoRecord], dev: &Device) {
    assert_eq!(crops.len(), records.len());
    let got = device(crops, records, dev);
    let mut bad = Vec::new();
    for (i, (crop, r)) in crops.iter().zip(records).enumerate() {
        let want = reference(crop, r);
        let n_diff = want.iter().zip(&got[i]).filter(|(a, b)| a != b).count();
        if n_diff > 0 {
            let k = want.iter().zip(&got[i]).position(|(a, b)| a != b).unwrap();
            bad.push(format!(
                "crop {i} ({}×{}): {n_diff} bytes differ, first at pixel {} ch {}: want {} got {} \
                 (input {:?}); record {r:?}",
                crop.h,
                crop.w,
                k / 3,
                k % 3,
                want[k],
                got[i][k],
                &crop.px[k / 3 * 3..k / 3 * 3 + 3],
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{dev:?}: {} crops differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn jitter(order: [u8; 4], b: f32, c: f32, s: f32, h: f32) -> PhotoRecord {
    PhotoRecord {
        order,
        flags: PhotoRecord::JITTER,
        brightness: b,
        contrast: c,
        saturation: s,
        hue: h,
        ..Default::default()
    }
}

/// A jitter record whose only non-identity op is `op` (fn_idx numbering) at factor `f`, in the
/// first slot. The other slots hold brightness/contrast/saturation at factor 1 (exact
/// identities); never hue, which is a lossy round trip even at shift 0.
fn only(op: u8, f: f32) -> PhotoRecord {
    let order = match op {
        PhotoRecord::BRIGHTNESS => [0, 1, 2, 1],
        PhotoRecord::CONTRAST => [1, 0, 2, 0],
        PhotoRecord::SATURATION => [2, 0, 1, 0],
        _ => [3, 0, 1, 2],
    };
    let mut r = jitter(order, 1.0, 1.0, 1.0, 0.0);
    match op {
        PhotoRecord::BRIGHTNESS => r.brightness = f,
        PhotoRecord::CONTRAST => r.contrast = f,
        PhotoRecord::SATURATION => r.saturation = f,
        _ => r.hue = f,
    }
    r
}

fn flagged(flags: u32, sigma: f32) -> PhotoRecord {
    PhotoRecord {
        flags,
        blur_sigma: sigma,
        ..Default::default()
    }
}

fn mixed_crops(n: usize, h: usize, w: usize, seed: u64) -> Vec<Crop> {
    (0..n)
        .map(|i| {
            let s = seed * 1000 + i as u64;
            match i % 4 {
                0 | 2 => structured_crop(h, w, s),
                1 => random_crop(h, w, s),
                _ => gray_crop(h, w, s),
            }
        })
        .collect()
}

fn draw_records(aug: &AugmentConfig, seed: u64, n: usize) -> Vec<PhotoRecord> {
    (0..n as u64)
        .map(|i| PhotoParams::draw(aug, &mut sample_rng(seed, 0, i)).record())
        .collect()
}

#[test]
fn drawn_records_match_reference() {
    let aug = AugmentConfig::default();
    for (seed, size) in [(1u64, 16usize), (2, 32), (3, 96)] {
        let n = if size == 96 { 12 } else { 24 };
        let records = draw_records(&aug, seed, n);
        check(&mixed_crops(n, size, size, seed), &records);
    }
}

#[test]
fn drawn_records_of_a_strong_recipe_match_reference() {
    // Every crop jittered with large factors (clipping, big hue shifts), more gray/blur/solarise.
    let aug = AugmentConfig {
        jitter_p: 1.0,
        brightness: 0.9,
        contrast: 0.9,
        saturation: 0.9,
        hue: 0.5,
        grayscale_p: 0.4,
        blur_p_local: 0.8,
        blur_p_global2: 0.5,
        solarize_p: 0.6,
        blur_sigma: [0.1, 4.0],
        ..AugmentConfig::default()
    };
    for (seed, h, w) in [(11u64, 32usize, 32usize), (12, 24, 40), (13, 48, 20)] {
        let records = draw_records(&aug, seed, 20);
        check(&mixed_crops(20, h, w, seed), &records);
    }
}

#[test]
fn every_op_alone_matches_reference() {
    let mut records = Vec::new();
    for f in [0.0f32, 0.37, 0.6, 1.0, 1.4, 2.5] {
        records.push(only(PhotoRecord::BRIGHTNESS, f));
        records.push(only(PhotoRecord::CONTRAST, f));
        records.push(only(PhotoRecord::SATURATION, f));
    }
    for f in [
        0.0f32, 0.5, -0.5, 1e-6, -1e-6, 0.1, -0.1, 0.25, 0.0039, -0.0039,
    ] {
        records.push(only(PhotoRecord::HUE, f));
    }
    records.push(flagged(PhotoRecord::GRAYSCALE, 0.0));
    records.push(flagged(PhotoRecord::SOLARIZE, 0.0));
    for sigma in [0.1f32, 0.5, 1.0, 2.0, 5.0] {
        records.push(flagged(PhotoRecord::BLUR, sigma));
    }
    records.push(PhotoRecord::default());
    for (h, w) in [(32usize, 32usize), (17, 29)] {
        let crops = mixed_crops(records.len(), h, w, 5);
        check(&crops, &records);
    }
}

#[test]
fn hue_edge_factors_match_reference() {
    // Shift 0 (factors 0 and |f| < 1/255) is still a lossy HSV round trip; ±0.5 wraps.
    let fs = [
        0.0f32, 0.5, -0.5, 1e-7, -1e-7, 0.003, -0.003, 0.49999, -0.49999,
    ];
    let records: Vec<PhotoRecord> = fs.iter().map(|&f| only(PhotoRecord::HUE, f)).collect();
    let crops: Vec<Crop> = (0..fs.len())
        .map(|i| random_crop(40, 40, 100 + i as u64))
        .collect();
    check(&crops, &records);
    // The round trip at shift 0 really changes some bytes (so the test would see it skipped).
    let rt = reference(&crops[0], &records[0]);
    assert_ne!(rt, crops[0].px);
}

#[test]
fn contrast_on_constant_and_saturation_on_gray_match_reference() {
    let mut crops = Vec::new();
    let mut records = Vec::new();
    for (i, rgb) in [[0u8, 0, 0], [255, 255, 255], [128, 64, 200], [7, 7, 7]]
        .into_iter()
        .enumerate()
    {
        for f in [0.0f32, 0.6, 1.7] {
            crops.push(constant_crop(16, 16, rgb));
            records.push(only(PhotoRecord::CONTRAST, f));
        }
        crops.push(gray_crop(16, 16, i as u64));
        records.push(only(PhotoRecord::SATURATION, 1.9));
        crops.push(gray_crop(16, 16, 10 + i as u64));
        records.push(only(PhotoRecord::SATURATION, 0.0));
    }
    check(&crops, &records);
}

#[test]
fn blur_matches_reference_on_sizes_and_sigmas() {
    for (h, w) in [
        (16usize, 16usize),
        (32, 32),
        (96, 96),
        (20, 44),
        (1, 1),
        (2, 5),
        (5, 3),
    ] {
        let sigmas = [0.1f32, 2.0, 0.7, 9.0];
        let records: Vec<PhotoRecord> = sigmas
            .iter()
            .map(|&s| flagged(PhotoRecord::BLUR, s))
            .collect();
        let crops = mixed_crops(sigmas.len(), h, w, (h * 100 + w) as u64);
        check(&crops, &records);
    }
}

#[test]
fn grayscale_blur_solarize_together_match_reference() {
    let all = PhotoRecord::GRAYSCALE | PhotoRecord::BLUR | PhotoRecord::SOLARIZE;
    let mut records = vec![
        flagged(all, 0.1),
        flagged(all, 2.0),
        flagged(PhotoRecord::BLUR | PhotoRecord::SOLARIZE, 1.3),
        flagged(PhotoRecord::GRAYSCALE | PhotoRecord::SOLARIZE, 0.0),
    ];
    let mut j = jitter([3, 1, 0, 2], 1.3, 0.7, 1.5, 0.08);
    j.flags |= all;
    j.blur_sigma = 1.1;
    records.push(j);
    check(&mixed_crops(records.len(), 96, 96, 21), &records);
}

#[test]
fn empty_batch_is_returned_unchanged() {
    let x = Tensor::zeros((0, 8, 8, 3), DType::F32, &Device::Cpu).unwrap();
    let y = apply(&x, &[]).unwrap();
    assert_eq!(y.dims(), &[0, 8, 8, 3]);
}

#[test]
fn batch_without_hue_or_blur_matches_reference() {
    let records = vec![
        jitter([0, 1, 2, 0], 1.2, 0.8, 1.5, 0.0),
        jitter([2, 0, 1, 2], 0.5, 1.3, 0.2, 0.0),
        flagged(PhotoRecord::GRAYSCALE, 0.0),
        flagged(PhotoRecord::SOLARIZE | PhotoRecord::BLUR, 0.0), // σ 0: box radius 0, no blur
        PhotoRecord::default(),
    ];
    let crops = mixed_crops(records.len(), 24, 24, 31);
    check(&crops, &records);
    // Untouched crops come back exactly.
    let out = device(&crops, &records, &Device::Cpu);
    assert_eq!(out[4], crops[4].px);
}

#[test]
fn blend_with_factor_one_is_an_exact_identity_in_f32() {
    // The premise of running the blend ops over all crops with α = 1 where they do not apply.
    for d in 0..=255u8 {
        for v in 0..=255u8 {
            let (d, v) = (d as f32, v as f32);
            assert_eq!(d + 1.0f32 * (v - d), v);
        }
    }
}

#[test]
fn box_matrices_match_the_sliding_sum() {
    for len in [1usize, 2, 3, 7, 16] {
        for sigma in [0.1f32, 1.0, 2.0, 6.0] {
            let bw = BoxWeights::new(box_radius(sigma, 3));
            let m = photometric::box_matrices(len, &[bw], &Device::Cpu).unwrap();
            let got: Vec<f64> = m.flatten_all().unwrap().to_vec1().unwrap();
            let r = bw.radius as isize;
            let clamp = |k: isize| k.clamp(0, len as isize - 1) as usize;
            let mut want = vec![0f64; len * len];
            for y in 0..len as isize {
                let row = &mut want[y as usize * len..][..len];
                for k in y - r..=y + r {
                    row[clamp(k)] += bw.ww as f64;
                }
                row[clamp(y - r - 1)] += bw.fw as f64;
                row[clamp(y + r + 1)] += bw.fw as f64;
            }
            assert_eq!(got, want, "len {len} sigma {sigma} {bw:?}");
        }
    }
}

/// Pixels `[chunk·2^20, (chunk+1)·2^20)` of all 2^24 byte triples, as a `[1, 1024, 1024, 3]`
/// tensor of channel values (c0, c1, c2) = (i >> 16, i >> 8, i) & 255.
fn all_triples(chunk: u32, dev: &Device) -> (Vec<[u8; 3]>, Tensor) {
    let t: Vec<[u8; 3]> = (chunk << 20..(chunk + 1) << 20)
        .map(|i| [(i >> 16) as u8, (i >> 8) as u8, i as u8])
        .collect();
    let flat: Vec<f32> = t.iter().flat_map(|p| p.map(|v| v as f32)).collect();
    let x = Tensor::from_vec(flat, (1, 1024, 1024, 3), dev).unwrap();
    (t, x)
}

fn plane(t: &Tensor) -> Vec<u8> {
    let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter()
        .map(|&f| {
            assert!(f.fract() == 0.0 && (0.0..=255.0).contains(&f), "{f}");
            f as u8
        })
        .collect()
}

#[test]
fn rgb_to_hsv_matches_reference_for_all_colours() {
    for (dev, chunk) in devices().iter().flat_map(|d| (0..16).map(move |c| (d, c))) {
        let (rgb, x) = all_triples(chunk, dev);
        let (h, s, v) = photometric::rgb_to_hsv(&x).unwrap();
        let (h, s, v) = (plane(&h), plane(&s), plane(&v));
        for (i, p) in rgb.iter().enumerate() {
            assert_eq!(
                (h[i], s[i], v[i]),
                rgb_to_hsv(p[0], p[1], p[2]),
                "{dev:?}: rgb {p:?}"
            );
        }
    }
}

#[test]
fn hsv_to_rgb_matches_reference_for_all_inputs() {
    for (dev, chunk) in devices().iter().flat_map(|d| (0..16).map(move |c| (d, c))) {
        let (hsv, x) = all_triples(chunk, dev);
        let x = x.to_dtype(DType::F64).unwrap();
        let ch = |i| x.narrow(3, i, 1).unwrap();
        let out = photometric::hsv_to_rgb(&ch(0), &ch(1), &ch(2)).unwrap();
        let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        for (i, p) in hsv.iter().enumerate() {
            let want = hsv_to_rgb(p[0], p[1], p[2]);
            let g = &got[3 * i..3 * i + 3];
            assert_eq!(
                (g[0], g[1], g[2]),
                (want.0 as f32, want.1 as f32, want.2 as f32),
                "{dev:?}: hsv {p:?}"
            );
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let dev = Device::Cpu;
    let r = [PhotoRecord::default()];
    let x = Tensor::zeros((1, 4, 4, 3), DType::F32, &dev).unwrap();
    // Count mismatch, wrong channels, wrong dtype.
    assert!(apply(&x, &[]).is_err());
    let x4 = Tensor::zeros((1, 4, 4, 4), DType::F32, &dev).unwrap();
    assert!(apply(&x4, &r).is_err());
    let xh = Tensor::zeros((1, 4, 4, 3), DType::F64, &dev).unwrap();
    assert!(apply(&xh, &r).is_err());
    // Unknown op code / non-finite factor: the message names the record.
    let bad = jitter([0, 1, 7, 3], 1.0, 1.0, 1.0, 0.0);
    let err = apply(&x, &[bad]).unwrap_err().to_string();
    assert!(
        err.contains("record 0") && err.contains("op code 7"),
        "{err}"
    );
    let nan = jitter([0, 1, 2, 3], f32::NAN, 1.0, 1.0, 0.0);
    assert!(apply(&x, &[nan]).is_err());
    // The same garbage without the JITTER flag is ignored, as by `from_record`.
    let off = PhotoRecord {
        order: [9, 9, 9, 9],
        ..Default::default()
    };
    assert!(apply(&x, &[off]).is_ok());
}

#[test]
fn contrast_on_a_large_crop_matches_reference() {
    // 260² pixels: Σ luma can pass 2^24, so the mean is summed in f64 (the other branch).
    // The gray crop's mean luma is 250.5 − 1/n: int(mean + 0.5) = 250 only if Σ is exact.
    let n = 260 * 260;
    let px = (0..n)
        .flat_map(|i| {
            let v = if i % 2 == 1 || i == 0 { 250u8 } else { 251 };
            [v, v, v]
        })
        .collect();
    let near_half = Crop { h: 260, w: 260, px };
    let crops = vec![
        near_half,
        constant_crop(260, 260, [250, 251, 255]),
        structured_crop(260, 260, 3),
    ];
    let records = vec![
        only(PhotoRecord::CONTRAST, 0.5),
        only(PhotoRecord::CONTRAST, 0.7),
        only(PhotoRecord::CONTRAST, 1.3),
    ];
    check(&crops, &records);
}

#[test]
fn strided_input_gives_the_same_bytes() {
    // A non-contiguous view (every other crop of a [2N, H, W, 3] tensor, transposed twice).
    let aug = AugmentConfig::default();
    let records = draw_records(&aug, 41, 6);
    let crops = mixed_crops(12, 24, 24, 41);
    let flat: Vec<u8> = crops.iter().flat_map(|c| c.px.iter().copied()).collect();
    let all = Tensor::from_vec(flat, (6, 2, 24, 24, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let view = all
        .narrow(1, 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert!(!view.is_contiguous());
    let a: Vec<f32> = apply(&view, &records)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = apply(&view.contiguous().unwrap(), &records)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    let odd: Vec<Crop> = crops.iter().skip(1).step_by(2).cloned().collect();
    check(&odd, &records);
}
