//! An in-memory record set: a folder of image files, or encoded images built by tests.

use std::path::Path;

use anyhow::{Context, Result};
use shared::shard::{Encoding, RecordRef, UNLABELLED};

use crate::decode::{sniff, Sniffed};
use crate::source::Records;

/// One owned record.
#[derive(Clone, Debug)]
pub struct OwnedRecord {
    pub path: String,
    pub label: i32,
    pub width: u32,
    pub height: u32,
    pub encoding: Encoding,
    pub payload: Vec<u8>,
}

/// Records held in memory, in a fixed order.
#[derive(Clone, Debug, Default)]
pub struct MemRecords {
    pub records: Vec<OwnedRecord>,
}

impl MemRecords {
    /// Every regular file of `dir` (not recursive), sorted by name, unlabelled. The encoding is
    /// sniffed from the bytes; unknown bytes are kept (as `Jpeg`) so the decoder reports them.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading image folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        let mut records = Vec::with_capacity(paths.len());
        for p in paths {
            let payload = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            records.push(OwnedRecord::encoded(name, UNLABELLED, payload));
        }
        anyhow::ensure!(!records.is_empty(), "no files in {}", dir.display());
        Ok(Self { records })
    }

    pub fn push(&mut self, rec: OwnedRecord) {
        self.records.push(rec);
    }
}

impl OwnedRecord {
    /// A JPEG/PNG (or unknown) payload; size left 0 (the decoder reads it from the bytes).
    pub fn encoded(path: String, label: i32, payload: Vec<u8>) -> Self {
        let encoding = if sniff(&payload) == Sniffed::Png {
            Encoding::Png
        } else {
            Encoding::Jpeg
        };
        Self {
            path,
            label,
            width: 0,
            height: 0,
            encoding,
            payload,
        }
    }

    pub fn as_ref(&self, index: u64) -> RecordRef<'_> {
        RecordRef {
            index,
            label: self.label,
            width: self.width,
            height: self.height,
            encoding: self.encoding,
            payload: &self.payload,
            path: &self.path,
            shard: 0,
            crc32c: crc32c::crc32c(&self.payload),
        }
    }
}

impl Records for MemRecords {
    fn len(&self) -> u64 {
        self.records.len() as u64
    }

    fn record(&self, index: u64) -> Result<RecordRef<'_>> {
        let r = self
            .records
            .get(index as usize)
            .with_context(|| format!("record {index} out of range"))?;
        Ok(r.as_ref(index))
    }
}

/// Where `bench`/`preview` read records from, and the run config.
#[derive(Clone, Debug, clap::Args)]
pub struct InputArgs {
    /// Shard directory (written by shard-tool).
    #[arg(long, conflicts_with = "images", required_unless_present = "images")]
    pub shards: Option<std::path::PathBuf>,
    /// A folder of image files instead of shards.
    #[arg(long)]
    pub images: Option<std::path::PathBuf>,
    /// Run config (TOML with [data]/[augment]); the paper's recipe when absent.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

impl InputArgs {
    pub fn config(&self) -> Result<shared::config::PipelineConfig> {
        match &self.config {
            Some(p) => shared::config::PipelineConfig::from_toml_file(p),
            None => Ok(Default::default()),
        }
    }

    pub fn open(&self) -> Result<Box<dyn Records>> {
        if let Some(dir) = &self.images {
            return Ok(Box::new(MemRecords::from_dir(dir)?));
        }
        let dir = self
            .shards
            .as_ref()
            .expect("clap requires --shards or --images");
        crate::source::open_shards(dir)
    }
}
