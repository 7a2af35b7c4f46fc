//! The shared-memory batch ring: loader processes build whole batches straight into slots of a
//! `/dev/shm` segment, one consumer (the trainer, or `loader tap`) reads them in order without a
//! copy.
//!
//! # Usage (the trainer's side)
//!
//! ```no_run
//! use shared::config::PipelineConfig;
//! use shared::ring::{Consumer, Ring, RingSpec};
//! use std::{sync::Arc, time::Duration};
//! # fn main() -> anyhow::Result<()> {
//! # let (dataset_id, n_samples) = (0u64, 1000u64);
//! let cfg = PipelineConfig::from_toml_file("configs/tiny.toml".as_ref())?;
//! // dataset_id / n_samples: from the shard reader (`Dataset::dataset_id()`, `len()`).
//! let spec = RingSpec::new(&cfg, dataset_id, n_samples, 4);
//! let mut consumer = Consumer::new(Arc::new(Ring::open_or_create("run1", &spec)?))?;
//! consumer.seek(0, 0, Duration::from_secs(60))?; // resume point
//! // … spawn `loader run --ring run1 --config configs/tiny.toml --shards DIR --threads N` …
//! for _ in 0..10 {
//!     let batch = consumer.next_batch(Duration::from_secs(60))?;
//!     let view = batch.view(); // zero-copy BatchView of the slot
//!     let _ = (batch.epoch(), batch.batch(), view.global_view(0), view.indices());
//! } // each guard frees its slot when dropped
//! drop(consumer); // closes the ring: loaders exit, /dev/shm/udi-ring-run1 is removed
//! # Ok(()) }
//! ```
//!
//! # PROTOCOL
//!
//! ## Naming and lifetime
//! A ring named `NAME` (letters, digits, `-`, `_`, `.`; at most 64 bytes) lives in the file
//! `/dev/shm/udi-ring-NAME` ([`segment_path`]), mode 0600. It is created complete under a
//! temporary name and `link(2)`ed into place, so a process that opens the name always sees an
//! initialised header; two creators racing both succeed (one creates, the other attaches).
//!
//! Who unlinks:
//! * the consumer, when it is dropped or [`Consumer::close`]d: it sets `closed` and unlinks the
//!   name at once (processes still mapping the segment keep their memory until they leave);
//!   producers see `closed` and exit. [`Consumer::detach`] instead leaves the ring for a later
//!   consumer.
//! * otherwise the last process to leave: a producer that deregisters while no consumer is
//!   attached and alive and no other producer is alive unlinks the name (this covers a consumer
//!   killed with SIGKILL and loaders stopped before any consumer attached).
//! * a segment whose creator, consumer and producers are all dead (a crashed run) is *stale*: the
//!   next [`Ring::open_or_create`] / [`Ring::create`] of that name unlinks and recreates it, and
//!   [`Ring::remove_stale`] unlinks every stale one of a name prefix (a trainer does, for its
//!   `udi-train-` rings, as it starts). A pid reused by an unrelated process makes a stale
//!   segment look live: it is then left for the next sweep.
//!
//! ## Segment layout (native endian, every region page-aligned)
//!
//! | offset | bytes | content |
//! |---|---|---|
//! | 0 | 4096 | [`RingHeader`] |
//! | 4096 | 4096 | the pipeline config as JSON (`config_len` bytes), so a consumer or `loader tap` can rebuild the [`BatchLayout`] without a config file |
//! | 8192 | 64 × 64 | producer table: [`MAX_PRODUCERS`] [`ProducerEntry`] records |
//! | 12288 | 64 × slots, rounded up to 4096 | slot control words, one [`SlotCtl`] per cache line |
//! | `data_offset` | `slot_bytes` × slots | slot `i` holds one batch in the BATCH LAYOUT of [`crate::batch`] (`batch_bytes` used, `slot_bytes` = `batch_bytes` rounded up to 4096) |
//!
//! Header fields (written once by the creator before the segment is linked, except where noted):
//! * `magic` = `b"UDIring1"`, `version` = [`RING_VERSION`], `data_offset`, `total_bytes`.
//! * `spec_hash`: xxh3 of the [`RingSpec`] (config fingerprint, dataset id, batch bytes, sample
//!   count, batch size, seed, data-parallel slice; not the slot count). A process whose spec differs refuses to attach
//!   ([`Ring::check_spec`] names every field that differs).
//! * `config_fingerprint` ([`PipelineConfig::fingerprint`]), `dataset_id`, `batch_bytes`
//!   ([`BatchLayout::total`]), `n_samples`, `batch_size`, `seed`, `slots`, `slot_bytes`,
//!   `batches_per_epoch` (drop_last; this rank's share), `world`, `rank`, `accumulate` (the
//!   data-parallel [`Slice`] the ring serves; 1, 0, 1 for one process).
//! * `creator_pid`, `created_ns` (CLOCK_MONOTONIC).
//! * mutable: `consumer_pid` (0 = none attached), `closed` (1 once the consumer closed the
//!   ring), `cursor` (the global batch number the consumer reads next), `next_claim` (highest
//!   claimed global batch + 1, a hint shown by `loader status`), `published`, `rebuilt` (totals),
//!   and two futex words `produced_ev` / `released_ev` that are incremented (then woken) whenever
//!   a slot is published / released, so waiters sleep instead of spinning.
//!
//! ## Batch order
//! Global batch number `g = epoch · batches_per_epoch + batch`. Batch `b` of epoch `e` holds the
//! permutation entries `[jB, (j+1)B)` of `epoch_permutation(seed, e, n_samples)` with
//! `j = slice.batch_of(b)` ([`Slice`]; `j = b` for one process, [`crate::rng::batch_samples`]). The consumer reads `g = cursor, cursor+1, …` and batch `g`
//! always lives in slot `g mod slots`.
//!
//! ## Slot state word
//! `SlotCtl::word` (u64) = `g << 24 | owner << 8 | state`, `state` ∈ {FREE 0, WRITING 1,
//! READY 2}; `owner` = producer-table index (low 6 bits) | registration generation (high 10 bits).
//! * `FREE(g)`: the slot may be claimed for batch `g` (and only `g`). Initially slot `i` is
//!   `FREE(cursor + ((i - cursor) mod slots))`.
//! * claim: a producer CASes `FREE(g)` → `WRITING(g, me)`; it scans `g ∈ [cursor, cursor+slots)`
//!   lowest first, so the batch the consumer waits for is built first and fast and slow
//!   producers balance dynamically. The CAS is the atomic claim: no batch is built twice at once.
//! * publish: after writing all `batch_bytes`, the producer CASes `WRITING(g, me)` → `READY(g, me)`
//!   with release ordering; the consumer loads the word with acquire, so it never sees a torn
//!   batch. If the CAS fails (the consumer sought elsewhere) the work is discarded.
//! * abandon (SIGINT/SIGTERM mid-batch, or an error): `WRITING(g, me)` → `FREE(g)`.
//! * release: when the consumer drops the batch guard it stores `FREE(g + slots)` (release) and
//!   then advances `cursor`.
//! * crash: a slot `WRITING(g, owner)` whose owner's pid is gone (`kill(pid, 0)` = ESRCH, or a
//!   zombie not yet reaped, or a reused pid: the start time in `/proc/PID/stat` differs from the
//!   one registered) or whose table entry was re-registered (generation differs) is re-claimed
//!   by CAS to
//!   `WRITING(g, me)` and rebuilt; crops are deterministic, so the consumer gets the same bytes.
//!   Heartbeats are shown by `loader status` and in the consumer's timeout message, but a
//!   producer that is alive with a stale heartbeat (e.g. stopped) is *not* robbed here: it could
//!   still write into the slot afterwards. Whoever started it kills it instead (the trainer's
//!   supervisor does, past `[run] loader_heartbeat_timeout_s`); once dead, its claim is rebuilt.
//!
//! ## Seek
//! [`Consumer::seek`] stores the new `cursor`, then moves every slot to the `FREE(g)` of the new
//! window with CAS, keeping slots that already hold (`READY`) or are building (`WRITING`) a batch
//! of the new window and waiting for live producers that are writing a batch outside it.
//!
//! ## Producers
//! A producer process registers in the producer table (`pid`, `generation`, `threads`), updates
//! `heartbeat_ns` (CLOCK_MONOTONIC) as it makes progress ([`Ring::heartbeat_age`]), counts
//! `batches`, and clears `pid` on exit.
//! Producers stop when the ring is `closed` or the attached consumer's pid is gone; with no
//! consumer attached yet they wait.

