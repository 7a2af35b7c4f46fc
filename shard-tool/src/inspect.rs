//! `inspect`: a summary of a packed dataset, or one record's metadata.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use shared::shard::{Dataset, ShardError, UNLABELLED};

/// Buckets of the longer image side.
const SIDE_BUCKETS: [(u32, &str); 7] = [
    (64, "<64"),
    (128, "64-127"),
    (256, "128-255"),
    (512, "256-511"),
    (1024, "512-1023"),
    (2048, "1024-2047"),
    (u32::MAX, ">=2048"),
];

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub dataset_id: String,
    pub records: u64,
    /// Number of classes.
    pub classes: usize,
    pub class_names: Vec<String>,
    /// Records per class name, plus `"(unlabelled)"` when there are any.
    pub class_counts: BTreeMap<String, u64>,
    pub shards: usize,
    pub payload_bytes: u64,
    pub file_bytes: u64,
    pub encodings: BTreeMap<String, u64>,
    /// Records per bucket of the longer side (pixels).
    pub max_side_histogram: BTreeMap<String, u64>,
    pub min_width: u32,
    pub max_width: u32,
    pub min_height: u32,
    pub max_height: u32,
    pub mean_width: f64,
    pub mean_height: f64,
    pub skipped_at_pack: usize,
    pub layout: String,
}

pub fn summarize(ds: &Dataset) -> Result<Summary, ShardError> {
    let m = ds.manifest();
    let mut encodings = BTreeMap::new();
    let mut hist: BTreeMap<String, u64> = SIDE_BUCKETS
        .iter()
        .map(|(_, n)| (n.to_string(), 0))
        .collect();
    let (mut min_w, mut max_w, mut min_h, mut max_h) = (u32::MAX, 0, u32::MAX, 0);
    let (mut sum_w, mut sum_h) = (0f64, 0f64);
    for i in 0..ds.len() {
        let r = ds.record(i)?;
        *encodings
            .entry(r.encoding.name().to_string())
            .or_insert(0u64) += 1;
        let side = r.width.max(r.height);
        let bucket = SIDE_BUCKETS.iter().find(|(lim, _)| side < *lim).unwrap().1;
        *hist.get_mut(bucket).unwrap() += 1;
        min_w = min_w.min(r.width);
        max_w = max_w.max(r.width);
        min_h = min_h.min(r.height);
        max_h = max_h.max(r.height);
        sum_w += r.width as f64;
        sum_h += r.height as f64;
    }
    let n = ds.len().max(1) as f64;
    let mut class_counts: BTreeMap<String, u64> = m
        .classes
        .iter()
        .cloned()
        .zip(m.class_counts.iter().copied())
        .collect();
    if m.unlabelled > 0 {
        class_counts.insert("(unlabelled)".into(), m.unlabelled);
    }
    Ok(Summary {
        dataset_id: format!("{:016x}", ds.dataset_id()),
        records: ds.len(),
        classes: m.classes.len(),
        class_names: m.classes.clone(),
        class_counts,
        shards: m.shards.len(),
        payload_bytes: m.payload_bytes,
        file_bytes: m.shards.iter().map(|s| s.file_bytes).sum(),
        encodings,
        max_side_histogram: hist,
        min_width: if ds.is_empty() { 0 } else { min_w },
        max_width: max_w,
        min_height: if ds.is_empty() { 0 } else { min_h },
        max_height: max_h,
        mean_width: sum_w / n,
        mean_height: sum_h / n,
        skipped_at_pack: m.skipped.len(),
        layout: m.pack.layout.clone(),
    })
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset {} ({} layout)", self.dataset_id, self.layout)?;
        writeln!(
            f,
            "records {}  classes {}  shards {}  payload {:.1} MB  on disk {:.1} MB  skipped at pack {}",
            self.records,
            self.classes,
            self.shards,
            self.payload_bytes as f64 / 1e6,
            self.file_bytes as f64 / 1e6,
            self.skipped_at_pack
        )?;
        writeln!(f, "encodings: {:?}", self.encodings)?;
        writeln!(
            f,
            "width {}..{} (mean {:.0})  height {}..{} (mean {:.0})",
            self.min_width,
            self.max_width,
            self.mean_width,
            self.min_height,
            self.max_height,
            self.mean_height
        )?;
        writeln!(f, "longer side:")?;
        for (_, name) in SIDE_BUCKETS {
            writeln!(f, "  {name:>10}  {}", self.max_side_histogram[name])?;
        }
        writeln!(f, "per class:")?;
        for (name, n) in &self.class_counts {
            writeln!(f, "  {name:>24}  {n}")?;
        }
        Ok(())
    }
}

/// One record's metadata (`inspect --index N`).
#[derive(Clone, Debug, Serialize)]
pub struct RecordInfo {
    pub index: u64,
    pub shard: u32,
    pub shard_file: String,
    pub label: i32,
    pub class: Option<String>,
    pub width: u32,
    pub height: u32,
    pub encoding: String,
    pub bytes: usize,
    pub crc32c: String,
    pub crc_ok: bool,
    pub path: String,
}

pub fn record_info(ds: &Dataset, index: u64) -> Result<RecordInfo, ShardError> {
    let r = ds.record(index)?;
    Ok(RecordInfo {
        index,
        shard: r.shard,
        shard_file: ds.shard_file(r.shard).to_string(),
        label: r.label,
        class: (r.label != UNLABELLED).then(|| ds.class_names()[r.label as usize].clone()),
        width: r.width,
        height: r.height,
        encoding: r.encoding.name().into(),
        bytes: r.payload.len(),
        crc32c: format!("{:08x}", r.crc32c),
        crc_ok: crc32c::crc32c(r.payload) == r.crc32c,
        path: r.path.to_string(),
    })
}
