//! Recovery end to end, through the `trainer` binary with real `loader` processes:
//! * a trainer killed with SIGKILL again and again (at every crash point of
//!   `trainer::crash_point`: between the files of a checkpoint write, between a step's metrics
//!   and its checkpoint, with a batch taken off the ring but not trained on; and from outside at
//!   seeded moments), resumed each time, while one of its loaders is killed in every life, ends
//!   with the weights and the metrics of an uninterrupted run, bit for bit;
//! * a loader that hangs (SIGSTOP) is seen in `loader status` with a growing heartbeat age, is
//!   killed and replaced by the trainer, and the run's batches do not change.
//!
//! The kill schedule is drawn from a seed: `UDI_RECOVERY_SEED` (default 19) replays a failure.
//! Needs the `loader` binary next to the test's target dir; without it the tests say so and stop.

mod common;

use common::{checkpoint_bits, children, loader_bin, loss_bits, synth_shards};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

fn seed() -> u64 {
    std::env::var("UDI_RECOVERY_SEED").map_or(19, |s| s.parse().expect("UDI_RECOVERY_SEED"))
}

/// The micro config over 40 generated images (10 batches per epoch), a checkpoint every 2 steps.
fn setup(tmp: &Path, epochs: u64) -> (PathBuf, PathBuf) {
    let shards = synth_shards(tmp, 2, 20, 40, 5);
    let cfg = common::cli_config(7)
        .set("optim.epochs", epochs as i64)
        .set("run.checkpoint_every", 2)
        .set("run.loader_heartbeat_timeout_s", 3.0)
        .write(&tmp.join("cfg.toml"));
    (shards, cfg)
}

fn trainer(cfg: &Path, shards: &Path, run: &Path, log: &Path, args: &[&str]) -> Command {
    let mut c = common::train_command(cfg, shards, run);
    c.args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c
}

/// The newest step in the run's metrics (0 before the first).
fn last_step(run: &Path) -> u64 {
    trainer::metrics::read_metrics(&run.join("metrics.jsonl"))
        .ok()
        .and_then(|m| m.last().map(|m| m.step))
        .unwrap_or(0)
}

fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
    })
}

