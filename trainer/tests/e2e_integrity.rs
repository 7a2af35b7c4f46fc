//! What a run survives, through the `trainer` binary: `--set` overrides reach the loader
//! processes (one effective config, RUN/config.toml), a second trainer on a run directory is
//! refused before it starts anything, a damaged newest checkpoint is skipped on `--resume`
//! (and reported by `trainer checkpoint verify`), and a checkpoint write that fails (the file
//! size limit standing in for a full disk) stops the run leaving the previous checkpoints intact.

mod common;

use common::{loader_bin, loss_bits as losses, synth_shards, train_opts};
use std::path::Path;
use std::process::{Command, Stdio};

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

fn config() -> common::TestConfig {
    common::cli_config(5)
}

/// `trainer ARGS`: (success, stdout, stderr).
fn trainer(args: &[&str], paths: &[(&str, &Path)]) -> (bool, String, String) {
    let mut c = Command::new(TRAINER);
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn data_and_augment_overrides_reach_the_loader_processes() {
    let Some(loader) = loader_bin() else {
        eprintln!("SKIPPED: no loader binary next to {TRAINER} (run `cargo build -p loader`)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 3);
    let cfg = config().write(&tmp.path().join("cfg.toml"));
    let sets = [
        "--set",
        "data.batch_size=8",
        "--set",
        "augment.global_scale=[0.5, 1.0]",
    ];
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--max-steps", "3"];
        args.extend(sets);
        args.extend(extra);
        trainer(
            &args,
            &[
                ("--config", &cfg),
                ("--shards", &shards),
                ("--out", out),
                ("--loader-bin", &loader),
            ],
        )
    };
    let run = tmp.path().join("run");
    let (ok, _, err) = train(&run, &["--loaders", "1", "--threads", "1"]);
    assert!(ok, "trainer with loader processes failed:\n{err}");
    assert!(
        !err.contains("restarted loader"),
        "a loader was restarted:\n{err}"
    );
    let written: toml::Table = std::fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(written["data"]["batch_size"].as_integer(), Some(8));
    assert_eq!(
        written["augment"]["global_scale"].as_array().unwrap()[0].as_float(),
        Some(0.5)
    );
    // The same overrides in-process: the loaders built the same batches.
    let reference = tmp.path().join("in-process");
    let (ok, _, err) = train(&reference, &["--in-process"]);
    assert!(ok, "{err}");
    assert_eq!(losses(&run).len(), 3);
    assert_eq!(losses(&run), losses(&reference));
    // And the overrides changed the batches (else the test would prove nothing).
    let plain = tmp.path().join("plain");
    let (ok, _, err) = trainer(
        &["train", "--max-steps", "3", "--in-process"],
        &[("--config", &cfg), ("--shards", &shards), ("--out", &plain)],
    );
    assert!(ok, "{err}");
    assert_ne!(losses(&plain), losses(&reference));
}

#[test]
fn a_second_trainer_is_refused_before_it_starts_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 4, 24, 0);
    let cfg = config().write(&tmp.path().join("cfg.toml"));
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let held = trainer::run_dir::lock_run_dir(&run).unwrap();
    let ring = format!("lock-test-{}", std::process::id());
    let (ok, _, err) = trainer(
        &["train", "--loaders", "1", "--ring", &ring],
        &[
            ("--config", &cfg),
            ("--shards", &shards),
            ("--out", &run),
            // Any existing file: the refusal must come before a loader is looked for or started.
            ("--loader-bin", Path::new(TRAINER)),
        ],
    );
    assert!(!ok);
    let holder = format!("in use by another trainer (pid {})", std::process::id());
    assert!(err.contains(&holder), "{err}");
    assert!(!err.contains("starting"), "loaders were started:\n{err}");
    assert!(!shared::ring::segment_path(&ring).exists());
    assert!(!run.join("config.toml").exists());
    drop(held);
}

#[test]
fn resume_skips_a_damaged_newest_checkpoint_and_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 1);
    let cfg = config().write(&tmp.path().join("cfg.toml"));
    let train = |out: &Path, steps: &str, resume: bool| {
        let mut args = vec!["train", "--in-process", "--max-steps", steps];
        if resume {
            args.push("--resume");
        }
        trainer(
            &args,
            &[("--config", &cfg), ("--shards", &shards), ("--out", out)],
        )
    };
    let run = tmp.path().join("run");
    let (ok, _, err) = train(&run, "4", false);
    assert!(ok, "{err}");
    // The newest checkpoint's tensors cut in half, as a lost node or a full disk leaves them.
    let newest = run.join("checkpoints/step-00000004");
    let t = newest.join("tensors.safetensors");
    let len = std::fs::metadata(&t).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let r = run.to_str().unwrap();
    let (ok, out, _) = trainer(&["checkpoint", "verify", r], &[]);
    assert!(!ok, "verify must fail on a damaged checkpoint:\n{out}");
    assert!(
        out.contains("DAMAGED") && out.contains("step-00000004") && out.contains("truncated"),
        "{out}"
    );
    assert_eq!(out.matches("ok ").count(), 2, "{out}");

    let (ok, _, err) = train(&run, "6", true);
    assert!(ok, "resume should fall back to step 3:\n{err}");
    assert!(
        err.contains("skipping damaged checkpoint") && err.contains("step-00000004"),
        "{err}"
    );
    assert!(
        err.contains("resuming from") && err.contains("step-00000003"),
        "{err}"
    );
    let (ok, out, _) = trainer(&["checkpoint", "verify", r], &[]);
    assert!(ok, "{out}");

    let reference = tmp.path().join("reference");
    let (ok, _, err) = train(&reference, "6", false);
    assert!(ok, "{err}");
    assert_eq!(losses(&run), losses(&reference));
    assert_eq!(
        common::checkpoint_bits(&run),
        common::checkpoint_bits(&reference)
    );
}

