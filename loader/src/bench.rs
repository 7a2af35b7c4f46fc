//! `loader bench`: images/s for (a) decode only, (b) decode + geometry + resize, (c) the full
//! recipe, measured in the same run over the same records, plus a per-stage breakdown of (c).

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use shared::config::AugmentConfig;
use shared::geometry::Sample;

use crate::decode::decode;
use crate::engine::{CropEngine, StageTimes};
use crate::source::Records;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub threads: usize,
    /// Records to use (0 = all).
    pub limit: u64,
    /// Passes over the records per mode.
    pub passes: u32,
    pub seed: u64,
}

/// One mode's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeResult {
    pub images: u64,
    pub wall_s: f64,
    pub img_per_s: f64,
    /// img/s divided by the thread count.
    pub img_per_s_per_core: f64,
    pub stages: StageShares,
}

/// Seconds per image of each stage (summed over threads).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageShares {
    pub decode_ms: f64,
    pub geometry_ms: f64,
    pub resize_ms: f64,
    pub photometric_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub images: u64,
    pub skipped: u64,
    pub decode_only_img_per_s: f64,
    pub geometry_resize_img_per_s: f64,
    pub full_img_per_s: f64,
    pub decode_only_img_per_s_per_core: f64,
    pub full_img_per_s_per_core: f64,
    /// full / decode-only, same run (the goal is ≥ 0.5).
    pub full_over_decode: f64,
    pub decode_only: ModeResult,
    pub geometry_resize: ModeResult,
    pub full: ModeResult,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Decode,
    Resize,
    Full,
}

fn run_mode(
    records: &dyn Records,
    engine: &CropEngine,
    opts: &BenchOptions,
    n: u64,
    mode: Mode,
) -> (ModeResult, u64) {
    let threads = opts.threads.max(1);
    let start = Instant::now();
    let per_thread: Vec<(StageTimes, u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut times = StageTimes::default();
                    let (mut done, mut skipped) = (0u64, 0u64);
                    let mut sample = Sample::default();
                    for pass in 0..opts.passes as u64 {
                        let mut i = t as u64;
                        while i < n {
                            let t0 = Instant::now();
                            let img = records.record(i).and_then(|r| decode(&r));
                            times.decode += t0.elapsed().as_secs_f64();
                            match img {
                                Ok(img) => {
                                    if mode != Mode::Decode {
                                        engine.make_sample_into(
                                            &img,
                                            opts.seed,
                                            pass,
                                            i,
                                            -1,
                                            mode == Mode::Full,
                                            &mut sample,
                                            &mut times,
                                        );
                                    }
                                    done += 1;
                                }
                                Err(_) => skipped += 1,
                            }
                            i += threads as u64;
                        }
                    }
                    (times, done, skipped)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench worker panicked"))
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut times = StageTimes::default();
    let (mut done, mut skipped) = (0, 0);
    for (t, d, s) in &per_thread {
        times.add(t);
        done += d;
        skipped += s;
    }
    let per = |x: f64| 1e3 * x / done.max(1) as f64;
    let rate = done as f64 / wall;
    let res = ModeResult {
        images: done,
        wall_s: wall,
        img_per_s: rate,
        img_per_s_per_core: rate / threads as f64,
        stages: StageShares {
            decode_ms: per(times.decode),
            geometry_ms: per(times.geometry),
            resize_ms: per(times.resize),
            photometric_ms: per(times.photometric),
        },
    };
    (res, skipped)
}

/// Runs the three modes back to back (decode-only first and last is not needed: each mode
/// reads the same in-memory records, so the page cache plays no part).
pub fn run(records: &dyn Records, aug: &AugmentConfig, opts: &BenchOptions) -> Result<BenchReport> {
    let n = if opts.limit == 0 {
        records.len()
    } else {
        opts.limit.min(records.len())
    };
    anyhow::ensure!(n > 0, "no records to benchmark");
    let engine = CropEngine::new(aug.clone());
    // Warm-up: thread-local decoders and resizer buffers, page-in of the records.
    let warm = BenchOptions {
        passes: 1,
        ..opts.clone()
    };
    run_mode(
        records,
        &engine,
        &warm,
        n.min(8 * opts.threads.max(1) as u64),
        Mode::Full,
    );
    let (decode_only, skipped) = run_mode(records, &engine, opts, n, Mode::Decode);
    let (geometry_resize, _) = run_mode(records, &engine, opts, n, Mode::Resize);
    let (full, _) = run_mode(records, &engine, opts, n, Mode::Full);
    Ok(BenchReport {
        threads: opts.threads.max(1),
        images: n,
        skipped,
        decode_only_img_per_s: decode_only.img_per_s,
        geometry_resize_img_per_s: geometry_resize.img_per_s,
        full_img_per_s: full.img_per_s,
        decode_only_img_per_s_per_core: decode_only.img_per_s_per_core,
        full_img_per_s_per_core: full.img_per_s_per_core,
        full_over_decode: full.img_per_s / decode_only.img_per_s.max(1e-9),
        decode_only,
        geometry_resize,
        full,
    })
}

/// Human-readable summary.
pub fn format_report(r: &BenchReport) -> String {
    let mut s = format!(
        "{} images × passes, {} threads ({} undecodable skipped)\n",
        r.images, r.threads, r.skipped
    );
    s += "mode                      img/s   img/s/core   ms/img: decode  geometry  resize  photometric\n";
    for (name, m) in [
        ("(a) decode only", &r.decode_only),
        ("(b) decode+geometry+resize", &r.geometry_resize),
        ("(c) full recipe", &r.full),
    ] {
        s += &format!(
            "{name:<26}{:>7.1} {:>11.1}          {:>7.3} {:>9.3} {:>7.3} {:>12.3}\n",
            m.img_per_s,
            m.img_per_s_per_core,
            m.stages.decode_ms,
            m.stages.geometry_ms,
            m.stages.resize_ms,
            m.stages.photometric_ms
        );
    }
    s += &format!("full / decode-only = {:.3}\n", r.full_over_decode);
    s
}

/// `loader bench` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub input: crate::folder::InputArgs,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Use only the first N records (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// Passes over the records per mode.
    #[arg(long, default_value_t = 1)]
    pub passes: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The `loader bench` subcommand.
pub fn cli(args: &BenchArgs) -> Result<()> {
    let cfg = args.input.config()?;
    let records = args.input.open()?;
    let opts = BenchOptions {
        threads: args.threads,
        limit: args.limit,
        passes: args.passes.max(1),
        seed: cfg.data.seed,
    };
    let report = run(records.as_ref(), &cfg.augment, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    Ok(())
}