use crate::batch::{BatchLayout, BatchView};
use crate::config::PipelineConfig;
use crate::rng::Slice;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::MmapRaw;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"UDIring1");
pub const RING_VERSION: u32 = 2;
/// Producer processes that can be registered at once.
pub const MAX_PRODUCERS: usize = 64;
const PAGE: usize = 4096;
const CONFIG_OFFSET: usize = PAGE;
const PRODUCERS_OFFSET: usize = 2 * PAGE;
const SLOTS_OFFSET: usize = 3 * PAGE;
const MAX_SLOTS: u32 = 4096;

const FREE: u64 = 0;
const WRITING: u64 = 1;
const READY: u64 = 2;

fn word(g: u64, owner: u16, state: u64) -> u64 {
    (g << 24) | ((owner as u64) << 8) | state
}
fn word_g(w: u64) -> u64 {
    w >> 24
}
fn word_owner(w: u64) -> u16 {
    ((w >> 8) & 0xFFFF) as u16
}
fn word_state(w: u64) -> u64 {
    w & 0xFF
}
fn state_name(w: u64) -> String {
    let s = match word_state(w) {
        FREE => "free",
        WRITING => "writing",
        READY => "ready",
        _ => "corrupt",
    };
    format!("{s} for global batch {}", word_g(w))
}

/// The path of ring `name`'s segment: `/dev/shm/udi-ring-NAME`.
pub fn segment_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/udi-ring-{name}"))
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        && !name.starts_with('.');
    if !ok {
        bail!("ring name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Nanoseconds of CLOCK_MONOTONIC (system-wide, so comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// True if a process with this pid exists and is not a zombie (EPERM counts as alive). A dead
/// child that its parent has not reaped yet is a zombie: it counts as dead, so its claims are
/// rebuilt even if the parent (e.g. the trainer that spawned the loaders) never waits for it.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as i32, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !matches!(proc_stat(pid), Some((b'Z' | b'X', _)))
}

/// (state, start time in clock ticks since boot) of a process, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u8, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let mut rest = text[text.rfind(')')? + 1..].split_ascii_whitespace();
    let state = *rest.next()?.as_bytes().first()?;
    Some((state, rest.nth(18)?.parse().ok()?))
}

/// Start time of `pid` (0 if unknown): with the pid it identifies a process even after the pid
/// is reused.
fn proc_start(pid: u32) -> u64 {
    proc_stat(pid).map(|s| s.1).unwrap_or(0)
}

fn futex_wait(w: &AtomicU32, expected: u32, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        // SAFETY: a shared (not PRIVATE) futex on a word inside the mapping; returns at once if
        // the word no longer equals `expected`.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                w.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                0,
                0,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (w, expected);
        std::thread::sleep(timeout.min(Duration::from_millis(1)));
    }
}

fn bump_and_wake(w: &AtomicU32) {
    w.fetch_add(1, Release);
    #[cfg(target_os = "linux")]
    // SAFETY: wakes every waiter on this shared futex word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0,
            0,
        )
    };
}

/// Everything that must agree between the processes sharing a ring.
#[derive(Clone, Debug, PartialEq)]
pub struct RingSpec {
    /// [`PipelineConfig::fingerprint`] of the producers' config.
    pub config_fingerprint: u64,
    /// Identity of the dataset (the shard reader's `dataset_id()`, or a synthetic source's).
    pub dataset_id: u64,
    /// [`BatchLayout::total`].
    pub batch_bytes: u64,
    pub n_samples: u64,
    pub batch_size: u32,
    pub seed: u64,
    pub slots: u32,
    /// The data-parallel rank's share of the sample order this ring serves.
    pub slice: Slice,
    /// The config itself (stored in the segment; not part of the hash beyond the fingerprint).
    pub config: PipelineConfig,
}

impl RingSpec {
    pub fn new(config: &PipelineConfig, dataset_id: u64, n_samples: u64, slots: u32) -> Self {
        let layout = BatchLayout::new(&config.augment, config.data.batch_size);
        Self {
            config_fingerprint: config.fingerprint(),
            dataset_id,
            batch_bytes: layout.total as u64,
            n_samples,
            batch_size: config.data.batch_size,
            seed: config.data.seed,
            slots,
            slice: Slice::WHOLE,
            config: config.clone(),
        }
    }

    /// The ring of one data-parallel rank (`Slice::WHOLE` by default).
    pub fn with_slice(mut self, slice: Slice) -> Self {
        self.slice = slice;
        self
    }

    /// The header's `spec_hash`. The slot count is left out: it does not shape a batch, and
    /// producers attach to a ring whatever its slot count.
    pub fn hash(&self) -> u64 {
        let mut b = Vec::with_capacity(48);
        for x in [
            self.config_fingerprint,
            self.dataset_id,
            self.batch_bytes,
            self.n_samples,
            self.seed,
        ] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b.extend_from_slice(&self.batch_size.to_le_bytes());
        for x in [self.slice.world, self.slice.rank, self.slice.accumulate] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_64(&b)
    }

    pub fn layout(&self) -> BatchLayout {
        BatchLayout::new(&self.config.augment, self.batch_size)
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.slice
            .batches_per_epoch(self.n_samples, self.batch_size)
    }

    fn slot_bytes(&self) -> u64 {
        self.batch_bytes.div_ceil(PAGE as u64) * PAGE as u64
    }
    fn data_offset(&self) -> u64 {
        (SLOTS_OFFSET + (64 * self.slots as usize).div_ceil(PAGE) * PAGE) as u64
    }
    fn total_bytes(&self) -> u64 {
        self.data_offset() + self.slots as u64 * self.slot_bytes()
    }
}

