//! Ring checks with real processes: `loader run` producers (synthetic source), `loader tap` or
//! this test process as the consumer. Every batch is compared with the in-process pipeline.

use loader::produce::{fill_batch, SyntheticSource};
use serde_json::Value;
use shared::batch::{BatchLayout, BatchView, OwnedBatch};
use shared::config::PipelineConfig;
use shared::ring::{segment_path, Consumer, Ring, RingSpec};
use shared::rng::epoch_permutation;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_loader");
const N: u64 = 40; // 10 batches of 4 per epoch
const WAIT: Duration = Duration::from_secs(120);

const CONFIG: &str = "[data]\nbatch_size = 4\nseed = 5\n[augment]\nglobal_size = 32\nlocal_size = 16\nn_local = 2\npatch_size = 8\nglobal_window = 2\nlocal_window = 2\n";

/// Owns the ring name, the config file and the child processes; cleans up on drop.
struct Fixture {
    name: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cfg.toml"), CONFIG).unwrap();
        Fixture {
            name: format!("t{}-{test}", std::process::id()),
            dir,
            children: Vec::new(),
        }
    }
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("cfg.toml")
    }
    fn cfg(&self) -> PipelineConfig {
        PipelineConfig::from_toml_str(CONFIG).unwrap()
    }
    fn run_cmd(&self, threads: usize, extra: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args([
            "run",
            "--ring",
            &self.name,
            "--threads",
            &threads.to_string(),
            "--synthetic",
            &N.to_string(),
        ]);
        c.arg("--config").arg(self.config_path()).args(extra);
        c
    }
    fn spawn_loader(&mut self, threads: usize, extra: &[&str]) -> u32 {
        let child = self
            .run_cmd(threads, extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }
    /// Waits until `n` live producers are registered on the ring: a loader process that starts
    /// after a short run has closed and removed the ring would create it anew and wait there for
    /// a consumer that never comes.
    fn wait_producers(&self, n: usize) {
        for _ in 0..6000 {
            if let Ok(r) = Ring::attach(&self.name) {
                if r.status().producers.iter().filter(|p| p.alive).count() >= n {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "{n} loader processes never registered on ring {}",
            self.name
        );
    }
    /// Runs `loader tap --json --batches N` to completion and parses its lines.
    fn tap(&self, batches: u64) -> Vec<Value> {
        self.tap_with(&["--batches", &batches.to_string()])
    }
    /// Runs `loader tap --json` with `extra` arguments to completion and parses its lines.
    fn tap_with(&self, extra: &[&str]) -> Vec<Value> {
        let out = Command::new(BIN)
            .args(["tap", "--json", "--ring", &self.name])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    /// Waits for every child; all must exit successfully.
    fn wait_all(&mut self) {
        for mut c in self.children.drain(..) {
            let st = c.wait().unwrap();
            assert!(st.success(), "loader exited with {st}");
        }
    }
    fn spec(&self) -> RingSpec {
        let cfg = self.cfg();
        RingSpec::new(&cfg, SyntheticSource::new(&cfg, N).dataset_id(), N, 4)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Ring::unlink(&self.name);
    }
}

/// Hash and sample indices of global batch `g` from the in-process pipeline.
fn reference(cfg: &PipelineConfig, g: u64) -> (String, Vec<u64>) {
    let bpe = N / cfg.data.batch_size as u64;
    let (e, b) = (g / bpe, g % bpe);
    let layout = BatchLayout::new(&cfg.augment, cfg.data.batch_size);
    let perm = epoch_permutation(cfg.data.seed, e, N);
    let mut buf = OwnedBatch::zeroed(&layout);
    fill_batch(
        &SyntheticSource::new(cfg, N),
        cfg,
        &layout,
        &perm,
        e,
        b,
        1,
        buf.bytes_mut(),
    )
    .unwrap();
    let v = BatchView::new(&layout, buf.bytes()).unwrap();
    (format!("{:016x}", v.hash()), v.indices().to_vec())
}

fn samples(line: &Value) -> Vec<u64> {
    line["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Every complete epoch holds each sample exactly once, and epochs are ordered differently.
fn check_epochs(per_batch: &[Vec<u64>], bpe: usize) {
    let epochs: Vec<Vec<u64>> = per_batch
        .chunks(bpe)
        .filter(|c| c.len() == bpe)
        .map(|c| c.concat())
        .collect();
    assert!(epochs.len() >= 2);
    for (e, order) in epochs.iter().enumerate() {
        let set: BTreeSet<u64> = order.iter().copied().collect();
        assert_eq!(order.len(), N as usize, "epoch {e}");
        assert_eq!(
            set,
            (0..N).collect(),
            "epoch {e} must hold every sample exactly once"
        );
    }
    assert_ne!(epochs[0], epochs[1], "epochs must reshuffle");
}

#[test]
fn one_and_three_loaders_deliver_identical_batches() {
    let batches = 25;
    let mut one = Fixture::new("one");
    one.spawn_loader(1, &[]);
    let a = one.tap(batches);
    one.wait_all(); // the tap closed the ring: loaders exit by themselves
    assert!(!segment_path(&one.name).exists(), "segment left behind");

    let mut three = Fixture::new("three");
    for threads in [1, 2, 3] {
        three.spawn_loader(threads, &[]);
    }
    three.wait_producers(3);
    let b = three.tap(batches);
    three.wait_all();
    assert!(!segment_path(&three.name).exists(), "segment left behind");

    assert_eq!(a.len(), batches as usize);
    assert_eq!(
        a, b,
        "1 loader and 3 loaders must give byte-identical batches"
    );
    let cfg = one.cfg();
    for (g, line) in a.iter().enumerate() {
        assert_eq!(
            (
                line["epoch"].as_u64().unwrap(),
                line["batch"].as_u64().unwrap()
            ),
            (g as u64 / 10, g as u64 % 10)
        );
        let (hash, idx) = reference(&cfg, g as u64);
        assert_eq!(
            line["hash"].as_str().unwrap(),
            hash,
            "batch {g} differs from the in-process pipeline"
        );
        assert_eq!(samples(line), idx);
    }
    check_epochs(&a.iter().map(samples).collect::<Vec<_>>(), 10);
}

#[test]
fn kill_9_of_one_loader_mid_epoch_loses_nothing() {
    let mut fx = Fixture::new("kill");
    let cfg = fx.cfg();
    let ring = Arc::new(Ring::create(&fx.name, &fx.spec()).unwrap());
    let mut consumer = Consumer::new(ring.clone()).unwrap();
    // The victim holds each claim for a long time, so it is killed while owning a batch.
    // It starts alone, so it owns a batch before the fast ones compete for slots.
    let victim = fx.spawn_loader(2, &["--hold-ms", "300"]);
    while !ring.status().writers.iter().any(|&(_, pid)| pid == victim) {
        std::thread::sleep(Duration::from_millis(5));
    }
    fx.spawn_loader(1, &[]);
    fx.spawn_loader(3, &[]);
    let mut got = Vec::new();
    let mut killed = false;
    let mut zombie = None;
    // Go on until the victim's claimed batch (always inside the window the consumer is about to
    // read) has been rebuilt by a survivor.
    while got.len() < 30 || !killed || ring.status().rebuilt == 0 {
        if !killed && got.len() >= 2 && ring.status().writers.iter().any(|&(_, pid)| pid == victim)
        {
            // SIGKILL, not reaped yet: the victim stays a zombie, as under a parent that does
            // not wait for its loaders; it must still count as dead.
            let mut child = fx.children.remove(0);
            child.kill().unwrap();
            zombie = Some(child);
            killed = true;
        }
        let g = consumer.next_batch(WAIT).unwrap();
        let v = g.view();
        got.push((
            g.epoch(),
            g.batch(),
            format!("{:016x}", v.hash()),
            v.indices().to_vec(),
        ));
    }
    assert!(killed, "the victim never claimed a batch");
    zombie.unwrap().wait().unwrap();
    assert!(
        ring.status().rebuilt >= 1,
        "the victim's batch was not rebuilt"
    );
    for (g, (e, b, hash, idx)) in got.iter().enumerate() {
        assert_eq!((*e, *b), (g as u64 / 10, g as u64 % 10));
        assert_eq!(
            (hash.clone(), idx.clone()),
            reference(&cfg, g as u64),
            "batch {g}"
        );
    }
    check_epochs(&got.iter().map(|x| x.3.clone()).collect::<Vec<_>>(), 10);

    // Resume elsewhere: seek gives the batch the in-process pipeline builds there.
    consumer.seek(1, 3, WAIT).unwrap();
    let g = consumer.next_batch(WAIT).unwrap();
    assert_eq!((g.epoch(), g.batch()), (1, 3));
    assert_eq!(format!("{:016x}", g.view().hash()), reference(&cfg, 13).0);
    drop(g);
    drop(consumer); // closes and unlinks
    fx.wait_all();
    assert!(!segment_path(&fx.name).exists());
}

#[test]
fn loaders_exit_when_the_consumer_is_killed_and_nothing_leaks() {
    let mut fx = Fixture::new("consumer");
    fx.spawn_loader(1, &[]);
    fx.spawn_loader(2, &[]);
    fx.wait_producers(2);
    let mut tap = Command::new(BIN)
        .args(["tap", "--ring", &fx.name, "--batches", "1000000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the tap consumes.
    loop {
        if let Ok(r) = Ring::attach(&fx.name) {
            let s = r.status();
            if s.consumer_pid == tap.id() && s.cursor >= 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tap.kill().unwrap();
    tap.wait().unwrap();
    fx.wait_all(); // loaders notice the dead consumer and exit cleanly
    assert!(
        !segment_path(&fx.name).exists(),
        "the last loader must unlink the segment"
    );
}

#[test]
fn mismatched_config_is_refused_by_name_and_sigterm_cleans_up() {
    let mut fx = Fixture::new("mismatch");
    let pid = fx.spawn_loader(1, &[]);
    while Ring::attach(&fx.name)
        .map(|r| r.status().producers.is_empty())
        .unwrap_or(true)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let other = fx.dir.path().join("other.toml");
    std::fs::write(&other, CONFIG.replace("seed = 5", "seed = 6")).unwrap();
    let out: Output = Command::new(BIN)
        .args(["run", "--ring", &fx.name, "--synthetic", "40", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("ring '{}'", fx.name))
            && err.contains("config fingerprint")
            && err.contains("seed"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["run", "--ring", &fx.name, "--synthetic", "48", "--config"])
        .arg(fx.config_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("dataset id") && err.contains("samples"),
        "{err}"
    );

    // `loader status` sees the producer, the full ring and no consumer.
    let out = Command::new(BIN)
        .args(["status", "--json", "--interval", "0.05", "--ring", &fx.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["producers"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["producers"][0]["pid"].as_u64(), Some(pid as u64));
    assert_eq!(st["consumer_pid"].as_u64(), Some(0));
    while Ring::attach(&fx.name).unwrap().status().ready < 4 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        Ring::attach(&fx.name).unwrap().status().published,
        4,
        "producers must stop when every slot is full"
    );

    // Backpressure: with every slot full the loader sleeps instead of spinning a core.
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1] // utime + stime
    };
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks() - before;
    assert!(
        used <= 5,
        "an idle loader used {used} CPU ticks in 0.5 s: it spins"
    );

    // SIGTERM with no consumer attached: the loader exits cleanly and, being the last one out,
    // removes the segment.
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    fx.wait_all();
    assert!(!segment_path(&fx.name).exists());
}

#[test]
fn stale_segment_of_a_killed_run_is_reclaimed() {
    let mut fx = Fixture::new("stale");
    fx.spawn_loader(1, &[]);
    while Ring::attach(&fx.name)
        .map(|r| r.status().published < 4)
        .unwrap_or(true)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut child = fx.children.remove(0);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        segment_path(&fx.name).exists(),
        "a SIGKILLed run leaves its segment"
    );
    // A new run with another config is not refused: the dead run's segment is replaced.
    let other = fx.dir.path().join("other.toml");
    std::fs::write(&other, CONFIG.replace("seed = 5", "seed = 6")).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--ring", &fx.name, "--synthetic", "40", "--config"])
        .arg(&other)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    fx.children.push(child);
    loop {
        if let Ok(r) = Ring::attach(&fx.name) {
            if r.status().producers.iter().any(|p| p.pid == pid) {
                assert_eq!(r.spec().seed, 6);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    fx.wait_all();
    assert!(!segment_path(&fx.name).exists());
}

#[test]
fn tap_detaches_and_a_second_tap_seeks() {
    let mut fx = Fixture::new("seek");
    fx.spawn_loader(2, &[]);
    fx.spawn_loader(1, &[]);
    fx.wait_producers(2);
    let cfg = fx.cfg();
    let first = fx.tap_with(&["--batches", "3", "--detach"]);
    let second = fx.tap_with(&["--batches", "2"]); // continues at the stored cursor
    assert!(
        !segment_path(&fx.name).exists(),
        "the second tap closes the ring"
    );
    let hashes: Vec<&str> = first
        .iter()
        .chain(&second)
        .map(|l| l["hash"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..5).map(|g| reference(&cfg, g).0).collect();
    assert_eq!(hashes, want);
    fx.wait_all();

    let mut fx2 = Fixture::new("seek2");
    fx2.spawn_loader(1, &[]);
    let lines = fx2.tap_with(&["--batches", "2", "--seek", "2:7"]);
    for (k, line) in lines.iter().enumerate() {
        assert_eq!(
            (line["epoch"].as_u64(), line["batch"].as_u64()),
            (Some(2), Some(7 + k as u64))
        );
        assert_eq!(
            line["hash"].as_str().unwrap(),
            reference(&cfg, 27 + k as u64).0
        );
    }
    fx2.wait_all();
}
