//! FORMAT of the on-disk shards. The types below are the reader's public face, which the loader
//! builds on; the shard issue fills in the format, the writer and the reader.

use std::fmt;

/// Label of a record packed from a flat folder or file list (no class).
pub const UNLABELLED: i32 = -1;

/// How a record's payload is stored.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Encoding {
    /// The original JPEG bytes, untouched (or re-encoded with `--encoding jpeg`).
    Jpeg = 0,
    /// PNG bytes (sniffed by magic, whatever the file's extension).
    Png = 1,
    /// zstd-compressed RGB8 pixels, `height × width × 3`, row-major.
    RawZstd = 2,
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
}

impl fmt::Display for RecordRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {} (shard {}, {})", self.index, self.shard, self.path)
    }
}
