//! The crop engine against Pillow itself: the pinned Pillow (`loader::pillow::PILLOW_VERSION`,
//! installed from PyPI into `target/pillow-venv` on first use) replays the decisions the engine
//! records — crop boxes, flips, photometric records — on the same encoded images, and every byte
//! must agree: the decoded image, each crop after crop + resize + flip (the loader's work with
//! `photometric = "device"`), and each finished crop. Images: generated pictures (PNG and JPEG,
//! tall, wide and tiny ones, so that both of Pillow 13's pass orders and upscaling occur), plus
//! real photos and the decoder edge cases of `../shared/data` when present; and a sweep of
//! random crop rectangles and output sizes through the resize alone.
//!
//! Skips with a message when python3, its venv module or PyPI is unavailable.

use std::path::{Path, PathBuf};

use loader::decode::decode_bytes;
use loader::engine::CropEngine;
use loader::pillow;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use shared::config::AugmentConfig;
use shared::geometry::{PhotoRecord, Sample};

/// Gradients, hard edges and speckle: bicubic overshoot gets clipped, edges show any tap error.
fn picture(w: u32, h: u32, seed: u64) -> image::RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cells = rng.random_range(3..12u32);
    image::RgbImage::from_fn(w, h, |x, y| {
        let n = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed as u32).rotate_left(13);
        let cell = ((x * cells / w) + (y * cells / h)).is_multiple_of(2);
        let edge = if cell { 255u8 } else { 0 };
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add((n >> 28) as u8),
            if n >> 30 == 0 {
                edge
            } else {
                (y * 255 / h.max(1)) as u8
            },
            edge ^ ((n >> 24) as u8 & 0x3f),
        ])
    })
}

fn encode(img: &image::RgbImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    if fmt == image::ImageFormat::Jpeg {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .unwrap();
    } else {
        img.write_to(&mut out, fmt).unwrap();
    }
    out.into_inner()
}

/// (name, encoded bytes) of every image the test runs on.
fn images() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (w, h)) in [
        (517, 389),
        (300, 1100), // tall: Pillow 13 resizes most crops vertically first
        (1200, 260), // wide
        (240, 230),
        (64, 48), // every crop is upscaled
        (23, 301),
    ]
    .into_iter()
    .enumerate()
    {
        let img = picture(w, h, i as u64);
        let fmt = [image::ImageFormat::Png, image::ImageFormat::Jpeg][i % 2];
        out.push((format!("generated {w}x{h} {fmt:?}"), encode(&img, fmt)));
    }
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    let photos = data.join("bench-photos/train/photos");
    if let Ok(dir) = std::fs::read_dir(&photos) {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        // Every 50th photo: 13 real photos, a few seconds.
        out.extend(
            paths
                .iter()
                .step_by(50)
                .map(|p| (p.display().to_string(), std::fs::read(p).unwrap())),
        );
    } else {
        eprintln!("{} absent: generated images only", photos.display());
    }
    for name in [
        "baseline_420.jpg",
        "progressive.jpg",
        "grayscale.jpg",
        "cmyk.jpg",
        "png_named.JPEG",
        "panorama_1000x100.jpg",
        "tiny_32x21.jpg",
    ] {
        let p = data.join("edge-cases").join(name);
        if let Ok(bytes) = std::fs::read(&p) {
            out.push((p.display().to_string(), bytes));
        }
    }
    out
}

fn photo_json(r: &PhotoRecord) -> serde_json::Value {
    json!({
        "order": r.order,
        "flags": r.flags,
        "brightness": r.brightness as f64,
        "contrast": r.contrast as f64,
        "saturation": r.saturation as f64,
        "hue": r.hue as f64,
        "blur_sigma": r.blur_sigma as f64,
    })
}

/// One byte run the loader made and Pillow must reproduce.
struct Expect {
    what: String,
    bytes: Vec<u8>,
}

