//! Per-step metrics: one JSON line per step in `RUN_DIR/metrics.jsonl`, a concise console line,
//! and the guard rails (non-finite loss, teacher entropy collapse / uniformity).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Everything logged for one optimiser step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser updates done after this step (1-based).
    pub step: u64,
    pub epoch: u64,
    /// (L_cls + L_udi + L_patch) / 3.
    pub loss: f32,
    pub loss_cls: f32,
    pub loss_udi: f32,
    pub loss_patch: f32,
    pub lr: f64,
    pub wd: f64,
    /// EMA momentum used for this step's teacher update.
    pub momentum: f64,
    pub teacher_temp: f64,
    /// Mean entropy (nats) of the teacher's three target distributions ([cls], multimodal, patch).
    pub teacher_entropy: [f32; 3],
    /// ln K: the entropy of the uniform distribution over the K prototypes.
    pub ln_k: f32,
    /// L2 norms of the centres c0, c1, c2 after this step's update.
    pub centre_norm: [f32; 3],
    /// Images per second over this step (data wait included).
    pub images_per_s: f64,
    /// Fraction of this step's wall time spent getting its batch: waiting for it, and copying
    /// it out of the ring and onto the device where that is not done ahead (`[run] prefetch`).
    pub data_wait_frac: f64,
    /// Seconds since the run (or this resumed part of it) started.
    pub elapsed_s: f64,
    /// Distinct bad records (failed CRC32C or undecodable) the loaders replaced so far.
    #[serde(default)]
    pub bad_records: u64,
}

