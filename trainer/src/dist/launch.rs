//! `trainer launch --gpus N -- train …`: N ranks on this host, with the variables `torchrun`
//! sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). When one rank fails, the
//! others are given a grace period to stop on their own (their collectives name the failed
//! rank) and are then killed; the launcher exits with the first failure's status.
//!
//! Signals: Ctrl-C reaches every rank from the terminal (one process group), so the launcher
//! only waits; a SIGTERM sent to the launcher alone is passed on to the ranks. Either way the
//! ranks agree to stop after the step, rank 0 checkpoints, and `--resume` continues.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Ranks to start on this host (one per GPU; on a CPU-only host, CPU ranks).
    #[arg(long)]
    pub gpus: u32,
    /// Rendezvous port of rank 0 (default: a free port).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the other ranks get to stop by themselves after one failed.
    #[arg(long, default_value_t = 30.0)]
    pub grace_s: f64,
    /// The trainer command every rank runs, after `--` (e.g. `-- train --config … --out …`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn launch_main(a: &LaunchArgs) -> Result<()> {
    if a.gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    let exe = std::env::current_exe().context("finding the trainer executable")?;
    let port = match a.master_port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
    };
    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..a.gpus {
        let child = Command::new(&exe)
            .args(&a.command)
            .env("WORLD_SIZE", a.gpus.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", a.gpus.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", exe.display()))?;
        children.push(Some(child));
    }
    // Ctrl-C: the ranks have it too; the launcher stays to wait for them.
    signal_hook::flag::register(
        signal_hook::consts::SIGINT,
        Arc::new(AtomicBool::new(false)),
    )?;
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    let mut failed: Option<(u32, ExitStatus)> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            if let Some(status) = c.try_wait()? {
                *slot = None;
                if !status.success() && failed.is_none() {
                    eprintln!("launch: rank {rank} failed ({status}); stopping the others");
                    failed = Some((rank as u32, status));
                    deadline = Some(Instant::now() + Duration::from_secs_f64(a.grace_s));
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if term.swap(false, Ordering::Relaxed) {
            for c in children.iter().flatten() {
                // SAFETY: signalling our own child, which has not been reaped yet.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            for (rank, c) in children.iter_mut().enumerate() {
                if let Some(c) = c {
                    eprintln!("launch: killing rank {rank}");
                    // Checkpoints are written to a temporary name and renamed: a kill leaves the
                    // last complete one as it was.
                    let _ = c.kill();
                }
            }
            deadline = None; // killed: nothing is left to wait for but their exit
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failed {
        Some((rank, status)) => bail!("rank {rank} of {} failed ({status})", a.gpus),
        None => Ok(()),
    }
}
