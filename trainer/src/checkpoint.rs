//! Checkpoints of a run: `RUN_DIR/checkpoints/step-XXXXXXXX/{tensors.safetensors, state.json}`.
//!
//! * Tensors (student, teacher, optimiser moments, anything a [`Tensor`] holds) go into one
//!   safetensors file, keyed by name; f32 round-trips bit for bit.
//! * Everything else (step, epoch, data cursor, RNG state, the config text) is JSON. The three
//!   loss centres are tensors (`center.{cls,udi,patch}`, K values each), stored with the weights
//!   so they round-trip bit for bit like them.
//! * A checkpoint is written into a hidden temporary directory, fsynced and renamed into place,
//!   so a crash mid-write leaves the previous checkpoints and no half-written one. A write that
//!   fails (no space, I/O error) removes its temporary directory and touches nothing else.
//! * `state.json` records the size and CRC32C of every other file of its checkpoint
//!   ([`CheckpointState::files`]); [`verify`] checks them, so storage that loses or damages a
//!   file after the write (a full disk, a node lost mid-copy) is caught before a resume.
//! * After each save only the newest `keep_last` checkpoints remain, never counting out the
//!   one just written.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TENSORS_FILE: &str = "tensors.safetensors";
pub const STATE_FILE: &str = "state.json";
/// Name prefix of a checkpoint being written (`.tmp-step-N-PID`) or pruned.
const TMP_PREFIX: &str = ".tmp-";
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
    /// Size and checksum of every other file of the checkpoint, by file name (filled by
    /// [`CheckpointManager::save`]; empty in checkpoints written before it was recorded).
    #[serde(default)]
    pub files: BTreeMap<String, FileDigest>,
}

/// What `state.json` records of a file so that [`verify`] can tell it is the one written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub crc32c: u32,
}

impl FileDigest {
    /// Reads `path` and digests it.
    pub fn of_file(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut f = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let (mut size, mut crc) = (0u64, 0u32);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                return Ok(Self { size, crc32c: crc });
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            size += n as u64;
        }
    }
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

    /// Writes checkpoint `state.step` atomically (recording its files' digests in
    /// `state.json`), then prunes old ones. Returns its path. On failure nothing but the
    /// temporary directory was touched, and that is removed.
    pub fn save(
        &self,
        tensors: &HashMap<String, Tensor>,
        state: &CheckpointState,
    ) -> Result<CheckpointPath> {
        let name = step_dir_name(state.step);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        let written = write_checkpoint_dir(&tmp, tensors, state);
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e.context(format!(
                "writing checkpoint {}",
                self.dir.join(&name).display()
            )));
        }
        crate::crash_point::here("checkpoint-complete");
        let dst = self.dir.join(&name);
        // Re-saving a step (the final save right after a periodic one): the old copy is moved
        // aside, not deleted, until the new one is in place.
        let aside = self.dir.join(format!(".old-{name}-{}", std::process::id()));
        let had_old = dst.exists();
        if had_old {
            fs::rename(&dst, &aside).with_context(|| format!("moving {} aside", dst.display()))?;
        }
        if let Err(e) = fs::rename(&tmp, &dst) {
            if had_old {
                let _ = fs::rename(&aside, &dst);
            }
            let _ = fs::remove_dir_all(&tmp);
            return Err(anyhow::Error::new(e).context(format!(
                "renaming {} → {}",
                tmp.display(),
                dst.display()
            )));
        }
        if had_old {
            let _ = fs::remove_dir_all(&aside);
        }
        fsync_dir(&self.dir);
        crate::crash_point::here("checkpoint-renamed");
        self.prune(state.step)?;
        Ok(CheckpointPath {
            step: state.step,
            dir: dst,
        })
    }

    /// Removes the temporary directories of writes that never finished (a trainer killed
    /// mid-write); returns them. Only for the holder of the run directory's lock.
    pub fn remove_unfinished(&self) -> Result<Vec<PathBuf>> {
        let mut gone = Vec::new();
        for e in
            fs::read_dir(&self.dir).with_context(|| format!("listing {}", self.dir.display()))?
        {
            let p = e?.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(TMP_PREFIX))
            {
                fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
                gone.push(p);
            }
        }
        Ok(gone)
    }

    /// All complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<CheckpointPath>> {
        list_checkpoints(&self.dir)
    }

    pub fn latest(&self) -> Result<Option<CheckpointPath>> {
        Ok(self.list()?.pop())
    }

    /// Keeps the newest `keep_last` checkpoints, and always `just_saved` (a newer, damaged one
    /// left on disk must not count it out).
    fn prune(&self, just_saved: u64) -> Result<()> {
        let all = self.list()?;
        if all.len() > self.keep_last {
            for c in &all[..all.len() - self.keep_last] {
                if c.step == just_saved {
                    continue;
                }
                // Out of sight first: a crash mid-removal leaves a temporary directory (removed by
                // the next trainer), not a half-deleted `step-N` that reads as damaged.
                let doomed = self.dir.join(format!(
                    "{TMP_PREFIX}pruned-{}-{}",
                    step_dir_name(c.step),
                    std::process::id()
                ));
                fs::rename(&c.dir, &doomed)
                    .and_then(|_| fs::remove_dir_all(&doomed))
                    .with_context(|| format!("removing old checkpoint {}", c.dir.display()))?;
            }
        }
        Ok(())
    }

    /// The newest checkpoint that passes [`verify`], with its state. Each newer one that fails
    /// is renamed `step-N.damaged` (kept for inspection, out of every listing) and reported to
    /// `skipped` with the reason.
    pub fn newest_intact(
        &self,
        mut skipped: impl FnMut(&CheckpointPath, &anyhow::Error),
    ) -> Result<Option<(CheckpointPath, CheckpointState)>> {
        let mut all = list_step_dirs(&self.dir)?;
        while let Some(c) = all.pop() {
            match verify(&c) {
                Ok(state) => return Ok(Some((c, state))),
                Err(e) => {
                    skipped(&c, &e);
                    let to = c
                        .dir
                        .with_file_name(format!("{}.damaged", step_dir_name(c.step)));
                    let _ = fs::remove_dir_all(&to);
                    fs::rename(&c.dir, &to)
                        .with_context(|| format!("moving {} aside", c.dir.display()))?;
                }
            }
        }
        Ok(None)
    }
}

