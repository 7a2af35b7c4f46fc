//! `loader bench`: images/s for (a) decode only, (b) decode + geometry + resize, (c) the full
//! recipe, measured in the same run over the same records, plus a per-stage breakdown of (c);
//! then the same recipe on PIL images (`bench/pil_recipe.py` under the pinned Pillow, one
//! process, one core) over the same records, and our rate over it per core.
//!
//! With `--rounds R` the modes and the PIL recipe run R times by turns, and each ratio to PIL is
//! the median of the R rounds' ratios: on a shared machine whose speed drifts over seconds, a
//! ratio of two runs seconds apart moves by tens of percent, the median of rounds far less.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use shared::config::{AugmentConfig, ResizeMode};
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
    /// Rounds of (a), (b), (c) and the PIL recipe, by turns.
    pub rounds: u32,
    pub seed: u64,
    /// Also measure the other resize mode (`--resize both`).
    pub both: bool,
    /// Python with Pillow for the PIL baseline (`None`: no baseline).
    pub pil_python: Option<std::path::PathBuf>,
}

/// One mode's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeResult {
    pub images: u64,
    pub wall_s: f64,
    pub img_per_s: f64,
    /// img/s divided by the thread count.
    pub img_per_s_per_core: f64,
    /// Images per second of the workers' own CPU time (`CLOCK_THREAD_CPUTIME_ID`): the per-core
    /// rate without the time other processes take from a shared machine.
    pub img_per_cpu_s: f64,
    pub stages: StageShares,
}

impl ModeResult {
    /// One result for the rounds `rs` of `threads` workers together (their images and times
    /// summed).
    fn merged(rs: &[&ModeResult], threads: usize) -> ModeResult {
        let images: u64 = rs.iter().map(|r| r.images).sum();
        let wall_s: f64 = rs.iter().map(|r| r.wall_s).sum();
        let cpu_s: f64 = rs
            .iter()
            .map(|r| r.images as f64 / r.img_per_cpu_s.max(1e-9))
            .sum();
        let per = |f: fn(&StageShares) -> f64| {
            rs.iter()
                .map(|r| f(&r.stages) * r.images as f64)
                .sum::<f64>()
                / images.max(1) as f64
        };
        ModeResult {
            images,
            wall_s,
            img_per_s: images as f64 / wall_s.max(1e-9),
            img_per_s_per_core: images as f64 / wall_s.max(1e-9) / threads as f64,
            img_per_cpu_s: images as f64 / cpu_s.max(1e-9),
            stages: StageShares {
                decode_ms: per(|s| s.decode_ms),
                geometry_ms: per(|s| s.geometry_ms),
                resize_ms: per(|s| s.resize_ms),
                photometric_ms: per(|s| s.photometric_ms),
            },
        }
    }

    /// This mode's rate over `base`'s (same run): (wall, workers' CPU time).
    fn over(&self, base: &ModeResult) -> (f64, f64) {
        (
            self.img_per_s / base.img_per_s.max(1e-9),
            self.img_per_cpu_s / base.img_per_cpu_s.max(1e-9),
        )
    }
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
    /// The same ratio from the workers' CPU time (robust to other load on the machine).
    pub full_over_decode_cpu: f64,
    /// (b) / decode-only, same run: the loader's whole work when `[augment] photometric =
    /// "device"` (crops cropped, resized, flipped; the trainer applies the photometric records).
    pub device_photometric_over_decode: f64,
    pub device_photometric_over_decode_cpu: f64,
    /// Resize mode of the fields above (`exact` or `fast`).
    pub resize: String,
    /// The payload CRC32C check every read does (`Records` over shards): CPU ms per image, one
    /// thread, over the same records; and its share of the decode-only mode's CPU time per
    /// image (read, check and decode).
    pub crc_ms: f64,
    pub crc_over_decode: f64,
    pub decode_only: ModeResult,
    pub geometry_resize: ModeResult,
    pub full: ModeResult,
    /// With `--resize both`: the fast mode in the same run, and its pixel error vs exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fast: Option<FastSection>,
    /// The PIL path of the recipe over the same records...
    pub pil: Option<PilBaseline>,
    /// ...or why it was not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pil_skipped: Option<String>,
}

