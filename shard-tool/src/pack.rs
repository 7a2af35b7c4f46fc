//! `pack`: list the input, process images in parallel, write shards in input order, finish
//! atomically. The output depends only on the input files and the options, never on threads.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use shared::shard::{DatasetWriter, Encoding, NewRecord, PackOptions, SkippedFile, UNLABELLED};

use crate::decode::{decode_bytes, probe, sniff};

/// How the input is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// `imagefolder` when the root has sub-folders, else `flat`.
    Auto,
    /// `<root>/<class>/**/<image>`, labelled by sorted class folder (torchvision ImageFolder).
    Imagefolder,
    /// Every image under the root, recursively, UNLABELLED.
    Flat,
}

/// Target encoding of `pack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetEncoding {
    /// JPEG: passthrough of the original bytes (PNG stays PNG), or a re-encode with `--max-side`.
    Jpeg,
    /// Decoded RGB8 pixels, zstd-compressed (trades disk for decode speed).
    Raw,
}

#[derive(Clone, Debug)]
pub struct PackConfig {
    pub encoding: TargetEncoding,
    /// Downscale so that the longer side is at most this (re-encode and raw modes).
    pub max_side: Option<u32>,
    /// JPEG quality of a re-encode.
    pub quality: u8,
    pub shard_bytes: u64,
    /// Decode every image at pack time (catches truncated files).
    pub validate: bool,
    /// Fail on the first bad file instead of skipping it.
    pub strict: bool,
    pub layout: Layout,
    /// Replace an existing output directory.
    pub force: bool,
    pub progress: bool,
    /// zstd level of raw payloads.
    pub zstd_level: i32,
    /// fsync shards and manifest before the final rename (durable against power loss; the
    /// rename alone already protects against a crashed process).
    pub fsync: bool,
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig {
            encoding: TargetEncoding::Jpeg,
            max_side: None,
            quality: 90,
            shard_bytes: 1 << 30,
            validate: true,
            strict: false,
            layout: Layout::Auto,
            force: false,
            progress: true,
            zstd_level: 3,
            fsync: true,
        }
    }
}

impl PackConfig {
    fn reencodes(&self) -> bool {
        self.encoding == TargetEncoding::Raw || self.max_side.is_some()
    }

    fn options(&self, layout: &str) -> PackOptions {
        PackOptions {
            encoding: match self.encoding {
                TargetEncoding::Jpeg => Encoding::Jpeg,
                TargetEncoding::Raw => Encoding::RawZstd,
            },
            max_side: self.max_side,
            quality: (self.encoding == TargetEncoding::Jpeg && self.max_side.is_some())
                .then_some(self.quality),
            shard_bytes: self.shard_bytes,
            validate: self.validate || self.reencodes(),
            layout: layout.to_string(),
        }
    }
}

/// One input image.
#[derive(Clone, Debug)]
pub struct InputFile {
    pub abs: PathBuf,
    /// Relative, `/`-separated path (stored in the shard).
    pub rel: String,
    pub label: i32,
}

/// The listed input: class names (empty when unlabelled) and files in pack order.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub classes: Vec<String>,
    pub files: Vec<InputFile>,
    pub layout: &'static str,
    /// Image files that will not be packed (e.g. outside any class folder).
    pub ignored: Vec<SkippedFile>,
}

pub fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".jpg", ".jpeg", ".png"].iter().any(|e| lower.ends_with(e))
}

