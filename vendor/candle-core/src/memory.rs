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
