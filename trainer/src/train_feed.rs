//! The two [`BatchFeed`]s: [`RingFeed`] reads the shared-memory ring filled by loader processes
//! (started and supervised here, or started by hand); [`InProcessFeed`] builds the same batches
//! in this process from any [`SampleSource`] (tests, and a fallback without loaders).

use crate::bad_records::RecordNames;
use crate::loaders::{LoaderEvent, Supervisor};
use crate::staging::{HostStage, StageBuf, Staged};
use crate::train::{BatchFeed, FedBatch};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use shared::batch::{BatchLayout, BatchView, BatchWriter, OwnedBatch};
use shared::config::{AugmentConfig, PipelineConfig};
use shared::geometry::{Sample, SampleSource};
use shared::ring::{Consumer, Ring, RingSpec};
use shared::rng::{epoch_permutation, Slice};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a feed's batches come from, one at a time, copied into staging buffers. Every source is
/// a [`BatchFeed`] that uploads each batch when the step asks for it;
/// [`crate::prefetch::Prefetch`] stages the next one on a thread of its own while a step runs.
pub trait BatchSource: Send {
    fn n_samples(&self) -> u64;
    /// Identity of the dataset (checked on resume).
    fn dataset_id(&self) -> u64;
    /// The next batch staged is batch `batch` of epoch `epoch`.
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()>;
    /// Copies the next batch into `buf`. The source's own memory (a ring slot) is free again
    /// when this returns.
    fn next_staged(&mut self, aug: &AugmentConfig, buf: &mut dyn StageBuf) -> Result<Staged>;
    /// A record's name for messages.
    fn record_name(&self, index: u64) -> String;
    /// Hands the record names over (to a wrapper that moves this source to another thread).
    fn take_record_names(&mut self) -> Option<RecordNames>;
}

impl BatchSource for Box<dyn BatchSource> {
    fn n_samples(&self) -> u64 {
        (**self).n_samples()
    }
    fn dataset_id(&self) -> u64 {
        (**self).dataset_id()
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        (**self).seek(epoch, batch)
    }
    fn next_staged(&mut self, aug: &AugmentConfig, buf: &mut dyn StageBuf) -> Result<Staged> {
        (**self).next_staged(aug, buf)
    }
    fn record_name(&self, index: u64) -> String {
        (**self).record_name(index)
    }
    fn take_record_names(&mut self) -> Option<RecordNames> {
        (**self).take_record_names()
    }
}

impl<T: BatchSource> BatchFeed for T {
    fn n_samples(&self) -> u64 {
        BatchSource::n_samples(self)
    }
    fn dataset_id(&self) -> u64 {
        BatchSource::dataset_id(self)
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        BatchSource::seek(self, epoch, batch)
    }
    fn next(&mut self, aug: &AugmentConfig, device: &Device) -> Result<FedBatch> {
        let mut buf = HostStage::default();
        let staged = self.next_staged(aug, &mut buf)?;
        FedBatch::upload(staged, &buf.upload(device), aug)
    }
    fn record_name(&self, index: u64) -> String {
        BatchSource::record_name(self, index)
    }
}

/// Batches built in this process, in the ring's order: batch b of epoch e holds the permutation
/// entries [bB, (b+1)B) of `epoch_permutation(seed, e, n)` (the PROTOCOL's batch order).
pub struct InProcessFeed {
    source: Arc<dyn SampleSource>,
    pipe: PipelineConfig,
    layout: BatchLayout,
    buf: OwnedBatch,
    dataset_id: u64,
    threads: usize,
    epoch: u64,
    batch: u64,
    perm: Option<(u64, Vec<u64>)>,
    names: Option<RecordNames>,
    slice: Slice,
}

impl InProcessFeed {
    pub fn new(
        source: Arc<dyn SampleSource>,
        pipe: &PipelineConfig,
        dataset_id: u64,
        threads: usize,
    ) -> Self {
        let layout = BatchLayout::new(&pipe.augment, pipe.data.batch_size);
        let buf = OwnedBatch::zeroed(&layout);
        Self {
            source,
            pipe: pipe.clone(),
            layout,
            buf,
            dataset_id,
            threads: threads.max(1),
            epoch: 0,
            batch: 0,
            perm: None,
            names: None,
            slice: Slice::WHOLE,
        }
    }

    /// Serves a data-parallel rank's batches ([`Slice`]): its batch `b` of an epoch is the
    /// one-process batch `slice.batch_of(b)`.
    pub fn with_slice(mut self, slice: Slice) -> Self {
        self.slice = slice;
        self
    }

    /// Names records in messages (e.g. shard file and path) instead of by index.
    pub fn with_record_names(mut self, names: RecordNames) -> Self {
        self.names = Some(names);
        self
    }

