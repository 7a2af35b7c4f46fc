//! Supervision of the loader processes the trainer starts: spawn N, restart one that dies
//! (with a back-off, and a limit so a loader that can never start is reported instead of
//! restarted forever), kill and restart one that is alive but makes no progress (its heartbeat,
//! see [`Supervisor::watch_heartbeats`]), stop them all when the trainer ends.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Finds the `loader` executable: `explicit` if given, else next to the current executable
/// (or its parent, for test binaries in `target/*/deps/`).
pub fn find_loader_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--loader-bin {}: no such file", p.display());
    }
    let exe = std::env::current_exe().context("locating the trainer executable")?;
    let name = format!("loader{}", std::env::consts::EXE_SUFFIX);
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let cand = d.join(&name);
        if cand.is_file() {
            return Ok(cand);
        }
        dir = d.parent();
    }
    bail!(
        "cannot find the `loader` binary next to {} (build it with `cargo build --release -p loader`, or pass --loader-bin)",
        exe.display()
    )
}

/// What happened to a loader during [`Supervisor::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoaderEvent {
    Exited {
        slot: usize,
        status: String,
    },
    /// Alive but its heartbeat was older than the timeout, or it had none that long after it
    /// started (`registered` false: stuck before joining the ring): killed (then restarted like
    /// a dead one).
    Hung {
        slot: usize,
        pid: u32,
        heartbeat_age: Duration,
        registered: bool,
    },
    Restarted {
        slot: usize,
        restarts: u32,
    },
}

struct Slot {
    child: Option<Child>,
    restarts: u32,
    /// Restart not before this instant (back-off).
    not_before: Instant,
    started: Instant,
}

/// The age of a loader process's last heartbeat (None while it has none, e.g. starting up).
pub type HeartbeatAge = Box<dyn Fn(u32) -> Option<Duration> + Send>;

/// Keeps `n` processes built by `make(slot)` running.
pub struct Supervisor {
    make: Box<dyn Fn(usize) -> Command + Send>,
    slots: Vec<Slot>,
    heartbeats: Option<(HeartbeatAge, Duration)>,
    /// Restarts allowed per slot before [`Supervisor::poll`] gives up with an error.
    pub max_restarts: u32,
    pub backoff: Duration,
}

impl Supervisor {
    /// Starts `n` processes. Children inherit stderr (their messages reach the user) and get
    /// null stdin.
    pub fn start(n: usize, make: impl Fn(usize) -> Command + Send + 'static) -> Result<Self> {
        let mut s = Self {
            make: Box::new(make),
            slots: Vec::new(),
            heartbeats: None,
            max_restarts: 10,
            backoff: Duration::from_millis(500),
        };
        for i in 0..n {
            let child = s.spawn(i)?;
            s.slots.push(Slot {
                child: Some(child),
                restarts: 0,
                not_before: Instant::now(),
                started: Instant::now(),
            });
        }
        Ok(s)
    }

    /// Treats a loader whose heartbeat (`age` of its pid) is older than `timeout` as hung, and
    /// one without a heartbeat `timeout` after it was started (so a loader stuck before it
    /// registers with the ring is not waited for forever): it is killed (SIGKILL, so whatever it
    /// had claimed is rebuilt by others) and restarted.
    pub fn watch_heartbeats(mut self, age: HeartbeatAge, timeout: Duration) -> Self {
        self.heartbeats = Some((age, timeout));
        self
    }

    fn spawn(&self, slot: usize) -> Result<Child> {
        let mut cmd = (self.make)(slot);
        cmd.stdin(Stdio::null());
        cmd.spawn()
            .with_context(|| format!("starting loader {slot}: {cmd:?}"))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Process ids of the running children (None for a slot waiting to restart).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.slots
            .iter()
            .map(|s| s.child.as_ref().map(|c| c.id()))
            .collect()
    }

