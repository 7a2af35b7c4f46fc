//! A model of device memory on the CPU: the bytes of CPU tensor storage alive now, and at most
//! since the last reset. Each storage is one allocation, as on the CUDA backend, so a step run on
//! the CPU with the device's dtypes and ops makes the allocations the device would make (buffers
//! a CPU kernel keeps to itself are not storage and not counted). Exact while tensors are created
//! and dropped on one thread at a time.

use crate::storage::Storage;
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes of CPU tensor storage alive now.
pub fn live_cpu_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes of CPU tensor storage alive at once since [`reset_peak_cpu_bytes`].
pub fn peak_cpu_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new high-water mark at the bytes alive now.
pub fn reset_peak_cpu_bytes() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

pub(crate) fn alloc(s: &Storage) {
    if let Storage::Cpu(c) = s {
        let n = c.byte_len();
        PEAK.fetch_max(LIVE.fetch_add(n, Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

pub(crate) fn free(s: &Storage) {
    if let Storage::Cpu(c) = s {
        LIVE.fetch_sub(c.byte_len(), Ordering::Relaxed);
    }
}

// ---- Traffic: what each op reads and writes ---------------------------------------------------
//
// While recording, every storage op (one kernel launch on the CUDA backend, or a few for a custom
// op) adds the bytes it reads and writes and, for matmuls, its FLOPs, keyed by the op's name. A
// step run on the CPU with the device's dtypes and ops is so counted as the device would run it.
// Reads count each distinct element of an input's view once (a broadcast dim reads its elements
// once); writes count the output storage, or the destination's view for in-place ops. Ops run
// inside another op (a custom op's CPU reference composed of candle ops) are not counted.

use crate::{DType, Layout};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

/// One op kind's totals while recording.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpTraffic {
    pub calls: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Multiply-adds × 2 of matmuls (0 for other ops).
    pub flops: u64,
}

static RECORDING: AtomicBool = AtomicBool::new(false);
static OPS: Mutex<BTreeMap<&'static str, OpTraffic>> = Mutex::new(BTreeMap::new());
thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Bytes the op being traced writes besides its output ([`written_by_op`]).
    static EXTRA: Cell<u64> = const { Cell::new(0) };
}

/// Starts recording traffic (from zero).
pub fn start_traffic() {
    OPS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    RECORDING.store(true, Ordering::Relaxed);
}

/// Stops recording and returns the totals per op name (sorted by name).
pub fn stop_traffic() -> Vec<(&'static str, OpTraffic)> {
    RECORDING.store(false, Ordering::Relaxed);
    let mut ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *ops).into_iter().collect()
}

/// Whether an op run now would be recorded (recording, and not inside another op).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed) && DEPTH.with(|d| d.get() == 0)
}

/// Adds one call of `name` (for ops composed outside candle's dispatch, e.g. a fused kernel's CPU
/// reference run under [`one_op`]).
pub fn record_op(name: &'static str, read_bytes: u64, written_bytes: u64, flops: u64) {
    if !recording() {
        return;
    }
    let mut ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    let t = ops.entry(name).or_default();
    t.calls += 1;
    t.read_bytes += read_bytes;
    t.written_bytes += written_bytes;
    t.flops += flops;
}

/// Adds `bytes` to what the op running now writes: for a custom op that writes more than the one
/// output candle counts (a second output it hands over another way).
pub fn written_by_op(bytes: u64) {
    EXTRA.with(|e| e.set(e.get() + bytes));
}

/// Runs `f` with the ops it runs not recorded: the caller records it as one op.
pub fn one_op<T>(f: impl FnOnce() -> T) -> T {
    let _nested = Nested::enter();
    f()
}

/// The distinct bytes a view reads: its elements, a broadcast (stride-0) dim counted once.
pub fn view_bytes(dtype: DType, l: &Layout) -> u64 {
    let elems: usize = l
        .dims()
        .iter()
        .zip(l.stride())
        .map(|(&d, &s)| if s == 0 { 1 } else { d })
        .product();
    (elems * dtype.size_in_bytes()) as u64
}

/// Marks the ops run until it is dropped as nested (not recorded).
pub(crate) struct Nested;

impl Nested {
    pub(crate) fn enter() -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        Nested
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// One storage op being traced: made before the op runs (with what it reads), finished with its
/// output. An op that fails or returns early is not recorded.
pub(crate) struct Trace {
    name: &'static str,
    read: u64,
    flops: u64,
    on: bool,
    _nested: Nested,
}

impl Trace {
    pub(crate) fn start(
        name: &'static str,
        reads: &[(&Storage, &Layout)],
        flops: u64,
    ) -> Self {
        let read = match recording() {
            true => reads.iter().map(|(s, l)| view_bytes(s.dtype(), l)).sum(),
            false => 0,
        };
        Self::start_bytes(name, read, flops)
    }

    pub(crate) fn start_bytes(name: &'static str, read: u64, flops: u64) -> Self {
        let on = recording();
        if on {
            EXTRA.with(|e| e.set(0));
        }
        Trace {
            name,
            read,
            flops,
            on,
            _nested: Nested::enter(),
        }
    }

    /// Records the op with `written` bytes written.
    pub(crate) fn written(self, written: u64) {
        let Trace {
            name,
            read,
            flops,
            on,
            _nested,
        } = self;
        drop(_nested);
        if on {
            let extra = EXTRA.with(|e| e.replace(0));
            record_op(name, read, written + extra, flops);
        }
    }

    /// Records the op with its new output storage as what it writes, and passes the output on.
    pub(crate) fn done<T: Written>(self, out: crate::Result<T>) -> crate::Result<T> {
        if let Ok(o) = &out {
            let n = if self.on { o.written_bytes() } else { 0 };
            self.written(n);
        }
        out
    }
}

/// The bytes of an op's new output.
pub(crate) trait Written {
    fn written_bytes(&self) -> u64;
}

impl Written for Storage {
    fn written_bytes(&self) -> u64 {
        match self {
            Storage::Cpu(c) => c.byte_len() as u64,
            _ => 0,
        }
    }
}

impl Written for (Storage, crate::Shape) {
    fn written_bytes(&self) -> u64 {
        self.0.written_bytes()
    }
}
