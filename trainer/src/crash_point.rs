//! Crash points for the recovery tests: with `UDI_CRASH_AT=NAME:N` in its environment, the
//! trainer kills itself with SIGKILL the N-th time (1-based) it reaches [`here`]`(NAME)`, as if
//! the machine had died at that instant. It reaches windows that a kill from outside at a random
//! moment seldom hits: between the files of a checkpoint write, between writing and renaming.
//! Unset (always, outside tests), [`here`] is one comparison.
//!
//! The points: `checkpoint-tensors` (tensors file written, `state.json` not yet),
//! `checkpoint-complete` (temporary directory complete, not yet renamed into place),
//! `checkpoint-renamed` (in place, older ones not yet pruned), `metrics-written` (a step's
//! metrics line written, its checkpoint not yet), `metrics-reopen` (on start, the kept metrics
//! lines written to a temporary file, not yet renamed over `metrics.jsonl`), `batch-fed` (a
//! batch taken off the ring and released there, not yet trained on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "UDI_CRASH_AT";

fn target() -> Option<&'static (String, u64)> {
    static T: OnceLock<Option<(String, u64)>> = OnceLock::new();
    T.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        let (name, n) = v.rsplit_once(':')?;
        Some((name.to_string(), n.parse().ok()?))
    })
    .as_ref()
}

/// Dies here (SIGKILL) on the N-th pass if `UDI_CRASH_AT=name:N`.
pub fn here(name: &str) {
    static PASSES: AtomicU64 = AtomicU64::new(0);
    if let Some((t, n)) = target() {
        if t == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
