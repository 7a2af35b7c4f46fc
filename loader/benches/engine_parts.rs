//! Per-part timings of the crop engine on real photos (`cargo bench -p loader --bench
//! engine_parts -- [DIR] [N]`): each resize variant and each photometric op, in ns per output
//! pixel, over the crops the engine draws for N images. The resize and the fused photometric
//! pipeline are timed as the fastest of 9 runs, at the CPU's SIMD level and at AVX2 by turns,
//! with the ratio of the two: on a shared machine that ratio is the number to compare between
//! builds. Without a folder it uses a generated picture. Not a test: it prints numbers for the
//! profile in the engine's docs.

use std::time::Instant;

use loader::decode::{decode_bytes, RgbImage};
use loader::photometric::{self as ph, JitterOp, PhotoParams};
use loader::resample::{PassOrder, Resampler};
use loader::simd::Simd;
use shared::config::AugmentConfig;
use shared::geometry::CropMeta;

fn images(dir: Option<&str>, n: usize) -> Vec<RgbImage> {
    if let Some(dir) = dir {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .expect("image folder")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        paths
            .iter()
            .take(n)
            .filter_map(|p| decode_bytes(&std::fs::read(p).ok()?).ok())
            .collect()
    } else {
        let (w, h) = (500u32, 375u32);
        let data = (0..w * h * 3)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        vec![RgbImage::from_raw(w, h, data).unwrap(); n]
    }
}