/// The recipe on PIL images (`bench/pil_recipe.py`), single-threaded, same records and passes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PilBaseline {
    pub pillow: String,
    /// Images over all rounds.
    pub images: u64,
    pub wall_s: f64,
    pub img_per_s: f64,
    /// Images per second of the process's CPU time.
    pub img_per_cpu_s: f64,
    /// Our full recipe (`photometric = "loader"`) over PIL, per core: (wall per core, CPU time),
    /// each the median over the rounds.
    pub loader_mode_over_pil: (f64, f64),
    /// Our (b), the loader's work with `photometric = "device"`, over PIL, per core.
    pub device_mode_over_pil: (f64, f64),
    /// Per round: (loader mode, device mode) over PIL, CPU time.
    pub rounds: Vec<(f64, f64)>,
}

/// The median of `xs` (the mean of the middle two for an even count).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => xs[n / 2],
        _ => 0.5 * (xs[n / 2 - 1] + xs[n / 2]),
    }
}

#[derive(serde::Deserialize)]
struct PilRun {
    images: u64,
    wall_s: f64,
    cpu_s: f64,
    pillow: String,
}

/// The PIL recipe's inputs for the first `n` records (JPEG/PNG payloads; raw records are
/// skipped), written once into a fresh temporary folder.
fn pil_inputs(records: &dyn Records, aug: &AugmentConfig, n: u64) -> Result<std::path::PathBuf> {
    let payloads: Vec<&[u8]> = (0..n)
        .filter_map(|i| records.record(i).ok())
        .filter(|r| r.encoding != shared::shard::Encoding::RawZstd)
        .map(|r| r.payload)
        .collect();
    anyhow::ensure!(!payloads.is_empty(), "no JPEG/PNG records for PIL");
    let dir = std::env::temp_dir().join(format!("loader-bench-pil-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("images.bin"), crate::pillow::blob(payloads))?;
    std::fs::write(dir.join("augment.json"), serde_json::to_vec(aug)?)?;
    Ok(dir)
}

/// One run of the PIL recipe over the inputs in `dir`.
fn pil_baseline(
    dir: &std::path::Path,
    opts: &BenchOptions,
    py: &std::path::Path,
) -> Result<PilRun> {
    let args: [std::ffi::OsString; 5] = [
        "bench".into(),
        dir.join("images.bin").into(),
        dir.join("augment.json").into(),
        opts.passes.to_string().into(),
        opts.seed.to_string().into(),
    ];
    let out = crate::pillow::run_script(py, dir, args);
    Ok(serde_json::from_str(out?.trim())?)
}

/// The fast resize mode measured beside the exact one.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FastSection {
    pub full_img_per_s: f64,
    pub full_img_per_s_per_core: f64,
    /// fast full / decode-only, same run.
    pub full_over_decode: f64,
    pub full_over_decode_cpu: f64,
    /// fast (b) / decode-only (see [`BenchReport::device_photometric_over_decode`]).
    pub device_photometric_over_decode: f64,
    pub device_photometric_over_decode_cpu: f64,
    pub geometry_resize: ModeResult,
    pub full: ModeResult,
    pub error: PixelError,
}

/// Fast vs exact on the same crops (same boxes, flips and photometric draws), over every byte
/// of every crop of the benchmarked records.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PixelError {
    /// After the resize (+ flip), before photometric ops: the resize deviation itself.
    pub resize_mae: f64,
    pub resize_psnr_db: f64,
    pub resize_max_abs: u8,
    /// Fraction of output bytes that differ after the resize.
    pub resize_differing: f64,
    /// On the finished crops (photometric ops amplify or damp the difference).
    pub full_mae: f64,
    pub full_psnr_db: f64,
    /// Fraction of crops that took the 2-tap path (the rest downsample by > 2×).
    pub fast_crop_fraction: f64,
}

