//! `verify`: re-check every record's checksum (and optionally decode it).

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use shared::shard::{Dataset, ShardError};

use crate::decode::decode_rgb;

/// A record that failed, by shard, index and original path.
#[derive(Clone, Debug, Serialize)]
pub struct BadRecord {
    pub index: u64,
    pub shard: Option<u32>,
    pub shard_file: Option<String>,
    pub path: Option<String>,
    pub error: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub decoded: bool,
    pub ok: u64,
    pub bad: Vec<BadRecord>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty()
    }
}

fn check(ds: &Dataset, index: u64, decode: bool) -> Result<(), BadRecord> {
    // Locate the record without the CRC first, so a failure can still name shard and path.
    let located = ds.record(index);
    let bad = |e: ShardError| BadRecord {
        index,
        shard: located.as_ref().ok().map(|r| r.shard),
        shard_file: located
            .as_ref()
            .ok()
            .map(|r| ds.shard_file(r.shard).to_string()),
        path: located.as_ref().ok().map(|r| r.path.to_string()),
        error: e.to_string(),
    };
    let rec = ds.record_checked(index).map_err(bad)?;
    if decode {
        decode_rgb(&rec).map_err(bad)?;
    }
    Ok(())
}

/// Opens `dir` (which checks headers, layout and index checksums) and checks every record.
pub fn verify(dir: &Path, decode: bool) -> Result<VerifyReport, ShardError> {
    let ds = Dataset::open(dir)?;
    let mut bad: Vec<BadRecord> = (0..ds.len())
        .into_par_iter()
        .filter_map(|i| check(&ds, i, decode).err())
        .collect();
    bad.sort_by_key(|b| b.index);
    Ok(VerifyReport {
        records: ds.len(),
        decoded: decode,
        ok: ds.len() - bad.len() as u64,
        bad,
    })
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BAD shard {} index {} path {}: {}",
            self.shard_file.as_deref().unwrap_or("?"),
            self.index,
            self.path.as_deref().unwrap_or("?"),
            self.error
        )
    }
}
