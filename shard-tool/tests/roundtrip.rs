//! Round trips, determinism, corruption detection, CLI output and the synthetic dataset.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use shard_tool::decode::{decode_jpeg, decode_rgb};
use shard_tool::pack::{PackConfig, TargetEncoding};
use shard_tool::synth::{class_name, write_imagefolder};
use shard_tool::verify::verify;
use shared::shard::{Dataset, Encoding, UNLABELLED};

/// Every record equals its source file byte for byte, with the label of its class folder.
fn assert_round_trip(src: &Path, out: &Path) {
    let ds = Dataset::open(out).unwrap();
    let mut classes: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    assert_eq!(ds.class_names(), classes);
    let mut files = 0;
    for c in &classes {
        files += std::fs::read_dir(src.join(c)).unwrap().count() as u64;
    }
    assert_eq!(ds.len(), files);
    let mut prev = String::new();
    for i in 0..ds.len() {
        let r = ds.record_checked(i).unwrap();
        assert_eq!(r.payload, std::fs::read(src.join(r.path)).unwrap(), "{r}");
        let folder = r.path.split('/').next().unwrap();
        assert_eq!(ds.class_names()[r.label as usize], folder);
        assert!(
            r.path > prev.as_str(),
            "records follow sorted ImageFolder order"
        );
        prev = r.path.to_string();
    }
}

#[test]
fn synthetic_sample_packs_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("synth");
    write_imagefolder(&src, 10, 20, 48, 0).unwrap();
    let out = tmp.path().join("packed");
    let s = pack_quiet(
        &src,
        &out,
        PackConfig {
            shard_bytes: 40_000,
            ..PackConfig::default()
        },
    );
    assert_eq!((s.packed, s.skipped, s.classes), (200, 0, 10));
    assert!(s.shards > 1);
    assert_round_trip(&src, &out);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest().class_counts, vec![20; 10]);
    let r = ds.record(0).unwrap();
    assert_eq!((r.width, r.height, r.label), (48, 48, 0));
}

#[test]
fn fashion_mnist_round_trips_byte_exactly() {
    let Some(fm) = shared_data("fashion-mnist") else {
        eprintln!("../shared/data/fashion-mnist absent: covered by the synthetic test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fm");
    let src = fm.join("train");
    let s = pack_quiet(
        &src,
        &out,
        PackConfig {
            shard_bytes: 1 << 20,
            ..PackConfig::default()
        },
    );
    assert_eq!(s.skipped, 0);
    assert!(s.shards >= 3, "{s}");
    assert_round_trip(&src, &out);
    let ds = Dataset::open(&out).unwrap();
    let r = ds.record(ds.len() / 2).unwrap();
    let (w, h, _) = decode_rgb(&r).unwrap();
    assert_eq!((w, h), (28, 28));
}

fn pack_with_threads(src: &Path, out: &Path, threads: usize, cfg: PackConfig) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| pack_quiet(src, out, cfg));
}

#[test]
fn output_is_byte_identical_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_imagefolder(&src, 4, 12, 32, 3).unwrap();
    let configs = [
        PackConfig {
            shard_bytes: 10_000,
            ..PackConfig::default()
        },
        PackConfig {
            encoding: TargetEncoding::Raw,
            max_side: Some(20),
            shard_bytes: 20_000,
            ..PackConfig::default()
        },
        PackConfig {
            max_side: Some(24),
            quality: 80,
            ..PackConfig::default()
        },
    ];
    for (k, cfg) in configs.into_iter().enumerate() {
        let a = tmp.path().join(format!("a{k}"));
        let b = tmp.path().join(format!("b{k}"));
        pack_with_threads(&src, &a, 1, cfg.clone());
        pack_with_threads(&src, &b, 3, cfg);
        let (fa, fb) = (dir_bytes(&a), dir_bytes(&b));
        assert!(fa.len() >= 2);
        assert!(fa == fb, "config {k}: 1 and 3 threads differ");
    }
}

#[test]
fn raw_and_reencoded_modes_decode_to_the_expected_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_imagefolder(&src, 2, 3, 40, 1).unwrap();
    let raw = tmp.path().join("raw");
    pack_quiet(
        &src,
        &raw,
        PackConfig {
            encoding: TargetEncoding::Raw,
            ..PackConfig::default()
        },
    );
    let ds = Dataset::open(&raw).unwrap();
    for i in 0..ds.len() {
        let r = ds.record_checked(i).unwrap();
        assert_eq!(r.encoding, Encoding::RawZstd);
        let (_, _, expect) = decode_jpeg(&std::fs::read(src.join(r.path)).unwrap()).unwrap();
        assert_eq!(
            decode_rgb(&r).unwrap().2,
            expect,
            "raw stores exactly the decoded pixels"
        );
    }
    let small = tmp.path().join("small");
    pack_quiet(
        &src,
        &small,
        PackConfig {
            max_side: Some(25),
            ..PackConfig::default()
        },
    );
    let ds = Dataset::open(&small).unwrap();
    assert_eq!(ds.manifest().pack.quality, Some(90));
    for i in 0..ds.len() {
        let r = ds.record(i).unwrap();
        assert_eq!((r.width, r.height, r.encoding), (25, 25, Encoding::Jpeg));
        assert_eq!(decode_rgb(&r).unwrap().2.len(), 25 * 25 * 3);
    }
    assert!(verify(&small, true).unwrap().is_ok());
}