/// The fastest of 9 runs of `f`, in seconds: on a shared machine the minimum is the least
/// disturbed number.
fn fastest(mut f: impl FnMut()) -> f64 {
    (0..9)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `f` at the CPU's SIMD level and at AVX2, by turns, three times over: the fastest time of
/// each, in seconds. Their ratio is steadier than either time on a machine whose speed drifts.
fn against_avx2(mut f: impl FnMut(Simd)) -> (f64, f64) {
    let (mut t, mut t_avx2) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        t = t.min(fastest(|| f(Simd::detect())));
        t_avx2 = t_avx2.min(fastest(|| f(Simd::Avx2.min(Simd::detect()))));
    }
    (t, t_avx2)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let dir = args.first().map(|s| s.as_str());
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let imgs = images(dir, n);
    if let Some(dir) = dir {
        // Decode again from memory, timed (the baseline of the goal).
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        let bytes: Vec<Vec<u8>> = paths
            .iter()
            .take(n)
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        for _ in 0..2 {
            let t = Instant::now();
            for b in &bytes {
                std::hint::black_box(decode_bytes(b).ok());
            }
            println!(
                "decode                   {:7.3} ms/img",
                1e3 * t.elapsed().as_secs_f64() / bytes.len().max(1) as f64
            );
        }
    }
    let aug = AugmentConfig::default();
    let mut crops: Vec<(usize, CropMeta, usize, PhotoParams)> = Vec::new();
    for (k, img) in imgs.iter().enumerate() {
        let mut rng = shared::rng::sample_rng(0, 0, k as u64);
        let cs = loader::crops::sample_crops(&aug, img.height, img.width, &mut rng);
        loader::srs::sampling_mask(aug.global_grid(), aug.global_window, &mut rng);
        loader::srs::sampling_mask(aug.local_grid(), aug.local_window, &mut rng);
        for (c, meta) in cs.iter().enumerate() {
            let size = if c < 2 {
                aug.global_size
            } else {
                aug.local_size
            } as usize;
            crops.push((k, *meta, size, PhotoParams::draw(&aug, &mut rng)));
        }
    }
    let px: usize = crops.iter().map(|c| c.2 * c.2).sum();
    println!(
        "{} images, {} crops, {} output pixels",
        imgs.len(),
        crops.len(),
        px
    );
    let per_img = |t: f64| 1e3 * t / imgs.len() as f64;

    // Resize: Pillow's bicubic (the engine's exact path), then the same without AVX2.
    let mut resample = Resampler::default();
    let order = PassOrder::Pillow13;
    let mut bufs: Vec<Vec<u8>> = crops.iter().map(|c| vec![0u8; c.2 * c.2 * 3]).collect();
    let (t, t_avx2) = against_avx2(|simd| {
        for ((k, meta, size, _), buf) in crops.iter().zip(bufs.iter_mut()) {
            resample.resize_using(simd, &imgs[*k], meta, order, buf, *size);
        }
    });
    println!(
        "resize pillow bicubic    {:7.3} ms/img {:6.2} ns/px ({:?}; {:.3}x the AVX2 kernels' time)",
        per_img(t),
        1e9 * t / px as f64,
        Simd::detect(),
        t / t_avx2
    );
    let (mut g, mut l) = (0.0, 0.0);
    for ((k, meta, size, _), buf) in crops.iter().zip(bufs.iter_mut()) {
        let t = Instant::now();
        resample.resize(&imgs[*k], meta, order, buf, *size);
        if *size == aug.global_size as usize {
            g += t.elapsed().as_secs_f64()
        } else {
            l += t.elapsed().as_secs_f64()
        }
    }
    println!(
        "  of which globals {:.3} ms/img, locals {:.3} ms/img",
        per_img(g),
        per_img(l)
    );
    let mut out = bufs.clone();
    let t = Instant::now();
    for ((k, meta, size, _), buf) in crops.iter().zip(out.iter_mut()) {
        resample.resize_using(
            loader::simd::Simd::Scalar,
            &imgs[*k],
            meta,
            order,
            buf,
            *size,
        );
    }
    println!(
        "resize pillow, scalar    {:7.3} ms/img  identical: {}",
        per_img(t.elapsed().as_secs_f64()),
        out == bufs
    );
    // The `resize = "fast"` path (2-tap where eligible, exact otherwise), as the engine runs it.
    let mut fast = loader::fast_resize::FastResizer::default();
    let t = Instant::now();
    for ((k, meta, size, _), buf) in crops.iter().zip(out.iter_mut()) {
        if loader::fast_resize::fast_eligible(meta, *size) {
            fast.resize(&imgs[*k], meta, buf, *size);
        } else {
            resample.resize(&imgs[*k], meta, order, buf, *size);
        }
    }
    println!(
        "resize fast (engine)     {:7.3} ms/img",
        per_img(t.elapsed().as_secs_f64())
    );

    // Photometric, op by op, over the exact resized crops.
    let mut flips = bufs.clone();
    let t = Instant::now();
    for ((_, _, size, _), b) in crops.iter().zip(flips.iter_mut()) {
        loader::engine::flip_rows(b, *size, *size);
    }
    println!(
        "flip (all crops)         {:7.3} ms/img",
        per_img(t.elapsed().as_secs_f64())
    );
    let mut scratch = Vec::new();
    let mut photo = ph::PhotoScratch::default();
    for round in 0..2 {
        let mut work = bufs.clone();
        let t = Instant::now();
        for ((_, _, size, p), b) in crops.iter().zip(work.iter_mut()) {
            p.apply_reference(b, *size, *size, &mut scratch);
        }
        println!(
            "photometric reference [{round}] {:7.3} ms/img",
            per_img(t.elapsed().as_secs_f64())
        );
        let mut work2 = bufs.clone();
        let (t, t_avx2) = against_avx2(|simd| {
            work2.clone_from(&bufs);
            for ((_, meta, size, p), b) in crops.iter().zip(work2.iter_mut()) {
                let flip = meta.hflip != 0;
                loader::fused::apply_fused_with(simd, p, b, *size, *size, flip, &mut photo);
            }
        });
        println!(
            "photometric fused+flip [{round}] {:7.3} ms/img ({:.3}x the AVX2 kernels' time)",
            per_img(t),
            t / t_avx2
        );
    }
    let mut times = [0.0f64; 8];
    let names = [
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "grayscale",
        "blur",
        "solarize",
        "-",
    ];
    let mut work = bufs.clone();
    for ((_, _, size, p), b) in crops.iter().zip(work.iter_mut()) {
        for op in &p.jitter {
            let t = Instant::now();
            let i = match *op {
                JitterOp::Brightness(f) => {
                    ph::brightness(b, f);
                    0
                }
                JitterOp::Contrast(f) => {
                    ph::contrast(b, f);
                    1
                }
                JitterOp::Saturation(f) => {
                    ph::saturation(b, f);
                    2
                }
                JitterOp::Hue(f) => {
                    ph::hue(b, f);
                    3
                }
            };
            times[i] += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        if p.grayscale {
            ph::grayscale(b);
        }
        times[4] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        if let Some(s) = p.blur {
            ph::gaussian_blur(b, *size, *size, s, &mut scratch);
        }
        times[5] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        if p.solarize {
            ph::solarize(b);
        }
        times[6] += t.elapsed().as_secs_f64();
    }
    for (n, t) in names.iter().zip(times).take(7) {
        println!("  {n:<12} {:7.3} ms/img", per_img(t));
    }
}
