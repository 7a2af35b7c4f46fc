//! Decode, the crop engine and the dataset source: shapes, pixels, determinism, skipping.

use std::io::Cursor;
use std::path::PathBuf;

use loader::decode::{decode, decode_bytes, RgbImage};
use loader::engine::{flip_rows, CropEngine};
use loader::folder::{MemRecords, OwnedRecord};
use loader::source::DatasetSource;
use shared::config::{AugmentConfig, PipelineConfig};
use shared::geometry::{local_pair, SampleSource, SrsRow};
use shared::shard::{Encoding, RecordRef};

fn tiny() -> AugmentConfig {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    PipelineConfig::from_toml_file(&root).unwrap().augment
}

/// A smooth, non-symmetric test picture.
fn picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            (((x + 2 * y) * 7) % 256) as u8,
        ])
    })
}

fn encode(img: &image::RgbImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    match fmt {
        image::ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
                .encode_image(img)
                .unwrap()
        }
        _ => img.write_to(&mut buf, fmt).unwrap(),
    }
    buf.into_inner()
}

fn record<'a>(payload: &'a [u8], encoding: Encoding, w: u32, h: u32) -> RecordRef<'a> {
    RecordRef {
        index: 3,
        label: 1,
        width: w,
        height: h,
        encoding,
        payload,
        path: "x/img.bin",
        shard: 0,
        crc32c: 0,
    }
}

#[test]
fn decodes_jpeg_png_gray_and_raw() {
    let pic = picture(61, 40);
    let jpg = encode(&pic, image::ImageFormat::Jpeg);
    let img = decode(&record(&jpg, Encoding::Jpeg, 0, 0)).unwrap();
    assert_eq!((img.width, img.height), (61, 40));
    let err: f64 = img
        .data
        .iter()
        .zip(pic.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / img.data.len() as f64;
    assert!(err < 4.0, "mean JPEG error {err}");

    // PNG stored as "Jpeg" (ImageNet's n02105855_2933.JPEG): sniffed by magic, lossless.
    let png = encode(&pic, image::ImageFormat::Png);
    let img = decode(&record(&png, Encoding::Jpeg, 0, 0)).unwrap();
    assert_eq!(img.data, pic.as_raw().clone());

    // Grayscale JPEG → R = G = B.
    let gray = image::GrayImage::from_fn(30, 20, |x, y| image::Luma([(x * 8 + y) as u8]));
    let mut buf = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
        .encode_image(&gray)
        .unwrap();
    let img = decode_bytes(buf.get_ref()).unwrap();
    assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));

    // Raw zstd RGB8.
    let raw = zstd::bulk::compress(pic.as_raw(), 3).unwrap();
    let img = decode(&record(&raw, Encoding::RawZstd, 61, 40)).unwrap();
    assert_eq!(img.data, pic.as_raw().clone());
    assert!(decode(&record(&raw, Encoding::RawZstd, 60, 40)).is_err());
}

#[test]
fn bad_payloads_are_errors_naming_the_record() {
    let jpg = encode(&picture(64, 64), image::ImageFormat::Jpeg);
    for bad in [&b""[..], &b"not an image at all"[..], &jpg[..jpg.len() / 2]] {
        let err = decode(&record(bad, Encoding::Jpeg, 0, 0)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("record 3") && msg.contains("x/img.bin"),
            "{msg}"
        );
    }
}

#[test]
fn sample_fields_match_the_documented_layout() {
    let aug = tiny();
    let img = RgbImage::from_raw(90, 70, picture(90, 70).into_raw()).unwrap();
    let s = CropEngine::new(aug.clone()).make_sample(&img, 0, 2, 17, 5);
    let (sg, sl, l) = (64usize, 32usize, 4usize);
    assert_eq!((s.index, s.label), (17, 5));
    assert_eq!(s.globals.len(), 2 * sg * sg * 3);
    assert_eq!(s.locals.len(), l * sl * sl * 3);
    assert_eq!(s.crops.len(), 2 + l);
    assert_eq!(s.global_mask.len(), aug.global_samples() as usize);
    assert_eq!(s.local_mask.len(), aug.local_samples() as usize);
    assert_eq!(s.n_valid.len(), 2 + 2 * l);
    let (ng, nl) = (aug.global_samples() as usize, aug.local_samples() as usize);
    assert_eq!(s.rows.len(), 2 * ng + 2 * l * nl);
    for k in 0..l {
        for t in 0..2 {
            let p = local_pair(k, t);
            let start = 2 * ng + (p - 2) * nl;
            let rows = &s.rows[start..start + nl];
            let n = s.n_valid[p] as usize;
            assert!(rows[..n].iter().all(|r| s.local_mask.contains(&r.src)));
            assert!(rows[n..].iter().all(|r| *r == SrsRow::default()));
        }
    }
}

