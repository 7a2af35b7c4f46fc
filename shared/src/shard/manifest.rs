//! `manifest.json`: the dataset-wide description of a packed directory.

use serde::{Deserialize, Serialize};

use super::Encoding;

/// File name of the manifest inside a packed directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The whole dataset: classes, shards, totals and how it was packed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"udi-shards"`.
    pub format: String,
    /// Shard format version (see FORMAT).
    pub version: u32,
    /// Class names, sorted as torchvision's ImageFolder sorts its folders; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// Records per class (same order as `classes`).
    pub class_counts: Vec<u64>,
    /// Records with label UNLABELLED.
    pub unlabelled: u64,
    /// Total records.
    pub records: u64,
    /// Total payload bytes (sum over records).
    pub payload_bytes: u64,
    pub shards: Vec<ShardInfo>,
    pub pack: PackOptions,
    /// Input files that were not packed, sorted by path.
    pub skipped: Vec<SkippedFile>,
}

/// One shard file and the global record range it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the dataset directory.
    pub file: String,
    pub first_index: u64,
    pub records: u64,
    pub payload_bytes: u64,
    /// Size of the whole shard file.
    pub file_bytes: u64,
}

/// The options the dataset was packed with (provenance; a re-pack with these reproduces it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackOptions {
    /// Target encoding: `Jpeg` (passthrough unless `max_side` is set: re-encode) or `RawZstd`.
    pub encoding: Encoding,
    /// Longest side after an optional downscale (re-encoding modes only).
    pub max_side: Option<u32>,
    /// JPEG quality of a re-encode.
    pub quality: Option<u8>,
    /// Target shard size in bytes; a shard is closed before a record that would exceed it.
    pub shard_bytes: u64,
    /// Whether every image was decoded at pack time.
    pub validate: bool,
    /// `imagefolder` (labelled by class folder), `flat` or `list` (UNLABELLED).
    pub layout: String,
}

/// An input file that was not packed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFile {
    pub path: String,
    pub reason: String,
}

impl Manifest {
    /// Stable 64-bit fingerprint of the manifest's canonical JSON.
    pub fn fingerprint(&self) -> u64 {
        let bytes = serde_json::to_vec(self).expect("manifest serialises");
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }
}