fn rel_string(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Image files under `dir`, recursively (following symlinks), sorted by path.
fn walk_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let meta = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        if meta.is_dir() {
            walk_images(&path, out)?;
        } else if meta.is_file()
            && is_image_name(&path.file_name().unwrap_or_default().to_string_lossy())
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Lists `input`: a directory (ImageFolder or flat) or a text file with one image path per line.
pub fn list_inputs(input: &Path, layout: Layout) -> Result<Inputs> {
    let meta = std::fs::metadata(input).with_context(|| format!("input {}", input.display()))?;
    if meta.is_file() {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading file list {}", input.display()))?;
        let base = input.parent().unwrap_or(Path::new("."));
        let files = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| InputFile {
                abs: base.join(l),
                rel: l.to_string(),
                label: UNLABELLED,
            })
            .collect();
        return Ok(Inputs {
            classes: vec![],
            files,
            layout: "list",
            ignored: vec![],
        });
    }
    let mut dirs = Vec::new();
    let mut top_files = Vec::new();
    for entry in std::fs::read_dir(input).with_context(|| format!("reading {}", input.display()))? {
        let path = entry?.path();
        if std::fs::metadata(&path)?.is_dir() {
            dirs.push(path);
        } else if is_image_name(&path.file_name().unwrap_or_default().to_string_lossy()) {
            top_files.push(path);
        }
    }
    let imagefolder = match layout {
        Layout::Auto => !dirs.is_empty(),
        Layout::Imagefolder => true,
        Layout::Flat => false,
    };
    if !imagefolder {
        let mut paths = Vec::new();
        walk_images(input, &mut paths)?;
        let mut files: Vec<InputFile> = paths
            .iter()
            .map(|p| InputFile {
                abs: p.clone(),
                rel: rel_string(input, p),
                label: UNLABELLED,
            })
            .collect();
        files.sort_by(|a, b| a.rel.cmp(&b.rel));
        return Ok(Inputs {
            classes: vec![],
            files,
            layout: "flat",
            ignored: vec![],
        });
    }
    // torchvision: classes = sorted(folder names); files sorted within each class.
    let mut classes: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut paths = Vec::new();
        walk_images(&input.join(class), &mut paths)?;
        let mut class_files: Vec<InputFile> = paths
            .iter()
            .map(|p| InputFile {
                abs: p.clone(),
                rel: rel_string(input, p),
                label: label as i32,
            })
            .collect();
        class_files.sort_by(|a, b| a.rel.cmp(&b.rel));
        files.extend(class_files);
    }
    let mut ignored: Vec<SkippedFile> = top_files
        .iter()
        .map(|p| SkippedFile {
            path: rel_string(input, p),
            reason: "outside any class folder".into(),
        })
        .collect();
    ignored.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Inputs {
        classes,
        files,
        layout: "imagefolder",
        ignored,
    })
}

/// A processed image, ready to append.
pub struct Processed {
    pub encoding: Encoding,
    pub width: u32,
    pub height: u32,
    pub payload: Vec<u8>,
    pub input_bytes: u64,
}

/// Reads, sniffs, validates and (optionally) re-encodes one file. `Err` is the skip reason.
pub fn process_file(path: &Path, cfg: &PackConfig) -> std::result::Result<Processed, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    process_bytes(bytes, cfg)
}

pub fn process_bytes(bytes: Vec<u8>, cfg: &PackConfig) -> std::result::Result<Processed, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let input_bytes = bytes.len() as u64;
    let encoding = sniff(&bytes).ok_or("not a JPEG or PNG (unrecognised magic bytes)")?;
    if !cfg.reencodes() {
        let (width, height) = if cfg.validate {
            let (w, h, _) = decode_bytes(encoding, &bytes, None)?;
            (w, h)
        } else {
            probe(encoding, &bytes)?
        };
        return Ok(Processed {
            encoding,
            width,
            height,
            payload: bytes,
            input_bytes,
        });
    }
    let (w, h, px) = decode_bytes(encoding, &bytes, None)?;
    let (w, h, px) = downscale(w, h, px, cfg.max_side);
    let (encoding, payload) = match cfg.encoding {
        TargetEncoding::Raw => (
            Encoding::RawZstd,
            zstd::bulk::compress(&px, cfg.zstd_level).map_err(|e| format!("zstd: {e}"))?,
        ),
        TargetEncoding::Jpeg => {
            let image = turbojpeg::Image {
                pixels: &px[..],
                width: w as usize,
                pitch: w as usize * 3,
                height: h as usize,
                format: turbojpeg::PixelFormat::RGB,
            };
            let jpeg = turbojpeg::compress(image, cfg.quality as i32, turbojpeg::Subsamp::Sub2x2)
                .map_err(|e| format!("JPEG encode: {e}"))?;
            (Encoding::Jpeg, jpeg.to_vec())
        }
    };
    Ok(Processed {
        encoding,
        width: w,
        height: h,
        payload,
        input_bytes,
    })
}

/// Downscales (never up) so that the longer side is at most `max_side`.
fn downscale(w: u32, h: u32, px: Vec<u8>, max_side: Option<u32>) -> (u32, u32, Vec<u8>) {
    let Some(max) = max_side.filter(|&m| m > 0 && w.max(h) > m) else {
        return (w, h, px);
    };
    let scale = max as f64 / w.max(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).clamp(1, max);
    let nh = ((h as f64 * scale).round() as u32).clamp(1, max);
    let img = image::RgbImage::from_raw(w, h, px).expect("decoder returns w*h*3 bytes");
    let out = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    (nw, nh, out.into_raw())
}