/// The segment's first page (see PROTOCOL).
#[repr(C)]
pub struct RingHeader {
    pub magic: u64,
    pub version: u32,
    pub config_len: u32,
    pub data_offset: u64,
    pub total_bytes: u64,
    pub spec_hash: u64,
    pub config_fingerprint: u64,
    pub dataset_id: u64,
    pub batch_bytes: u64,
    pub n_samples: u64,
    pub seed: u64,
    pub slot_bytes: u64,
    pub batches_per_epoch: u64,
    pub created_ns: u64,
    pub batch_size: u32,
    pub slots: u32,
    pub creator_pid: u32,
    pub consumer_pid: AtomicU32,
    pub closed: AtomicU32,
    pub produced_ev: AtomicU32,
    pub released_ev: AtomicU32,
    pub _pad: u32,
    pub cursor: AtomicU64,
    pub next_claim: AtomicU64,
    pub published: AtomicU64,
    pub rebuilt: AtomicU64,
    pub world: u32,
    pub rank: u32,
    pub accumulate: u32,
}

/// One producer process's record (one cache line).
#[repr(C, align(64))]
pub struct ProducerEntry {
    /// 0 = free entry.
    pub pid: AtomicU32,
    /// Bumped at every registration in this entry (10 bits used in slot words).
    pub generation: AtomicU32,
    pub threads: AtomicU32,
    pub _pad: u32,
    pub heartbeat_ns: AtomicU64,
    pub started_ns: AtomicU64,
    /// Batches published by this producer.
    pub batches: AtomicU64,
    /// Of which re-claimed from dead producers.
    pub rebuilt: AtomicU64,
    /// Start time of the process (`/proc/PID/stat` field 22), to tell a reused pid apart.
    pub proc_start: AtomicU64,
}

/// A slot's control word (one cache line).
#[repr(C, align(64))]
pub struct SlotCtl {
    pub word: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<RingHeader>() <= PAGE);
const _: () = assert!(std::mem::size_of::<ProducerEntry>() == 64);
const _: () = assert!(MAX_PRODUCERS * 64 <= PAGE);

/// A mapped ring segment (any role). Cheap to share between threads.
pub struct Ring {
    name: String,
    map: MmapRaw,
    _file: File,
    ino: u64,
    spec: RingSpec,
    layout: BatchLayout,
}

