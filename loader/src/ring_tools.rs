//! `loader tap` (a stand-alone ring consumer for debugging and checks) and `loader bench-ring`.

use crate::daemon::open_source;
use crate::produce::fill_batch;
use anyhow::{Context, Result};
use shared::batch::{BatchHeader, BatchLayout, OwnedBatch};
use shared::config::PipelineConfig;
use shared::ring::{Consumer, Producer, Ring, RingSpec};
use shared::rng::epoch_permutation;
use std::mem::offset_of;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct TapArgs {
    #[arg(long)]
    pub ring: String,
    /// Batches to read.
    #[arg(long)]
    pub batches: u64,
    /// One JSON object per line: epoch, batch, samples, hash.
    #[arg(long)]
    pub json: bool,
    /// Start at EPOCH:BATCH instead of the ring's cursor.
    #[arg(long)]
    pub seek: Option<String>,
    /// Seconds to wait for the ring to appear and for each batch.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Leave the ring to a later consumer instead of closing it (closing stops the loaders).
    #[arg(long)]
    pub detach: bool,
}

fn attach_waiting(name: &str, timeout: Duration) -> Result<Ring> {
    let deadline = Instant::now() + timeout;
    loop {
        match Ring::attach(name) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `loader tap`.
pub fn tap(args: &TapArgs) -> Result<()> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let ring = Arc::new(attach_waiting(&args.ring, timeout)?);
    let mut consumer = Consumer::new(ring)?;
    if let Some(at) = &args.seek {
        let (e, b) = at
            .split_once(':')
            .and_then(|(e, b)| Some((e.parse().ok()?, b.parse().ok()?)))
            .with_context(|| format!("--seek {at}: expected EPOCH:BATCH"))?;
        consumer.seek(e, b, timeout)?;
    }
    for _ in 0..args.batches {
        let guard = consumer.next_batch(timeout)?;
        let view = guard.view();
        let hash = view.hash();
        if args.json {
            let line = serde_json::json!({
                "epoch": guard.epoch(),
                "batch": guard.batch(),
                "samples": view.indices(),
                "hash": format!("{hash:016x}"),
            });
            println!("{line}");
        } else {
            println!(
                "epoch {} batch {} hash {hash:016x} samples {:?}",
                guard.epoch(),
                guard.batch(),
                view.indices()
            );
        }
    }
    if args.detach {
        consumer.detach();
    }
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Run config ([data] batch_size is overridden by --batch-size if given).
    #[arg(long, default_value = "configs/udi_vit_s16_in1k.toml")]
    pub config: PathBuf,
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Shard directory (default: a synthetic dataset).
    #[arg(long)]
    pub shards: Option<PathBuf>,
    /// Synthetic dataset size when no --shards.
    #[arg(long, default_value_t = 4096)]
    pub synthetic: u64,
    /// Extra hashing passes per synthetic sample (emulated decode cost).
    #[arg(long, default_value_t = 0)]
    pub synthetic_work: u32,
    /// Batches measured per case (after one warm-up batch).
    #[arg(long, default_value_t = 20)]
    pub batches: u64,
    /// Worker threads per loader process (and of the in-process pipeline).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Loader process counts to measure end to end.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub procs: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Repetitions per case (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    case: String,
    batches: u64,
    seconds: f64,
    gb_per_s: f64,
    images_per_s: f64,
}

fn row(case: &str, batches: u64, secs: f64, batch_bytes: usize, batch_size: u32) -> Row {
    Row {
        case: case.to_string(),
        batches,
        seconds: secs,
        gb_per_s: (batches as f64 * batch_bytes as f64) / secs / 1e9,
        images_per_s: (batches * batch_size as u64) as f64 / secs,
    }
}

struct Children(Vec<Child>, String);
impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Ring::unlink(&self.1);
    }
}

/// Seconds for `n` memcpy's of `src` into a warm buffer.
fn time_memcpy(src: &OwnedBatch, layout: &BatchLayout, n: u64) -> f64 {
    let mut dst = OwnedBatch::zeroed(layout);
    dst.bytes_mut().copy_from_slice(src.bytes());
    let t = Instant::now();
    for _ in 0..n {
        dst.bytes_mut()
            .copy_from_slice(std::hint::black_box(src.bytes()));
    }
    std::hint::black_box(dst.bytes()[0]);
    t.elapsed().as_secs_f64()
}

/// Seconds for `n` batches through a ring: a producer thread copies `src` into each claimed
/// slot (patching the header's epoch/batch) and publishes; this thread consumes in order.
fn time_handover(name: &str, spec: &RingSpec, src: &OwnedBatch, n: u64) -> Result<f64> {
    let ring = Arc::new(Ring::create(name, spec)?);
    let mut consumer = Consumer::new(ring.clone())?;
    let producer = Producer::register(ring.clone(), 1)?;
    let warm = spec.slots as u64; // first touch of every slot's pages is not measured
    let elapsed = std::thread::scope(|s| -> Result<f64> {
        s.spawn(|| {
            for _ in 0..warm + n {
                let Ok(mut c) = producer.claim(Duration::from_secs(30), &|| false) else {
                    break;
                };
                let (e, b) = (c.epoch, c.batch);
                let out = c.bytes_mut();
                out.copy_from_slice(src.bytes());
                out[offset_of!(BatchHeader, epoch)..][..8].copy_from_slice(&e.to_le_bytes());
                out[offset_of!(BatchHeader, batch)..][..8].copy_from_slice(&b.to_le_bytes());
                c.publish();
            }
        });
        for _ in 0..warm {
            consumer.next_batch(Duration::from_secs(30))?;
        }
        let t = Instant::now();
        for _ in 0..n {
            let g = consumer.next_batch(Duration::from_secs(30))?;
            std::hint::black_box(g.view().header());
        }
        Ok(t.elapsed().as_secs_f64())
    });
    drop(consumer); // closes the ring: the producer thread stops
    elapsed
}