/// What `pack` did.
#[derive(Clone, Debug, Serialize)]
pub struct PackSummary {
    pub out: PathBuf,
    pub packed: u64,
    pub skipped: u64,
    pub skipped_files: Vec<SkippedFile>,
    pub classes: usize,
    pub shards: usize,
    pub input_bytes: u64,
    pub payload_bytes: u64,
    pub seconds: f64,
    /// Input megabytes (1e6 bytes) per second.
    pub mb_per_s: f64,
}

impl std::fmt::Display for PackSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "packed {} records into {} shard(s) in {} ({} classes)",
            self.packed,
            self.shards,
            self.out.display(),
            self.classes
        )?;
        writeln!(
            f,
            "input {:.1} MB, payload {:.1} MB, {:.2} s, {:.1} MB/s",
            self.input_bytes as f64 / 1e6,
            self.payload_bytes as f64 / 1e6,
            self.seconds,
            self.mb_per_s
        )?;
        write!(f, "skipped {}", self.skipped)?;
        for s in &self.skipped_files {
            write!(f, "\n  {}: {}", s.path, s.reason)?;
        }
        Ok(())
    }
}

/// Files processed per parallel batch (bounded memory; order is kept within and across batches).
const BATCH: usize = 256;

/// Packs `input` into `out` (see [`PackConfig`]). `out` appears only once complete.
pub fn pack(input: &Path, out: &Path, cfg: &PackConfig) -> Result<PackSummary> {
    let start = Instant::now();
    let inputs = list_inputs(input, cfg.layout)?;
    if out.exists() && !cfg.force {
        bail!(
            "{} already exists (use --force to replace it)",
            out.display()
        );
    }
    let name = out
        .file_name()
        .with_context(|| format!("{} has no directory name", out.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = pack_into(&inputs, &tmp, cfg, start);
    match result {
        Ok(mut summary) => {
            if cfg.fsync {
                sync_dir(&tmp);
            }
            replace_dir(&tmp, out, cfg.force)?;
            if cfg.fsync {
                sync_dir(parent);
            }
            summary.out = out.to_path_buf();
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn replace_dir(tmp: &Path, out: &Path, force: bool) -> Result<()> {
    if force && out.exists() {
        let old = tmp.with_extension("old");
        std::fs::rename(out, &old)
            .with_context(|| format!("moving old {} aside", out.display()))?;
        std::fs::rename(tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}

fn progress_bar(n: u64, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn pack_into(inputs: &Inputs, dir: &Path, cfg: &PackConfig, start: Instant) -> Result<PackSummary> {
    let mut writer = DatasetWriter::new(dir, cfg.shard_bytes).with_fsync(cfg.fsync);
    let mut skipped = inputs.ignored.clone();
    let mut input_bytes = 0u64;
    let bar = progress_bar(inputs.files.len() as u64, cfg.progress);
    type Batch<'a> = Vec<(&'a InputFile, std::result::Result<Processed, String>)>;
    // Append a finished batch in order; runs while the next batch is being processed.
    let mut append = |batch: Batch, writer: &mut DatasetWriter| -> Result<()> {
        for (file, res) in batch {
            match res {
                Ok(p) => {
                    input_bytes += p.input_bytes;
                    writer.push(&NewRecord {
                        label: file.label,
                        width: p.width,
                        height: p.height,
                        encoding: p.encoding,
                        payload: &p.payload,
                        path: &file.rel,
                    })?;
                }
                Err(reason) => {
                    if cfg.strict {
                        bail!("{}: {reason} (--strict)", file.abs.display());
                    }
                    skipped.push(SkippedFile {
                        path: file.rel.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    };
    let mut pending: Option<Batch> = None;
    for chunk in inputs.files.chunks(BATCH) {
        let (done, written) = rayon::join(
            || {
                chunk
                    .par_iter()
                    .map(|f| {
                        let r = process_file(&f.abs, cfg);
                        bar.inc(1);
                        (f, r)
                    })
                    .collect::<Batch>()
            },
            || pending.take().map(|b| append(b, &mut writer)).transpose(),
        );
        written?;
        pending = Some(done);
    }
    if let Some(b) = pending.take() {
        append(b, &mut writer)?;
    }
    bar.finish_and_clear();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = writer.finish(
        inputs.classes.clone(),
        cfg.options(inputs.layout),
        skipped.clone(),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(PackSummary {
        out: dir.to_path_buf(),
        packed: manifest.records,
        skipped: skipped.len() as u64,
        skipped_files: skipped,
        classes: manifest.classes.len(),
        shards: manifest.shards.len(),
        input_bytes,
        payload_bytes: manifest.payload_bytes,
        seconds,
        mb_per_s: input_bytes as f64 / 1e6 / seconds.max(1e-9),
    })
}