// SAFETY: all shared mutable state is accessed through atomics or under the slot protocol.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Creates ring `name` for `spec`; fails if a live ring of that name exists (a stale one is
    /// reclaimed).
    pub fn create(name: &str, spec: &RingSpec) -> Result<Ring> {
        check_name(name)?;
        loop {
            match Self::open_existing(name)? {
                Some(r) if r.is_stale() => r.unlink_if_same(),
                Some(r) => bail!(
                    "ring '{name}' ({}) already exists and is in use (creator pid {}, consumer pid {})",
                    segment_path(name).display(),
                    r.header().creator_pid,
                    r.header().consumer_pid.load(Relaxed)
                ),
                None => {
                    if let Some(r) = Self::try_create(name, spec)? {
                        return Ok(r);
                    }
                }
            }
        }
    }

    /// Attaches to ring `name` if it exists and is live (checking `spec`), else creates it.
    pub fn open_or_create(name: &str, spec: &RingSpec) -> Result<Ring> {
        check_name(name)?;
        loop {
            match Self::open_existing(name)? {
                Some(r) if r.is_stale() => r.unlink_if_same(),
                Some(r) => {
                    r.check_spec(spec)?;
                    return Ok(r);
                }
                None => {
                    if let Some(r) = Self::try_create(name, spec)? {
                        return Ok(r);
                    }
                }
            }
        }
    }

    /// Attaches to an existing ring, taking its spec and config from the segment.
    pub fn attach(name: &str) -> Result<Ring> {
        check_name(name)?;
        Self::open_existing(name)?.ok_or_else(|| {
            anyhow!(
                "ring '{name}' does not exist ({} not found)",
                segment_path(name).display()
            )
        })
    }

    /// Attaches to an existing ring and refuses it unless it was created for `spec`.
    pub fn attach_checked(name: &str, spec: &RingSpec) -> Result<Ring> {
        let r = Self::attach(name)?;
        r.check_spec(spec)?;
        Ok(r)
    }

    /// Unlinks every ring whose name starts with `prefix` and that nobody alive uses (all its
    /// processes were killed, so none was left to unlink it); returns their names. Segments
    /// that cannot be read as rings are left alone.
    pub fn remove_stale(prefix: &str) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir("/dev/shm") else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for e in dir.flatten() {
            let file = e.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_prefix("udi-ring-")) else {
                continue;
            };
            if !name.starts_with(prefix) || check_name(name).is_err() {
                continue;
            }
            if let Ok(Some(r)) = Self::open_existing(name) {
                if r.is_stale() {
                    r.unlink_if_same();
                    gone.push(name.to_string());
                }
            }
        }
        gone
    }

    /// Removes ring `name`'s segment name (mapped processes keep their memory). Missing is fine.
    pub fn unlink(name: &str) -> Result<()> {
        check_name(name)?;
        match std::fs::remove_file(segment_path(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("unlinking {}", segment_path(name).display()))
            }
            _ => Ok(()),
        }
    }

    fn try_create(name: &str, spec: &RingSpec) -> Result<Option<Ring>> {
        if spec.slots == 0 || spec.slots > MAX_SLOTS {
            bail!(
                "ring '{name}': slots must be 1..={MAX_SLOTS}, got {}",
                spec.slots
            );
        }
        if spec.batches_per_epoch() == 0 {
            bail!(
                "ring '{name}': {} samples make no batch of {}",
                spec.n_samples,
                spec.batch_size
            );
        }
        let config = serde_json::to_vec(&spec.config)?;
        if config.len() > PAGE {
            bail!(
                "ring '{name}': config JSON is {} bytes, the segment keeps at most {PAGE}",
                config.len()
            );
        }
        let path = segment_path(name);
        let tmp = PathBuf::from(format!(
            "/dev/shm/.udi-ring-{name}.{}.tmp",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let result = (|| -> Result<Option<Ring>> {
            file.set_len(spec.total_bytes()).with_context(|| {
                format!(
                    "sizing {} to {} bytes (is /dev/shm big enough?)",
                    tmp.display(),
                    spec.total_bytes()
                )
            })?;
            let map =
                MmapRaw::map_raw(&file).with_context(|| format!("mapping {}", tmp.display()))?;
            // SAFETY: fresh zeroed mapping, page aligned and large enough; nobody else sees it yet.
            let h = unsafe { &mut *(map.as_mut_ptr() as *mut RingHeader) };
            h.magic = RING_MAGIC;
            h.version = RING_VERSION;
            h.config_len = config.len() as u32;
            h.data_offset = spec.data_offset();
            h.total_bytes = spec.total_bytes();
            h.spec_hash = spec.hash();
            h.config_fingerprint = spec.config_fingerprint;
            h.dataset_id = spec.dataset_id;
            h.batch_bytes = spec.batch_bytes;
            h.n_samples = spec.n_samples;
            h.seed = spec.seed;
            h.slot_bytes = spec.slot_bytes();
            h.batches_per_epoch = spec.batches_per_epoch();
            h.created_ns = monotonic_ns();
            h.batch_size = spec.batch_size;
            h.slots = spec.slots;
            h.world = spec.slice.world;
            h.rank = spec.slice.rank;
            h.accumulate = spec.slice.accumulate;
            h.creator_pid = std::process::id();
            // SAFETY: inside the mapping, disjoint from the header.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    config.as_ptr(),
                    map.as_mut_ptr().add(CONFIG_OFFSET),
                    config.len(),
                );
            }
            let ring = Ring::from_parts(name, map, file.try_clone()?, spec.clone())?;
            for i in 0..spec.slots as u64 {
                ring.slot(i as usize).word.store(word(i, 0, FREE), Relaxed);
            }
            std::sync::atomic::fence(SeqCst);
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(Some(ring)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e).with_context(|| format!("linking {}", path.display())),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    fn open_existing(name: &str) -> Result<Option<Ring>> {
        let path = segment_path(name);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening ring '{name}' ({})", path.display()))
            }
        };
        let len = file.metadata()?.len();
        if len < SLOTS_OFFSET as u64 {
            bail!(
                "{} is not a batch ring ({len} bytes); remove it",
                path.display()
            );
        }
        let map = MmapRaw::map_raw(&file).with_context(|| format!("mapping {}", path.display()))?;
        // SAFETY: the mapping is at least one page; fields are read-only after creation.
        let h = unsafe { &*(map.as_ptr() as *const RingHeader) };
        if h.magic != RING_MAGIC {
            bail!(
                "{} is not a batch ring (bad magic); remove it",
                path.display()
            );
        }
        if h.version != RING_VERSION {
            bail!(
                "ring '{name}' ({}) has protocol version {}, this program speaks {RING_VERSION}; \
                 remove it or use the matching programs",
                path.display(),
                h.version
            );
        }
        if h.total_bytes != len
            || h.config_len as usize > PAGE
            || h.slots == 0
            || h.slots > MAX_SLOTS
        {
            bail!(
                "ring '{name}' ({}): header does not match the file size; remove it",
                path.display()
            );
        }
        // SAFETY: within the config page.
        let cfg_bytes = unsafe {
            std::slice::from_raw_parts(map.as_ptr().add(CONFIG_OFFSET), h.config_len as usize)
        };
        let config: PipelineConfig = serde_json::from_slice(cfg_bytes)
            .map_err(anyhow::Error::from)
            .and_then(|c: PipelineConfig| c.validate().map(|()| c))
            .with_context(|| format!("ring '{name}': reading the stored config"))?;
        let spec = RingSpec {
            config_fingerprint: h.config_fingerprint,
            dataset_id: h.dataset_id,
            batch_bytes: h.batch_bytes,
            n_samples: h.n_samples,
            batch_size: h.batch_size,
            seed: h.seed,
            slots: h.slots,
            slice: Slice::new(h.world, h.rank, h.accumulate).map_err(|e| {
                anyhow::anyhow!("ring '{name}' ({}): {e}; remove it", path.display())
            })?,
            config,
        };
        // In this order: each check bounds what the next one computes with (a damaged batch
        // size or batch byte count would divide by zero or overflow the size arithmetic). The
        // batch count per epoch divides every batch number, so 0 (or a count that disagrees
        // with the header's) is damage too.
        let sane = spec.batch_size > 0
            && spec.layout().total as u64 == h.batch_bytes
            && spec.total_bytes() == h.total_bytes;
        let bpe = if sane { spec.batches_per_epoch() } else { 0 };
        if bpe == 0 || bpe != h.batches_per_epoch {
            bail!(
                "ring '{name}': stored geometry is inconsistent; remove {}",
                path.display()
            );
        }
        Ok(Some(Ring::from_parts(name, map, file, spec)?))
    }

    fn from_parts(name: &str, map: MmapRaw, file: File, spec: RingSpec) -> Result<Ring> {
        let ino = file.metadata()?.ino();
        let layout = spec.layout();
        Ok(Ring {
            name: name.to_string(),
            map,
            _file: file,
            ino,
            spec,
            layout,
        })
    }

    /// Refuses a ring whose spec differs from ours, naming each differing field.
    pub fn check_spec(&self, want: &RingSpec) -> Result<()> {
        let have = &self.spec;
        if have.hash() == want.hash() {
            return Ok(());
        }
        let mut diffs = Vec::new();
        let mut cmp = |what: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{what}: ring has {a}, this process has {b}"));
            }
        };
        cmp(
            "config fingerprint (data+augment tables)",
            format!("{:016x}", have.config_fingerprint),
            format!("{:016x}", want.config_fingerprint),
        );
        cmp(
            "dataset id",
            format!("{:016x}", have.dataset_id),
            format!("{:016x}", want.dataset_id),
        );
        cmp(
            "batch bytes",
            have.batch_bytes.to_string(),
            want.batch_bytes.to_string(),
        );
        cmp(
            "samples",
            have.n_samples.to_string(),
            want.n_samples.to_string(),
        );
        cmp(
            "batch size",
            have.batch_size.to_string(),
            want.batch_size.to_string(),
        );
        cmp("seed", have.seed.to_string(), want.seed.to_string());
        let slice = |s: &Slice| {
            format!(
                "rank {} of {} (accumulate {})",
                s.rank, s.world, s.accumulate
            )
        };
        cmp(
            "data-parallel slice",
            slice(&have.slice),
            slice(&want.slice),
        );
        bail!(
            "ring '{}' ({}) was created for another geometry/config; refusing to attach: {}",
            self.name,
            segment_path(&self.name).display(),
            diffs.join("; ")
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn spec(&self) -> &RingSpec {
        &self.spec
    }
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }
    pub fn header(&self) -> &RingHeader {
        // SAFETY: page 0 of a validated mapping.
        unsafe { &*(self.map.as_ptr() as *const RingHeader) }
    }
    fn producer(&self, i: usize) -> &ProducerEntry {
        assert!(i < MAX_PRODUCERS);
        // SAFETY: inside the producer-table page.
        unsafe { &*(self.map.as_ptr().add(PRODUCERS_OFFSET + 64 * i) as *const ProducerEntry) }
    }
    fn slot(&self, i: usize) -> &SlotCtl {
        assert!(i < self.spec.slots as usize);
        // SAFETY: inside the slot-control pages.
        unsafe { &*(self.map.as_ptr().add(SLOTS_OFFSET + 64 * i) as *const SlotCtl) }
    }
    fn slot_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.spec.slots as usize);
        // SAFETY: slot i lies inside the mapping (checked against the file size at open).
        unsafe {
            self.map
                .as_mut_ptr()
                .add(self.header().data_offset as usize + i * self.header().slot_bytes as usize)
        }
    }
    fn slot_of(&self, g: u64) -> usize {
        (g % self.spec.slots as u64) as usize
    }

    /// (epoch, batch) of global batch `g`.
    pub fn split(&self, g: u64) -> (u64, u64) {
        let bpe = self.spec.batches_per_epoch();
        (g / bpe, g % bpe)
    }

    /// A segment nobody alive uses any more (or one already closed).
    fn is_stale(&self) -> bool {
        let h = self.header();
        if h.closed.load(Acquire) != 0 {
            return true;
        }
        let live_producer = !self.live_producers().is_empty();
        !(pid_alive(h.creator_pid) || pid_alive(h.consumer_pid.load(Acquire)) || live_producer)
    }

    /// Unlinks the name only if it still refers to this segment (not a newer one).
    fn unlink_if_same(&self) {
        let path = segment_path(&self.name);
        if let Ok(m) = std::fs::metadata(&path) {
            if m.ino() == self.ino {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    fn owner_alive(&self, owner: u16) -> bool {
        let e = self.producer((owner & 63) as usize);
        (e.generation.load(Acquire) & 0x3FF) as u16 == owner >> 6 && Self::entry_alive(e)
    }

    /// The entry's process is alive and is still the one that registered (same start time).
    fn entry_alive(e: &ProducerEntry) -> bool {
        let pid = e.pid.load(Acquire);
        let start = e.proc_start.load(Acquire);
        pid_alive(pid) && (start == 0 || proc_start(pid) == start)
    }

    fn live_producers(&self) -> Vec<u32> {
        (0..MAX_PRODUCERS)
            .map(|i| self.producer(i))
            .filter(|e| Self::entry_alive(e))
            .map(|e| e.pid.load(Acquire))
            .collect()
    }

    fn consumer_gone(&self) -> bool {
        let h = self.header();
        if h.closed.load(Acquire) != 0 {
            return true;
        }
        let c = h.consumer_pid.load(Acquire);
        c != 0 && !pid_alive(c)
    }

    /// Time since the last heartbeat of producer process `pid`, once it has registered (a
    /// stopped process counts; an entry still being registered, or whose start time does not
    /// match the live process, does not).
    pub fn heartbeat_age(&self, pid: u32) -> Option<Duration> {
        let started = proc_start(pid);
        (0..MAX_PRODUCERS)
            .map(|i| self.producer(i))
            .filter(|e| {
                pid != 0
                    && started != 0
                    && e.pid.load(Acquire) == pid
                    && e.proc_start.load(Acquire) == started
                    && pid_alive(pid)
            })
            .map(|e| {
                let beat = e.heartbeat_ns.load(Acquire);
                Duration::from_nanos(monotonic_ns().saturating_sub(beat))
            })
            .min()
    }

    /// A snapshot for `loader status` and error messages.
    pub fn status(&self) -> RingStatus {
        let h = self.header();
        let now = monotonic_ns();
        let mut ready = 0;
        let mut writing = 0;
        let mut writers = Vec::new();
        for i in 0..self.spec.slots as usize {
            let w = self.slot(i).word.load(Acquire);
            match word_state(w) {
                READY => ready += 1,
                WRITING => {
                    writing += 1;
                    let pid = self
                        .producer((word_owner(w) & 63) as usize)
                        .pid
                        .load(Acquire);
                    writers.push((word_g(w), pid));
                }
                _ => {}
            }
        }
        let producers = (0..MAX_PRODUCERS)
            .filter_map(|i| {
                let e = self.producer(i);
                let pid = e.pid.load(Acquire);
                (pid != 0).then(|| ProducerInfo {
                    pid,
                    alive: pid_alive(pid),
                    threads: e.threads.load(Relaxed),
                    batches: e.batches.load(Relaxed),
                    rebuilt: e.rebuilt.load(Relaxed),
                    heartbeat_age_s: now.saturating_sub(e.heartbeat_ns.load(Relaxed)) as f64 * 1e-9,
                })
            })
            .collect();
        let cursor = h.cursor.load(Acquire);
        let (epoch, batch) = self.split(cursor);
        RingStatus {
            name: self.name.clone(),
            slots: self.spec.slots,
            ready,
            writing,
            cursor,
            epoch,
            batch,
            batches_per_epoch: self.spec.batches_per_epoch(),
            consumer_pid: h.consumer_pid.load(Acquire),
            consumer_alive: pid_alive(h.consumer_pid.load(Acquire)),
            closed: h.closed.load(Acquire) != 0,
            published: h.published.load(Acquire),
            rebuilt: h.rebuilt.load(Acquire),
            producers,
            writers,
        }
    }
}

/// See [`Ring::status`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct RingStatus {
    pub name: String,
    pub slots: u32,
    pub ready: u32,
    pub writing: u32,
    pub cursor: u64,
    pub epoch: u64,
    pub batch: u64,
    pub batches_per_epoch: u64,
    pub consumer_pid: u32,
    pub consumer_alive: bool,
    pub closed: bool,
    pub published: u64,
    pub rebuilt: u64,
    pub producers: Vec<ProducerInfo>,
    /// (global batch, pid of the producer table entry) of every slot being written.
    pub writers: Vec<(u64, u32)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProducerInfo {
    pub pid: u32,
    pub alive: bool,
    pub threads: u32,
    pub batches: u64,
    pub rebuilt: u64,
    pub heartbeat_age_s: f64,
}

/// The reading side. One per ring: attaching fails while another live consumer is attached.
pub struct Consumer {
    ring: std::sync::Arc<Ring>,
    cursor: u64,
    detached: bool,
}

impl Consumer {
    /// Registers as the ring's consumer, continuing from the stored cursor.
    pub fn new(ring: std::sync::Arc<Ring>) -> Result<Consumer> {
        let me = std::process::id();
        let h = ring.header();
        loop {
            let cur = h.consumer_pid.load(Acquire);
            if cur != 0 && cur != me && pid_alive(cur) {
                bail!("ring '{}' already has a consumer (pid {cur})", ring.name);
            }
            if h.consumer_pid
                .compare_exchange(cur, me, AcqRel, Acquire)
                .is_ok()
            {
                break;
            }
        }
        let cursor = h.cursor.load(Acquire);
        Ok(Consumer {
            ring,
            cursor,
            detached: false,
        })
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// (epoch, batch) that [`next_batch`](Self::next_batch) returns next.
    pub fn position(&self) -> (u64, u64) {
        self.ring.split(self.cursor)
    }

    /// Waits (sleeping on a futex) up to `timeout` for the next batch in order.
    pub fn next_batch(&mut self, timeout: Duration) -> Result<BatchGuard<'_>> {
        let ring = &*self.ring;
        let h = ring.header();
        let g = self.cursor;
        let slot = ring.slot_of(g);
        let ctl = ring.slot(slot);
        let deadline = Instant::now() + timeout;
        loop {
            let ev = h.produced_ev.load(Acquire);
            let w = ctl.word.load(Acquire);
            if word_state(w) == READY && word_g(w) == g {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let (e, b) = ring.split(g);
                let live = ring.live_producers();
                bail!(
                    "ring '{}': waited {:.1}s for epoch {e} batch {b} (global {g}, slot {slot}: {}); {} live producer(s){}",
                    ring.name,
                    timeout.as_secs_f64(),
                    state_name(w),
                    live.len(),
                    if live.is_empty() { " — is `loader run` running?".to_string() } else { format!(" (pids {live:?})") }
                );
            }
            futex_wait(
                &h.produced_ev,
                ev,
                (deadline - now).min(Duration::from_millis(100)),
            );
        }
        // SAFETY: the slot is READY for g: no producer writes it until we release it.
        let bytes = unsafe {
            std::slice::from_raw_parts(ring.slot_ptr(slot) as *const u8, ring.layout.total)
        };
        let view = BatchView::new(&ring.layout, bytes)
            .map_err(|e| anyhow!("ring '{}' slot {slot}: {e}", ring.name))?;
        let hd = view.header();
        let (e, b) = ring.split(g);
        if (hd.epoch, hd.batch) != (e, b) {
            bail!(
                "ring '{}' slot {slot}: holds epoch {} batch {}, expected {e} {b}",
                ring.name,
                hd.epoch,
                hd.batch
            );
        }
        Ok(BatchGuard {
            consumer: self,
            g,
            slot,
            bytes,
        })
    }

    /// Continues at `batch` of `epoch` (for resume). Slots of the old position are recycled;
    /// waits up to `timeout` for producers writing batches outside the new window.
    pub fn seek(&mut self, epoch: u64, batch: u64, timeout: Duration) -> Result<()> {
        let ring = &*self.ring;
        let bpe = ring.spec.batches_per_epoch();
        if batch >= bpe {
            bail!("seek: epoch {epoch} has {bpe} batches, asked for batch {batch}");
        }
        let g0 = epoch * bpe + batch;
        let n = ring.spec.slots as u64;
        let h = ring.header();
        h.cursor.store(g0, Release);
        let deadline = Instant::now() + timeout;
        for i in 0..n {
            // The batch of the new window that lives in slot i.
            let target = g0 + (i + n - g0 % n) % n;
            loop {
                let w = ring.slot(i as usize).word.load(Acquire);
                let keep = word_g(w) == target && word_state(w) != FREE;
                if w == word(target, 0, FREE) || keep {
                    break;
                }
                if word_state(w) == WRITING && ring.owner_alive(word_owner(w)) {
                    if Instant::now() >= deadline {
                        bail!(
                            "seek: slot {i} is still being written by a live producer ({})",
                            state_name(w)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if ring
                    .slot(i as usize)
                    .word
                    .compare_exchange(w, word(target, 0, FREE), AcqRel, Acquire)
                    .is_ok()
                {
                    break;
                }
            }
        }
        h.next_claim.store(g0, Release);
        self.cursor = g0;
        bump_and_wake(&h.released_ev);
        Ok(())
    }

    /// Leaves the ring for a later consumer (keeps the segment and the cursor).
    pub fn detach(mut self) {
        self.detached = true;
        let _ = self.ring.header().consumer_pid.compare_exchange(
            std::process::id(),
            0,
            AcqRel,
            Acquire,
        );
    }

    /// Closes the ring: producers stop, the name is unlinked.
    pub fn close(self) {}
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let h = self.ring.header();
        h.closed.store(1, Release);
        self.ring.unlink_if_same();
        bump_and_wake(&h.released_ev);
        bump_and_wake(&h.produced_ev);
    }
}

/// A published batch, borrowed from its slot; dropping it hands the slot back to producers.
pub struct BatchGuard<'a> {
    consumer: &'a mut Consumer,
    g: u64,
    slot: usize,
    bytes: &'a [u8],
}

impl<'a> BatchGuard<'a> {
    pub fn view(&self) -> BatchView<'_> {
        BatchView {
            layout: &self.consumer.ring.layout,
            bytes: self.bytes,
        }
    }
    pub fn epoch(&self) -> u64 {
        self.consumer.ring.split(self.g).0
    }
    pub fn batch(&self) -> u64 {
        self.consumer.ring.split(self.g).1
    }
}

impl std::ops::Deref for BatchGuard<'_> {
    type Target = [u8];
    /// The batch's bytes (BATCH LAYOUT).
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        let ring = &*self.consumer.ring;
        let n = ring.spec.slots as u64;
        ring.slot(self.slot)
            .word
            .store(word(self.g + n, 0, FREE), Release);
        ring.header().cursor.store(self.g + 1, Release);
        self.consumer.cursor = self.g + 1;
        bump_and_wake(&ring.header().released_ev);
    }
}

