//! The engine's exact resize runs on RGBX pixels (`loader::rgbx`); it must give the bytes of the
//! RGB (U8x3) resize, the reference, on every crop: random images, random crop rectangles
//! (down- and upscaling, unchanged size, one-pixel edges), for every CPU extension
//! fast_image_resize can use on this machine (each has its own kernels).

use fast_image_resize as fr;
use loader::decode::RgbImage;
use loader::engine::resize_crop;
use loader::rgbx::RgbxResizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::geometry::CropMeta;

fn random_image(rng: &mut ChaCha8Rng, w: u32, h: u32) -> RgbImage {
    // Smooth gradients plus noise: both flat areas and edges that make the bicubic overshoot
    // (clamping at 0 and 255 is exercised).
    let noise: u8 = rng.random_range(0..=255);
    let data = (0..w * h * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let (x, y) = (p % w, p / w);
            let base = ((x * (c + 1) * 7 + y * 3) % 256) as u8;
            if rng.random_range(0..=255u8) < noise {
                [0, 255][rng.random_range(0..2usize)]
            } else {
                base
            }
        })
        .collect();
    RgbImage::from_raw(w, h, data).unwrap()
}

fn extensions() -> Vec<fr::CpuExtensions> {
    let mut all = vec![fr::CpuExtensions::None];
    #[cfg(target_arch = "x86_64")]
    all.extend([fr::CpuExtensions::Sse4_1, fr::CpuExtensions::Avx2]);
    #[cfg(target_arch = "aarch64")]
    all.push(fr::CpuExtensions::Neon);
    all.into_iter().filter(|e| e.is_supported()).collect()
}

#[test]
fn rgbx_resize_gives_the_rgb_resize_bytes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut checked = 0;
    for ext in extensions() {
        let mut rgb = fr::Resizer::new();
        let mut rgbx = RgbxResizer::default();
        // SAFETY: `extensions()` keeps only the supported ones.
        unsafe {
            rgb.set_cpu_extensions(ext);
            rgbx.set_cpu_extensions(ext);
        }
        for _ in 0..12 {
            let (w, h) = (rng.random_range(1..400u32), rng.random_range(1..300u32));
            let img = random_image(&mut rng, w, h);
            rgbx.load(&img);
            for _ in 0..10 {
                let (cw, ch) = (rng.random_range(1..=w), rng.random_range(1..=h));
                let meta = CropMeta {
                    left: rng.random_range(0..=w - cw),
                    top: rng.random_range(0..=h - ch),
                    w: cw,
                    h: ch,
                    ..Default::default()
                };
                let size = match rng.random_range(0..4) {
                    0 => 224,
                    1 => 96,
                    2 => cw.max(1) as usize, // one axis unchanged
                    _ => rng.random_range(1..300),
                };
                let mut want = vec![0u8; size * size * 3];
                resize_crop(&mut rgb, &img, &meta, &mut want, size);
                let mut got = vec![1u8; size * size * 3];
                rgbx.resize(&meta, &mut got, size);
                assert!(
                    got == want,
                    "{ext:?}: {w}x{h} image, crop {meta:?} → {size}: RGBX bytes differ"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 120);
}

/// Load replaces the previous sample's source (the buffer is reused across samples).
#[test]
fn rgbx_resizer_reuse_across_images_of_other_sizes() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut rgb = fr::Resizer::new();
    let mut rgbx = RgbxResizer::default();
    for (w, h) in [(300, 200), (50, 40), (257, 311), (1, 1)] {
        let img = random_image(&mut rng, w, h);
        rgbx.load(&img);
        let meta = CropMeta {
            w,
            h,
            ..Default::default()
        };
        for size in [96, 1, 224] {
            let mut want = vec![0u8; size * size * 3];
            resize_crop(&mut rgb, &img, &meta, &mut want, size);
            let mut got = vec![0u8; size * size * 3];
            rgbx.resize(&meta, &mut got, size);
            assert_eq!(got, want, "{w}x{h} → {size}");
        }
    }
}

/// Real photos (`../shared/data/bench-photos`, or the folder in `LOADER_BENCH_PHOTOS`) when
/// present: every crop the engine draws for them, RGBX vs RGB bytes.
#[test]
fn rgbx_resize_on_engine_crops_of_real_photos_when_present() {
    let dir = std::env::var_os("LOADER_BENCH_PHOTOS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/data/bench-photos/train/photos")
        });
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("{} absent: skipped", dir.display());
        return;
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let aug = shared::config::AugmentConfig::default();
    let (mut rgb, mut rgbx) = (fr::Resizer::new(), RgbxResizer::default());
    let mut crops = 0;
    for (k, p) in paths.iter().take(8).enumerate() {
        let img = loader::decode::decode_bytes(&std::fs::read(p).unwrap()).unwrap();
        rgbx.load(&img);
        let mut rng = shared::rng::sample_rng(5, 0, k as u64);
        for (c, meta) in loader::crops::sample_crops(&aug, img.height, img.width, &mut rng)
            .iter()
            .enumerate()
        {
            let size = if c < 2 {
                aug.global_size
            } else {
                aug.local_size
            } as usize;
            let mut want = vec![0u8; size * size * 3];
            resize_crop(&mut rgb, &img, meta, &mut want, size);
            let mut got = vec![0u8; size * size * 3];
            rgbx.resize(meta, &mut got, size);
            assert!(got == want, "{}: crop {meta:?}", p.display());
            crops += 1;
        }
    }
    println!("{crops} crops of real photos identical");
}
