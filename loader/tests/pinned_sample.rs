//! Pins the exact bytes the crop engine produces, so speed work on resize / photometric code
//! cannot silently change a single pixel, mask or row. The hashes were computed from the engine
//! before the performance rewrite (commit 3765707) and updated once since, when the resize became
//! Pillow's own bicubic bit for bit (`tests/pillow_exact.rs` checks those bytes against Pillow); a
//! legitimate semantic change must update them and say why.

use loader::decode::RgbImage;
use loader::engine::CropEngine;
use loader::photometric::{JitterOp, PhotoParams, PhotoScratch};
use shared::config::AugmentConfig;
use shared::geometry::Sample;
use xxhash_rust::xxh3::xxh3_64;

/// A textured, non-symmetric 517×389 picture: gradients plus a hashed speckle, so that every
/// photometric op (hue, blur, contrast...) changes many pixels.
fn picture() -> RgbImage {
    let (w, h) = (517u32, 389u32);
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let n = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)).rotate_left(13);
            let speck = (n >> 24) as u8 / 4;
            data.push(((x * 255 / w) as u8).wrapping_add(speck));
            data.push(((y * 255 / h) as u8).saturating_add(speck / 2));
            data.push((((x + 2 * y) * 3) % 256) as u8 ^ speck);
        }
    }
    RgbImage::from_raw(w, h, data).unwrap()
}

fn sample_hash(s: &Sample) -> u64 {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&s.globals);
    bytes.extend_from_slice(&s.locals);
    for c in &s.crops {
        bytes.extend_from_slice(format!("{c:?}").as_bytes());
    }
    for m in s.global_mask.iter().chain(&s.local_mask) {
        bytes.extend_from_slice(&m.to_le_bytes());
    }
    for n in &s.n_valid {
        bytes.extend_from_slice(&n.to_le_bytes());
    }
    for r in &s.rows {
        bytes.extend_from_slice(&r.src.to_le_bytes());
        for t in r.tgt {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        for w in r.w {
            bytes.extend_from_slice(&w.to_bits().to_le_bytes());
        }
    }
    xxh3_64(&bytes)
}

const SEED: u64 = 1234;
const N: u64 = 12;

#[test]
fn samples_are_bit_identical_to_the_pinned_hashes() {
    let engine = CropEngine::new(AugmentConfig::default());
    let img = picture();
    let hashes: Vec<u64> = (0..N)
        .map(|i| sample_hash(&engine.make_sample(&img, SEED, 3, i, 7)))
        .collect();
    println!("{hashes:#018x?}");
    assert_eq!(hashes, PINNED);
}

/// The pinned samples exercise every photometric op at least once (otherwise the pin would not
/// guard them). Params are re-drawn here exactly as the engine draws them.
#[test]
fn pinned_samples_cover_every_photometric_op() {
    let aug = AugmentConfig::default();
    let engine = CropEngine::new(aug.clone());
    let img = picture();
    let (mut b, mut c, mut s, mut h, mut g, mut bl, mut so) = (0, 0, 0, 0, 0, 0, 0);
    for i in 0..N {
        let smp = engine.make_sample(&img, SEED, 3, i, 7);
        // Re-derive the photometric draws: same RNG stream, same order as make_sample_into.
        let mut rng = shared::rng::sample_rng(SEED, 3, i);
        let crops = loader::crops::sample_crops(&aug, img.height, img.width, &mut rng);
        assert_eq!(crops, smp.crops);
        loader::srs::sampling_mask(aug.global_grid(), aug.global_window, &mut rng);
        loader::srs::sampling_mask(aug.local_grid(), aug.local_window, &mut rng);
        for _ in &crops {
            let p = PhotoParams::draw(&aug, &mut rng);
            for op in &p.jitter {
                match op {
                    JitterOp::Brightness(_) => b += 1,
                    JitterOp::Contrast(_) => c += 1,
                    JitterOp::Saturation(_) => s += 1,
                    JitterOp::Hue(_) => h += 1,
                }
            }
            g += p.grayscale as u32;
            bl += p.blur.is_some() as u32;
            so += p.solarize as u32;
        }
    }
    for (name, n) in [
        ("brightness", b),
        ("contrast", c),
        ("saturation", s),
        ("hue", h),
        ("grayscale", g),
        ("blur", bl),
        ("solarize", so),
    ] {
        assert!(n > 0, "{name} never fires in the pinned samples");
    }
}

const PINNED: [u64; N as usize] = [
    13017002365483908629,
    6660853480803568106,
    14124636891090215144,
    2435943807782652487,
    1313742210231898,
    16818201728122533029,
    18416240971367303898,
    6223110718050663631,
    5234680462396294739,
    12792932099296036865,
    11861061652355178825,
    9964427818228109629,
];

/// The photometric stage alone, on fixed crops (independent of the resizer's SIMD path, which
/// may round differently on a CPU without AVX2): every crop's drawn params of the pinned
/// samples applied to a 224² and a 96² cut of the picture, by the fused pipeline (AVX2 where
/// the CPU has it), the fused pipeline without AVX2 kernels, and the op-by-op reference.
#[test]
fn photometric_output_is_bit_identical_to_the_pinned_hash() {
    let aug = AugmentConfig::default();
    let img = picture();
    let cut = |size: usize| -> Vec<u8> {
        let mut v = Vec::with_capacity(size * size * 3);
        for y in 0..size {
            let o = (y * img.width as usize) * 3;
            v.extend_from_slice(&img.data[o..o + size * 3]);
        }
        v
    };
    let (big, small) = (cut(224), cut(96));
    let (mut fused, mut scalar, mut reference) = (Vec::new(), Vec::new(), Vec::new());
    let mut scratch = PhotoScratch::default();
    let mut blur = Vec::new();
    for i in 0..N {
        let mut rng = shared::rng::sample_rng(SEED, 3, i);
        let crops = loader::crops::sample_crops(&aug, img.height, img.width, &mut rng);
        loader::srs::sampling_mask(aug.global_grid(), aug.global_window, &mut rng);
        loader::srs::sampling_mask(aug.local_grid(), aug.local_window, &mut rng);
        for k in 0..crops.len() {
            let p = PhotoParams::draw(&aug, &mut rng);
            let (src, size) = if k < 2 { (&big, 224) } else { (&small, 96) };
            let mut buf = src.clone();
            p.apply(&mut buf, size, size, &mut scratch);
            fused.push(xxh3_64(&buf));
            let mut buf = src.clone();
            loader::fused::apply_fused_scalar(&p, &mut buf, size, size, false, &mut scratch);
            scalar.push(xxh3_64(&buf));
            let mut buf = src.clone();
            p.apply_reference(&mut buf, size, size, &mut blur);
            reference.push(xxh3_64(&buf));
        }
    }
    let h = |all: &[u64]| xxh3_64(&all.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    println!("{:#x}", h(&fused));
    assert_eq!(h(&reference), PINNED_PHOTO, "op-by-op reference");
    assert_eq!(h(&fused), PINNED_PHOTO, "fused pipeline");
    assert_eq!(h(&scalar), PINNED_PHOTO, "fused pipeline, scalar kernels");
}

const PINNED_PHOTO: u64 = 3614037014115419959;