#[derive(Default)]
struct ErrAcc {
    abs: u64,
    sq: u64,
    max: u8,
    differing: u64,
    n: u64,
}

impl ErrAcc {
    fn add(&mut self, a: &[u8], b: &[u8]) {
        for (&x, &y) in a.iter().zip(b) {
            let d = x.abs_diff(y);
            self.abs += d as u64;
            self.sq += d as u64 * d as u64;
            self.max = self.max.max(d);
            self.differing += (d != 0) as u64;
        }
        self.n += a.len() as u64;
    }
    fn mae(&self) -> f64 {
        self.abs as f64 / self.n.max(1) as f64
    }
    fn psnr(&self) -> f64 {
        let mse = self.sq as f64 / self.n.max(1) as f64;
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Pixel error of the fast mode vs exact over the first `n` records.
fn fast_error(
    records: &dyn Records,
    exact: &CropEngine,
    fast: &CropEngine,
    n: u64,
    seed: u64,
) -> PixelError {
    let (mut resize, mut full) = (ErrAcc::default(), ErrAcc::default());
    let (mut crops, mut eligible) = (0u64, 0u64);
    let (mut a, mut b) = (Sample::default(), Sample::default());
    let mut t = StageTimes::default();
    for i in 0..n {
        let Ok(img) = records.record(i).and_then(|r| decode(&r)) else {
            continue;
        };
        for photometric in [false, true] {
            exact.make_sample_into(&img, seed, 0, i, -1, photometric, &mut a, &mut t);
            fast.make_sample_into(&img, seed, 0, i, -1, photometric, &mut b, &mut t);
            assert_eq!(a.crops, b.crops, "fast mode changed the geometry");
            assert_eq!(a.rows, b.rows, "fast mode changed the SRS rows");
            let acc = if photometric { &mut full } else { &mut resize };
            acc.add(&a.globals, &b.globals);
            acc.add(&a.locals, &b.locals);
        }
        let aug = fast.aug();
        for (k, c) in a.crops.iter().enumerate() {
            let size = if k < 2 {
                aug.global_size
            } else {
                aug.local_size
            } as usize;
            crops += 1;
            eligible += crate::fast_resize::fast_eligible(c, size) as u64;
        }
    }
    PixelError {
        resize_mae: resize.mae(),
        resize_psnr_db: resize.psnr(),
        resize_max_abs: resize.max,
        resize_differing: resize.differing as f64 / resize.n.max(1) as f64,
        full_mae: full.mae(),
        full_psnr_db: full.psnr(),
        fast_crop_fraction: eligible as f64 / crops.max(1) as f64,
    }
}

/// CPU ms per image of the payload CRC32C over the first `n` records (`passes` times), one
/// thread: the check every read does, timed alone over payloads already in memory.
fn crc_ms(records: &dyn Records, n: u64, passes: u32) -> f64 {
    let payloads: Vec<&[u8]> = (0..n)
        .filter_map(|i| records.record(i).ok().map(|r| r.payload))
        .collect();
    let cpu0 = thread_cpu_s();
    for _ in 0..passes.max(1) {
        for p in &payloads {
            std::hint::black_box(crc32c::crc32c(std::hint::black_box(p)));
        }
    }
    let count = payloads.len() as f64 * passes.max(1) as f64;
    1e3 * (thread_cpu_s() - cpu0) / count.max(1.0)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Decode,
    Resize,
    Full,
}

/// CPU time of the calling thread in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
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
    let per_thread: Vec<(StageTimes, u64, u64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let cpu0 = thread_cpu_s();
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
                    (times, done, skipped, thread_cpu_s() - cpu0)
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
    let (mut done, mut skipped, mut cpu) = (0, 0, 0.0);
    for (t, d, s, c) in &per_thread {
        times.add(t);
        done += d;
        skipped += s;
        cpu += c;
    }
    let per = |x: f64| 1e3 * x / done.max(1) as f64;
    let rate = done as f64 / wall;
    let res = ModeResult {
        images: done,
        wall_s: wall,
        img_per_s: rate,
        img_per_s_per_core: rate / threads as f64,
        img_per_cpu_s: done as f64 / cpu.max(1e-9),
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
    let payloads = opts
        .pil_python
        .as_ref()
        .map(|_| pil_inputs(records, aug, n));
    let (mut rounds, mut skipped) = (Vec::new(), 0);
    let mut pil_runs: Vec<PilRun> = Vec::new();
    let mut pil_error = None;
    for _ in 0..opts.rounds.max(1) {
        let (decode_only, s) = run_mode(records, &engine, opts, n, Mode::Decode);
        skipped = s;
        let (geometry_resize, _) = run_mode(records, &engine, opts, n, Mode::Resize);
        let (full, _) = run_mode(records, &engine, opts, n, Mode::Full);
        rounds.push([decode_only, geometry_resize, full]);
        if let (Some(py), Some(inputs), None) = (&opts.pil_python, &payloads, &pil_error) {
            match inputs
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|dir| pil_baseline(dir, opts, py))
            {
                Ok(r) => pil_runs.push(r),
                Err(e) => pil_error = Some(format!("{e:#}")),
            }
        }
    }
    if let Some(Ok(dir)) = &payloads {
        let _ = std::fs::remove_dir_all(dir);
    }
    let merged = |m: usize| {
        let rs: Vec<&ModeResult> = rounds.iter().map(|r| &r[m]).collect();
        ModeResult::merged(&rs, opts.threads.max(1))
    };
    let (decode_only, geometry_resize, full) = (merged(0), merged(1), merged(2));
    let crc_ms = crc_ms(records, n, opts.passes);
    let fast = if opts.both {
        let fast_engine = CropEngine::new(AugmentConfig {
            resize: ResizeMode::Fast,
            ..aug.clone()
        });
        let exact_engine = CropEngine::new(AugmentConfig {
            resize: ResizeMode::Exact,
            ..aug.clone()
        });
        let (geometry_resize, _) = run_mode(records, &fast_engine, opts, n, Mode::Resize);
        let (full, _) = run_mode(records, &fast_engine, opts, n, Mode::Full);
        Some(FastSection {
            full_img_per_s: full.img_per_s,
            full_img_per_s_per_core: full.img_per_s_per_core,
            full_over_decode: full.over(&decode_only).0,
            full_over_decode_cpu: full.over(&decode_only).1,
            device_photometric_over_decode: geometry_resize.over(&decode_only).0,
            device_photometric_over_decode_cpu: geometry_resize.over(&decode_only).1,
            geometry_resize,
            full,
            error: fast_error(records, &exact_engine, &fast_engine, n, opts.seed),
        })
    } else {
        None
    };
    let (pil, pil_skipped) = match (&opts.pil_python, pil_error) {
        (None, _) => (None, Some("not run".to_string())),
        (Some(_), Some(why)) => (None, Some(why)),
        (Some(_), None) => {
            let over = |m: &ModeResult, r: &PilRun| {
                (
                    m.img_per_s_per_core * r.wall_s / r.images as f64,
                    m.img_per_cpu_s * r.cpu_s / r.images as f64,
                )
            };
            let per_round: Vec<[(f64, f64); 2]> = rounds
                .iter()
                .zip(&pil_runs)
                .map(|(m, r)| [over(&m[2], r), over(&m[1], r)])
                .collect();
            let med = |k: usize, f: fn((f64, f64)) -> f64| {
                median(per_round.iter().map(|r| f(r[k])).collect())
            };
            let images: u64 = pil_runs.iter().map(|r| r.images).sum();
            let wall_s: f64 = pil_runs.iter().map(|r| r.wall_s).sum();
            let cpu_s: f64 = pil_runs.iter().map(|r| r.cpu_s).sum();
            (
                Some(PilBaseline {
                    pillow: pil_runs[0].pillow.clone(),
                    images,
                    wall_s,
                    img_per_s: images as f64 / wall_s,
                    img_per_cpu_s: images as f64 / cpu_s,
                    loader_mode_over_pil: (med(0, |r| r.0), med(0, |r| r.1)),
                    device_mode_over_pil: (med(1, |r| r.0), med(1, |r| r.1)),
                    rounds: per_round.iter().map(|r| (r[0].1, r[1].1)).collect(),
                }),
                None,
            )
        }
    };
    Ok(BenchReport {
        threads: opts.threads.max(1),
        images: n,
        skipped,
        decode_only_img_per_s: decode_only.img_per_s,
        geometry_resize_img_per_s: geometry_resize.img_per_s,
        full_img_per_s: full.img_per_s,
        decode_only_img_per_s_per_core: decode_only.img_per_s_per_core,
        full_img_per_s_per_core: full.img_per_s_per_core,
        full_over_decode: full.over(&decode_only).0,
        full_over_decode_cpu: full.over(&decode_only).1,
        device_photometric_over_decode: geometry_resize.over(&decode_only).0,
        device_photometric_over_decode_cpu: geometry_resize.over(&decode_only).1,
        resize: match aug.resize {
            ResizeMode::Exact => "exact",
            ResizeMode::Pillow12 => "pillow12",
            ResizeMode::Fast => "fast",
        }
        .into(),
        crc_ms,
        crc_over_decode: crc_ms * decode_only.img_per_cpu_s / 1e3,
        decode_only,
        geometry_resize,
        full,
        fast,
        pil,
        pil_skipped,
    })
}

/// Human-readable summary.
pub fn format_report(r: &BenchReport) -> String {
    let mut s = format!(
        "{} images × passes, {} threads ({} undecodable skipped), resize {}\n",
        r.images, r.threads, r.skipped, r.resize
    );
    s += "mode                      img/s   img/s/core img/cpu-s   ms/img: decode  geometry  resize  photometric\n";
    let mut rows = vec![
        ("(a) decode only", &r.decode_only),
        ("(b) decode+geometry+resize", &r.geometry_resize),
        ("(c) full recipe", &r.full),
    ];
    if let Some(f) = &r.fast {
        rows.push(("(b) ... resize = fast", &f.geometry_resize));
        rows.push(("(c) ... resize = fast", &f.full));
    }
    for (name, m) in rows {
        s += &format!(
            "{name:<26}{:>7.1} {:>11.1} {:>9.1}          {:>7.3} {:>9.3} {:>7.3} {:>12.3}\n",
            m.img_per_s,
            m.img_per_s_per_core,
            m.img_per_cpu_s,
            m.stages.decode_ms,
            m.stages.geometry_ms,
            m.stages.resize_ms,
            m.stages.photometric_ms
        );
    }
    s += &format!(
        "payload CRC32C check (on every read): {:.4} CPU ms/img = {:.2}% of decode-only CPU time\n",
        r.crc_ms,
        100.0 * r.crc_over_decode
    );
    s += &format!(
        "full / decode-only = {:.3} wall, {:.3} CPU time ({})\n",
        r.full_over_decode, r.full_over_decode_cpu, r.resize
    );
    s += &format!(
        "photometric = \"device\": loader work (b) / decode-only = {:.3} wall, {:.3} CPU time ({})\n",
        r.device_photometric_over_decode, r.device_photometric_over_decode_cpu, r.resize
    );
    match &r.pil {
        Some(p) => {
            s += &format!(
                "PIL recipe (Pillow {}, 1 process): {:.1} img/s, {:.1} img/cpu-s over {} images\n",
                p.pillow, p.img_per_s, p.img_per_cpu_s, p.images
            );
            s += &format!(
                "ours over PIL per core: loader mode {:.2}x wall, {:.2}x CPU time; device mode {:.2}x wall, {:.2}x CPU time ({})\n",
                p.loader_mode_over_pil.0,
                p.loader_mode_over_pil.1,
                p.device_mode_over_pil.0,
                p.device_mode_over_pil.1,
                r.resize
            );
            if p.rounds.len() > 1 {
                let list = |f: fn(&(f64, f64)) -> f64| {
                    p.rounds
                        .iter()
                        .map(|r| format!("{:.2}", f(r)))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                s += &format!(
                    "  medians of {} rounds; per round, CPU time: loader mode {}; device mode {}\n",
                    p.rounds.len(),
                    list(|r| r.0),
                    list(|r| r.1)
                );
            }
        }
        None => {
            let why = r.pil_skipped.as_deref().unwrap_or("not run");
            s += &format!("PIL recipe: skipped ({why})\n");
        }
    }
    if let Some(f) = &r.fast {
        let e = &f.error;
        s += &format!(
            "full / decode-only = {:.3} wall, {:.3} CPU time (fast)\n",
            f.full_over_decode, f.full_over_decode_cpu
        );
        s += &format!(
            "photometric = \"device\": loader work (b) / decode-only = {:.3} wall, {:.3} CPU time (fast)\n",
            f.device_photometric_over_decode, f.device_photometric_over_decode_cpu
        );
        s += &format!(
            "fast vs exact: after resize MAE {:.3}, PSNR {:.1} dB, max |d| {}, {:.1}% bytes differ; \
             finished crops MAE {:.3}, PSNR {:.1} dB; {:.1}% of crops on the 2-tap path\n",
            e.resize_mae,
            e.resize_psnr_db,
            e.resize_max_abs,
            100.0 * e.resize_differing,
            e.full_mae,
            e.full_psnr_db,
            100.0 * e.fast_crop_fraction
        );
    }
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
    /// Rounds of our modes and the PIL recipe, by turns; the ratios to PIL are the medians of
    /// the rounds' ratios.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Resize mode: the config's (default), `exact`, `pillow12`, `fast`, or `both` (exact, then
    /// fast in the same run, with the fast mode's pixel error vs exact, i.e. vs Pillow).
    #[arg(long, value_parser = ["exact", "pillow12", "fast", "both"])]
    pub resize: Option<String>,
    /// The PIL baseline: `auto` (a venv with the pinned Pillow in `target/pillow-venv`, made on
    /// first use), `off`, or the path of a Python that has Pillow.
    #[arg(long, default_value = "auto")]
    pub pil: String,
}

/// The `loader bench` subcommand.
pub fn cli(args: &BenchArgs) -> Result<()> {
    let mut cfg = args.input.config()?;
    let records = args.input.open()?;
    match args.resize.as_deref() {
        Some("fast") => cfg.augment.resize = ResizeMode::Fast,
        Some("pillow12") => cfg.augment.resize = ResizeMode::Pillow12,
        Some("exact" | "both") => cfg.augment.resize = ResizeMode::Exact,
        _ => {}
    }
    let pil_python = match args.pil.as_str() {
        "off" => None,
        "auto" => match crate::pillow::python(&crate::pillow::default_venv()) {
            Ok(py) => Some(py),
            Err(e) => {
                eprintln!("PIL baseline unavailable: {e:#}");
                None
            }
        },
        path => Some(path.into()),
    };
    let opts = BenchOptions {
        threads: args.threads,
        limit: args.limit,
        passes: args.passes.max(1),
        rounds: args.rounds.max(1),
        seed: cfg.data.seed,
        both: args.resize.as_deref() == Some("both"),
        pil_python,
    };
    let report = run(records.as_ref(), &cfg.augment, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    Ok(())
}