fn sigkill(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// An uninterrupted run of `steps`, batches built in-process.
fn reference(cfg: &Path, shards: &Path, dir: &Path, steps: u64) -> PathBuf {
    let run = dir.join("reference");
    let log = dir.join("reference.log");
    let st = trainer(cfg, shards, &run, &log, &["--in-process"])
        .args(["--max-steps", &steps.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap());
    run
}

/// How one life of the trainer ends.
#[derive(Clone, Debug)]
enum Death {
    /// `UDI_CRASH_AT=point:n`.
    At(&'static str, u64),
    /// SIGKILL from outside, `delay_ms` after step `start + steps` is logged.
    Outside { steps: u64, delay_ms: u64 },
}

#[test]
fn a_trainer_killed_anywhere_and_resumed_ends_bit_identical_to_an_uninterrupted_run() {
    let Some(loader) = loader_bin() else {
        eprintln!("SKIPPED: no loader binary next to {TRAINER} (run `cargo build -p loader`)");
        return;
    };
    const STEPS: u64 = 40;
    let seed = seed();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let (shards, cfg) = setup(tmp.path(), 4);
    let reference = reference(&cfg, &shards, tmp.path(), STEPS);

    // Every crash point once, and two kills from outside, in a seeded order. Each life moves
    // the run at most 4 steps on (checkpoints every 2 steps, n ≤ 2), so all of them die before
    // step 40.
    let mut deaths = vec![Death::At("metrics-reopen", 1)];
    for p in [
        "checkpoint-tensors",
        "checkpoint-complete",
        "checkpoint-renamed",
        "metrics-written",
        "batch-fed",
    ] {
        deaths.push(Death::At(p, rng.random_range(1..=2)));
    }
    for _ in 0..2 {
        deaths.push(Death::Outside {
            steps: rng.random_range(1..=3),
            delay_ms: rng.random_range(0..30),
        });
    }
    deaths.shuffle(&mut rng);

    let run = tmp.path().join("run");
    let mut loader_kills = 0;
    let mut seen_loaders = std::collections::BTreeSet::new();
    for life in 0..=deaths.len() {
        // A fresh run has no metrics history to lose: reopen the metrics of a resumed one.
        if !has_checkpoint(&run) && matches!(deaths.get(life), Some(Death::At("metrics-reopen", _)))
        {
            deaths.swap(life, life + 1);
        }
        let death = deaths.get(life);
        let what = format!("seed {seed}, life {life} ({death:?})");
        let log = tmp.path().join(format!("life-{life}.log"));
        let mut cmd = trainer(
            &cfg,
            &shards,
            &run,
            &log,
            &["--loaders", "2", "--threads", "1"],
        );
        cmd.args(["--max-steps", &STEPS.to_string()])
            .arg("--loader-bin")
            .arg(&loader);
        if has_checkpoint(&run) {
            cmd.arg("--resume");
        }
        if let Some(Death::At(point, n)) = death {
            cmd.env(trainer::crash_point::ENV, format!("{point}:{n}"));
        }
        let start = last_step(&run);
        // A loader killed one step into every life, and every 6 steps after that (not more
        // often: the supervisor's back-off doubles with each restart).
        let mut kill_loader_at = start + 1;
        let mut child: Child = cmd.spawn().unwrap();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            let at = last_step(&run);
            let kids = children(child.id());
            seen_loaders.extend(&kids);
            if at >= kill_loader_at && !kids.is_empty() {
                sigkill(kids[rng.random_range(0..kids.len())]);
                loader_kills += 1;
                kill_loader_at = at + 6;
            }
            if let Some(Death::Outside { steps, delay_ms }) = death {
                if at >= start + steps {
                    std::thread::sleep(Duration::from_millis(*delay_ms));
                    sigkill(child.id());
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let stderr = std::fs::read_to_string(&log).unwrap();
        if death.is_none() {
            assert!(status.success(), "{what}: {status}\n{stderr}");
            assert!(
                stderr.contains(&format!("step {STEPS}/{STEPS}")),
                "{what}:\n{stderr}"
            );
        } else {
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{what}: {status}\n{stderr}"
            );
        }
        // Whatever the moment, no damaged checkpoint is left in sight.
        if has_checkpoint(&run) {
            for (c, r) in trainer::checkpoint::verify_run(&run).unwrap() {
                assert!(
                    r.is_ok(),
                    "{what}: {}: {:#}",
                    c.dir.display(),
                    r.unwrap_err()
                );
            }
        }
    }
    // The last life alone runs 8 steps or more: at least two kills.
    assert!(
        loader_kills >= 2,
        "seed {seed}: only {loader_kills} loader kills"
    );
    eprintln!(
        "seed {seed}: {} trainer kills, {loader_kills} loader kills",
        deaths.len()
    );

    assert_eq!(trainer::checkpoint::resolve(&run).unwrap().step, STEPS);
    assert_eq!(loss_bits(&run), loss_bits(&reference));
    assert_eq!(loss_bits(&run).len() as u64, STEPS);
    assert!(
        checkpoint_bits(&run) == checkpoint_bits(&reference),
        "seed {seed}: final weights differ from the uninterrupted run's"
    );
    // No loader outlives its trainer (they get SIGTERM when it dies, and then leave the ring).
    let tag = shards.to_string_lossy().into_owned();
    let ours = |pid: &u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&tag))
    };
    let mut polls = 0;
    while seen_loaders.iter().any(ours) && polls < 3000 {
        std::thread::sleep(Duration::from_millis(10));
        polls += 1;
    }
    let orphans: Vec<u32> = seen_loaders.iter().copied().filter(ours).collect();
    orphans.iter().for_each(|&p| sigkill(p));
    assert!(orphans.is_empty(), "loaders left running: {orphans:?}");
    // Nothing half-written is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .chain(std::fs::read_dir(&run).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `loader status --json` of `ring`: (pid, heartbeat age) of every producer.
fn heartbeats(loader: &Path, ring: &str) -> Vec<(u32, f64)> {
    let out = Command::new(loader)
        .args(["status", "--json", "--interval", "0", "--ring", ring])
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["producers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pid"].as_u64().unwrap() as u32,
                p["heartbeat_age_s"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_hung_loader_is_killed_and_replaced_and_the_batches_do_not_change() {
    let Some(loader) = loader_bin() else {
        eprintln!("SKIPPED: no loader binary next to {TRAINER} (run `cargo build -p loader`)");
        return;
    };
    const STEPS: u64 = 12;
    let tmp = tempfile::tempdir().unwrap();
    let (shards, cfg) = setup(tmp.path(), 2);
    let reference = reference(&cfg, &shards, tmp.path(), STEPS);

    // One loader: while it is stopped nothing else feeds the trainer, so the run completes
    // only if the hang is detected.
    let run = tmp.path().join("run");
    let log = tmp.path().join("run.log");
    let ring = format!("hung-loader-{}", std::process::id());
    let mut child = trainer(
        &cfg,
        &shards,
        &run,
        &log,
        &["--loaders", "1", "--threads", "1"],
    )
    .args(["--max-steps", &STEPS.to_string(), "--ring", &ring])
    .arg("--loader-bin")
    .arg(&loader)
    .spawn()
    .unwrap();
    let mut stopped = None;
    let mut seen_age = 0.0f64;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        match stopped {
            None if last_step(&run) >= 2 => {
                if let [pid] = children(child.id())[..] {
                    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                    stopped = Some(pid);
                }
            }
            Some(pid) => {
                if let Some(&(_, age)) = heartbeats(&loader, &ring).iter().find(|p| p.0 == pid) {
                    seen_age = seen_age.max(age);
                }
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    let pid = stopped.expect("never saw the loader process");
    let left_alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    if left_alive {
        sigkill(pid);
    }
    assert!(status.success(), "{stderr}");
    assert!(!left_alive, "the stopped loader {pid} was left behind");
    assert!(
        stderr.contains(&format!("loader 0 (pid {pid}) made no progress"))
            && stderr.contains("restarted loader 0"),
        "{stderr}"
    );
    // `loader status` showed its heartbeat ageing (it is killed past 3 s).
    assert!(seen_age >= 1.0, "largest heartbeat age seen: {seen_age} s");
    assert_eq!(loss_bits(&run), loss_bits(&reference));
    assert_eq!(loss_bits(&run).len() as u64, STEPS);
    assert!(checkpoint_bits(&run) == checkpoint_bits(&reference));
}
