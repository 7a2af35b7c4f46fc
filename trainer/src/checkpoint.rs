//! Checkpoints of a run: `RUN_DIR/checkpoints/step-XXXXXXXX/{tensors.safetensors, state.json}`.
//!
//! * Tensors (student, teacher, optimiser moments, anything a [`Tensor`] holds) go into one
//!   safetensors file, keyed by name; f32 round-trips bit for bit.
//! * Everything else (step, epoch, data cursor, RNG state, the config text) is JSON. The three
//!   loss centres are tensors (`center.{cls,udi,patch}`, K values each), stored with the weights
//!   so they round-trip bit for bit like them.
//! * A checkpoint is written into a hidden temporary directory, fsynced and renamed into place,
//!   so a crash mid-write leaves the previous checkpoints and no half-written one.
//! * After each save only the newest `keep_last` checkpoints remain.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TENSORS_FILE: &str = "tensors.safetensors";
pub const STATE_FILE: &str = "state.json";
/// Bumped when the meaning of a field changes; older checkpoints are refused with a message.
pub const FORMAT_VERSION: u32 = 1;

/// Where the next batch comes from: batch `batch` of epoch `epoch` (of the ring's order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub batch: u64,
}

/// The non-tensor state of a run at the end of step `step` (steps counted from 1; `step`
/// optimiser updates have been applied).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimiser updates done.
    pub step: u64,
    /// Epoch of the last batch consumed.
    pub epoch: u64,
    /// The next batch to consume.
    pub cursor: DataCursor,
    /// The master seed; every random stream is keyed by (seed, domain, epoch/step, index), so
    /// the RNG state is (seed, step): nothing else is needed to continue the streams exactly.
    pub seed: u64,
    /// The full config file text the run started with.
    pub config_toml: String,
    /// Anything else the trainer wants back (e.g. its own step counters).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// One checkpoint on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPath {
    pub step: u64,
    pub dir: PathBuf,
}

impl CheckpointPath {
    pub fn tensors(&self) -> PathBuf {
        self.dir.join(TENSORS_FILE)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
}

/// Saves, lists, prunes and loads the checkpoints of one run directory.
pub struct CheckpointManager {
    dir: PathBuf,
    keep_last: usize,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

impl CheckpointManager {
    /// Checkpoints of `run_dir` (created if missing); keeps the newest `keep_last` (≥ 1).
    pub fn new(run_dir: &Path, keep_last: usize) -> Result<Self> {
        let dir = run_dir.join("checkpoints");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            keep_last: keep_last.max(1),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes checkpoint `state.step` atomically, then prunes old ones. Returns its path.
    pub fn save(
        &self,
        tensors: &HashMap<String, Tensor>,
        state: &CheckpointState,
    ) -> Result<CheckpointPath> {
        let name = step_dir_name(state.step);
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let tpath = tmp.join(TENSORS_FILE);
        candle_core::safetensors::save(tensors, &tpath)
            .with_context(|| format!("writing {}", tpath.display()))?;
        fsync_file(&tpath)?;
        let spath = tmp.join(STATE_FILE);
        {
            let mut f =
                fs::File::create(&spath).with_context(|| format!("writing {}", spath.display()))?;
            f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
            f.sync_all()?;
        }
        let dst = self.dir.join(&name);
        if dst.exists() {
            // Re-saving the same step (e.g. the final save right after a periodic one).
            fs::remove_dir_all(&dst).with_context(|| format!("replacing {}", dst.display()))?;
        }
        fs::rename(&tmp, &dst)
            .with_context(|| format!("renaming {} → {}", tmp.display(), dst.display()))?;
        fsync_dir(&self.dir);
        self.prune()?;
        Ok(CheckpointPath {
            step: state.step,
            dir: dst,
        })
    }

    /// All complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<CheckpointPath>> {
        list_checkpoints(&self.dir)
    }

    pub fn latest(&self) -> Result<Option<CheckpointPath>> {
        Ok(self.list()?.pop())
    }

    fn prune(&self) -> Result<()> {
        let all = self.list()?;
        if all.len() > self.keep_last {
            for c in &all[..all.len() - self.keep_last] {
                fs::remove_dir_all(&c.dir)
                    .with_context(|| format!("removing old checkpoint {}", c.dir.display()))?;
            }
        }
        Ok(())
    }
}

fn list_checkpoints(dir: &Path) -> Result<Vec<CheckpointPath>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir) else {
            continue;
        };
        let c = CheckpointPath {
            step,
            dir: e.path(),
        };
        if c.tensors().is_file() && c.state().is_file() {
            out.push(c);
        }
    }
    out.sort_by_key(|c| c.step);
    Ok(out)
}

