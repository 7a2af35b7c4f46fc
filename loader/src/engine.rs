//! The multi-crop engine: one decoded image + (seed, epoch, index) → one [`Sample`].
//!
//! Per crop, as torchvision's `RandomResizedCrop` + `RandomHorizontalFlip` run on a PIL image:
//! crop rectangle → Pillow's antialiased bicubic resize of the crop ([`crate::resample`], bit
//! for bit Pillow 13's, or Pillow ≤ 12's pass order with `resize = "pillow12"`) → horizontal
//! flip (a permutation of the resized pixels, folded into the first photometric pass) →
//! photometric pipeline ([`crate::fused`]). With `[augment] resize = "fast"` a crop that
//! downsamples by at most 2× is resized by [`crate::fast_resize`] instead (a documented
//! deviation: other pixel values, same geometry). Every random draw comes from
//! `shared::rng::sample_rng(seed, epoch, index)` in a fixed order: geometry, SRS masks, then the
//! photometric parameters of each crop in crop order.

use std::cell::RefCell;
use std::time::Instant;

use shared::config::{AugmentConfig, ResizeMode};
use shared::geometry::{global_pair, local_pair, Sample, SrsRow};

use crate::crops::sample_crops;
use crate::decode::RgbImage;
use crate::fast_resize::{fast_eligible, FastResizer};
use crate::photometric::{PhotoParams, PhotoScratch};
use crate::resample::{PassOrder, Resampler};
use crate::srs::{project_rows, sampling_mask};

/// Seconds spent per stage, accumulated over calls (for `loader bench`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub decode: f64,
    pub geometry: f64,
    pub resize: f64,
    pub photometric: f64,
}

impl StageTimes {
    pub fn add(&mut self, o: &StageTimes) {
        self.decode += o.decode;
        self.geometry += o.geometry;
        self.resize += o.resize;
        self.photometric += o.photometric;
    }
    pub fn total(&self) -> f64 {
        self.decode + self.geometry + self.resize + self.photometric
    }
}

struct Scratch {
    resample: Resampler,
    fast: FastResizer,
    photo: PhotoScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        resample: Resampler::default(),
        fast: FastResizer::default(),
        photo: PhotoScratch::default(),
    });
}

/// Turns decoded images into samples; cheap to share between threads (`&self` only).
#[derive(Clone, Debug)]
pub struct CropEngine {
    aug: AugmentConfig,
}

impl CropEngine {
    pub fn new(aug: AugmentConfig) -> Self {
        Self { aug }
    }

    pub fn aug(&self) -> &AugmentConfig {
        &self.aug
    }

    /// All crops, masks and rows of sample `index` of `epoch` (see `shared::geometry::Sample`).
    pub fn make_sample(
        &self,
        img: &RgbImage,
        seed: u64,
        epoch: u64,
        index: u64,
        label: i32,
    ) -> Sample {
        let mut s = Sample::default();
        self.make_sample_into(
            img,
            seed,
            epoch,
            index,
            label,
            self.aug.photometric.is_loader(),
            &mut s,
            &mut StageTimes::default(),
        );
        s
    }

    /// [`Self::make_sample`] into a reused `Sample`; `photometric = false` stops after the
    /// resize and flip (bench stage b, and `[augment] photometric = "device"`, where the trainer
    /// applies `out.photo`); `times` accumulates per-stage seconds.
    #[allow(clippy::too_many_arguments)]
    pub fn make_sample_into(
        &self,
        img: &RgbImage,
        seed: u64,
        epoch: u64,
        index: u64,
        label: i32,
        photometric: bool,
        out: &mut Sample,
        times: &mut StageTimes,
    ) {
        let aug = &self.aug;
        let t0 = Instant::now();
        let mut rng = shared::rng::sample_rng(seed, epoch, index);
        let crops = sample_crops(aug, img.height, img.width, &mut rng);
        let (gg, lg) = (aug.global_grid(), aug.local_grid());
        out.global_mask = sampling_mask(gg, aug.global_window, &mut rng);
        out.local_mask = sampling_mask(lg, aug.local_window, &mut rng);
        let photo: Vec<PhotoParams> = crops
            .iter()
            .map(|_| PhotoParams::draw(aug, &mut rng))
            .collect();
        out.photo.clear();
        out.photo.extend(photo.iter().map(PhotoParams::record));

        let (ng, nl) = (aug.global_samples() as usize, aug.local_samples() as usize);
        let n_local = aug.n_local as usize;
        out.rows.clear();
        out.rows
            .resize(2 * ng + 2 * n_local * nl, SrsRow::default());
        out.n_valid.clear();
        out.n_valid.resize(aug.n_pairs() as usize, 0);
        for v in 0..2 {
            let rows = &mut out.rows[v * ng..(v + 1) * ng];
            out.n_valid[global_pair(v)] =
                project_rows(&crops[v], gg, &crops[1 - v], gg, &out.global_mask, rows);
        }
        for k in 0..n_local {
            for t in 0..2 {
                let p = local_pair(k, t);
                let start = 2 * ng + (p - 2) * nl;
                let rows = &mut out.rows[start..start + nl];
                out.n_valid[p] =
                    project_rows(&crops[2 + k], lg, &crops[t], gg, &out.local_mask, rows);
            }
        }
        out.index = index;
        out.label = label;
        times.geometry += t0.elapsed().as_secs_f64();

        let (sg, sl) = (aug.global_size as usize, aug.local_size as usize);
        out.globals.resize(2 * sg * sg * 3, 0);
        out.locals.resize(n_local * sl * sl * 3, 0);
        let fast = aug.resize == ResizeMode::Fast;
        let order = pass_order(aug.resize);
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            let globals = out.globals.chunks_exact_mut(sg * sg * 3).map(|b| (b, sg));
            let locals = out.locals.chunks_exact_mut(sl * sl * 3).map(|b| (b, sl));
            for (((buf, size), meta), params) in globals.chain(locals).zip(&crops).zip(&photo) {
                let t1 = Instant::now();
                if fast && fast_eligible(meta, size) {
                    scratch.fast.resize(img, meta, buf, size);
                } else {
                    scratch.resample.resize(img, meta, order, buf, size);
                }
                let flip = meta.hflip != 0;
                if photometric {
                    let t2 = Instant::now();
                    times.resize += (t2 - t1).as_secs_f64();
                    // The flip is folded into the first photometric pass.
                    params.apply_flipped(buf, size, size, flip, &mut scratch.photo);
                    times.photometric += t2.elapsed().as_secs_f64();
                } else {
                    if flip {
                        flip_rows(buf, size, size);
                    }
                    times.resize += t1.elapsed().as_secs_f64();
                }
            }
        });
        out.crops = crops;
    }
}

/// The pass order of the Pillow version a resize mode reproduces.
pub fn pass_order(mode: ResizeMode) -> PassOrder {
    match mode {
        ResizeMode::Pillow12 => PassOrder::HorizontalFirst,
        ResizeMode::Exact | ResizeMode::Fast => PassOrder::Pillow13,
    }
}

/// Mirrors every row of an RGB image in place.
pub fn flip_rows(img: &mut [u8], w: usize, h: usize) {
    for y in 0..h {
        let row = &mut img[y * w * 3..(y + 1) * w * 3];
        let (left, right) = row.split_at_mut(w / 2 * 3);
        let right_len = right.len();
        for (x, a) in left.chunks_exact_mut(3).enumerate() {
            let b = &mut right[right_len - 3 * (x + 1)..right_len - 3 * x];
            let tmp = [a[0], a[1], a[2]];
            a.copy_from_slice(b);
            b.copy_from_slice(&tmp);
        }
    }
}
