//! Batch assembly: samples of one batch produced in parallel and packed with
//! [`BatchWriter`]. The bytes never depend on the thread count or on scheduling.

use anyhow::{Context, Result};
use rand::{Rng, RngCore};
use shared::batch::{BatchLayout, BatchWriter};
use shared::config::PipelineConfig;
use shared::geometry::{CropMeta, Sample, SampleSource, SrsRow};
use shared::rng::{sample_rng, Slice};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

/// Fills `out` with batch `batch` of `epoch` (permutation `perm`) using `threads` workers.
#[allow(clippy::too_many_arguments)]
pub fn fill_batch(
    source: &dyn SampleSource,
    cfg: &PipelineConfig,
    layout: &BatchLayout,
    perm: &[u64],
    epoch: u64,
    batch: u64,
    threads: usize,
    out: &mut [u8],
) -> Result<()> {
    let never = AtomicBool::new(false);
    fill_batch_until(
        source,
        cfg,
        layout,
        perm,
        Slice::WHOLE,
        epoch,
        batch,
        threads,
        out,
        &never,
        &|| {},
    )?;
    Ok(())
}

/// [`fill_batch`] of a data-parallel rank's batch `batch` ([`Slice`]) that gives up between
/// samples once `stop` is raised: returns `Ok(false)` when the batch was abandoned (its bytes
/// are then incomplete). `progress` is called (on this thread) after each sample is written: a
/// loader's heartbeat, so that a stuck sample shows.
#[allow(clippy::too_many_arguments)]
pub fn fill_batch_until(
    source: &dyn SampleSource,
    cfg: &PipelineConfig,
    layout: &BatchLayout,
    perm: &[u64],
    slice: Slice,
    epoch: u64,
    batch: u64,
    threads: usize,
    out: &mut [u8],
    stop: &AtomicBool,
    progress: &dyn Fn(),
) -> Result<bool> {
    let indices = slice.samples(perm, batch, cfg.data.batch_size);
    let mut writer = BatchWriter::new(layout, out, epoch, batch, &cfg.augment);
    let produce = |b: usize| {
        source.produce(epoch, indices[b]).with_context(|| {
            format!(
                "epoch {epoch} batch {batch}: sample {} (position {b})",
                indices[b]
            )
        })
    };
    if threads <= 1 {
        for b in 0..indices.len() {
            if stop.load(Relaxed) {
                return Ok(false);
            }
            writer.write_sample(b, &produce(b)?);
            progress();
        }
        return Ok(true);
    }
    // Workers pull positions from a counter and hand finished samples to this thread, which
    // owns the writer: each sample lands at its fixed position, whatever the arrival order.
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let (tx, rx) = crossbeam::channel::bounded::<(usize, Result<Sample>)>(2 * threads);
    let mut written = 0;
    let mut failure = None;
    crossbeam::scope(|scope| {
        for _ in 0..threads.min(indices.len()) {
            let tx = tx.clone();
            let (next, abort, produce) = (&next, &abort, &produce);
            scope.spawn(move |_| loop {
                let b = next.fetch_add(1, Relaxed);
                if b >= indices.len() || abort.load(Relaxed) || stop.load(Relaxed) {
                    break;
                }
                if tx.send((b, produce(b))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (b, sample) in rx.iter() {
            match sample {
                Ok(s) => {
                    writer.write_sample(b, &s);
                    written += 1;
                    progress();
                }
                Err(e) => {
                    failure = Some(e);
                    abort.store(true, Relaxed);
                    break;
                }
            }
        }
        drop(rx);
    })
    .map_err(|_| anyhow::anyhow!("epoch {epoch} batch {batch}: a worker thread panicked"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(written == indices.len())
}

/// A deterministic stand-in for the crop engine: every byte and row of sample `index` in `epoch`
/// comes from the counter-based RNG of (seed, epoch, index). Used by tests and `--synthetic N`,
/// so ring checks need no image data. `work` adds that many extra hashing passes over the crops
/// per sample to emulate decode/augment cost in benchmarks.
pub struct SyntheticSource {
    cfg: PipelineConfig,
    n: u64,
    work: u32,
}

impl SyntheticSource {
    pub fn new(cfg: &PipelineConfig, n: u64) -> Self {
        Self {
            cfg: cfg.clone(),
            n,
            work: 0,
        }
    }
    pub fn with_work(mut self, work: u32) -> Self {
        self.work = work;
        self
    }
    /// Stands in for the shard reader's dataset id.
    pub fn dataset_id(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(format!("synthetic:{}", self.n).as_bytes())
    }
}

impl SampleSource for SyntheticSource {
    fn len(&self) -> u64 {
        self.n
    }

    fn produce(&self, epoch: u64, index: u64) -> Result<Sample> {
        anyhow::ensure!(
            index < self.n,
            "synthetic source has {} samples, asked for {index}",
            self.n
        );
        let a = &self.cfg.augment;
        let mut rng = sample_rng(self.cfg.data.seed, epoch, index);
        let l = a.n_local as usize;
        let (n_g, n_l) = (a.global_samples() as usize, a.local_samples() as usize);
        let mut globals = vec![0u8; 2 * (a.global_size * a.global_size * 3) as usize];
        let mut locals = vec![0u8; l * (a.local_size * a.local_size * 3) as usize];
        rng.fill_bytes(&mut globals);
        rng.fill_bytes(&mut locals);
        let mut acc = 0u64;
        for _ in 0..self.work {
            acc ^= xxhash_rust::xxh3::xxh3_64_with_seed(&globals, acc)
                ^ xxhash_rust::xxh3::xxh3_64(&locals);
        }
        std::hint::black_box(acc);
        let crops = (0..2 + l)
            .map(|_| CropMeta {
                img_h: 256,
                img_w: 320,
                top: rng.random_range(0..128),
                left: rng.random_range(0..160),
                h: rng.random_range(16..128),
                w: rng.random_range(16..160),
                hflip: rng.random_range(0..2),
            })
            .collect();
        let g_cells = a.global_grid() * a.global_grid();
        let l_cells = a.local_grid() * a.local_grid();
        let global_mask = (0..n_g)
            .map(|_| rng.random_range(0..g_cells) as u16)
            .collect();
        let local_mask = (0..n_l)
            .map(|_| rng.random_range(0..l_cells) as u16)
            .collect();
        let n_valid: Vec<u32> = (0..2 + 2 * l)
            .map(|p| rng.random_range(0..=if p < 2 { n_g } else { n_l }) as u32)
            .collect();
        // Rows in the documented format: valid rows first (source index inside the source
        // crop's grid), then all-zero invalid rows, so the trainer accepts these batches too.
        let mut rows = Vec::with_capacity(2 * n_g + 2 * l * n_l);
        for (p, &valid) in n_valid.iter().enumerate() {
            let (n, src_cells) = if p < 2 {
                (n_g, g_cells)
            } else {
                (n_l, l_cells)
            };
            for r in 0..n as u32 {
                rows.push(if r < valid {
                    SrsRow {
                        src: rng.random_range(0..src_cells) as u16,
                        _pad: 0,
                        tgt: [0; 4].map(|_| rng.random_range(0..g_cells) as u16),
                        w: [0.25; 4],
                    }
                } else {
                    SrsRow::default()
                });
            }
        }
        Ok(Sample {
            index,
            label: (index % 10) as i32,
            globals,
            locals,
            crops,
            global_mask,
            local_mask,
            n_valid,
            rows,
            photo: vec![shared::geometry::PhotoRecord::default(); 2 + l],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::batch::{BatchView, OwnedBatch};
    use shared::config::AugmentConfig;
    use shared::rng::epoch_permutation;

    fn cfg() -> PipelineConfig {
        let mut c = PipelineConfig::default();
        c.data.batch_size = 6;
        c.augment = AugmentConfig {
            global_size: 32,
            local_size: 16,
            n_local: 2,
            patch_size: 8,
            global_window: 2,
            local_window: 2,
            ..Default::default()
        };
        c
    }

    #[test]
    fn batch_bytes_do_not_depend_on_threads() {
        let c = cfg();
        let src = SyntheticSource::new(&c, 30);
        let layout = BatchLayout::new(&c.augment, c.data.batch_size);
        let perm = epoch_permutation(c.data.seed, 2, 30);
        let mut hashes = Vec::new();
        for threads in [1, 2, 5] {
            let mut buf = OwnedBatch::zeroed(&layout);
            fill_batch(&src, &c, &layout, &perm, 2, 3, threads, buf.bytes_mut()).unwrap();
            let v = BatchView::new(&layout, buf.bytes()).unwrap();
            assert_eq!(v.indices(), &perm[18..24]);
            assert_eq!((v.header().epoch, v.header().batch), (2, 3));
            hashes.push(v.hash());
        }
        assert!(hashes.iter().all(|&h| h == hashes[0]), "{hashes:x?}");
        // Another epoch gives other crops of the same sample.
        let a = src.produce(0, 5).unwrap();
        assert_ne!(a.globals, src.produce(1, 5).unwrap().globals);
        assert_eq!(a, src.produce(0, 5).unwrap());
    }

    #[test]
    fn source_errors_name_the_sample_and_stop_abandons() {
        let c = cfg();
        let src = SyntheticSource::new(&c, 30);
        let layout = BatchLayout::new(&c.augment, c.data.batch_size);
        let perm: Vec<u64> = (0..36).collect(); // index 30.. do not exist
        let mut buf = OwnedBatch::zeroed(&layout);
        // A heartbeat per sample written, on any thread count (the loader's progress signal).
        for threads in [1, 3] {
            let beats = AtomicUsize::new(0);
            let never = AtomicBool::new(false);
            let beat = || {
                beats.fetch_add(1, Relaxed);
            };
            let out = buf.bytes_mut();
            assert!(fill_batch_until(
                &src,
                &c,
                &layout,
                &perm,
                Slice::WHOLE,
                0,
                1,
                threads,
                out,
                &never,
                &beat
            )
            .unwrap());
            assert_eq!(beats.load(Relaxed), c.data.batch_size as usize);
        }
        let err = fill_batch(&src, &c, &layout, &perm, 0, 5, 3, buf.bytes_mut()).unwrap_err();
        assert!(
            format!("{err:#}").contains("epoch 0 batch 5: sample 3"),
            "{err:#}"
        );
        let stop = AtomicBool::new(true);
        assert!(!fill_batch_until(
            &src,
            &c,
            &layout,
            &perm,
            Slice::WHOLE,
            0,
            0,
            2,
            buf.bytes_mut(),
            &stop,
            &|| {}
        )
        .unwrap());
    }
}
