//! `scripts/gpu-check.sh` in its dry run (`GPU_CHECK_DEVICE=cpu`): every step of the GPU check
//! with the same commands and flags on the CPU at small shapes, with this build's binaries, packed
//! into `$OUT` as on a GPU machine. A renamed flag, a moved file or a JSON field the table no
//! longer finds fails here instead of on a GPU.
//!
//! Needs `loader` and `shard-tool` next to the trainer binary and the `device_smoke` example
//! (all built by `cargo test --workspace`), python3 and tar; without them the test says so and
//! stops early. PyTorch and timm are optional: without them their steps must be marked skipped.

mod common;

use common::repo_path;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

/// The steps the check runs (pytorch-* and e2e-timm may be skipped without PyTorch).
const STEPS: &[&str] = &[
    "device-smoke",
    "kernel-check",
    "debug-tiny-init",
    "debug-tiny-batch",
    "debug-tiny-cpu",
    "debug-tiny-cpu-f32-fused-explicit",
    "debug-tiny-cpu-bf16-fused-explicit",
    "debug-tiny-cpu-f32-fused-autograd",
    "debug-tiny-cpu-bf16-fused-autograd",
    "trainer-bf16-fused-explicit-b4",
    "trainer-bf16-fused-autograd-b4",
    "trainer-bf16-fused-no-flash-explicit-b4",
    "trainer-bf16-fused-explicit-keep-b4",
    "trainer-bf16-fused-explicit-b2",
    "trainer-bf16-fused-explicit-b8",
    "trainer-bf16-fused-autograd-b2",
    "trainer-bf16-fused-autograd-b8",
    "trainer-bf16-fused-explicit-profile-b4",
    "pytorch-official-b4",
    "pytorch-fast-compile-b4",
    "pytorch-official-b2",
    "learn-synth",
    "learn-knn-init",
    "learn-train-explicit",
    "learn-knn-explicit",
    "learn-train-autograd",
    "learn-knn-autograd",
    "debug-vits-init",
    "debug-vits-batch",
    "debug-vits-cpu",
    "debug-vits-cpu-bf16-fused-explicit",
    "debug-vits-cpu-bf16-fused-no-flash-explicit",
    "debug-vits-cpu-f32-fused-explicit",
    "e2e-synth",
    "e2e-pack",
    "e2e-train",
    "e2e-train-noprefetch",
    "e2e-export",
    "e2e-timm",
    "nccl-world1",
];

