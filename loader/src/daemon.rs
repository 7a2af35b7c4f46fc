//! `loader run` (a producer process on a ring) and `loader status`.
//!
//! A `loader run` process attaches to the ring (creating it if absent, reclaiming it if stale),
//! registers as a producer and loops: claim the next batch, build it straight into the slot with
//! `--threads` workers ([`crate::produce::fill_batch_until`]), publish. Its heartbeat in the
//! ring's producer table is refreshed by progress, not by a timer: after every sample written
//! and every (at most 1 s) wait for a free slot. A loader that is stopped, deadlocked or stuck
//! in one sample therefore shows a growing heartbeat age (`loader status`), and the trainer's
//! supervisor replaces it. It exits when:
//! * SIGINT/SIGTERM arrives: the batch being built is abandoned between samples and handed back
//!   (another producer or a restart rebuilds it);
//! * the consumer closes the ring or its process disappears (consumer killed): loaders exit, and
//!   the last one out unlinks the segment (see `shared::ring` PROTOCOL, "Who unlinks").
//!
//! With no consumer attached yet, loaders fill every slot and wait.

use crate::produce::{fill_batch_until, SyntheticSource};
use anyhow::{bail, Context, Result};
use shared::config::PipelineConfig;
use shared::geometry::SampleSource;
use shared::ring::{Idle, Producer, Ring, RingSpec};
use shared::rng::{epoch_permutation, Slice};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Shard directory of the dataset.
    #[arg(long, required_unless_present = "synthetic")]
    pub shards: Option<PathBuf>,
    /// Ring name: the segment is /dev/shm/udi-ring-NAME.
    #[arg(long)]
    pub ring: String,
    /// Run config (its [data] and [augment] tables).
    #[arg(long)]
    pub config: PathBuf,
    /// Worker threads building one batch.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Slots, if this process creates the ring.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Data-parallel training: the trainer rank this ring feeds (its share of each global batch).
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Data-parallel training: the number of trainer ranks.
    #[arg(long, default_value_t = 1)]
    pub world: u32,
    /// Gradient accumulation: per-rank batches in one optimiser step.
    #[arg(long, default_value_t = 1)]
    pub accumulate: u32,
    /// Testing: a synthetic dataset of N samples instead of --shards.
    #[arg(long, hide = true, conflicts_with = "shards")]
    pub synthetic: Option<u64>,
    /// Testing/benchmarks: extra hashing passes per synthetic sample.
    #[arg(long, hide = true, default_value_t = 0)]
    pub synthetic_work: u32,
    /// Testing: sleep this long between building and publishing each batch (holds the claim).
    #[arg(long, hide = true, default_value_t = 0)]
    pub hold_ms: u64,
}

/// The sample source named by the command line, with its dataset id.
pub fn open_source(
    shards: Option<&PathBuf>,
    synthetic: Option<u64>,
    work: u32,
    cfg: &PipelineConfig,
) -> Result<(Box<dyn SampleSource>, u64)> {
    if let Some(n) = synthetic {
        let s = SyntheticSource::new(cfg, n).with_work(work);
        let id = s.dataset_id();
        return Ok((Box::new(s), id));
    }
    match shards {
        Some(dir) => {
            let (src, id) = crate::source::open_dataset_source(dir, cfg)?;
            Ok((Box::new(src), id))
        }
        None => bail!("give --shards DIR"),
    }
}

