//! `bench`: pack and read throughput, each next to a baseline measured in the same run on the
//! same files and the same rayon pool. Warm page cache throughout (files are read once first).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::Serialize;
use shared::shard::Dataset;

use crate::decode::{decode_bytes, sniff};
use crate::pack::{list_inputs, pack, Layout, PackConfig};

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub baseline: String,
    pub baseline_seconds: f64,
    pub baseline_mb_per_s: f64,
    /// Throughput relative to the baseline (>1: faster than the baseline).
    pub ratio: f64,
    pub goal: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub files: usize,
    pub input_bytes: u64,
    pub threads: usize,
    pub repeats: usize,
    pub rows: Vec<BenchRow>,
}

/// Median wall times of `a` and `b`, run alternately `repeats` times each, so that a change in
/// background load hits measure and baseline alike. Each closure times its own work (prep excluded).
fn time_pair(
    repeats: usize,
    mut a: impl FnMut() -> Result<f64>,
    mut b: impl FnMut() -> Result<f64>,
) -> Result<(f64, f64)> {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        ta.push(a()?);
        tb.push(b()?);
    }
    Ok((median(ta), median(tb)))
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// Runs `prep` untimed, then times `f`.
fn timed(prep: impl FnOnce(), f: impl FnOnce() -> Result<()>) -> Result<f64> {
    prep();
    let s = Instant::now();
    f()?;
    Ok(s.elapsed().as_secs_f64())
}

fn row(
    name: &str,
    secs: f64,
    base: &str,
    base_secs: f64,
    bytes: u64,
    goal: Option<f64>,
) -> BenchRow {
    let mbs = |s: f64| bytes as f64 / 1e6 / s.max(1e-9);
    BenchRow {
        name: name.into(),
        seconds: secs,
        mb_per_s: mbs(secs),
        baseline: base.into(),
        baseline_seconds: base_secs,
        baseline_mb_per_s: mbs(base_secs),
        ratio: base_secs / secs.max(1e-9),
        goal,
    }
}

/// Runs the benchmark over the ImageFolder (or flat folder) at `input`, in a scratch dir.
pub fn bench(input: &Path, repeats: usize) -> Result<BenchReport> {
    let repeats = repeats.max(1);
    let inputs = list_inputs(input, Layout::Auto)?;
    let files: Vec<_> = inputs.files.iter().map(|f| f.abs.clone()).collect();
    anyhow::ensure!(!files.is_empty(), "no images under {}", input.display());
    // Warm the page cache, and count bytes.
    let input_bytes: u64 = files
        .iter()
        .map(|p| std::fs::read(p).map(|b| b.len() as u64))
        .sum::<std::io::Result<u64>>()?;
    let scratch = tempfile::Builder::new().prefix("shard-bench").tempdir()?;
    let s = scratch.path();
    let clean = |p: &Path| {
        let _ = std::fs::remove_dir_all(p);
    };
    let mut rows = Vec::new();

    // 1. pack --no-validate vs a plain parallel copy of the same files (with and without fsync:
    //    pack fsyncs each shard and the manifest for its atomic finish).
    let copy_dir = s.join("copy");
    let copy = |sync: bool| -> Result<()> {
        std::fs::create_dir_all(&copy_dir)?;
        files
            .par_iter()
            .enumerate()
            .try_for_each(|(i, p)| -> Result<()> {
                let dst = copy_dir.join(format!("{i}"));
                std::fs::copy(p, &dst)?;
                if sync {
                    std::fs::File::open(&dst)?.sync_all()?;
                }
                Ok(())
            })
    };
    let out = s.join("packed");
    let cfg = PackConfig {
        validate: false,
        progress: false,
        ..PackConfig::default()
    };
    // Like for like: no fsync on either side, then fsync on both sides.
    let cfg_nosync = PackConfig {
        fsync: false,
        ..cfg.clone()
    };
    let pairs = [
        (
            "pack --no-validate --no-fsync",
            &cfg_nosync,
            "copy (no fsync)",
            false,
        ),
        (
            "pack --no-validate (fsync)",
            &cfg,
            "copy + fsync each file",
            true,
        ),
    ];
    for (name, pcfg, base, sync) in pairs {
        let (t_pack, t_copy) = time_pair(
            repeats,
            || timed(|| clean(&out), || pack(input, &out, pcfg).map(|_| ())),
            || timed(|| clean(&copy_dir), || copy(sync)),
        )?;
        rows.push(row(name, t_pack, base, t_copy, input_bytes, Some(0.8)));
    }
    clean(&copy_dir);

    // 2. validated pack vs read + decode-only of the same files.
    let decode_only = || -> Result<()> {
        files.par_iter().try_for_each(|p| -> Result<()> {
            let bytes = std::fs::read(p)?;
            if let Some(enc) = sniff(&bytes) {
                let _ = decode_bytes(enc, &bytes, None);
            }
            Ok(())
        })
    };
    for (name, fsync) in [
        ("pack (validated, --no-fsync)", false),
        ("pack (validated, fsync)", true),
    ] {
        let cfg_v = PackConfig {
            validate: true,
            fsync,
            ..cfg.clone()
        };
        let (t_pack_v, t_decode) = time_pair(
            repeats,
            || timed(|| clean(&out), || pack(input, &out, &cfg_v).map(|_| ())),
            || timed(|| {}, decode_only),
        )?;
        rows.push(row(
            name,
            t_pack_v,
            "read + decode only",
            t_decode,
            input_bytes,
            Some(0.9),
        ));
    }

    // 3. random-access reads: the reader vs reading the loose files, same random order, both
    //    touching every byte (CRC32C), in parallel.
    let ds = Dataset::open(&out)?;
    let mut order: Vec<u64> = (0..ds.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let paths: Vec<_> = (0..ds.len())
        .map(|i| input.join(ds.record(i).unwrap().path))
        .collect();
    let payload_bytes = ds.manifest().payload_bytes;
    let reader = || {
        order
            .par_iter()
            .try_for_each(|&i| ds.record_checked(i).map(|_| ()))
            .map_err(Into::into)
    };
    let loose = || {
        order.par_iter().try_for_each(|&i| -> Result<()> {
            let b = std::fs::read(&paths[i as usize])?;
            std::hint::black_box(crc32c::crc32c(&b));
            Ok(())
        })
    };
    let (t_reader, t_loose) =
        time_pair(repeats * 5, || timed(|| {}, reader), || timed(|| {}, loose))?;
    rows.push(row(
        "random read: Dataset::record_checked",
        t_reader,
        "random read: fs::read loose files + CRC",
        t_loose,
        payload_bytes,
        None,
    ));
    Ok(BenchReport {
        files: files.len(),
        input_bytes,
        threads: rayon::current_num_threads(),
        repeats,
        rows,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} files, {:.1} MB, {} threads, median of {} alternating runs (reads: {}), warm cache",
            self.files,
            self.input_bytes as f64 / 1e6,
            self.threads,
            self.repeats,
            self.repeats * 5
        )?;
        writeln!(
            f,
            "{:<38} {:>9} {:>9} | {:<40} {:>9} {:>9} | {:>6} {:>5}",
            "measure", "s", "MB/s", "baseline", "s", "MB/s", "ratio", "goal"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<38} {:>9.3} {:>9.1} | {:<40} {:>9.3} {:>9.1} | {:>6.2} {:>5}",
                r.name,
                r.seconds,
                r.mb_per_s,
                r.baseline,
                r.baseline_seconds,
                r.baseline_mb_per_s,
                r.ratio,
                r.goal
                    .map(|g| format!("{g:.1}"))
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        Ok(())
    }
}