fn python_ok() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn gpu_check_dry_run_passes_every_step() {
    let dir = Path::new(TRAINER).parent().unwrap();
    let needed = [
        dir.join("loader"),
        dir.join("shard-tool"),
        dir.join("examples/device_smoke"),
    ];
    if let Some(missing) = needed.iter().find(|p| !p.is_file()) {
        eprintln!(
            "SKIPPED: no {} (run `cargo test --workspace`)",
            missing.display()
        );
        return;
    }
    if !python_ok() {
        eprintln!("SKIPPED: no python3 (the check's comparisons and table are Python)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    // Only the knobs set here: a SKIP_* or size knob from the caller's environment would change
    // what is checked.
    let mut cmd = Command::new("bash");
    cmd.arg(repo_path("scripts/gpu-check.sh"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GPU_CHECK_DEVICE", "cpu")
        .env("BINDIR", dir)
        .env("OUT", out.path());
    for k in ["HOME", "TMPDIR"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    let run = cmd.output().unwrap();
    let console = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "gpu-check.sh failed:\n{console}");

    // The results as a GPU run returns them: $OUT/gpu-results.tgz and $OUT/summary.md.
    let res = out.path().join("res");
    std::fs::create_dir(&res).unwrap();
    let st = Command::new("tar")
        .arg("xzf")
        .arg(out.path().join("gpu-results.tgz"))
        .arg("-C")
        .arg(&res)
        .status()
        .unwrap();
    assert!(st.success(), "no gpu-results.tgz:\n{console}");
    let read = |name: &str| {
        std::fs::read_to_string(res.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\nconsole:\n{console}"))
    };
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert_eq!(summary, read("summary.md"));

    // Every step ran and passed; only the PyTorch ones may be skipped, and only without it.
    let mut rcs = HashMap::new();
    for line in read("steps.tsv").lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 3, "steps.tsv: {line:?}");
        assert!(
            rcs.insert(f[0].to_string(), f[1].to_string()).is_none(),
            "step {} ran twice",
            f[0]
        );
    }
    let mut errors = Vec::new();
    for step in STEPS {
        match rcs.get(*step).map(String::as_str) {
            None => errors.push(format!("{step}: not run")),
            Some("0") => {}
            Some("skipped") if step.starts_with("pytorch-") || *step == "e2e-timm" => {
                let why = read(&format!("{step}.log"));
                if !(why.starts_with("skipped: no torch") || why.starts_with("skipped: no timm")) {
                    errors.push(format!(
                        "{step}: skipped, but not for a missing PyTorch: {why}"
                    ));
                }
            }
            Some(rc) => errors.push(format!(
                "{step}: rc {rc}; its log ends:\n{}",
                tail(&std::fs::read_to_string(res.join(format!("{step}.log"))).unwrap_or_default())
            )),
        }
    }
    for step in rcs.keys().filter(|s| !STEPS.contains(&s.as_str())) {
        errors.push(format!(
            "{step}: a step this test does not know (add it to STEPS)"
        ));
    }
    assert!(
        errors.is_empty(),
        "{}\n\nsummary.md:\n{summary}",
        errors.join("\n")
    );

    // The table: one row per trainer bench with numbers; one verdict per debug-step comparison
    // (f32 on the CPU must pass at the tight tolerance; bf16 must at least compare the same keys).
    let rows: Vec<Vec<&str>> = summary
        .lines()
        .filter(|l| l.starts_with("| "))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    for step in STEPS.iter().filter(|s| s.starts_with("trainer-")) {
        let (run, batch) = step.rsplit_once("-b").unwrap();
        let row = rows
            .iter()
            .find(|r| r.len() == 10 && r[0] == run && r[1] == batch)
            .unwrap_or_else(|| panic!("no table row for {step}:\n{summary}"));
        assert!(row[2].parse::<f64>().is_ok_and(|v| v > 0.0), "{row:?}");
        assert!(row[3].parse::<f64>().is_ok_and(|v| v > 0.0), "{row:?}");
        assert_eq!(row[9], "ok", "{row:?}");
    }
    for step in STEPS
        .iter()
        .filter(|s| s.starts_with("debug-") && s.contains("-cpu-"))
    {
        let row = rows
            .iter()
            .find(|r| r.len() == 2 && r[0] == *step)
            .unwrap_or_else(|| panic!("no comparison row for {step}:\n{summary}"));
        let pass = row[1].starts_with("PASS: ");
        let compared = pass || row[1].starts_with("FAIL: ");
        assert!(
            if step.contains("-f32-") {
                pass
            } else {
                compared
            },
            "{row:?}"
        );
    }
    for label in [
        "random init",
        "after training, explicit engine",
        "after training, autograd engine",
    ] {
        let row = rows
            .iter()
            .find(|r| r.len() == 2 && r[0] == label)
            .unwrap_or_else(|| panic!("no learning row {label:?}:\n{summary}"));
        assert!(row[1].parse::<f64>().is_ok(), "{row:?}");
    }
    for want in [
        "kernel-check on cpu (tiny shapes): all match their CPU references",
        "| flash_attention | bf16 |",
        "* e2e: 3 steps on CPU fed by loader processes",
        "(same bits); data wait",
        "NCCL world size 1 (launch --gpus 1): all-reduce: ",
        "device-smoke on cpu: ok",
    ] {
        assert!(
            summary.contains(want),
            "summary.md lacks {want:?}:\n{summary}"
        );
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