/// `loader bench-ring`: ring hand-over bandwidth against a plain memcpy of the same bytes, and
/// end-to-end images/s through 1, 2, … loader processes against the in-process pipeline with
/// the same total number of worker threads. Each case: best of `--rounds`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    let mut cfg = PipelineConfig::from_toml_file(&args.config)?;
    if let Some(b) = args.batch_size {
        cfg.data.batch_size = b;
    }
    let synthetic = Some(args.synthetic).filter(|_| args.shards.is_none());
    let (source, dataset_id) =
        open_source(args.shards.as_ref(), synthetic, args.synthetic_work, &cfg)?;
    let layout = BatchLayout::new(&cfg.augment, cfg.data.batch_size);
    let (bsz, n, rounds) = (cfg.data.batch_size, args.batches.max(1), args.rounds.max(1));
    let spec = RingSpec::new(&cfg, dataset_id, source.len(), args.slots);
    let bpe = spec.batches_per_epoch();
    let perm = epoch_permutation(cfg.data.seed, 0, source.len());
    let pid = std::process::id();
    let _cleanup = Children(Vec::new(), format!("bench-{pid}"));
    let mut rows = Vec::new();

    // A real batch as the payload of the copy benchmarks.
    let mut src = OwnedBatch::zeroed(&layout);
    fill_batch(
        &*source,
        &cfg,
        &layout,
        &perm,
        0,
        0,
        args.threads,
        src.bytes_mut(),
    )?;

    // Alternate the two so that both see the same machine load.
    let (mut t_copy, mut t_ring) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        t_copy = t_copy.min(time_memcpy(&src, &layout, n));
        t_ring = t_ring.min(time_handover(&format!("bench-{pid}"), &spec, &src, n)?);
    }
    rows.push(row(
        "memcpy of the batch bytes (baseline)",
        n,
        t_copy,
        layout.total,
        bsz,
    ));
    rows.push(row(
        "ring hand-over (copy into slot, publish, consume)",
        n,
        t_ring,
        layout.total,
        bsz,
    ));

    let cfg_path = std::env::temp_dir().join(format!("udi-bench-{pid}.toml"));
    std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
    for &procs in &args.procs {
        let threads = procs * args.threads;
        let mut t_inproc = f64::MAX;
        let mut buf = OwnedBatch::zeroed(&layout);
        for _ in 0..rounds {
            let t = Instant::now();
            for b in 0..n {
                fill_batch(
                    &*source,
                    &cfg,
                    &layout,
                    &perm,
                    0,
                    b % bpe,
                    threads,
                    buf.bytes_mut(),
                )?;
            }
            t_inproc = t_inproc.min(t.elapsed().as_secs_f64());
        }
        rows.push(row(
            &format!("in-process pipeline, {threads} thread(s)"),
            n,
            t_inproc,
            layout.total,
            bsz,
        ));

        let mut t_procs = f64::MAX;
        for _ in 0..rounds {
            let name = format!("bench-{pid}-{procs}");
            let ring = Arc::new(Ring::create(&name, &spec)?);
            let mut children = Children(Vec::new(), name.clone());
            let mut consumer = Consumer::new(ring.clone())?;
            for _ in 0..procs {
                let mut cmd = Command::new(std::env::current_exe()?);
                cmd.args([
                    "run",
                    "--ring",
                    &name,
                    "--threads",
                    &args.threads.to_string(),
                ]);
                cmd.arg("--config").arg(&cfg_path);
                match &args.shards {
                    Some(d) => cmd.arg("--shards").arg(d),
                    None => cmd
                        .args(["--synthetic", &args.synthetic.to_string()])
                        .args(["--synthetic-work", &args.synthetic_work.to_string()]),
                };
                children
                    .0
                    .push(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
            }
            // Start the clock once the loaders are up and what they built during start-up has
            // been drained: the ring is then in its steady state.
            consumer
                .next_batch(Duration::from_secs(60))
                .context("first batch from the loader processes")?;
            for _ in 1..spec.slots {
                consumer.next_batch(Duration::from_secs(60))?;
            }
            let t = Instant::now();
            for _ in 0..n {
                let g = consumer.next_batch(Duration::from_secs(60))?;
                std::hint::black_box(g.view().header());
            }
            t_procs = t_procs.min(t.elapsed().as_secs_f64());
            drop(consumer);
            drop(children);
        }
        let case = format!(
            "{procs} loader process(es) × {} thread(s) via ring",
            args.threads
        );
        rows.push(row(&case, n, t_procs, layout.total, bsz));
    }
    let _ = std::fs::remove_file(&cfg_path);

    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let cores = std::thread::available_parallelism()
        .map(|x| x.get())
        .unwrap_or(1);
    println!(
        "batch: {bsz} images, {:.2} MB; {n} batches per case, best of {rounds}; {cores} core(s); source: {}",
        layout.total as f64 / 1e6,
        if args.shards.is_some() { "shards" } else { "synthetic" }
    );
    println!(
        "{:<56} {:>9} {:>8} {:>10}",
        "case", "seconds", "GB/s", "images/s"
    );
    for r in &rows {
        println!(
            "{:<56} {:>9.3} {:>8.2} {:>10.1}",
            r.case, r.seconds, r.gb_per_s, r.images_per_s
        );
    }
    println!(
        "ring hand-over / memcpy bandwidth: {:.2}×",
        rows[1].gb_per_s / rows[0].gb_per_s
    );
    Ok(())
}
