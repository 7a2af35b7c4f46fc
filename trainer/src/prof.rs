//! Opt-in stage timings for `trainer bench --profile`: each [`time`] scope synchronises the
//! device before and after, so the wall time between is the scope's device work (plus its
//! launch overhead). Off by default: then a scope is one atomic load and the closure.
//!
//! Only forward work can be scoped (candle runs the backward pass as one call); the backward
//! time per stage is roughly 2× the forward's.

use candle_core::{Device, Result};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);

thread_local! {
    static ACC: RefCell<Vec<(&'static str, f64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Turns the scopes on or off (process-wide) and clears what was recorded.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
    ACC.with(|a| a.borrow_mut().clear());
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Runs `f`, adding its synchronised wall time to `name` when profiling is on.
pub fn time<T>(dev: &Device, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    dev.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    let dt = t.elapsed().as_secs_f64();
    ACC.with(|a| {
        let mut a = a.borrow_mut();
        match a.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => a.push((name, dt, 1)),
        }
    });
    Ok(out)
}

/// A stage boundary of a training step: the time now, after the device has finished the work
/// queued so far when profiling is on. Off, nothing waits, so that the device keeps working while
/// the host queues the next stage; the stage times are then the host's (exact on the CPU, where
/// work runs as it is queued).
pub fn mark(dev: &Device) -> Result<Instant> {
    if enabled() {
        dev.synchronize()?;
    }
    Ok(Instant::now())
}

/// What was recorded since [`enable`]: (scope, total seconds, calls), in first-seen order.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    ACC.with(|a| std::mem::take(&mut *a.borrow_mut()))
}