/// Resolves what a user passes as `--checkpoint`: a checkpoint directory, its `state.json` or
/// `tensors.safetensors`, a run directory (its newest checkpoint), or a run's `checkpoints/`.
pub fn resolve(path: &Path) -> Result<CheckpointPath> {
    let p = if path.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    if p.join(STATE_FILE).is_file() && p.join(TENSORS_FILE).is_file() {
        let step = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_step_dir)
            .unwrap_or(0);
        return Ok(CheckpointPath { step, dir: p });
    }
    for dir in [p.join("checkpoints"), p.clone()] {
        if dir.is_dir() {
            if let Some(c) = list_checkpoints(&dir)?.pop() {
                return Ok(c);
            }
        }
    }
    bail!(
        "{}: no checkpoint here (expected a run dir, its checkpoints/ or a step-N dir)",
        path.display()
    )
}

/// Loads a checkpoint's tensors onto `device` and its state.
pub fn load(
    c: &CheckpointPath,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, CheckpointState)> {
    let state = load_state(c)?;
    let tensors = candle_core::safetensors::load(c.tensors(), device)
        .with_context(|| format!("reading {}", c.tensors().display()))?;
    Ok((tensors, state))
}

pub fn load_state(c: &CheckpointPath) -> Result<CheckpointState> {
    let text = fs::read_to_string(c.state())
        .with_context(|| format!("reading {}", c.state().display()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", c.state().display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} but this trainer reads format {FORMAT_VERSION}",
            c.state().display(),
            state.format_version
        );
    }
    Ok(state)
}

fn fsync_file(p: &Path) -> Result<()> {
    fs::File::open(p)?
        .sync_all()
        .with_context(|| format!("fsync {}", p.display()))
}

/// Makes the rename durable; best effort (not every filesystem allows opening a directory).
fn fsync_dir(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            format_version: FORMAT_VERSION,
            step,
            epoch: 1,
            cursor: DataCursor {
                epoch: 1,
                batch: step % 7,
            },
            seed: 3,
            config_toml: "[data]\nbatch_size = 4\n".into(),
            extra: serde_json::json!({"k": 1}),
        }
    }

    fn tensors(seed: f32) -> HashMap<String, Tensor> {
        let d = Device::Cpu;
        let a: Vec<f32> = (0..24).map(|i| (i as f32 + seed).sin() / 7.0).collect();
        HashMap::from([
            (
                "student.w".to_string(),
                Tensor::from_vec(a.clone(), (4, 6), &d).unwrap(),
            ),
            (
                "opt.m.w".to_string(),
                Tensor::from_vec(a.iter().map(|x| x * 1e-7).collect::<Vec<_>>(), 24, &d).unwrap(),
            ),
        ])
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 3).unwrap();
        let t = tensors(0.5);
        let c = m.save(&t, &state(10)).unwrap();
        let (t2, s2) = load(&c, &Device::Cpu).unwrap();
        assert_eq!(s2, state(10));
        for (k, v) in &t {
            assert_eq!(bits(v), bits(&t2[k]), "{k}");
            assert_eq!(v.dims(), t2[k].dims());
        }
    }

    #[test]
    fn keeps_last_k_and_resolves_latest() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 2).unwrap();
        for s in [5, 10, 15, 20] {
            m.save(&tensors(s as f32), &state(s)).unwrap();
        }
        let steps: Vec<u64> = m.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![15, 20]);
        assert_eq!(resolve(dir.path()).unwrap().step, 20);
        assert_eq!(
            resolve(&dir.path().join("checkpoints/step-00000015"))
                .unwrap()
                .step,
            15
        );
        assert_eq!(
            resolve(&dir.path().join("checkpoints/step-00000015/state.json"))
                .unwrap()
                .step,
            15
        );
        assert!(resolve(&dir.path().join("nothing")).is_err());
    }

    #[test]
    fn half_written_checkpoints_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 5).unwrap();
        m.save(&tensors(1.0), &state(1)).unwrap();
        // A crash during the write of step 2 leaves a temp dir (and a dir without its state).
        fs::create_dir_all(m.dir().join(".tmp-step-00000002-99")).unwrap();
        fs::create_dir_all(m.dir().join("step-00000003")).unwrap();
        fs::write(m.dir().join("step-00000003").join(TENSORS_FILE), b"junk").unwrap();
        assert_eq!(m.latest().unwrap().unwrap().step, 1);
    }

    #[test]
    fn wrong_format_version_is_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 5).unwrap();
        let mut s = state(4);
        s.format_version = 99;
        let c = m.save(&tensors(1.0), &s).unwrap();
        let err = load(&c, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("state.json") && err.contains("99"), "{err}");
    }
}