/// `loader run`.
pub fn run(args: &RunArgs) -> Result<()> {
    // Handlers first: a signal during start-up must still end in a clean exit.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let cfg = PipelineConfig::from_toml_file(&args.config)?;
    let (source, dataset_id) = open_source(
        args.shards.as_ref(),
        args.synthetic,
        args.synthetic_work,
        &cfg,
    )?;
    let slice = Slice::new(args.world, args.rank, args.accumulate).map_err(anyhow::Error::msg)?;
    let spec = RingSpec::new(&cfg, dataset_id, source.len(), args.slots).with_slice(slice);
    let ring = Arc::new(Ring::open_or_create(&args.ring, &spec)?);
    let threads = args.threads.max(1);
    let producer = Producer::register(ring.clone(), threads as u32)?;
    let layout = ring.layout().clone();
    let hold = Duration::from_millis(args.hold_ms);
    let mut published = 0u64;
    let mut rebuilt = 0u64;
    let outcome = {
        let mut perm: Option<(u64, Vec<u64>)> = None;
        loop {
            let claimed = producer.claim(Duration::from_secs(1), &|| stop.load(Relaxed));
            producer.heartbeat();
            let mut claim = match claimed {
                Ok(c) => c,
                Err(Idle::Timeout) => continue,
                Err(Idle::Stopped) => break Ok("stopped by signal"),
                Err(Idle::ConsumerGone) => break Ok("the consumer closed the ring or exited"),
            };
            let epoch = claim.epoch;
            if perm.as_ref().map(|p| p.0) != Some(epoch) {
                perm = Some((epoch, epoch_permutation(cfg.data.seed, epoch, source.len())));
            }
            let p = &perm.as_ref().unwrap().1;
            let batch = claim.batch;
            match fill_batch_until(
                &*source,
                &cfg,
                &layout,
                p,
                slice,
                epoch,
                batch,
                threads,
                claim.bytes_mut(),
                &stop,
                &|| producer.heartbeat(),
            ) {
                Ok(true) => {
                    if !hold.is_zero() {
                        std::thread::sleep(hold);
                    }
                    let was_rebuilt = claim.rebuilt;
                    if claim.publish() {
                        published += 1;
                        rebuilt += was_rebuilt as u64;
                    }
                }
                Ok(false) => break Ok("stopped by signal (batch abandoned)"),
                Err(e) => break Err(e.context(format!("ring '{}'", args.ring))),
            }
        }
    };
    drop(producer);
    let why = outcome?;
    eprintln!(
        "loader run (pid {}): {why}; published {published} batches ({rebuilt} rebuilt from dead producers)",
        std::process::id()
    );
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[arg(long)]
    pub ring: String,
    /// Seconds between the two snapshots that give batches/s.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    #[arg(long)]
    pub json: bool,
}

/// `loader status`: producers, fill level and batches/s of a ring (it does not attach as a
/// producer or consumer).
pub fn status(args: &StatusArgs) -> Result<()> {
    let ring = Ring::attach(&args.ring)?;
    let t0 = Instant::now();
    let a = ring.status();
    std::thread::sleep(Duration::from_secs_f64(args.interval.max(0.0)));
    let b = ring.status();
    let dt = t0.elapsed().as_secs_f64().max(1e-9);
    let rate = (b.published - a.published) as f64 / dt;
    let consumed_rate = (b.cursor.saturating_sub(a.cursor)) as f64 / dt;
    if args.json {
        let mut v = serde_json::to_value(&b)?;
        v["batches_per_s"] = rate.into();
        v["consumed_per_s"] = consumed_rate.into();
        let sl = ring.spec().slice;
        v["data_parallel"] =
            serde_json::json!({"world": sl.world, "rank": sl.rank, "accumulate": sl.accumulate});
        println!("{v}");
        return Ok(());
    }
    let spec = ring.spec();
    println!(
        "ring '{}': {} slots of {} bytes, batch {} of {} samples, {} batches/epoch",
        b.name, b.slots, spec.batch_bytes, spec.batch_size, spec.n_samples, b.batches_per_epoch
    );
    let sl = spec.slice;
    if sl != Slice::WHOLE {
        println!(
            "data-parallel: feeds rank {} of {} (accumulate {}): its share of each global batch of {}",
            sl.rank,
            sl.world,
            sl.accumulate,
            spec.batch_size as u64 * sl.group()
        );
    }
    println!("fill: {} ready, {} being written", b.ready, b.writing);
    println!(
        "consumer: {} — next epoch {} batch {} (global {})",
        match (b.consumer_pid, b.consumer_alive, b.closed) {
            (_, _, true) => "closed".to_string(),
            (0, _, _) => "none attached".to_string(),
            (p, true, _) => format!("pid {p}"),
            (p, false, _) => format!("pid {p} (dead)"),
        },
        b.epoch,
        b.batch,
        b.cursor
    );
    println!("rate: {rate:.1} batches/s published, {consumed_rate:.1} batches/s consumed; totals {} published, {} rebuilt", b.published, b.rebuilt);
    println!("producers:");
    for p in &b.producers {
        println!(
            "  pid {:>7} {:5} threads {:>3}  batches {:>8}  rebuilt {:>4}  heartbeat {:.1}s ago",
            p.pid,
            if p.alive { "alive" } else { "dead" },
            p.threads,
            p.batches,
            p.rebuilt,
            p.heartbeat_age_s
        );
    }
    if b.producers.is_empty() {
        println!("  (none)");
    }
    Ok(())
}
