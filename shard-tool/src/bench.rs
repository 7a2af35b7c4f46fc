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

/// Median wall time of `repeats` runs of `f` (`prep` runs before each, untimed).
fn time_median(
    repeats: usize,
    mut prep: impl FnMut(),
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        prep();
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(t[t.len() / 2])
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
    let t_copy = time_median(repeats, || clean(&copy_dir), || copy(false))?;
    let t_copy_sync = time_median(repeats, || clean(&copy_dir), || copy(true))?;
    clean(&copy_dir);
    let out = s.join("packed");
    let cfg = PackConfig {
        validate: false,
        progress: false,
        ..PackConfig::default()
    };
    let t_pack_nv = time_median(
        repeats,
        || clean(&out),
        || pack(input, &out, &cfg).map(|_| ()),
    )?;
    rows.push(row(
        "pack --no-validate",
        t_pack_nv,
        "copy (no fsync)",
        t_copy,
        input_bytes,
        Some(0.8),
    ));
    rows.push(row(
        "pack --no-validate",
        t_pack_nv,
        "copy + fsync each file",
        t_copy_sync,
        input_bytes,
        Some(0.8),
    ));

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
    let t_decode = time_median(repeats, || {}, decode_only)?;
    let cfg_v = PackConfig {
        validate: true,
        ..cfg.clone()
    };
    let t_pack_v = time_median(
        repeats,
        || clean(&out),
        || pack(input, &out, &cfg_v).map(|_| ()),
    )?;
    rows.push(row(
        "pack (validated)",
        t_pack_v,
        "read + decode only",
        t_decode,
        input_bytes,
        Some(0.9),
    ));

    // 3. random-access reads: the reader vs reading the loose files, same random order, both
    //    touching every byte (CRC32C), in parallel.
    let ds = Dataset::open(&out)?;
    let mut order: Vec<u64> = (0..ds.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let paths: Vec<_> = (0..ds.len())
        .map(|i| input.join(ds.record(i).unwrap().path))
        .collect();
    let payload_bytes = ds.manifest().payload_bytes;
    let reps = repeats * 5;
    let t_reader = time_median(
        reps,
        || {},
        || {
            order
                .par_iter()
                .try_for_each(|&i| ds.record_checked(i).map(|_| ()))
                .map_err(Into::into)
        },
    )?;
    let t_loose = time_median(
        reps,
        || {},
        || {
            order.par_iter().try_for_each(|&i| -> Result<()> {
                let b = std::fs::read(&paths[i as usize])?;
                std::hint::black_box(crc32c::crc32c(&b));
                Ok(())
            })
        },
    )?;
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
            "{} files, {:.1} MB, {} threads, median of {} runs (reads: {} runs), warm cache",
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