fn shard_tool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shard-tool"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn flipped_byte_is_named_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_imagefolder(&src, 3, 5, 32, 9).unwrap();
    let out = tmp.path().join("packed");
    pack_quiet(
        &src,
        &out,
        PackConfig {
            shard_bytes: 4_000,
            ..PackConfig::default()
        },
    );
    let ds = Dataset::open(&out).unwrap();
    let victim = 8u64;
    let r = ds.record(victim).unwrap();
    let shard_file = ds.shard_file(r.shard).to_string();
    let (path, shard) = (r.path.to_string(), r.shard);
    // Find the payload's offset in its shard file by content (payloads are distinct JPEGs).
    let file = out.join(&shard_file);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(r.payload.len())
        .position(|w| w == r.payload)
        .unwrap();
    let flip = at + r.payload.len() / 2;
    drop(ds);
    bytes[flip] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let report = verify(&out, false).unwrap();
    assert_eq!(report.bad.len(), 1);
    let bad = &report.bad[0];
    assert_eq!(
        (bad.index, bad.shard, bad.path.as_deref()),
        (victim, Some(shard), Some(path.as_str()))
    );

    let o = shard_tool(&["verify", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(&path)
            && stdout.contains(&shard_file)
            && stdout.contains(&format!("index {victim}")),
        "{stdout}"
    );
}

#[test]
fn cli_json_outputs_and_atomic_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_imagefolder(&src, 3, 4, 24, 5).unwrap();
    std::fs::write(src.join("2_junk.jpg"), b"not an image").unwrap();
    std::fs::write(
        src.join(class_name(1, 3)).join("bad.JPEG"),
        b"\xFF\xD8\xFFgarbage",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = shard_tool(&[
        "pack",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["packed"], 12);
    assert_eq!(v["skipped"], 2, "{v}");

    let o = shard_tool(&["inspect", out.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["records"].as_u64(), v["classes"].as_u64()),
        (Some(12), Some(3))
    );
    assert_eq!(
        v["payload_bytes"].as_u64(),
        Some(Dataset::open(&out).unwrap().manifest().payload_bytes)
    );

    let o = shard_tool(&["inspect", out.to_str().unwrap(), "--index", "5", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["label"], 1);
    assert_eq!(v["width"], 24);
    assert_eq!(v["crc_ok"], true);
    assert!(v["path"].as_str().unwrap().starts_with(&class_name(1, 3)));

    // An existing output is never clobbered without --force; a forced re-pack is identical.
    let before = dir_bytes(&out);
    let o = shard_tool(&["pack", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = shard_tool(&[
        "pack",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--force",
        "--threads",
        "1",
    ]);
    assert!(o.status.success());
    assert!(before == dir_bytes(&out));
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "no temp dirs left behind: {names:?}");

    let o = shard_tool(&["verify", out.to_str().unwrap(), "--decode"]);
    assert!(o.status.success());
}

#[test]
fn flat_folder_and_file_list_are_unlabelled() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("flat");
    write_edge_cases(&src);
    let list = tmp.path().join("list.txt");
    std::fs::write(
        &list,
        "flat/baseline_420.jpg\n\nflat/png_named.JPEG\nflat/empty.jpg\n",
    )
    .unwrap();
    let out = tmp.path().join("from_list");
    let s = pack_quiet(&list, &out, PackConfig::default());
    assert_eq!((s.packed, s.skipped), (2, 1));
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest().pack.layout, "list");
    assert!(ds.class_names().is_empty());
    assert_eq!(ds.record(1).unwrap().path, "flat/png_named.JPEG");
    assert_eq!(ds.record(0).unwrap().label, UNLABELLED);
}

#[test]
fn synth_is_deterministic_and_classes_differ_in_structure() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    write_imagefolder(&a, 10, 3, 32, 42).unwrap();
    write_imagefolder(&b, 10, 3, 32, 42).unwrap();
    write_imagefolder(&c, 10, 3, 32, 43).unwrap();
    let name = class_name(7, 10);
    assert_eq!(name, "07_checker");
    let f = |d: &Path| std::fs::read(d.join(&name).join("1.jpg")).unwrap();
    assert_eq!(f(&a), f(&b));
    assert_ne!(f(&a), f(&c));
    // Stripes: horizontal ones vary down a column, vertical ones along a row.
    let px = shard_tool::synth::draw(5, 0, 64, 0);
    let var = |idx: &dyn Fn(usize) -> usize| {
        let v: Vec<f64> = (0..64).map(|k| px[idx(k) * 3] as f64).collect();
        let m = v.iter().sum::<f64>() / 64.0;
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 64.0
    };
    assert!(
        var(&|k| k * 64 + 10) > 10.0 * var(&|k| 10 * 64 + k),
        "class 5 = horizontal stripes"
    );
}

#[test]
fn truncated_shard_fails_verify_naming_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_imagefolder(&src, 2, 4, 24, 2).unwrap();
    let out = tmp.path().join("packed");
    pack_quiet(
        &src,
        &out,
        PackConfig {
            shard_bytes: 3_000,
            ..PackConfig::default()
        },
    );
    let file = out.join("shard-00001.bin");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let o = shard_tool(&["verify", out.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("shard-00001.bin") && stderr.contains("truncated"),
        "{stderr}"
    );
}

#[test]
fn bench_runs_and_reports_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_imagefolder(&src, 2, 5, 32, 4).unwrap();
    let report = shard_tool::bench::bench(&src, 1).unwrap();
    assert_eq!(report.files, 10);
    assert_eq!(report.rows.len(), 5);
    assert!(report
        .rows
        .iter()
        .all(|r| r.seconds > 0.0 && r.baseline_seconds > 0.0 && r.ratio.is_finite()));
}