    /// Reaps dead children, kills hung ones, and restarts both once their back-off has passed.
    /// Errors when a slot has died more than `max_restarts` times.
    pub fn poll(&mut self) -> Result<Vec<LoaderEvent>> {
        let mut ev = Vec::new();
        for i in 0..self.slots.len() {
            let started = self.slots[i].started;
            if let (Some(c), Some((age, timeout))) =
                (self.slots[i].child.as_mut(), &self.heartbeats)
            {
                let pid = c.id();
                let (a, registered) = match age(pid) {
                    Some(a) => (a, true),
                    None => (started.elapsed(), false),
                };
                if a > *timeout {
                    // SIGKILL also ends a stopped process; reaped just below.
                    let _ = c.kill();
                    let _ = c.wait();
                    ev.push(LoaderEvent::Hung {
                        slot: i,
                        pid,
                        heartbeat_age: a,
                        registered,
                    });
                }
            }
            if let Some(c) = self.slots[i].child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.slots[i].child = None;
                    // A loader that ran a while before dying gets its restart budget back.
                    if self.slots[i].started.elapsed() > Duration::from_secs(60) {
                        self.slots[i].restarts = 0;
                    }
                    self.slots[i].not_before =
                        Instant::now() + self.backoff * (1 << self.slots[i].restarts.min(5));
                    ev.push(LoaderEvent::Exited {
                        slot: i,
                        status: describe(st),
                    });
                }
            }
            if self.slots[i].child.is_none() && Instant::now() >= self.slots[i].not_before {
                if self.slots[i].restarts >= self.max_restarts {
                    bail!(
                        "loader {i} died {} times in a row; giving up (see its messages above)",
                        self.slots[i].restarts + 1
                    );
                }
                let child = self.spawn(i)?;
                let s = &mut self.slots[i];
                s.child = Some(child);
                s.restarts += 1;
                s.started = Instant::now();
                ev.push(LoaderEvent::Restarted {
                    slot: i,
                    restarts: s.restarts,
                });
            }
        }
        Ok(ev)
    }

    /// Asks every child to stop (SIGTERM), waits up to `grace`, then kills what is left.
    pub fn shutdown(&mut self, grace: Duration) {
        for s in &mut self.slots {
            if let Some(c) = s.child.as_mut() {
                terminate(c);
            }
        }
        let until = Instant::now() + grace;
        for s in &mut self.slots {
            if let Some(mut c) = s.child.take() {
                loop {
                    match c.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() < until => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Ok(None) => {
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(3));
    }
}

fn describe(st: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = st.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match st.code() {
        Some(c) => format!("exit code {c}"),
        None => "unknown status".into(),
    }
}

#[cfg(unix)]
fn terminate(c: &mut Child) {
    // SIGTERM lets a loader unmap and leave the ring cleanly.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
}

#[cfg(not(unix))]
fn terminate(c: &mut Child) {
    let _ = c.kill();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn wait_for(
        sup: &mut Supervisor,
        mut pred: impl FnMut(&[LoaderEvent]) -> bool,
    ) -> Vec<LoaderEvent> {
        let mut all = Vec::new();
        for _ in 0..500 {
            all.extend(sup.poll().unwrap());
            if pred(&all) {
                return all;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached; events: {all:?}");
    }

    #[test]
    fn restarts_a_dead_loader_and_keeps_the_others() {
        let spawned = Arc::new(AtomicUsize::new(0));
        let sp = spawned.clone();
        // Slot 0 dies at once the first time, then lives; slot 1 lives.
        let mut sup = Supervisor::start(2, move |slot| {
            let n = sp.fetch_add(1, Ordering::SeqCst);
            let mut c = Command::new("sh");
            let script = if slot == 0 && n == 0 {
                "exit 3"
            } else {
                "sleep 30"
            };
            c.args(["-c", script]);
            c
        })
        .unwrap();
        sup.backoff = Duration::from_millis(10);
        let ev = wait_for(&mut sup, |e| {
            e.iter().any(|x| matches!(x, LoaderEvent::Restarted { .. }))
        });
        assert_eq!(
            ev[0],
            LoaderEvent::Exited {
                slot: 0,
                status: "exit code 3".into()
            }
        );
        assert_eq!(
            ev[1],
            LoaderEvent::Restarted {
                slot: 0,
                restarts: 1
            }
        );
        assert_eq!(spawned.load(Ordering::SeqCst), 3);
        let pids: Vec<u32> = sup.pids().into_iter().map(|p| p.unwrap()).collect();
        sup.shutdown(Duration::from_secs(2));
        // Both children are gone after shutdown (kill(pid, 0) fails for a reaped pid).
        for p in pids {
            assert_ne!(unsafe { libc::kill(p as i32, 0) }, 0, "pid {p} still alive");
        }
    }

    #[test]
    fn kills_and_restarts_a_loader_whose_heartbeat_is_stale() {
        let sleeper = |_| {
            let mut c = Command::new("sh");
            c.args(["-c", "sleep 30"]);
            c
        };
        let sup = Supervisor::start(2, sleeper).unwrap();
        let pids: Vec<u32> = sup.pids().into_iter().map(|p| p.unwrap()).collect();
        // Slot 0's first process has a 100 s old heartbeat; every other one is fresh, or (slot
        // 1) has none yet but started well within the timeout.
        let (hung, quiet) = (pids[0], pids[1]);
        let mut sup = sup.watch_heartbeats(
            Box::new(move |pid| match pid {
                p if p == hung => Some(Duration::from_secs(100)),
                p if p == quiet => None,
                _ => Some(Duration::ZERO),
            }),
            Duration::from_secs(25),
        );
        sup.backoff = Duration::from_millis(10);
        let ev = wait_for(&mut sup, |e| {
            e.iter().any(|x| matches!(x, LoaderEvent::Restarted { .. }))
        });
        assert_eq!(
            ev,
            [
                LoaderEvent::Hung {
                    slot: 0,
                    pid: hung,
                    heartbeat_age: Duration::from_secs(100),
                    registered: true,
                },
                LoaderEvent::Exited {
                    slot: 0,
                    status: "killed by signal 9".into()
                },
                LoaderEvent::Restarted {
                    slot: 0,
                    restarts: 1
                }
            ]
        );
        assert_ne!(unsafe { libc::kill(hung as i32, 0) }, 0, "pid {hung} alive");
        let now = sup.pids();
        assert!(now[0].is_some_and(|p| p != hung) && now[1] == Some(quiet));
        // The fresh replacement is left alone.
        for _ in 0..5 {
            assert_eq!(sup.poll().unwrap(), []);
        }
    }

    #[test]
    fn kills_a_loader_that_never_registers() {
        let sleeper = |_| {
            let mut c = Command::new("sh");
            c.args(["-c", "sleep 30"]);
            c
        };
        // No process ever has a heartbeat: each is killed `timeout` after its own start.
        let timeout = Duration::from_millis(1500);
        let mut sup = Supervisor::start(1, sleeper)
            .unwrap()
            .watch_heartbeats(Box::new(|_| None), timeout);
        let first = sup.pids()[0].unwrap();
        sup.backoff = Duration::from_millis(10);
        let ev = wait_for(&mut sup, |e| {
            e.iter().any(|x| matches!(x, LoaderEvent::Restarted { .. }))
        });
        match &ev[0] {
            LoaderEvent::Hung {
                slot: 0,
                pid,
                heartbeat_age,
                registered: false,
            } => assert!(*pid == first && *heartbeat_age > timeout, "{ev:?}"),
            other => panic!("expected the unregistered loader to be killed, got {other:?}"),
        }
        assert_ne!(
            unsafe { libc::kill(first as i32, 0) },
            0,
            "pid {first} alive"
        );
        // Its replacement gets its own full timeout, counted from its own start.
        let second = sup.pids()[0].unwrap();
        assert_ne!(second, first);
        assert!(sup.poll().unwrap().is_empty());
        sup.shutdown(Duration::from_secs(2));
    }

    #[test]
    fn gives_up_on_a_loader_that_never_starts() {
        let mut sup = Supervisor::start(1, |_| {
            let mut c = Command::new("sh");
            c.args(["-c", "exit 1"]);
            c
        })
        .unwrap();
        sup.backoff = Duration::from_millis(1);
        sup.max_restarts = 2;
        let mut err = None;
        for _ in 0..1000 {
            match sup.poll() {
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        let err = err.expect("supervisor should give up");
        assert!(err.contains("loader 0 died 3 times"), "{err}");
    }

    #[test]
    fn explicit_loader_bin_must_exist() {
        assert!(find_loader_bin(Some(Path::new("/nonexistent/loader"))).is_err());
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(find_loader_bin(Some(f.path())).unwrap(), f.path());
    }
}