/// Appends metrics lines; flushed after each line so `tail -f` and `trainer plot` see them.
pub struct MetricsLog {
    out: BufWriter<fs::File>,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `RUN_DIR/metrics.jsonl`. On resume, lines past `keep_through_step` (written after the
    /// checkpoint we resume from) are dropped so the file describes one consistent run.
    pub fn open(run_dir: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        // On resume a damaged line (e.g. a crash mid-write) must not block training: keep what
        // parses, say what was dropped.
        let kept: Vec<StepMetrics> = match keep_through_step {
            Some(s) if path.exists() => {
                let text = fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let mut kept = Vec::new();
                let mut bad = 0;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<StepMetrics>(line) {
                        Ok(m) if m.step <= s => kept.push(m),
                        Ok(_) => {}
                        Err(_) => bad += 1,
                    }
                }
                if bad > 0 {
                    eprintln!(
                        "warning: {}: dropped {bad} unreadable line(s)",
                        path.display()
                    );
                }
                kept
            }
            _ => Vec::new(),
        };
        // Rewritten beside and renamed over: a crash here leaves the old file whole.
        let tmp = path.with_extension("jsonl.tmp");
        let mut w = BufWriter::new(
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for m in &kept {
            writeln!(w, "{}", serde_json::to_string(m)?)?;
        }
        w.into_inner()?
            .sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        crate::crash_point::here("metrics-reopen");
        fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
        let out = BufWriter::new(
            fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?,
        );
        Ok(Self { out, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        writeln!(self.out, "{}", serde_json::to_string(m)?)?;
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))?;
        crate::crash_point::here("metrics-written");
        Ok(())
    }
}

/// Reads a metrics file; a torn last line (the run was killed mid-write) is skipped.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .collect::<std::io::Result<_>>()?;
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == n => break,
            Err(e) => anyhow::bail!("{}: line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `step 120/1000 (12%) ep 3 | loss 9.12 (cls 9.0 udi 9.1 patch 9.3) | lr 1.2e-4 τt 0.045 | H 3.1/3.2/4.0 of 11.09 | 52 img/s wait 3% | ETA 4m10s`
pub fn console_line(m: &StepMetrics, total_steps: u64, first_step: u64) -> String {
    let done = m.step.saturating_sub(first_step);
    let left = total_steps.saturating_sub(m.step);
    let eta = if done > 0 && m.elapsed_s > 0.0 {
        fmt_duration(Duration::from_secs_f64(
            m.elapsed_s / done as f64 * left as f64,
        ))
    } else {
        "?".into()
    };
    let pct = 100.0 * m.step as f64 / total_steps.max(1) as f64;
    let bad = if m.bad_records > 0 {
        format!(" | bad records {}", m.bad_records)
    } else {
        String::new()
    };
    format!(
        "step {}/{} ({pct:.0}%) ep {} | loss {:.4} (cls {:.3} udi {:.3} patch {:.3}) | lr {:.2e} wd {:.3} m {:.4} τt {:.3} | H {:.2}/{:.2}/{:.2} of {:.2} | {:.1} img/s wait {:.0}%{bad} | ETA {eta}",
        m.step,
        total_steps,
        m.epoch,
        m.loss,
        m.loss_cls,
        m.loss_udi,
        m.loss_patch,
        m.lr,
        m.wd,
        m.momentum,
        m.teacher_temp,
        m.teacher_entropy[0],
        m.teacher_entropy[1],
        m.teacher_entropy[2],
        m.ln_k,
        m.images_per_s,
        100.0 * m.data_wait_frac,
    )
}

/// Raised when the loss is not finite: training stops, the last good checkpoint stays.
pub fn check_finite(m: &StepMetrics) -> Result<()> {
    let parts = [
        ("loss", m.loss),
        ("loss_cls", m.loss_cls),
        ("loss_udi", m.loss_udi),
        ("loss_patch", m.loss_patch),
    ];
    if let Some((name, v)) = parts.iter().find(|(_, v)| !v.is_finite()) {
        anyhow::bail!(
            "non-finite {name} = {v} at step {} (epoch {}): stopping without saving this step. \
             The last checkpoint before it is intact; lower the learning rate or check the data, then --resume.",
            m.step,
            m.epoch
        );
    }
    Ok(())
}

/// The state of the teacher's target distribution that DINO users most often ask about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntropyState {
    Healthy,
    /// Entropy near 0: every image maps to the same one-hot prototype (sharpening won).
    Collapsed,
    /// Entropy near ln K: the target is uniform (centring won; nothing to learn from).
    Uniform,
}

/// Classifies each target's entropy and reports transitions (so a warning prints once per
/// episode, not every step).
pub struct EntropyGuard {
    /// Below `low · ln K` counts as collapsed.
    pub low: f32,
    /// Above `high · ln K` counts as uniform.
    pub high: f32,
    /// Steps ignored at the start (the teacher is random then; uniform is expected).
    pub grace_steps: u64,
    last: [EntropyState; 3],
}

const TARGETS: [&str; 3] = ["[cls]", "multimodal [cls+]", "patch"];

impl EntropyGuard {
    pub fn new(grace_steps: u64) -> Self {
        Self {
            low: 0.05,
            high: 0.98,
            grace_steps,
            last: [EntropyState::Healthy; 3],
        }
    }

    pub fn classify(&self, h: f32, ln_k: f32) -> EntropyState {
        if h < self.low * ln_k {
            EntropyState::Collapsed
        } else if h > self.high * ln_k {
            EntropyState::Uniform
        } else {
            EntropyState::Healthy
        }
    }

