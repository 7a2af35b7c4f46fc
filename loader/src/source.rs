//! [`DatasetSource`]: the crop engine over a record set, as a [`SampleSource`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Result};
use shared::geometry::{Sample, SampleSource};
use shared::shard::RecordRef;

use crate::decode::{decode, RgbImage};
use crate::engine::CropEngine;

/// Random access to records: the shard reader (`shared::shard::Dataset`) or an in-memory set.
pub trait Records: Send + Sync {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn record(&self, index: u64) -> Result<RecordRef<'_>>;
}

/// Turns (epoch, index) into a finished sample: decode the record, run the crop engine with the
/// run's seed. Records that fail their CRC or do not decode are logged once, counted, and
/// replaced by the next good index (index+1, +2, … mod len): the replacement depends on nothing
/// but the data, so it is the same whatever the number of loader processes, and the sample's
/// `index` (the batch's indices section) is the one used, from which the trainer counts the
/// replaced ones.
pub struct DatasetSource<R: Records> {
    records: R,
    engine: CropEngine,
    seed: u64,
    skipped: AtomicU64,
    logged: Mutex<std::collections::HashSet<u64>>,
}

impl<R: Records> DatasetSource<R> {
    pub fn new(records: R, engine: CropEngine, seed: u64) -> Self {
        Self {
            records,
            engine,
            seed,
            skipped: AtomicU64::new(0),
            logged: Mutex::new(Default::default()),
        }
    }

    /// How many times an undecodable record was met and replaced (every occurrence counts).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    pub fn records(&self) -> &R {
        &self.records
    }

    pub fn engine(&self) -> &CropEngine {
        &self.engine
    }

    /// The first decodable record at or after `index` (wrapping), with its label and index.
    pub fn decode_from(&self, index: u64) -> Result<(u64, i32, RgbImage)> {
        let n = self.records.len();
        if n == 0 {
            bail!("empty dataset");
        }
        for step in 0..n {
            let i = (index + step) % n;
            let result = self
                .records
                .record(i)
                .and_then(|rec| Ok((rec.label, decode(&rec)?)));
            match result {
                Ok((label, img)) => return Ok((i, label, img)),
                Err(e) => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    if self.logged.lock().map(|mut s| s.insert(i)).unwrap_or(false) {
                        eprintln!("loader: skipping index {i}: {e:#}");
                    }
                }
            }
        }
        bail!("no decodable record in the dataset ({n} records)")
    }
}

impl<R: Records> SampleSource for DatasetSource<R> {
    fn len(&self) -> u64 {
        self.records.len()
    }

    fn produce(&self, epoch: u64, index: u64) -> Result<Sample> {
        let (used, label, img) = self.decode_from(index)?;
        // Crops are keyed by the index actually used, so a replaced sample equals that record's.
        Ok(self.engine.make_sample(&img, self.seed, epoch, used, label))
    }
}

/// Opens a shard directory (written by shard-tool) as records.
pub fn open_shards(dir: &std::path::Path) -> Result<Box<dyn Records>> {
    let ds = shared::shard::Dataset::open(dir)
        .map_err(|e| anyhow::anyhow!("opening shards {}: {e}", dir.display()))?;
    Ok(Box::new(ds))
}

/// Every payload's CRC32C is checked as it is read (`loader bench` reports the cost next to the
/// decode's): a damaged record is replaced like an undecodable one, never served.
impl Records for shared::shard::Dataset {
    fn len(&self) -> u64 {
        shared::shard::Dataset::len(self)
    }
    fn record(&self, index: u64) -> Result<RecordRef<'_>> {
        shared::shard::Dataset::record_checked(self, index).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

impl Records for Box<dyn Records> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn record(&self, index: u64) -> Result<RecordRef<'_>> {
        (**self).record(index)
    }
}

/// The crop engine over a shard directory, with the dataset id the ring handshake needs:
/// what `loader run --shards DIR` plugs in (`daemon::open_source`).
pub fn open_dataset_source(
    dir: &std::path::Path,
    cfg: &shared::config::PipelineConfig,
) -> Result<(DatasetSource<shared::shard::Dataset>, u64)> {
    let ds = shared::shard::Dataset::open(dir)
        .map_err(|e| anyhow::anyhow!("opening shards {}: {e}", dir.display()))?;
    let id = ds.dataset_id();
    Ok((
        DatasetSource::new(ds, CropEngine::new(cfg.augment.clone()), cfg.data.seed),
        id,
    ))
}
