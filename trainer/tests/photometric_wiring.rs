//! `[augment] photometric = "device"` end to end: the loader's crop engine leaves the crops
//! geometric and records its photometric decisions; the trainer applies them while it builds the
//! batch tensors. The normalised tensors must equal, bit for bit, those of the same samples with
//! the photometric pipeline run in the loader (`"loader"`, the recipe's PIL semantics).

use candle_core::Device;
use loader::decode::RgbImage;
use loader::engine::CropEngine;
use shared::batch::{BatchLayout, BatchView, BatchWriter, OwnedBatch};
use shared::config::{AugmentConfig, PhotometricAt};
use trainer::data::TrainBatch;

/// A textured picture with colour, edges and flat regions, different per sample.
fn picture(w: u32, h: u32, salt: u32) -> RgbImage {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let speckle = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ salt) >> 27;
            data.push(((x * 255 / w) as u8).wrapping_add(speckle as u8));
            data.push(if (x / 9 + y / 7 + salt).is_multiple_of(2) {
                200
            } else {
                30
            });
            data.push(((y * 255 / h) as u8) ^ (salt as u8));
        }
    }
    RgbImage::from_raw(w, h, data).unwrap()
}

fn batch(aug: &AugmentConfig, b: usize) -> OwnedBatch {
    let layout = BatchLayout::new(aug, b as u32);
    let engine = CropEngine::new(aug.clone());
    let mut buf = OwnedBatch::zeroed(&layout);
    {
        let mut w = BatchWriter::new(&layout, buf.bytes_mut(), 1, 0, aug);
        for i in 0..b {
            let img = picture(97 + 13 * i as u32, 83 + 7 * i as u32, i as u32);
            w.write_sample(i, &engine.make_sample(&img, 5, 1, i as u64, 0));
        }
    }
    buf
}

#[test]
fn device_photometric_batches_equal_loader_photometric_batches() {
    let loader_aug = AugmentConfig {
        global_size: 32,
        local_size: 16,
        n_local: 4,
        patch_size: 8,
        global_window: 2,
        local_window: 2,
        ..Default::default()
    };
    let device_aug = AugmentConfig {
        photometric: PhotometricAt::Device,
        ..loader_aug.clone()
    };
    let b = 12;
    let (lb, db) = (batch(&loader_aug, b), batch(&device_aug, b));
    let layout = BatchLayout::new(&loader_aug, b as u32);
    let (lv, dv) = (
        BatchView::new(&layout, lb.bytes()).unwrap(),
        BatchView::new(&layout, db.bytes()).unwrap(),
    );
    assert!(dv.photometric_pending() && !lv.photometric_pending());
    // Same decisions, same geometry; the pixels differ before the trainer applies the records.
    assert_eq!(lv.photo(), dv.photo());
    assert_eq!(lv.crops(), dv.crops());
    assert_ne!(lv.global_view(0), dv.global_view(0));
    let jittered = dv.photo().iter().filter(|r| r.flags != 0).count();
    assert!(jittered > b, "only {jittered} crops with photometric ops");

    let dev = Device::Cpu;
    let from_loader = TrainBatch::from_view(&lv, &loader_aug, &dev).unwrap();
    let from_device = TrainBatch::from_view(&dv, &device_aug, &dev).unwrap();
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(
        bits(&from_device.globals),
        bits(&from_loader.globals),
        "global views"
    );
    assert_eq!(
        bits(from_device.locals.as_ref().unwrap()),
        bits(from_loader.locals.as_ref().unwrap()),
        "local crops"
    );
}