    /// Builds batch `batch` of `epoch` into the internal buffer.
    pub fn build(&mut self, epoch: u64, batch: u64) -> Result<BatchView<'_>> {
        let n = self.source.len();
        if self.perm.as_ref().map(|p| p.0) != Some(epoch) {
            self.perm = Some((epoch, epoch_permutation(self.pipe.data.seed, epoch, n)));
        }
        let idx: Vec<u64> = self
            .slice
            .samples(
                &self.perm.as_ref().unwrap().1,
                batch,
                self.pipe.data.batch_size,
            )
            .to_vec();
        let chunk = idx.len().div_ceil(self.threads);
        let source = &self.source;
        let samples: Vec<Result<Sample>> = std::thread::scope(|s| {
            let hs: Vec<_> = idx
                .chunks(chunk.max(1))
                .map(|c| {
                    s.spawn(move || {
                        c.iter()
                            .map(|&i| source.produce(epoch, i))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("sample thread panicked"))
                .collect()
        });
        let mut w = BatchWriter::new(
            &self.layout,
            self.buf.bytes_mut(),
            epoch,
            batch,
            &self.pipe.augment,
        );
        for (b, s) in samples.into_iter().enumerate() {
            w.write_sample(
                b,
                &s.with_context(|| format!("epoch {epoch} batch {batch} sample {b}"))?,
            );
        }
        BatchView::new(&self.layout, self.buf.bytes()).map_err(anyhow::Error::msg)
    }
}

impl BatchSource for InProcessFeed {
    fn n_samples(&self) -> u64 {
        self.source.len()
    }
    fn dataset_id(&self) -> u64 {
        self.dataset_id
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        self.epoch = epoch;
        self.batch = batch;
        Ok(())
    }
    fn next_staged(&mut self, aug: &AugmentConfig, buf: &mut dyn StageBuf) -> Result<Staged> {
        let (e, b) = (self.epoch, self.batch);
        let bpe = self
            .slice
            .batches_per_epoch(self.source.len(), self.pipe.data.batch_size);
        let staged = Staged::from_view(&self.build(e, b)?, aug, buf)?;
        let c = crate::train::advance(e, b, bpe);
        (self.epoch, self.batch) = (c.epoch, c.batch);
        Ok(staged)
    }
    fn record_name(&self, index: u64) -> String {
        record_name(self.names.as_ref(), index)
    }
    fn take_record_names(&mut self) -> Option<RecordNames> {
        self.names.take()
    }
}

pub(crate) fn record_name(names: Option<&RecordNames>, index: u64) -> String {
    names.map_or_else(|| format!("sample {index}"), |f| f(index))
}

/// How the loader processes of a [`RingFeed`] are started.
#[derive(Clone, Debug)]
pub struct LoaderLaunch {
    pub loader_bin: PathBuf,
    pub shards: PathBuf,
    /// The run's effective config (`RUN/config.toml`: the file plus `--set` overrides).
    pub config: PathBuf,
    /// Loader processes.
    pub processes: usize,
    /// Worker threads per loader process.
    pub threads: usize,
    /// Ring slots (a loader that creates or checks the ring must agree with the trainer).
    pub slots: u32,
    /// The data-parallel rank's share the loaders produce.
    pub slice: Slice,
    /// A loader whose heartbeat is older than this is killed and restarted.
    pub heartbeat_timeout: Duration,
}

/// The ring's consumer side, plus the supervisor of the loaders this trainer started.
pub struct RingFeed {
    consumer: Consumer,
    n_samples: u64,
    dataset_id: u64,
    timeout: Duration,
    supervisor: Option<SupervisorThread>,
    names: Option<RecordNames>,
}

/// Polls the loader [`Supervisor`] in the background so a dead loader is restarted even while
/// the trainer blocks on the ring.
struct SupervisorThread {
    stop: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SupervisorThread {
    fn start(mut sup: Supervisor) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let (st, fl) = (stop.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match sup.poll() {
                    Ok(ev) => {
                        for e in ev {
                            match e {
                                LoaderEvent::Exited { slot, status } => {
                                    eprintln!("trainer: loader {slot} exited ({status})")
                                }
                                LoaderEvent::Hung {
                                    slot,
                                    pid,
                                    heartbeat_age,
                                    registered: true,
                                } => eprintln!(
                                    "trainer: loader {slot} (pid {pid}) made no progress for {:.1} s \
                                     (no heartbeat); killed it",
                                    heartbeat_age.as_secs_f64()
                                ),
                                LoaderEvent::Hung {
                                    slot,
                                    pid,
                                    heartbeat_age,
                                    registered: false,
                                } => eprintln!(
                                    "trainer: loader {slot} (pid {pid}) has not joined the ring \
                                     {:.1} s after it started (stuck starting up?); killed it",
                                    heartbeat_age.as_secs_f64()
                                ),
                                LoaderEvent::Restarted { slot, restarts } => eprintln!(
                                    "trainer: restarted loader {slot} (restart #{restarts})"
                                ),
                            }
                        }
                    }
                    Err(e) => {
                        *fl.lock().unwrap() = Some(format!("{e:#}"));
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            sup.shutdown(Duration::from_secs(5));
        });
        Self {
            stop,
            failed,
            handle: Some(handle),
        }
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }
}

impl Drop for SupervisorThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A loader started by a trainer gets SIGTERM when the trainer dies (even by SIGKILL). Without
/// this, a loader that starts after its trainer was killed finds the ring abandoned, creates it
/// afresh and waits for a consumer forever.
fn stop_with_parent(c: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(c, move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // The parent may have died before prctl: then this process was already re-parented.
            if libc::getppid() as u32 != parent {
                libc::_exit(0);
            }
            Ok(())
        });
    }
}

/// A ring name of this trainer's own, `udi-train-PID-TIME` (a dead trainer's ring of the same pid
/// cannot collide), after unlinking the rings of trainers whose processes were all killed.
pub fn own_ring_name() -> String {
    for n in Ring::remove_stale("udi-train-") {
        eprintln!("removed the abandoned ring '{n}' of a killed run");
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("udi-train-{}-{t:x}", std::process::id())
}

impl RingFeed {
    /// Creates ring `name` of `spec` (config, dataset, slots, data-parallel slice) and, with
    /// `launch`, starts the loaders that fill it. Without `launch` (`--external-loaders`) it
    /// attaches to (or creates) the ring and waits for loaders started by hand with the same
    /// config and shards.
    pub fn start(
        name: &str,
        spec: &RingSpec,
        timeout: Duration,
        launch: Option<&LoaderLaunch>,
    ) -> Result<Self> {
        let (n_samples, dataset_id) = (spec.n_samples, spec.dataset_id);
        let ring = match launch {
            Some(_) => Ring::create(name, spec)?,
            None => Ring::open_or_create(name, spec)?,
        };
        let ring = Arc::new(ring);
        let consumer = Consumer::new(ring.clone())?;
        let supervisor = match launch {
            None => None,
            Some(l) => {
                let l = l.clone();
                let timeout = l.heartbeat_timeout;
                let ring_name = name.to_string();
                let sup = Supervisor::start(l.processes, move |_slot| {
                    let mut c = Command::new(&l.loader_bin);
                    // Own process group: a terminal's Ctrl-C reaches the trainer only, which
                    // checkpoints and then stops its loaders itself.
                    std::os::unix::process::CommandExt::process_group(&mut c, 0);
                    stop_with_parent(&mut c);
                    c.arg("run")
                        .arg("--shards")
                        .arg(&l.shards)
                        .arg("--ring")
                        .arg(&ring_name)
                        .arg("--config")
                        .arg(&l.config)
                        .arg("--threads")
                        .arg(l.threads.to_string())
                        .arg("--slots")
                        .arg(l.slots.to_string())
                        .arg("--rank")
                        .arg(l.slice.rank.to_string())
                        .arg("--world")
                        .arg(l.slice.world.to_string())
                        .arg("--accumulate")
                        .arg(l.slice.accumulate.to_string());
                    c
                })?
                .watch_heartbeats(Box::new(move |pid| ring.heartbeat_age(pid)), timeout);
                Some(SupervisorThread::start(sup))
            }
        };
        Ok(Self {
            consumer,
            n_samples,
            dataset_id,
            timeout,
            supervisor,
            names: None,
        })
    }

    /// Names records in messages (e.g. shard file and path) instead of by index.
    pub fn with_record_names(mut self, names: RecordNames) -> Self {
        self.names = Some(names);
        self
    }
}

impl BatchSource for RingFeed {
    fn n_samples(&self) -> u64 {
        self.n_samples
    }
    fn dataset_id(&self) -> u64 {
        self.dataset_id
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        if self.consumer.position() != (epoch, batch) {
            self.consumer.seek(epoch, batch, self.timeout)?;
        }
        Ok(())
    }
    fn next_staged(&mut self, aug: &AugmentConfig, buf: &mut dyn StageBuf) -> Result<Staged> {
        let t0 = Instant::now();
        loop {
            if let Some(f) = self.supervisor.as_ref().and_then(|s| s.failure()) {
                bail!("loaders failed: {f}");
            }
            // Short waits so a loader failure is noticed while blocked on the ring.
            match self.consumer.next_batch(Duration::from_secs(2)) {
                Ok(guard) => {
                    let staged = Staged::from_view(&guard.view(), aug, buf)?;
                    drop(guard);
                    crate::crash_point::here("batch-fed");
                    return Ok(staged);
                }
                Err(e) if t0.elapsed() < self.timeout && format!("{e}").contains("waited") => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }
    fn record_name(&self, index: u64) -> String {
        record_name(self.names.as_ref(), index)
    }
    fn take_record_names(&mut self) -> Option<RecordNames> {
        self.names.take()
    }
}
