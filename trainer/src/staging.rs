//! A batch copied out of its slot ([`Staged`]): the crops' uint8 bytes and the dense SRS rows in
//! staging buffers ([`StageBuf`]: host vectors, or page-locked memory on CUDA), the rest in
//! small vectors. Once staged, the slot can be handed back to the loaders; the device tensors
//! are then made from the buffers by an [`Upload`] (`TrainBatch::from_staged`).

use crate::data::dense_rows;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use shared::batch::BatchView;
use shared::config::AugmentConfig;
use shared::geometry::PhotoRecord;
use std::ops::Range;

/// Where each tensor of a batch sits in the staging buffers, and its shape (see `crate::data`).
pub struct StageLayout {
    /// Bytes of crops: the 2B global views (view-major), then the L·B local crops (crop-major).
    pub pixels: usize,
    /// f32 values of the dense rows: student, teacher, valid_g, valid_l.
    pub rows: usize,
    pub globals: (Range<usize>, [usize; 4]),
    pub locals: (Range<usize>, [usize; 4]),
    /// student_rows, teacher_rows, valid_g, valid_l.
    pub row_parts: [(Range<usize>, Vec<usize>); 4],
}

impl StageLayout {
    pub fn new(aug: &AugmentConfig, batch_size: usize) -> Self {
        let (b, l) = (batch_size, aug.n_local as usize);
        let (sg, sl) = (aug.global_size as usize, aug.local_size as usize);
        let (n_g, n_l) = (aug.global_samples() as usize, aug.local_samples() as usize);
        let ng2 = (aug.global_grid() * aug.global_grid()) as usize;
        let g = 2 * b * sg * sg * 3;
        let lc = l * b * sl * sl * 3;
        let shapes = [
            vec![2 * b, n_g, ng2],
            vec![2 * b, n_g + l * n_l, ng2],
            vec![2, b, n_g],
            vec![2, b, l, n_l],
        ];
        let mut at = 0;
        let row_parts = shapes.map(|s| {
            let n: usize = s.iter().product();
            at += n;
            (at - n..at, s)
        });
        Self {
            pixels: g + lc,
            rows: at,
            globals: (0..g, [2 * b, sg, sg, 3]),
            locals: (g..g + lc, [l * b, sl, sl, 3]),
            row_parts,
        }
    }
}

/// Staging memory for one batch.
pub trait StageBuf {
    /// Buffers of exactly `pixels` bytes and `rows` f32 values (contents unspecified).
    fn get(&mut self, pixels: usize, rows: usize) -> Result<(&mut [u8], &mut [f32])>;
}

/// Staging in ordinary host memory.
#[derive(Default)]
pub struct HostStage {
    pub pixels: Vec<u8>,
    pub rows: Vec<f32>,
}

impl StageBuf for HostStage {
    fn get(&mut self, pixels: usize, rows: usize) -> Result<(&mut [u8], &mut [f32])> {
        self.pixels.resize(pixels, 0);
        self.rows.resize(rows, 0.0);
        Ok((&mut self.pixels, &mut self.rows))
    }
}

impl HostStage {
    /// Uploads by copying from these buffers onto `device` (synchronously).
    pub fn upload<'a>(&'a self, device: &'a Device) -> HostUpload<'a> {
        HostUpload {
            pixels: &self.pixels,
            rows: &self.rows,
            device,
        }
    }
}

/// Makes device tensors from ranges of the staging buffers.
pub trait Upload {
    /// A uint8 tensor of `shape` from `range` of the pixel buffer.
    fn pixels(&self, range: Range<usize>, shape: &[usize]) -> Result<Tensor>;
    /// An f32 tensor of `shape` from `range` of the row buffer.
    fn rows(&self, range: Range<usize>, shape: &[usize]) -> Result<Tensor>;
}

pub struct HostUpload<'a> {
    pixels: &'a [u8],
    rows: &'a [f32],
    device: &'a Device,
}

impl Upload for HostUpload<'_> {
    fn pixels(&self, range: Range<usize>, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.pixels[range], shape, self.device)?)
    }
    fn rows(&self, range: Range<usize>, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.rows[range], shape, self.device)?)
    }
}

/// A staged batch's small parts; its crops and rows are in the [`StageBuf`] it was staged into.
#[derive(Clone, Debug)]
pub struct Staged {
    pub batch_size: usize,
    pub epoch: u64,
    /// Batch number within the epoch.
    pub index: u64,
    /// Photometric records of the globals and the locals (tensor order), when the loader left
    /// the pipeline to the trainer's device.
    pub photo: Option<(Vec<PhotoRecord>, Vec<PhotoRecord>)>,
    pub labels: Vec<i32>,
    /// The dataset index of each sample (the batch's `indices` section).
    pub indices: Vec<u64>,
}

impl Staged {
    /// Copies `view`'s crops and dense rows into `buf`; nothing borrows `view` afterwards.
    pub fn from_view(
        view: &BatchView,
        aug: &AugmentConfig,
        buf: &mut dyn StageBuf,
    ) -> Result<Self> {
        let lay = view.layout;
        let (b, l) = (lay.batch_size, lay.n_local);
        let h = view.header();
        ensure!(
            lay.global_size == aug.global_size as usize
                && lay.local_size == aug.local_size as usize,
            "batch crop sizes do not match [augment]"
        );
        ensure!(
            l == aug.n_local as usize,
            "batch has {l} local crops, [augment] n_local = {}",
            aug.n_local
        );
        let sl = StageLayout::new(aug, b);
        let (pixels, rows) = buf.get(sl.pixels, sl.rows)?;
        let gn = view.global_view(0).len();
        pixels[..gn].copy_from_slice(view.global_view(0));
        pixels[gn..2 * gn].copy_from_slice(view.global_view(1));
        let mut at = sl.locals.0.start;
        for k in 0..l {
            let crop = view.local_view(k);
            pixels[at..at + crop.len()].copy_from_slice(crop);
            at += crop.len();
        }
        let rows_fn = |bb: usize, p: usize| view.pair_rows(bb, p);
        let host = crate::data::HostRows {
            batch_size: b,
            n_local: l,
            n_valid: view.n_valid(),
            rows: &rows_fn,
        };
        dense_rows(aug, &host, rows)
            .map_err(|e| anyhow::anyhow!("batch (epoch {}, batch {}): {e:#}", h.epoch, h.batch))?;
        // Photometric records in the image tensors' order (view-major, crop-major).
        let photo = view.photometric_pending().then(|| {
            let p = view.photo();
            let crops = |r: Range<usize>| -> Vec<PhotoRecord> {
                r.flat_map(|c| (0..b).map(move |bb| p[bb * (2 + l) + c]))
                    .collect()
            };
            (crops(0..2), crops(2..2 + l))
        });
        Ok(Self {
            batch_size: b,
            epoch: h.epoch,
            index: h.batch,
            photo,
            labels: view.labels().to_vec(),
            indices: view.indices().to_vec(),
        })
    }
}
