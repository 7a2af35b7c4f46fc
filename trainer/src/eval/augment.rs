//! The linear probe's train transform (udi-spec §5, Mugs' "strong" transform): horizontal flip
//! (p 0.5) → RandAugment `rand-m9-mstd0.5-inc1` → RandomResizedCrop(crop, scale 0.08–1,
//! bicubic) → normalise → RandomErasing (p 0.25, pixel mode). Every draw comes from
//! `shared::rng::sample_rng(seed, epoch, item)`, so an item's augmentation depends on nothing
//! but those three numbers.

use super::randaugment::{gauss, RandAugment};
use crate::knn::{MEAN, STD};
use image::RgbImage;
use loader::crops::CropSampler;
use rand::Rng;

/// The whole train transform of one image.
#[derive(Clone, Copy, Debug)]
pub struct TrainTransform {
    pub crop: u32,
    pub rand_augment: RandAugment,
    pub scale: [f64; 2],
    pub erase_prob: f64,
}

impl TrainTransform {
    pub fn new(crop: u32) -> Self {
        Self {
            crop,
            rand_augment: RandAugment::default(),
            scale: [0.08, 1.0],
            erase_prob: 0.25,
        }
    }

    /// Normalised CHW f32 pixels (`3 · crop²`) of one augmented view of `img`.
    pub fn apply(&self, img: &RgbImage, seed: u64, epoch: u64, item: u64) -> Vec<f32> {
        let mut rng = shared::rng::sample_rng(seed, epoch, item);
        let img = if rng.random::<f64>() < 0.5 {
            image::imageops::flip_horizontal(img)
        } else {
            img.clone()
        };
        let img = self.rand_augment.apply(&img, &mut rng);
        let r = CropSampler {
            height: img.height() as i64,
            width: img.width() as i64,
            scale: self.scale,
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            fix_overlap_typo: true,
        }
        .plain(&mut rng);
        let view = image::imageops::crop_imm(&img, r.j as u32, r.i as u32, r.w as u32, r.h as u32)
            .to_image();
        let c = self.crop;
        let img = image::imageops::resize(&view, c, c, image::imageops::FilterType::CatmullRom);
        let mut x = normalise_chw(&img);
        if rng.random::<f64>() < self.erase_prob {
            random_erase(&mut x, c as usize, &mut rng);
        }
        x
    }
}

/// RGB8 → normalised CHW f32 (the mean/std of udi-spec §1.1).
pub fn normalise_chw(img: &RgbImage) -> Vec<f32> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// timm `RandomErasing(mode="pixel", max_count=1)` after the coin flip: one rectangle of
/// 2–33 % of the area, aspect in [0.3, 1/0.3] (log-uniform), filled with N(0, 1) per value;
/// 10 attempts to fit it, else nothing.
pub fn random_erase<R: Rng>(x: &mut [f32], size: usize, rng: &mut R) {
    let area = (size * size) as f64;
    let (la, lb) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for _ in 0..10 {
        let target = area * (0.02 + rng.random::<f64>() * (1.0 / 3.0 - 0.02));
        let aspect = (la + rng.random::<f64>() * (lb - la)).exp();
        let h = (target * aspect).sqrt().round() as usize;
        let w = (target / aspect).sqrt().round() as usize;
        if w < size && h < size {
            let top = rng.random_range(0..=size - h);
            let left = rng.random_range(0..=size - w);
            for c in 0..3 {
                for y in top..top + h {
                    for xx in left..left + w {
                        x[c * size * size + y * size + xx] = gauss(rng) as f32;
                    }
                }
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_epoch_item_gives_the_same_view_and_others_differ() {
        let img = RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
        });
        let t = TrainTransform::new(16);
        let a = t.apply(&img, 1, 2, 3);
        assert_eq!(a.len(), 3 * 16 * 16);
        assert_eq!(a, t.apply(&img, 1, 2, 3));
        assert_ne!(a, t.apply(&img, 1, 3, 3));
        assert_ne!(a, t.apply(&img, 1, 2, 4));
    }

    #[test]
    fn normalise_matches_the_definition() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 128]));
        let x = normalise_chw(&img);
        assert!((x[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((x[2] - (-0.456 / 0.224)).abs() < 1e-6);
        assert!((x[5] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-6);
    }
}