    /// Warnings for targets whose state just became unhealthy.
    pub fn check(&mut self, m: &StepMetrics) -> Vec<String> {
        let mut out = Vec::new();
        if m.step <= self.grace_steps || m.ln_k.is_nan() || m.ln_k <= 0.0 {
            return out;
        }
        for (j, h) in m.teacher_entropy.iter().enumerate() {
            let s = self.classify(*h, m.ln_k);
            if s != self.last[j] {
                match s {
                    EntropyState::Collapsed => out.push(format!(
                        "warning: step {}: teacher {} entropy {:.3} ≈ 0 (ln K = {:.2}): the targets collapsed to one prototype. \
                         Usual causes: teacher_temp too low for this K, centre momentum too high, lr too high.",
                        m.step, TARGETS[j], h, m.ln_k
                    )),
                    EntropyState::Uniform => out.push(format!(
                        "warning: step {}: teacher {} entropy {:.3} ≈ ln K = {:.2}: the targets are uniform. \
                         Usual causes: teacher_temp too high, or the run is still too young to have learnt anything.",
                        m.step, TARGETS[j], h, m.ln_k
                    )),
                    EntropyState::Healthy => {}
                }
                self.last[j] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64, loss: f32, h: [f32; 3]) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0,
            loss,
            loss_cls: loss,
            loss_udi: loss,
            loss_patch: loss,
            teacher_entropy: h,
            ln_k: 10.0,
            elapsed_s: step as f64,
            bad_records: 0,
            ..Default::default()
        }
    }

    #[test]
    fn jsonl_round_trip_and_resume_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        for s in 1..=5 {
            log.write(&m(s, s as f32 * 0.5, [1.0, 2.0, 3.0])).unwrap();
        }
        drop(log);
        let back = read_metrics(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            back,
            (1..=5)
                .map(|s| m(s, s as f32 * 0.5, [1.0, 2.0, 3.0]))
                .collect::<Vec<_>>()
        );
        // Resume from the checkpoint of step 3: lines 4 and 5 are dropped.
        let mut log = MetricsLog::open(dir.path(), Some(3)).unwrap();
        log.write(&m(4, 9.0, [1.0; 3])).unwrap();
        drop(log);
        let back = read_metrics(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            back.iter().map(|x| x.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(back[3].loss, 9.0);
    }

    #[test]
    fn torn_last_line_is_skipped_but_a_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(METRICS_FILE);
        let good = serde_json::to_string(&m(1, 1.0, [1.0; 3])).unwrap();
        fs::write(&p, format!("{good}\n{{\"step\": 2, \"lo")).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 1);
        fs::write(&p, format!("{{oops\n{good}\n")).unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn non_finite_loss_is_named() {
        assert!(check_finite(&m(3, 1.0, [1.0; 3])).is_ok());
        let mut bad = m(7, 1.0, [1.0; 3]);
        bad.loss_patch = f32::NAN;
        let e = check_finite(&bad).unwrap_err().to_string();
        assert!(e.contains("loss_patch") && e.contains("step 7"), "{e}");
    }

    #[test]
    fn entropy_warnings_fire_once_per_episode() {
        let mut g = EntropyGuard::new(2);
        // Grace period: uniform at step 1 is expected.
        assert!(g.check(&m(1, 1.0, [9.99, 9.99, 9.99])).is_empty());
        let w = g.check(&m(3, 1.0, [0.1, 5.0, 9.9])); // collapsed, healthy, uniform
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("[cls]") && w[0].contains("collapsed"));
        assert!(w[1].contains("patch") && w[1].contains("uniform"));
        assert!(
            g.check(&m(4, 1.0, [0.1, 5.0, 9.9])).is_empty(),
            "no repeat while the state persists"
        );
        assert!(g.check(&m(5, 1.0, [5.0, 5.0, 5.0])).is_empty());
        assert_eq!(
            g.check(&m(6, 1.0, [0.2, 5.0, 5.0])).len(),
            1,
            "a new episode warns again"
        );
    }

    #[test]
    fn console_line_shows_progress_and_eta() {
        let mut x = m(50, 2.5, [1.0, 2.0, 3.0]);
        x.elapsed_s = 100.0; // 50 steps in 100 s → 2 s/step, 50 left → 1m40s
        let line = console_line(&x, 100, 0);
        assert!(
            line.contains("step 50/100 (50%)") && line.contains("ETA 1m40s"),
            "{line}"
        );
        assert!(!line.contains("bad records"), "{line}");
        x.bad_records = 3;
        assert!(console_line(&x, 100, 0).contains("| bad records 3 |"));
    }
}
