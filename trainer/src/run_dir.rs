//! The run directory, made ready before anything of a run is started: its lock (one trainer per
//! run directory), the checkpoint a `--resume` continues from (the newest intact one), and
//! `config.toml`, the effective config (file plus `--set` overrides) that every process of the
//! run reads: the trainer, the loaders it starts, and loaders started by hand.

use crate::checkpoint::{CheckpointManager, CheckpointPath, CheckpointState};
use crate::train::parse_config;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
const LOCK_FILE: &str = ".lock";

/// A locked, prepared run directory (unlocked when dropped).
pub struct RunDir {
    dir: PathBuf,
    /// `None` on the ranks other than rank 0 of a data-parallel job (they write nothing here).
    _lock: Option<fs::File>,
    /// The checkpoint to resume from (with `resume`).
    pub resume_from: Option<(CheckpointPath, CheckpointState)>,
    /// Newer checkpoints that failed verification, with the reason; set aside as
    /// `step-N.damaged`.
    pub skipped: Vec<String>,
}

impl RunDir {
    /// Creates and locks `dir`. A fresh run (`resume` false) refuses a directory that already
    /// has checkpoints; a resumed one picks the newest intact checkpoint and refuses a config
    /// that differs from its own in anything but `[run]`. Then `config_toml` is written to
    /// `dir/config.toml`.
    pub fn open(dir: &Path, config_toml: &str, resume: bool) -> Result<Self> {
        let (cfg, run) = parse_config(config_toml, "config")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = lock_run_dir(dir)?;
        let ckpts = CheckpointManager::new(dir, run.keep_last)?;
        ckpts.remove_unfinished()?;
        let mut skipped = Vec::new();
        let resume_from = if resume {
            let found = ckpts.newest_intact(|c, e| {
                skipped.push(format!(
                    "skipping damaged checkpoint {}: {e:#}",
                    c.dir.display()
                ))
            })?;
            let Some((c, state)) = found else {
                bail!(
                    "--resume: no intact checkpoint in {}{}",
                    ckpts.dir().display(),
                    skipped.iter().map(|s| format!("\n{s}")).collect::<String>()
                );
            };
            let (saved, _) = parse_config(&state.config_toml, &c.state().display().to_string())?;
            if saved != cfg {
                bail!(
                    "--resume: the config differs from the one {} was trained with (only [run] may \
                     change); that one is in its {}",
                    c.dir.display(),
                    c.state().display()
                );
            }
            Some((c, state))
        } else {
            if let Some(c) = ckpts.latest()? {
                bail!(
                    "{} already has checkpoints ({}): pass --resume to continue it, or choose a new --out",
                    dir.display(),
                    c.dir.display()
                );
            }
            None
        };
        write_atomically(&dir.join(CONFIG_FILE), config_toml.as_bytes())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: Some(lock),
            resume_from,
            skipped,
        })
    }

    /// The run directory as another rank of a data-parallel job sees it: rank 0 holds the lock
    /// and chose `resume_from` (a checkpoint directory, on a filesystem every rank shares).
    pub fn follow(dir: &Path, resume_from: Option<&Path>) -> Result<Self> {
        let resume_from = match resume_from {
            None => None,
            Some(p) => {
                let c = crate::checkpoint::resolve(p)?;
                let state = crate::checkpoint::load_state(&c)?;
                Some((c, state))
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: None,
            resume_from,
            skipped: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `RUN/config.toml`: the effective config of this run.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }
}

/// An exclusive lock on `RUN_DIR/.lock`, held while training: two trainers in one run directory
/// would interleave their checkpoints and metrics. The file holds the holder's pid.
pub fn lock_run_dir(run_dir: &Path) -> Result<fs::File> {
    use std::os::unix::io::AsRawFd;
    let p = run_dir.join(LOCK_FILE);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "{} is in use by another trainer (pid {}); stop it first",
            run_dir.display(),
            holder_pid(&p)
        );
    }
    f.set_len(0)
        .and_then(|_| (&f).write_all(format!("{}\n", std::process::id()).as_bytes()))
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(f)
}

/// The pid in a held lock file. The holder writes it right after locking, so an empty read
/// (the two raced) is retried for a moment.
fn holder_pid(lock: &Path) -> String {
    for _ in 0..50 {
        let s = fs::read_to_string(lock).unwrap_or_default();
        if !s.trim().is_empty() {
            return s.trim().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    "unknown".into()
}

/// Writes `path` through a temporary file and a rename: readers see the old or the new text.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, bytes)
        .and_then(|_| fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}