const FSIZE_CHILD: &str = "UDI_TEST_FSIZE_CHILD";

/// Runs the body in a child process (this test binary, this test only): a file size limit
/// applies to the whole process, and the child's output goes to pipes, which it does not cover.
#[test]
fn a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_one() {
    if let Ok(dir) = std::env::var(FSIZE_CHILD) {
        return failed_write_child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_one",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(FSIZE_CHILD, tmp.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

fn failed_write_child(dir: &Path) {
    use trainer::checkpoint;
    let run = dir.join("run");
    let cfg = config().toml();
    let mut feed = common::synth_feed(&cfg, 16, 7, 1, 1);
    trainer::train::train(&train_opts(&cfg, &run, false, 2), &mut feed).unwrap();
    let last_good = checkpoint::resolve(&run).unwrap();
    assert_eq!(last_good.step, 2);
    let size = std::fs::metadata(last_good.tensors()).unwrap().len();
    // Room for config and metrics, not for another tensors file.
    let limit = 64 * 1024;
    assert!(size > 2 * limit, "tensors file of {size} bytes");
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut r), 0);
        r.rlim_cur = limit;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &r), 0);
    }
    let mut feed = common::synth_feed(&cfg, 16, 7, 1, 1);
    let e = trainer::train::train(&train_opts(&cfg, &run, true, 4), &mut feed).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("step-00000003"), "{e}");
    assert!(
        e.contains("the last good checkpoint is") && e.contains("step-00000002"),
        "{e}"
    );
    // Only the good checkpoint is left, nothing half-written beside it, and it verifies.
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000001", "step-00000002"]);
    assert_eq!(checkpoint::verify(&last_good).unwrap().step, 2);
}

/// Flips one byte in the middle of record `index`'s payload in its shard file; returns the
/// shard file name and the record's path.
fn flip_payload_byte(shards: &Path, index: u64) -> (String, String) {
    let ds = shared::shard::Dataset::open(shards).unwrap();
    let r = ds.record(index).unwrap();
    let (file, path, payload) = (
        ds.shard_file(r.shard).to_string(),
        r.path.to_string(),
        r.payload.to_vec(),
    );
    drop(ds);
    let p = shards.join(&file);
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes
        .windows(payload.len())
        .position(|w| w == payload.as_slice())
        .unwrap()
        + payload.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();
    (file, path)
}

#[test]
fn a_damaged_record_is_replaced_counted_named_and_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = synth_shards(tmp.path(), 2, 8, 40, 4);
    let (file, path) = flip_payload_byte(&shards, 5);
    let cfg = config()
        .set("run.checkpoint_every", 100)
        .write(&tmp.path().join("cfg.toml"));
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--max-steps", "8"];
        args.extend(extra);
        trainer(
            &args,
            &[("--config", &cfg), ("--shards", &shards), ("--out", out)],
        )
    };
    // Default limit: 0.1 % of 16 records, so one bad record stops the run, naming it.
    let (ok, _, err) = train(&tmp.path().join("strict"), &["--in-process"]);
    assert!(!ok, "{err}");
    assert!(err.contains("max_bad_records = 0"), "{err}");
    assert!(err.contains(&format!("{file}: record 5 ({path})")), "{err}");
    // Allowed: replaced by the next record, counted in metrics.jsonl and the console line.
    let run = tmp.path().join("run");
    let (ok, _, err) = train(&run, &["--in-process", "--set", "run.max_bad_records=1"]);
    assert!(ok, "{err}");
    // Met in both epochs, named once by the source that replaced it and once by the trainer.
    let named = format!("record 5 ({file}, {path}): CRC32C mismatch");
    assert_eq!(err.matches(&named).count(), 1, "{err}");
    assert_eq!(err.matches("bad record replaced").count(), 1, "{err}");
    assert!(err.contains("| bad records 1 |"), "{err}");
    let m = trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 8);
    assert_eq!(m.last().unwrap().bad_records, 1);
    // Loader processes replace it the same way, whatever their number.
    if let Some(loader) = loader_bin() {
        let ring_run = tmp.path().join("ring");
        let (ok, _, err) = trainer(
            &[
                "train",
                "--max-steps",
                "8",
                "--loaders",
                "2",
                "--threads",
                "1",
                "--set",
                "run.max_bad_records=1",
            ],
            &[
                ("--config", &cfg),
                ("--shards", &shards),
                ("--out", &ring_run),
                ("--loader-bin", &loader),
            ],
        );
        assert!(ok, "{err}");
        // Once per loader process that met it.
        assert!((1..=2).contains(&err.matches(&named).count()), "{err}");
        assert_eq!(losses(&ring_run), losses(&run));
    }
}