/// Why [`Producer::claim`] returned no batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// The consumer closed the ring or died.
    ConsumerGone,
    /// The stop flag was raised.
    Stopped,
    /// Nothing to claim within the timeout (all slots full or being built).
    Timeout,
}

/// A registered producer process (shared by its worker threads).
pub struct Producer {
    ring: std::sync::Arc<Ring>,
    index: usize,
    token: u16,
    pid: u32,
}

impl Producer {
    /// Registers in the producer table with `threads` worker threads (for display).
    pub fn register(ring: std::sync::Arc<Ring>, threads: u32) -> Result<Producer> {
        let me = std::process::id();
        for i in 0..MAX_PRODUCERS {
            let e = ring.producer(i);
            let cur = e.pid.load(Acquire);
            // A live pid blocks takeover even if reused (only costs an entry).
            if (cur == 0 || !pid_alive(cur))
                && e.pid.compare_exchange(cur, me, AcqRel, Acquire).is_ok()
            {
                let gen = e.generation.fetch_add(1, AcqRel).wrapping_add(1) & 0x3FF;
                e.threads.store(threads, Relaxed);
                e.batches.store(0, Relaxed);
                e.rebuilt.store(0, Relaxed);
                e.started_ns.store(monotonic_ns(), Relaxed);
                // The heartbeat before the start time: a reader that sees this process's start
                // time (Acquire) sees its first heartbeat, not the previous occupant's last.
                e.heartbeat_ns.store(monotonic_ns(), Release);
                e.proc_start.store(proc_start(me), Release);
                return Ok(Producer {
                    ring,
                    index: i,
                    token: (gen as u16) << 6 | i as u16,
                    pid: me,
                });
            }
        }
        bail!(
            "ring '{}': all {MAX_PRODUCERS} producer entries are taken by live processes",
            ring.name
        )
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn heartbeat(&self) {
        self.ring
            .producer(self.index)
            .heartbeat_ns
            .store(monotonic_ns(), Release);
    }

    /// True once the consumer closed the ring or its process is gone.
    pub fn consumer_gone(&self) -> bool {
        self.ring.consumer_gone()
    }

    /// Claims the next batch to build: an orphan of a dead producer first, else the lowest free
    /// batch of the consumer's window. Sleeps while everything is full.
    pub fn claim(&self, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<Claim<'_>, Idle> {
        let ring = &*self.ring;
        let h = ring.header();
        let n = ring.spec.slots as u64;
        let deadline = Instant::now() + timeout;
        loop {
            if stop() {
                return Err(Idle::Stopped);
            }
            if ring.consumer_gone() {
                return Err(Idle::ConsumerGone);
            }
            let ev = h.released_ev.load(Acquire);
            let cursor = h.cursor.load(Acquire);
            for g in cursor..cursor + n {
                let slot = ring.slot_of(g);
                let ctl = ring.slot(slot);
                let w = ctl.word.load(Acquire);
                let rebuilt = if w == word(g, 0, FREE) {
                    false
                } else if word_state(w) == WRITING
                    && word_g(w) == g
                    && !ring.owner_alive(word_owner(w))
                {
                    true
                } else {
                    continue;
                };
                if ctl
                    .word
                    .compare_exchange(w, word(g, self.token, WRITING), AcqRel, Acquire)
                    .is_ok()
                {
                    h.next_claim.fetch_max(g + 1, AcqRel);
                    if rebuilt {
                        h.rebuilt.fetch_add(1, Relaxed);
                        ring.producer(self.index).rebuilt.fetch_add(1, Relaxed);
                    }
                    let (epoch, batch) = ring.split(g);
                    return Ok(Claim {
                        producer: self,
                        g,
                        slot,
                        epoch,
                        batch,
                        rebuilt,
                        done: false,
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Idle::Timeout);
            }
            // Wake periodically anyway: orphans appear without an event (a producer dies).
            futex_wait(
                &h.released_ev,
                ev,
                (deadline - now).min(Duration::from_millis(50)),
            );
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let ring = &*self.ring;
        let _ = ring
            .producer(self.index)
            .pid
            .compare_exchange(self.pid, 0, AcqRel, Acquire);
        let h = ring.header();
        let consumer = h.consumer_pid.load(Acquire);
        let consumer_here = h.closed.load(Acquire) == 0 && pid_alive(consumer);
        if !consumer_here && ring.live_producers().is_empty() {
            ring.unlink_if_same();
        }
    }
}

/// A claimed batch: write it with [`bytes_mut`](Self::bytes_mut), then [`publish`](Self::publish).
/// Dropped unpublished, the batch is handed back (abandoned) for another producer.
pub struct Claim<'a> {
    producer: &'a Producer,
    g: u64,
    slot: usize,
    pub epoch: u64,
    pub batch: u64,
    /// True if this batch was re-claimed from a dead producer.
    pub rebuilt: bool,
    done: bool,
}

impl Claim<'_> {
    pub fn global(&self) -> u64 {
        self.g
    }
    /// The slot's `batch_bytes`, exclusively ours while the claim lives.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let ring = &*self.producer.ring;
        // SAFETY: the slot word is WRITING(g, us): no one else writes or reads these bytes.
        unsafe { std::slice::from_raw_parts_mut(ring.slot_ptr(self.slot), ring.layout.total) }
    }
    /// Makes the batch visible to the consumer; false if the consumer sought away meanwhile.
    pub fn publish(mut self) -> bool {
        self.done = true;
        let p = self.producer;
        let ring = &*p.ring;
        let ok = ring
            .slot(self.slot)
            .word
            .compare_exchange(
                word(self.g, p.token, WRITING),
                word(self.g, p.token, READY),
                AcqRel,
                Acquire,
            )
            .is_ok();
        if ok {
            ring.header().published.fetch_add(1, Relaxed);
            ring.producer(p.index).batches.fetch_add(1, Relaxed);
            bump_and_wake(&ring.header().produced_ev);
        }
        ok
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let p = self.producer;
        let ring = &*p.ring;
        let _ = ring.slot(self.slot).word.compare_exchange(
            word(self.g, p.token, WRITING),
            word(self.g, 0, FREE),
            AcqRel,
            Acquire,
        );
        bump_and_wake(&ring.header().released_ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchWriter;
    use crate::config::AugmentConfig;
    use std::sync::Arc;

    fn tiny_cfg() -> PipelineConfig {
        let mut c = PipelineConfig::default();
        c.data.batch_size = 4;
        c.augment = AugmentConfig {
            global_size: 32,
            local_size: 16,
            n_local: 2,
            patch_size: 8,
            global_window: 2,
            local_window: 2,
            ..Default::default()
        };
        c
    }

    fn name(t: &str) -> String {
        format!("unit-{}-{t}", std::process::id())
    }

    fn write(claim: &mut Claim, layout: &BatchLayout, aug: &AugmentConfig) {
        let (e, b) = (claim.epoch, claim.batch);
        let bytes = claim.bytes_mut();
        let w = BatchWriter::new(layout, bytes, e, b, aug);
        let at = layout.indices.start;
        w.bytes[at..at + 8].copy_from_slice(&(e * 1000 + b).to_le_bytes());
    }

    #[test]
    fn in_order_handover_with_threads_and_cleanup() {
        let cfg = tiny_cfg();
        let spec = RingSpec::new(&cfg, 7, 40, 3);
        let n = name("order");
        let ring = Arc::new(Ring::create(&n, &spec).unwrap());
        assert!(segment_path(&n).exists());
        let mode = std::fs::metadata(segment_path(&n)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut consumer = Consumer::new(ring.clone()).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let ring = Arc::new(Ring::attach(&n).unwrap());
                let stop = stop.clone();
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let p = Producer::register(ring.clone(), 1).unwrap();
                    let layout = ring.layout().clone();
                    while let Ok(mut c) = p.claim(Duration::from_secs(30), &|| stop.load(Relaxed)) {
                        write(&mut c, &layout, &cfg.augment);
                        c.publish();
                    }
                })
            })
            .collect();
        // 10 batches per epoch; read 2.5 epochs in order.
        for g in 0..25u64 {
            let b = consumer.next_batch(Duration::from_secs(30)).unwrap();
            assert_eq!((b.epoch(), b.batch()), (g / 10, g % 10));
            assert_eq!(b.view().indices()[0], (g / 10) * 1000 + g % 10);
        }
        consumer.seek(0, 3, Duration::from_secs(30)).unwrap();
        let b = consumer.next_batch(Duration::from_secs(30)).unwrap();
        assert_eq!((b.epoch(), b.batch()), (0, 3));
        drop(b);
        stop.store(true, Relaxed);
        drop(consumer);
        for h in handles {
            h.join().unwrap();
        }
        assert!(!segment_path(&n).exists());
    }

