//! The `trainer` binary end to end with real `loader` processes: train on packed shards, a
//! loader killed mid-run is restarted and the run's losses are unchanged (bitwise equal to an
//! `--in-process` run), then plot, k-NN (--json) and export.
//!
//! Needs the `loader` binary next to the test's target dir (built by `cargo test --workspace`
//! or `cargo build -p loader`); without it the test says so and stops early.

mod common;

use common::{children, loader_bin, loss_bits as losses, synth_shards};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

/// The micro config, checkpoints every step, a small ring.
fn config() -> common::TestConfig {
    common::cli_config(2)
}

#[test]
fn train_with_loader_processes_survives_a_killed_loader() {
    let Some(loader) = loader_bin() else {
        eprintln!("SKIPPED: no loader binary next to {TRAINER} (run `cargo build -p loader` or `cargo test --workspace`)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 0);
    let cfg = config().write(&tmp.path().join("cfg.toml"));

    let run = tmp.path().join("run");
    let child = Command::new(TRAINER)
        .args([
            "train",
            "--max-steps",
            "8",
            "--loaders",
            "1",
            "--threads",
            "1",
        ])
        .arg("--config")
        .arg(&cfg)
        .arg("--shards")
        .arg(&shards)
        .arg("--out")
        .arg(&run)
        .arg("--loader-bin")
        .arg(&loader)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the loader once the first step is logged.
    let t0 = Instant::now();
    let mut killed = None;
    while killed.is_none() && t0.elapsed() < Duration::from_secs(120) {
        let stepped = std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|s| s.lines().count() >= 1)
            .unwrap_or(false);
        let kids = children(child.id());
        if stepped && !kids.is_empty() {
            unsafe { libc::kill(kids[0] as i32, libc::SIGKILL) };
            killed = Some(kids[0]);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trainer failed:\n{stderr}");
    assert!(killed.is_some(), "never saw the loader process");
    assert!(
        stderr.contains("restarted loader 0"),
        "no restart reported:\n{stderr}"
    );
    assert!(stderr.contains("step 8/8"), "{stderr}");

    // Same run, batches built in-process: identical losses, so the restart lost nothing.
    let run2 = tmp.path().join("run-in-process");
    let st = Command::new(TRAINER)
        .args(["train", "--max-steps", "8", "--in-process"])
        .arg("--config")
        .arg(&cfg)
        .arg("--shards")
        .arg(&shards)
        .arg("--out")
        .arg(&run2)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(losses(&run), losses(&run2));
    assert_eq!(losses(&run).len(), 8);

    let ok = |args: &[&str]| {
        let o = Command::new(TRAINER).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let r = run.to_str().unwrap();
    ok(&["plot", r]);
    assert!(run.join("curves.png").is_file());
    let s = shards.to_str().unwrap();
    let j: serde_json::Value = serde_json::from_str(
        ok(&[
            "knn",
            "--checkpoint",
            r,
            "--train",
            s,
            "--val",
            s,
            "--k",
            "3",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert!(
        j["top1"].as_f64().unwrap() >= 0.0
            && j["top5"].as_f64().unwrap() >= j["top1"].as_f64().unwrap()
    );
    assert_eq!(j["k"], 3);
    let e = tmp.path().join("b.safetensors");
    ok(&[
        "export",
        "--checkpoint",
        r,
        "--format",
        "timm",
        "--out",
        e.to_str().unwrap(),
    ]);
    assert!(
        candle_core::safetensors::load(&e, &candle_core::Device::Cpu)
            .unwrap()
            .contains_key("reg_token")
    );
}

/// `trainer train` with `args`, returning (success, stderr).
fn train_cli(
    cfg: &Path,
    shards: &Path,
    run: &Path,
    args: &[&str],
    interrupt_after_first_step: bool,
) -> (bool, String) {
    let child = common::train_command(cfg, shards, run)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if interrupt_after_first_step {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            if std::fs::read_to_string(run.join("metrics.jsonl"))
                .map(|s| s.lines().count() >= 1)
                .unwrap_or(false)
            {
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 1);
    // Checkpoints only at the end: the one after Ctrl-C comes from the interrupt.
    let cfg = config()
        .set("run.checkpoint_every", 100)
        .write(&tmp.path().join("cfg.toml"));

    let run = tmp.path().join("run");
    let (ok, err) = train_cli(
        &cfg,
        &shards,
        &run,
        &["--max-steps", "8", "--in-process"],
        true,
    );
    assert!(ok, "interrupted trainer should exit cleanly:\n{err}");
    assert!(err.contains("stopped at step"), "{err}");
    let stopped = trainer::checkpoint::resolve(&run).unwrap().step;
    assert!(stopped < 8, "stopped at {stopped}");
    let (ok, err) = train_cli(
        &cfg,
        &shards,
        &run,
        &["--max-steps", "8", "--in-process", "--resume"],
        false,
    );
    assert!(ok, "{err}");
    assert!(err.contains("resuming from"), "{err}");

    let reference = tmp.path().join("reference");
    let (ok, err) = train_cli(
        &cfg,
        &shards,
        &reference,
        &["--max-steps", "8", "--in-process"],
        false,
    );
    assert!(ok, "{err}");
    assert_eq!(losses(&run), losses(&reference));
    assert_eq!(losses(&run).len(), 8);
}
