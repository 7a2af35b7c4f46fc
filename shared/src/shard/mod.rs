//! The on-disk shard format, its writer and its memory-mapped reader.
//!
//! # FORMAT (version 1)
//!
//! A packed dataset is a directory:
//!
//! ```text
//! <dir>/manifest.json        the Manifest (JSON, written last: a dir without it is not a dataset)
//! <dir>/shard-00000.bin      shard 0
//! <dir>/shard-00001.bin      ...
//! ```
//!
//! Records are numbered by a *global sample index* `0..manifest.records`; shard `s` holds the
//! contiguous range `shards[s].first_index .. first_index + records`. Records never straddle
//! shards. The reader finds a record in O(1): a binary search over the (few) shard start indices,
//! then one fixed-size index entry at `index_offset + 32 * local_index` in the memory-mapped file.
//!
//! Every integer is **little-endian**. A shard file is:
//!
//! ```text
//! offset            size  field
//! 0                 128   header
//! 128               ...   payloads, concatenated in record order, no padding
//! index_offset      32*n  index: one fixed-size entry per record (stored raw, for O(1) access)
//! meta_offset       m     path table: one zstd frame (ends exactly at the end of the file)
//! ```
//!
//! Header (128 bytes):
//!
//! ```text
//!   0  [u8; 8]  magic = b"UDISHARD"
//!   8  u32      version = 1
//!  12  u32      shard_id (= position in manifest.shards)
//!  16  u64      first_index: global index of the shard's record 0
//!  24  u64      record_count n
//!  32  u64      index_offset (= 128 + total payload bytes)
//!  40  u64      meta_offset (= index_offset + 32 * n)
//!  48  u32      meta_len: compressed bytes of the path table (meta_offset + meta_len = file size)
//!  52  u32      meta_raw_len: bytes of the path table once decompressed
//!  56  u32      index_crc: CRC32C of the n index entries
//!  60  u32      meta_crc: CRC32C of the compressed path table
//!  64  [u8; 60] reserved, zero
//! 124  u32      header_crc: CRC32C of header bytes 0..124
//! ```
//!
//! Index entry (32 bytes):
//!
//! ```text
//!   0  u64  payload offset from the start of the shard file (>= 128, payload ends <= index_offset)
//!   8  u32  payload byte length
//!  12  u32  CRC32C (Castagnoli) of the payload
//!  16  i32  label: class number into manifest.classes, or UNLABELLED = -1
//!  20  u32  width in pixels (of the stored image)
//!  24  u32  height in pixels
//!  28  u8   encoding: 0 = Jpeg, 1 = Png, 2 = RawZstd (see [`Encoding`])
//!  29  [u8; 3] reserved, zero
//! ```
//!
//! Path table, once decompressed (`meta_raw_len` bytes): `n` u32 end offsets, then the UTF-8
//! relative paths (`/`-separated, relative to the packed root) concatenated; path `i` is
//! `strings[end[i-1] .. end[i]]` (with `end[-1] = 0`). It is decompressed lazily, on the first
//! access to a shard's paths.
//!
//! zstd is used where it pays: the path table (paths compress ~5-10x) and `RawZstd` payloads.
//! JPEG payloads do not compress (ratio ~1.00) and are stored as the original bytes; the index is
//! stored raw because O(1) random access into a memory map needs fixed-size entries.
//!
//! The manifest (see [`Manifest`]) holds the class names (sorted folder names, as torchvision's
//! `ImageFolder`), per-class counts, the shard list with record ranges and sizes, totals, the pack
//! options and the files skipped at pack time. [`Dataset::dataset_id`] fingerprints it.
//!
//! Reading is defensive: every offset and length read from disk is bounds-checked against the
//! mapped file before use, decompression sizes are capped, and any inconsistency is a
//! [`ShardError`] naming the shard file (and record), never a panic.

mod format;
mod manifest;
mod reader;
mod writer;

use std::fmt;
use std::path::PathBuf;

pub use format::{ENTRY_LEN, HEADER_LEN, MAGIC, VERSION};
pub use manifest::{Manifest, PackOptions, ShardInfo, SkippedFile, MANIFEST_FILE};
pub use reader::Dataset;
pub use writer::{shard_file_name, DatasetWriter, NewRecord, ShardWriter};

/// Label of a record packed from a flat folder or file list (no class).
pub const UNLABELLED: i32 = -1;

/// How a record's payload is stored.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Encoding {
    /// The original JPEG bytes, untouched (or re-encoded with `--encoding jpeg`).
    Jpeg = 0,
    /// PNG bytes (sniffed by magic, whatever the file's extension).
    Png = 1,
    /// zstd-compressed RGB8 pixels, `height × width × 3`, row-major.
    RawZstd = 2,
}

impl Encoding {
    /// The on-disk byte back to an encoding (`None` for an unknown value).
    pub fn from_u8(v: u8) -> Option<Encoding> {
        match v {
            0 => Some(Encoding::Jpeg),
            1 => Some(Encoding::Png),
            2 => Some(Encoding::RawZstd),
            _ => None,
        }
    }

    /// Short lower-case name, as used on the command line (`jpeg`, `png`, `raw`).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Jpeg => "jpeg",
            Encoding::Png => "png",
            Encoding::RawZstd => "raw",
        }
    }
}

/// One record, borrowed from the memory-mapped shard.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    /// Global sample index.
    pub index: u64,
    pub label: i32,
    pub width: u32,
    pub height: u32,
    pub encoding: Encoding,
    pub payload: &'a [u8],
    /// Original path relative to the packed root (for error messages and provenance).
    pub path: &'a str,
    /// Shard number that holds the record.
    pub shard: u32,
    /// CRC32C of the payload, as stored in the index.
    pub crc32c: u32,
}

impl fmt::Display for RecordRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "record {} (shard {}, {})",
            self.index, self.shard, self.path
        )
    }
}

/// Everything that can go wrong reading or writing shards. Each variant names the file or shard
/// (and the record, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: bad manifest: {msg}", path.display())]
    Manifest { path: PathBuf, msg: String },
    #[error("{file}: corrupt shard: {msg}")]
    Corrupt { file: String, msg: String },
    #[error("record {index} ({file}, {path}): {msg}")]
    BadRecord {
        index: u64,
        file: String,
        path: String,
        msg: String,
    },
    #[error("record {index} ({file}, {path}): CRC32C mismatch (index says {expected:08x}, payload has {actual:08x})")]
    Checksum {
        index: u64,
        file: String,
        path: String,
        expected: u32,
        actual: u32,
    },
    #[error("record {index} out of range: the dataset has {len} records")]
    OutOfRange { index: u64, len: u64 },
    #[error("record {index} ({path}): cannot decode: {msg}")]
    Decode {
        index: u64,
        path: String,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ShardError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> ShardError {
        ShardError::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
