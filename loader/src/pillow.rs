//! Real Pillow, run from Rust: a Python with a pinned Pillow in a throwaway venv, and the
//! recipe script (`bench/pil_recipe.py`, compiled in) that `loader bench` times as the PIL
//! baseline and the loader's Pillow test replays the engine's decisions with.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The Pillow release the exact resize and the photometric ops are checked against.
pub const PILLOW_VERSION: &str = "13.0.0";

/// The recipe script.
pub const SCRIPT: &str = include_str!("../../bench/pil_recipe.py");

/// The default venv: `target/pillow-venv` of this workspace.
pub fn default_venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pillow-venv")
}

/// The venv's Python if it has Pillow [`PILLOW_VERSION`]; otherwise makes the venv with
/// `python3 -m venv` and `pip install pillow==VERSION` first. Errors say what is missing (no
/// python3, no venv module, PyPI unreachable).
pub fn python(venv: &Path) -> Result<PathBuf> {
    let py = venv.join("bin/python");
    if has_pillow(&py) {
        return Ok(py);
    }
    run(
        Command::new("python3").arg("-m").arg("venv").arg(venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(&py).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            // Without PyPI, fail in seconds rather than retry for minutes.
            "--timeout",
            "20",
            "--retries",
            "1",
            &format!("pillow=={PILLOW_VERSION}"),
        ]),
        "pip install pillow (PyPI unreachable?)",
    )?;
    anyhow::ensure!(
        has_pillow(&py),
        "{} has no Pillow {PILLOW_VERSION} after pip install",
        py.display()
    );
    Ok(py)
}

fn has_pillow(py: &Path) -> bool {
    Command::new(py)
        .args([
            "-c",
            &format!("import PIL; assert PIL.__version__ == '{PILLOW_VERSION}'"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot start"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Payloads as the script reads them: u32 little-endian length, then the bytes.
pub fn blob<'a>(payloads: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Runs the recipe script with `args` (the script itself is written into `dir`); returns stdout.
pub fn run_script<I>(py: &Path, dir: &Path, args: I) -> Result<String>
where
    I: IntoIterator,
    I::Item: AsRef<std::ffi::OsStr>,
{
    let script = dir.join("pil_recipe.py");
    std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let out = Command::new(py)
        .arg(&script)
        .args(args)
        .output()
        .context("running the PIL recipe script")?;
    if !out.status.success() {
        bail!(
            "PIL recipe script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