/// Writes the files of one checkpoint into `dir` (created afresh), fsynced.
fn write_checkpoint_dir(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    state: &CheckpointState,
) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tpath = dir.join(TENSORS_FILE);
    candle_core::safetensors::save(tensors, &tpath)
        .with_context(|| format!("writing {}", tpath.display()))?;
    fsync_file(&tpath)?;
    crate::crash_point::here("checkpoint-tensors");
    let mut state = state.clone();
    state.files = BTreeMap::from([(TENSORS_FILE.to_string(), FileDigest::of_file(&tpath)?)]);
    let spath = dir.join(STATE_FILE);
    let mut f = fs::File::create(&spath).with_context(|| format!("writing {}", spath.display()))?;
    f.write_all(serde_json::to_string_pretty(&state)?.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", spath.display()))?;
    Ok(())
}

/// Checks one checkpoint: `state.json` parses and has this trainer's format, and every file it
/// records has its recorded size and CRC32C (a checkpoint from before digests were recorded:
/// its tensors file's header and offsets are consistent). Returns the state; errors name the file and what is wrong with it.
pub fn verify(c: &CheckpointPath) -> Result<CheckpointState> {
    let state = load_state(c)?;
    for (name, want) in &state.files {
        // A damaged state.json may name anything: only plain files of this checkpoint are read.
        let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        if !plain {
            bail!(
                "{}: lists the file {name:?}, not a file of this checkpoint (damaged)",
                c.state().display()
            );
        }
        let p = c.dir.join(name);
        let got = FileDigest::of_file(&p)
            .with_context(|| format!("{} lists {name:?}", c.state().display()))?;
        if got.size != want.size {
            bail!(
                "{}: {} bytes, but {STATE_FILE} records {} (truncated or replaced)",
                p.display(),
                got.size,
                want.size
            );
        }
        if got.crc32c != want.crc32c {
            bail!(
                "{}: CRC32C {:08x}, but {STATE_FILE} records {:08x} (damaged)",
                p.display(),
                got.crc32c,
                want.crc32c
            );
        }
    }
    if !state.files.contains_key(TENSORS_FILE) {
        // Written before digests were recorded: at least the header and offsets must hold.
        let t = c.tensors();
        let bytes = fs::read(&t).with_context(|| format!("reading {}", t.display()))?;
        safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", t.display()))?;
    }
    Ok(state)
}

fn list_checkpoints(dir: &Path) -> Result<Vec<CheckpointPath>> {
    let mut all = list_step_dirs(dir)?;
    all.retain(|c| c.tensors().is_file() && c.state().is_file());
    Ok(all)
}

/// Every `step-N` directory, complete or not, oldest first.
fn list_step_dirs(dir: &Path) -> Result<Vec<CheckpointPath>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir) else {
            continue;
        };
        out.push(CheckpointPath {
            step,
            dir: e.path(),
        });
    }
    out.sort_by_key(|c| c.step);
    Ok(out)
}

