//! Bad and unusual inputs: generated always, and the real collection in ../shared when present.

mod common;

use std::path::Path;

use common::*;
use shard_tool::decode::{decode_bytes, decode_rgb};
use shard_tool::pack::{pack, PackConfig};
use shard_tool::verify::verify;
use shared::shard::{Dataset, Encoding, UNLABELLED};

/// Packs an edge-case dir and checks: the bad files are skipped by path with reasons, everything
/// else packs, round-trips byte-exactly and decodes to RGB of the indexed size.
fn check_edge_set(src: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("packed");
    let summary = pack_quiet(src, &out, PackConfig::default());
    let skipped: Vec<&str> = summary
        .skipped_files
        .iter()
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(skipped, EDGE_BAD, "{summary}");
    let reasons: Vec<&str> = summary
        .skipped_files
        .iter()
        .map(|s| s.reason.as_str())
        .collect();
    assert!(reasons[0].contains("empty"), "{reasons:?}");
    assert!(
        reasons[2].to_lowercase().contains("premature end"),
        "{reasons:?}"
    );
    let n_images = std::fs::read_dir(src)
        .unwrap()
        .filter(|e| {
            shard_tool::pack::is_image_name(&e.as_ref().unwrap().file_name().to_string_lossy())
        })
        .count() as u64;
    assert_eq!(
        summary.packed + summary.skipped,
        n_images,
        "nothing else is lost"
    );

    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), summary.packed);
    assert_eq!(ds.manifest().skipped, summary.skipped_files);
    for i in 0..ds.len() {
        let r = ds.record_checked(i).unwrap();
        assert_eq!(r.label, UNLABELLED);
        assert_eq!(r.payload, std::fs::read(src.join(r.path)).unwrap(), "{r}");
        let (w, h, px) = decode_rgb(&r).unwrap();
        assert_eq!(px.len(), w as usize * h as usize * 3);
        match r.path {
            "png_named.JPEG" => assert_eq!(r.encoding, Encoding::Png),
            "grayscale.jpg" => assert!(px.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2])),
            "cmyk.jpg" => {
                // Against an independent decoder (image crate / zune-jpeg).
                let reference = image::load_from_memory(r.payload).unwrap().to_rgb8();
                assert_eq!((reference.width(), reference.height()), (w, h));
                let diff: u64 = px
                    .iter()
                    .zip(reference.as_raw())
                    .map(|(&a, &b)| (a as i64 - b as i64).unsigned_abs())
                    .sum();
                let mad = diff as f64 / px.len() as f64;
                eprintln!(
                    "{}: CMYK vs image crate: mean abs diff {mad:.3} per channel",
                    src.display()
                );
                assert!(
                    mad < 3.0,
                    "CMYK decode differs from the image crate by {mad} per channel"
                );
                let mean = |v: &[u8], c: usize| {
                    v.iter().skip(c).step_by(3).map(|&x| x as f64).sum::<f64>()
                        / (v.len() / 3) as f64
                };
                for c in 0..3 {
                    assert!((mean(&px, c) - mean(reference.as_raw(), c)).abs() < 2.0);
                }
            }
            _ => assert_eq!(r.encoding, Encoding::Jpeg),
        }
    }
    assert!(verify(&out, true).unwrap().is_ok());
}

#[test]
fn generated_edge_cases_pack_and_decode() {
    let tmp = tempfile::tempdir().unwrap();
    write_edge_cases(tmp.path());
    check_edge_set(tmp.path());
}

#[test]
fn generated_cmyk_decodes_to_the_source_colours() {
    let tmp = tempfile::tempdir().unwrap();
    write_edge_cases(tmp.path());
    let (w, h, px) = decode_bytes(
        Encoding::Jpeg,
        &std::fs::read(tmp.path().join("cmyk.jpg")).unwrap(),
        None,
    )
    .unwrap();
    let src = test_rgb(w as usize, h as usize);
    let mad = px
        .iter()
        .zip(&src)
        .map(|(&a, &b)| (a as i64 - b as i64).abs())
        .sum::<i64>() as f64
        / px.len() as f64;
    assert!(
        mad < 4.0,
        "inverted CMYK round trip is off by {mad} per channel"
    );
}

#[test]
fn real_edge_cases_pack_and_decode() {
    match shared_data("edge-cases") {
        Some(dir) => check_edge_set(&dir),
        None => eprintln!("../shared/data/edge-cases absent: covered by the generated set"),
    }
}

#[test]
fn strict_fails_naming_the_file_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_edge_cases(&src);
    let out = tmp.path().join("packed");
    let err = pack(
        &src,
        &out,
        &quiet(PackConfig {
            strict: true,
            ..PackConfig::default()
        }),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("empty.jpg"), "{err:#}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["src"],
        "a failed pack leaves no output and no temp dir"
    );
}

#[test]
fn unvalidated_truncated_jpeg_is_caught_by_verify_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_edge_cases(&src);
    let out = tmp.path().join("packed");
    let s = pack_quiet(
        &src,
        &out,
        PackConfig {
            validate: false,
            ..PackConfig::default()
        },
    );
    // Without decoding, only files without a parsable header are skipped.
    assert_eq!(
        s.skipped_files
            .iter()
            .map(|s| s.path.as_str())
            .collect::<Vec<_>>(),
        ["empty.jpg", "garbage.jpg"]
    );
    assert!(verify(&out, false).unwrap().is_ok(), "checksums are fine");
    let report = verify(&out, true).unwrap();
    assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
    let bad = &report.bad[0];
    assert_eq!(bad.path.as_deref(), Some("truncated.jpg"));
    assert_eq!(bad.shard_file.as_deref(), Some("shard-00000.bin"));
    assert!(
        bad.error.to_lowercase().contains("premature end"),
        "{}",
        bad.error
    );
}

#[test]
fn a_failed_decode_does_not_poison_the_next_one() {
    let tmp = tempfile::tempdir().unwrap();
    write_edge_cases(tmp.path());
    let good = std::fs::read(tmp.path().join("baseline_420.jpg")).unwrap();
    for bad in [&b"\xFF\xD8\xFFgarbage"[..], &good[..good.len() / 2]] {
        assert!(decode_bytes(Encoding::Jpeg, bad, None).is_err());
        assert_eq!(
            decode_bytes(Encoding::Jpeg, &good, None).unwrap().0,
            96,
            "same thread, next image"
        );
    }
}