    #[test]
    fn mismatched_spec_is_refused_by_name_and_stale_rings_are_reclaimed() {
        let cfg = tiny_cfg();
        let spec = RingSpec::new(&cfg, 7, 40, 3);
        let n = name("spec");
        let ring = Ring::create(&n, &spec).unwrap();
        let mut other = cfg.clone();
        other.augment.hue = 0.3;
        let err = Ring::open_or_create(&n, &RingSpec::new(&other, 7, 40, 3))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&n) && err.contains("config fingerprint"),
            "{err}"
        );
        let err = Ring::attach_checked(&n, &RingSpec::new(&cfg, 8, 40, 3))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("dataset id") && !err.contains("fingerprint"),
            "{err}"
        );
        assert!(
            Ring::create(&n, &spec).is_err(),
            "live ring must not be replaced"
        );
        // Pretend the creator died: the segment becomes stale and is recreated.
        // SAFETY: test-only poke at a header field nobody else reads concurrently.
        unsafe { (*(ring.map.as_mut_ptr() as *mut RingHeader)).creator_pid = 0x7FFF_FFF0 };
        let again = Ring::create(&n, &spec).unwrap();
        assert_ne!(again.ino, ring.ino);
        Ring::unlink(&n).unwrap();
    }

    #[test]
    fn dead_producer_claim_is_rebuilt() {
        let cfg = tiny_cfg();
        let spec = RingSpec::new(&cfg, 1, 40, 2);
        let n = name("orphan");
        let ring = Arc::new(Ring::create(&n, &spec).unwrap());
        let mut consumer = Consumer::new(ring.clone()).unwrap();
        let a = Producer::register(ring.clone(), 1).unwrap();
        let claim = a.claim(Duration::from_secs(5), &|| false).unwrap();
        assert_eq!(claim.global(), 0);
        std::mem::forget(claim);
        // Simulate the death of producer `a`: its table entry now names a dead pid.
        ring.producer(a.index).pid.store(0x7FFF_FFF0, Release);
        let b = Producer::register(ring.clone(), 1).unwrap();
        let mut c = b.claim(Duration::from_secs(5), &|| false).unwrap();
        assert_eq!((c.global(), c.rebuilt), (0, true));
        write(&mut c, ring.layout(), &cfg.augment);
        assert!(c.publish());
        assert_eq!(
            consumer.next_batch(Duration::from_secs(5)).unwrap().batch(),
            0
        );
        // Abandoned claims go back to the pool.
        let c = b.claim(Duration::from_secs(5), &|| false).unwrap();
        assert_eq!(c.global(), 1);
        drop(c);
        assert_eq!(
            b.claim(Duration::from_secs(5), &|| false).unwrap().global(),
            1
        );
        let err = consumer
            .next_batch(Duration::from_millis(50))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("epoch 0 batch 1") && err.contains("live producer"),
            "{err}"
        );
        std::mem::forget(a);
    }

    #[test]
    fn heartbeat_age_follows_the_beats_of_a_live_registered_pid() {
        let spec = RingSpec::new(&tiny_cfg(), 1, 40, 2);
        let n = name("heartbeat");
        let ring = Arc::new(Ring::create(&n, &spec).unwrap());
        let me = std::process::id();
        assert_eq!(ring.heartbeat_age(me), None, "not registered yet");
        let p = Producer::register(ring.clone(), 1).unwrap();
        let beat = &ring.producer(p.index).heartbeat_ns;
        beat.store(monotonic_ns() - 5_000_000_000, Release);
        assert!(ring.heartbeat_age(me).unwrap() >= Duration::from_secs(5));
        p.heartbeat();
        assert!(ring.heartbeat_age(me).unwrap() < Duration::from_secs(5));
        // Mid-registration (pid claimed, start time not yet written) the entry still holds the
        // previous occupant's heartbeat: it must not count.
        let start = ring.producer(p.index).proc_start.swap(0, AcqRel);
        beat.store(1, Release);
        assert_eq!(ring.heartbeat_age(me), None);
        ring.producer(p.index).proc_start.store(start, Release);
        p.heartbeat();
        // Another pid, or an entry whose process is gone, has no heartbeat.
        assert_eq!(ring.heartbeat_age(0x7FFF_FFF0), None);
        ring.producer(p.index).pid.store(0x7FFF_FFF0, Release);
        assert_eq!(ring.heartbeat_age(0x7FFF_FFF0), None);
        assert_eq!(ring.heartbeat_age(me), None);
        std::mem::forget(p);
        Ring::unlink(&n).unwrap();
    }

    #[test]
    fn remove_stale_unlinks_only_abandoned_rings_of_the_prefix() {
        let spec = RingSpec::new(&tiny_cfg(), 1, 40, 2);
        let (dead, live) = (name("sweep-dead"), name("sweep-live"));
        let abandoned = Ring::create(&dead, &spec).unwrap();
        // SAFETY: test-only poke at a header field nobody else reads concurrently.
        unsafe { (*(abandoned.map.as_mut_ptr() as *mut RingHeader)).creator_pid = 0x7FFF_FFF0 };
        let _in_use = Ring::create(&live, &spec).unwrap();
        let other = name("other-dead");
        let foreign = Ring::create(&other, &spec).unwrap();
        unsafe { (*(foreign.map.as_mut_ptr() as *mut RingHeader)).creator_pid = 0x7FFF_FFF0 };
        let prefix = dead.strip_suffix("sweep-dead").unwrap().to_string() + "sweep-";
        assert_eq!(Ring::remove_stale(&prefix), [dead.as_str()]);
        assert!(!segment_path(&dead).exists());
        assert!(segment_path(&live).exists() && segment_path(&other).exists());
        Ring::unlink(&live).unwrap();
        Ring::unlink(&other).unwrap();
    }

    /// Writes `bytes` as the segment of ring `name` (as a damaged or foreign file would be).
    fn plant(name: &str, bytes: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let p = segment_path(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn segment_bytes(t: &str) -> (Vec<u8>, RingSpec) {
        let spec = RingSpec::new(&tiny_cfg(), 7, 40, 2);
        let n = name(t);
        let ring = Ring::create(&n, &spec).unwrap();
        let bytes = std::fs::read(segment_path(&n)).unwrap();
        drop(ring);
        Ring::unlink(&n).unwrap();
        (bytes, spec)
    }

    #[test]
    fn another_version_or_a_truncated_segment_is_refused_by_name() {
        let (bytes, spec) = segment_bytes("refuse-src");
        let n = name("refuse");
        let mut v = bytes.clone();
        let at = std::mem::offset_of!(RingHeader, version);
        v[at..at + 4].copy_from_slice(&(RING_VERSION + 1).to_ne_bytes());
        plant(&n, &v);
        let e = format!("{:#}", Ring::attach_checked(&n, &spec).err().unwrap());
        assert!(
            e.contains(&segment_path(&n).display().to_string()) && e.contains("protocol version"),
            "{e}"
        );
        for len in [0, 100, SLOTS_OFFSET, bytes.len() - 1] {
            plant(&n, &bytes[..len]);
            let e = format!("{:#}", Ring::attach(&n).err().unwrap());
            assert!(e.contains(&n), "{len}: {e}");
        }
        Ring::unlink(&n).unwrap();
    }

    /// A header whose data-parallel slice leaves no batch in an epoch (world size 2^31 for 40
    /// samples) or whose batch count disagrees with it is refused, not divided by.
    #[test]
    fn a_header_with_no_batch_per_epoch_is_refused() {
        let (bytes, _) = segment_bytes("nobatch-src");
        let n = name("nobatch");
        let world = std::mem::offset_of!(RingHeader, world);
        let bpe = std::mem::offset_of!(RingHeader, batches_per_epoch);
        let mut a = bytes.clone();
        a[world..world + 4].copy_from_slice(&(1u32 << 31).to_ne_bytes());
        let mut b = bytes.clone();
        b[bpe..bpe + 8].copy_from_slice(&12345u64.to_ne_bytes());
        for v in [a, b] {
            plant(&n, &v);
            let e = format!("{:#}", Ring::attach(&n).err().unwrap());
            assert!(e.contains("inconsistent"), "{e}");
        }
        Ring::unlink(&n).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any damage to the header, config or producer pages, or any length: an error or a
        /// consistent ring, never a panic or a read past the mapping.
        #[test]
        fn damaged_segments_never_panic(
            edits in proptest::collection::vec((0usize..SLOTS_OFFSET, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..(64 * 1024)),
        ) {
            let (mut bytes, _) = segment_bytes("fuzz-src");
            for (at, b) in edits {
                bytes[at] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c.min(bytes.len()));
            }
            let n = name("fuzz");
            plant(&n, &bytes);
            if let Ok(r) = Ring::attach(&n) {
                // Whatever was accepted is consistent with the file.
                proptest::prop_assert_eq!(r.header().total_bytes, bytes.len() as u64);
                let _ = r.status();
            }
            let _ = Ring::unlink(&n);
        }
    }
}