/// [`verify`] on every `step-N` directory of a run (`run_dir/checkpoints`, or `run_dir` itself
/// when it is a `checkpoints/` directory), oldest first.
pub fn verify_run(run_dir: &Path) -> Result<Vec<(CheckpointPath, Result<CheckpointState>)>> {
    let dir = if run_dir.join("checkpoints").is_dir() {
        run_dir.join("checkpoints")
    } else {
        run_dir.to_path_buf()
    };
    let all = list_step_dirs(&dir)?;
    if all.is_empty() {
        bail!("{}: no checkpoints", dir.display());
    }
    Ok(all
        .into_iter()
        .map(|c| {
            let r = verify(&c);
            (c, r)
        })
        .collect())
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
            files: BTreeMap::new(),
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
        let (t2, mut s2) = load(&c, &Device::Cpu).unwrap();
        let digest = FileDigest::of_file(&c.tensors()).unwrap();
        assert_eq!(s2.files, BTreeMap::from([(TENSORS_FILE.into(), digest)]));
        assert_eq!(digest.size, fs::metadata(c.tensors()).unwrap().len());
        s2.files.clear();
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
        // The next trainer removes the temp dir, and only it.
        let gone = m.remove_unfinished().unwrap();
        assert_eq!(gone, [m.dir().join(".tmp-step-00000002-99")]);
        assert!(m.dir().join("step-00000003").is_dir());
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

    #[test]
    fn file_digest_is_size_and_standard_crc32c() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        // The CRC-32C check value of "123456789" (RFC 3720 / the Castagnoli catalogue entry).
        fs::write(&p, b"123456789").unwrap();
        let d = FileDigest::of_file(&p).unwrap();
        assert_eq!((d.size, d.crc32c), (9, 0xe306_9283));
    }

    /// Damages the tensors file of `c`: cut to half, or one byte flipped in place.
    fn damage(c: &CheckpointPath, truncate: bool) {
        let t = c.tensors();
        let mut b = fs::read(&t).unwrap();
        if truncate {
            b.truncate(b.len() / 2);
        } else {
            let i = b.len() - 3;
            b[i] ^= 0x10;
        }
        fs::write(&t, b).unwrap();
    }

    #[test]
    fn verify_names_a_truncated_or_flipped_tensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 5).unwrap();
        let a = m.save(&tensors(1.0), &state(1)).unwrap();
        let b = m.save(&tensors(2.0), &state(2)).unwrap();
        assert_eq!(verify(&a).unwrap().step, 1);
        damage(&a, true);
        let e = format!("{:#}", verify(&a).unwrap_err());
        assert!(
            e.contains("tensors.safetensors") && e.contains("truncated"),
            "{e}"
        );
        // A flipped byte inside a tensor keeps the safetensors header valid: only the checksum
        // catches it.
        damage(&b, false);
        candle_core::safetensors::load(b.tensors(), &Device::Cpu).unwrap();
        let e = format!("{:#}", verify(&b).unwrap_err());
        assert!(
            e.contains("tensors.safetensors") && e.contains("CRC32C"),
            "{e}"
        );
        fs::write(b.state(), "{\"format_version\": 1, \"st").unwrap();
        let e = format!("{:#}", verify(&b).unwrap_err());
        assert!(e.contains("state.json"), "{e}");
    }

    #[test]
    fn newest_intact_skips_damaged_ones_and_sets_them_aside() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 5).unwrap();
        for s in [1, 2, 3] {
            m.save(&tensors(s as f32), &state(s)).unwrap();
        }
        let all = m.list().unwrap();
        damage(&all[2], true);
        fs::remove_file(all[1].state()).unwrap();
        let mut skipped = Vec::new();
        let (c, st) = m
            .newest_intact(|c, e| skipped.push((c.step, format!("{e:#}"))))
            .unwrap()
            .unwrap();
        assert_eq!((c.step, st.step), (1, 1));
        assert_eq!(skipped.len(), 2);
        assert_eq!(skipped[0].0, 3);
        assert!(skipped[0].1.contains("truncated"), "{:?}", skipped);
        assert_eq!(skipped[1].0, 2);
        assert!(skipped[1].1.contains("state.json"), "{:?}", skipped);
        assert_eq!(m.list().unwrap(), vec![c.clone()]);
        assert!(m.dir().join("step-00000003.damaged").is_dir());
        // Nothing intact at all: None.
        damage(&c, false);
        assert!(m.newest_intact(|_, _| ()).unwrap().is_none());
    }

    #[test]
    fn keep_last_never_prunes_the_checkpoint_just_written() {
        // A newer checkpoint on disk (e.g. damaged, not yet set aside) must not push the one
        // just saved out of `keep_last`.
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 1).unwrap();
        m.save(&tensors(9.0), &state(9)).unwrap();
        let c = m.save(&tensors(5.0), &state(5)).unwrap();
        assert!(c.dir.is_dir());
        assert_eq!(verify(&c).unwrap().step, 5);
    }

    #[test]
    fn re_saving_a_step_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), 2).unwrap();
        m.save(&tensors(1.0), &state(4)).unwrap();
        let c = m.save(&tensors(2.0), &state(4)).unwrap();
        let (t, _) = load(&c, &Device::Cpu).unwrap();
        assert_eq!(bits(&t["student.w"]), bits(&tensors(2.0)["student.w"]));
        let names: Vec<_> = fs::read_dir(m.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("step-00000004")]);
    }
}