#[test]
fn engine_bytes_equal_pillows() {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../pillow-venv");
    let py = match pillow::python(&venv) {
        Ok(py) => py,
        Err(e) => {
            eprintln!("skipping the Pillow comparison: {e:#}");
            return;
        }
    };
    let aug = AugmentConfig::default();
    let engine = CropEngine::new(aug.clone());
    let sizes = |k: usize| {
        if k < 2 {
            aug.global_size
        } else {
            aug.local_size
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let (mut payloads, mut spec, mut expect) = (Vec::new(), Vec::new(), Vec::new());
    let (mut n_crops, mut n_sweep) = (0, 0);
    for (name, bytes) in images() {
        let img = decode_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        // Two samples per image, so each image gets 24 recipe crops.
        for index in [3u64, 8] {
            let (mut geo, mut full) = (Sample::default(), Sample::default());
            let mut t = Default::default();
            engine.make_sample_into(&img, 7, 0, index, 0, false, &mut geo, &mut t);
            engine.make_sample_into(&img, 7, 0, index, 0, true, &mut full, &mut t);
            assert_eq!(geo.photo, full.photo);
            let mut crops: Vec<serde_json::Value> = geo
                .crops
                .iter()
                .enumerate()
                .map(|(k, c)| json!([c.left, c.top, c.w, c.h, sizes(k), c.hflip != 0]))
                .collect();
            // The resize alone on random rectangles and output sizes (no photometric ops).
            let mut sweep = Vec::new();
            for _ in 0..4 {
                let (w, h) = (
                    rng.random_range(1..=img.width),
                    rng.random_range(1..=img.height),
                );
                let meta = shared::geometry::CropMeta {
                    img_h: img.height,
                    img_w: img.width,
                    left: rng.random_range(0..=img.width - w),
                    top: rng.random_range(0..=img.height - h),
                    w,
                    h,
                    hflip: rng.random_range(0..2),
                };
                let size = rng.random_range(1..300usize);
                let mut buf = vec![0u8; size * size * 3];
                let mut r = loader::resample::Resampler::default();
                r.resize(&img, &meta, Default::default(), &mut buf, size);
                if meta.hflip != 0 {
                    loader::engine::flip_rows(&mut buf, size, size);
                }
                crops.push(json!([meta.left, meta.top, w, h, size, meta.hflip != 0]));
                sweep.push((format!("{name}: sweep {meta:?} -> {size}"), buf));
            }
            spec.push(json!({
                "crops": crops,
                "photo": geo.photo.iter().map(photo_json).collect::<Vec<_>>(),
            }));
            payloads.push(bytes.clone());
            expect.push(Expect {
                what: format!("{name}: decode"),
                bytes: img.data.clone(),
            });
            let split = |s: &Sample| {
                let g = s.globals.chunks((aug.global_size.pow(2) * 3) as usize);
                let l = s.locals.chunks((aug.local_size.pow(2) * 3) as usize);
                g.chain(l).map(<[u8]>::to_vec).collect::<Vec<_>>()
            };
            for (k, (b, c)) in split(&geo).into_iter().zip(&geo.crops).enumerate() {
                expect.push(Expect {
                    what: format!("{name} #{index}: crop {k} {c:?} after resize + flip"),
                    bytes: b,
                });
            }
            n_sweep += sweep.len();
            expect.extend(
                sweep
                    .into_iter()
                    .map(|(what, bytes)| Expect { what, bytes }),
            );
            for (k, b) in split(&full).into_iter().enumerate() {
                let p = geo.photo[k];
                expect.push(Expect {
                    what: format!("{name} #{index}: crop {k} finished ({p:?})"),
                    bytes: b,
                });
            }
            n_crops += geo.crops.len();
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let (blob, spec_path, out) = (
        dir.path().join("images.bin"),
        dir.path().join("spec.json"),
        dir.path().join("out.bin"),
    );
    std::fs::write(&blob, pillow::blob(payloads.iter().map(Vec::as_slice))).unwrap();
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    pillow::run_script(
        &py,
        dir.path(),
        [
            "replay".as_ref(),
            blob.as_os_str(),
            spec_path.as_os_str(),
            out.as_os_str(),
        ],
    )
    .unwrap();
    let got = std::fs::read(&out).unwrap();
    let want: usize = expect.iter().map(|e| e.bytes.len()).sum();
    assert_eq!(got.len(), want, "Pillow wrote a different number of bytes");

    let (mut at, mut bad) = (0, Vec::new());
    for e in &expect {
        let theirs = &got[at..at + e.bytes.len()];
        at += e.bytes.len();
        let diff = e.bytes.iter().zip(theirs).filter(|(a, b)| a != b).count();
        if diff > 0 {
            let max = e
                .bytes
                .iter()
                .zip(theirs)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            bad.push(format!("{}: {diff} bytes differ, max {max}", e.what));
        }
    }
    eprintln!(
        "compared with Pillow {}: {} images, {n_crops} recipe crops, {n_sweep} sweep resizes",
        pillow::PILLOW_VERSION,
        payloads.len() / 2
    );
    assert!(
        bad.is_empty(),
        "{} of {} byte runs differ from Pillow's:\n{}",
        bad.len(),
        expect.len(),
        bad.join("\n")
    );
}