#[test]
fn resize_is_bicubic_of_the_crop_and_flip_mirrors() {
    // With every photometric op off, a constant image gives constant crops, and a horizontal
    // ramp gives crops whose flip flag decides the ramp's direction.
    let off = AugmentConfig {
        jitter_p: 0.0,
        grayscale_p: 0.0,
        blur_p_local: 0.0,
        blur_p_global1: 0.0,
        blur_p_global2: 0.0,
        solarize_p: 0.0,
        ..tiny()
    };
    // blur fires when rand <= p: p = 0 can still fire on an exact 0.0 draw (prob 2^-53).
    let engine = CropEngine::new(off);
    let flat = RgbImage::from_raw(50, 40, [10u8, 120, 230].repeat(2000)).unwrap();
    let s = engine.make_sample(&flat, 1, 0, 0, 0);
    assert!(s
        .globals
        .chunks(3)
        .chain(s.locals.chunks(3))
        .all(|p| p == [10, 120, 230]));

    let ramp = RgbImage::from_raw(
        200,
        150,
        (0..150)
            .flat_map(|_| (0..200u32).flat_map(|x| [x as u8, 0, 0]))
            .collect(),
    )
    .unwrap();
    let mut seen_flip = [false; 2];
    for idx in 0..20 {
        let s = engine.make_sample(&ramp, 1, 0, idx, 0);
        let size = 64usize;
        let g0 = &s.globals[..size * size * 3];
        let (first, last) = (g0[0] as i32, g0[(size - 1) * 3] as i32);
        let c = s.crops[0];
        if c.hflip == 1 {
            assert!(first > last, "flipped ramp must decrease {c:?}");
        } else {
            assert!(first < last, "ramp must increase {c:?}");
        }
        // The resized row spans the crop's columns: within ~scale/2 pixels of left .. left+w−1.
        let lo = first.min(last);
        let hi = first.max(last);
        assert!(
            (lo - c.left as i32).abs() <= 3 && (hi - (c.left + c.w - 1) as i32).abs() <= 3,
            "{lo} {hi} {c:?}"
        );
        seen_flip[c.hflip as usize] = true;
    }
    assert!(seen_flip[0] && seen_flip[1]);

    let mut px = vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9];
    flip_rows(&mut px, 3, 1);
    assert_eq!(px, vec![7, 8, 9, 4, 5, 6, 1, 2, 3]);
}

fn mem_records(n: usize) -> MemRecords {
    let mut recs = MemRecords::default();
    for i in 0..n {
        let pic = picture(80 + 7 * i as u32, 60 + 5 * i as u32);
        recs.push(OwnedRecord::encoded(
            format!("img{i}.jpg"),
            i as i32,
            encode(&pic, image::ImageFormat::Jpeg),
        ));
    }
    recs
}

#[test]
fn samples_are_deterministic_across_thread_counts() {
    let source = DatasetSource::new(mem_records(6), CropEngine::new(tiny()), 42);
    let serial: Vec<_> = (0..6).map(|i| source.produce(3, i).unwrap()).collect();
    for threads in [2usize, 4] {
        let parallel: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let source = &source;
                    s.spawn(move || {
                        (t..6)
                            .step_by(threads)
                            .map(|i| (i, source.produce(3, i as u64).unwrap()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut all: Vec<_> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
            all.sort_by_key(|(i, _)| *i);
            all.into_iter().map(|(_, s)| s).collect()
        });
        assert_eq!(serial, parallel, "{threads} threads");
    }
    // Different epoch or index → different crops.
    assert_ne!(serial[0].crops, source.produce(4, 0).unwrap().crops);
    assert_ne!(serial[0].globals, serial[1].globals);
    assert_eq!(serial[2].label, 2);
}

#[test]
fn undecodable_records_are_skipped_to_the_next_index() {
    let mut recs = mem_records(3);
    recs.records[1].payload = b"garbage".to_vec();
    recs.records[2].payload.clear();
    let source = DatasetSource::new(recs, CropEngine::new(tiny()), 0);
    let s = source.produce(0, 1).unwrap();
    // 1 and 2 fail → wraps to 0; the sample is record 0's, crops keyed by index 0.
    assert_eq!((s.index, s.label), (0, 0));
    assert_eq!(source.skipped(), 2);
    assert_eq!(s, source.produce(0, 0).unwrap());
    assert_eq!(source.produce(0, 2).unwrap().index, 0);
    assert_eq!(source.skipped(), 3);
}

/// Real-data check, only where ../shared/data exists: the edge cases decode or fail as listed.
#[test]
fn edge_cases_from_shared_data_when_present() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/edge-cases");
    if !dir.exists() {
        eprintln!("skipping: {} absent", dir.display());
        return;
    }
    let engine = CropEngine::new(AugmentConfig::default());
    for (name, ok) in [
        ("baseline_420.jpg", true),
        ("progressive.jpg", true),
        ("subsampling_444.jpg", true),
        ("grayscale.jpg", true),
        ("cmyk.jpg", true),
        ("png_named.JPEG", true),
        ("exif_orientation_6.jpg", true),
        ("tiny_32x21.jpg", true),
        ("panorama_1000x100.jpg", true),
        ("truncated.jpg", false),
        ("garbage.jpg", false),
        ("empty.jpg", false),
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let res = decode_bytes(&bytes);
        assert_eq!(res.is_ok(), ok, "{name}: {:?}", res.as_ref().err());
        if let Ok(img) = res {
            let s = engine.make_sample(&img, 0, 0, 0, 0);
            assert_eq!(s.globals.len(), 2 * 224 * 224 * 3, "{name}");
            if name == "grayscale.jpg" {
                assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
            }
            if name == "tiny_32x21.jpg" {
                assert_eq!((img.width, img.height), (32, 21));
            }
        }
    }
}
