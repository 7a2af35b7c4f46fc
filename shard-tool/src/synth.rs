//! A synthetic labelled ImageFolder: one shape or texture per class, drawn with random position,
//! scale, period and colours plus a little noise. Deterministic given the seed.
//!
//! The class is the structure only; everything else is a nuisance drawn independently of the
//! class, within what the UDI augmentations can teach invariance to: position and scale (random
//! resized crops), and colour as a light foreground on a dark background with a random tint of
//! moderate saturation (colour jitter: brightness/contrast ±0.4, saturation ±0.2, hue ±0.1,
//! grayscale). Fully random per-image colours (the first version) made the nearest neighbours of
//! an image those of the same colours, which no augmentation undoes, so k-NN stayed at chance.

use std::path::Path;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The ten base patterns; class `c` uses pattern `c % 10` (and a thinner/denser variant for c >= 10).
pub const PATTERNS: [&str; 10] = [
    "disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "checker", "diagonal",
    "dots",
];

/// Folder name of class `c` out of `classes` (zero-padded, so sorted order = class order).
pub fn class_name(c: usize, classes: usize) -> String {
    let width = classes.saturating_sub(1).to_string().len().max(2);
    let variant = c / PATTERNS.len();
    if variant == 0 {
        format!("{c:0width$}_{}", PATTERNS[c % PATTERNS.len()])
    } else {
        format!("{c:0width$}_{}_v{variant}", PATTERNS[c % PATTERNS.len()])
    }
}

/// Draws image `i` of class `c` as RGB8, `size × size`.
pub fn draw(c: usize, i: usize, size: u32, seed: u64) -> Vec<u8> {
    let stream = ((c as u64) << 32) | i as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_5EED);
    rng.set_stream(stream);
    let s = size as f32;
    let (fg, bg) = colours(&mut rng);
    let cx = s * rng.random_range(0.3..0.7);
    let cy = s * rng.random_range(0.3..0.7);
    let variant = (c / PATTERNS.len()) as f32;
    let r = s * rng.random_range(0.18..0.32) / (1.0 + 0.3 * variant);
    let period = (s * rng.random_range(0.08..0.16) / (1.0 + 0.5 * variant)).max(2.0);
    let phase = rng.random_range(0.0..period);
    let noise = 10i32;
    let mut px = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            let (u, v) = ((xf - cx) / r, (yf - cy) / r);
            let band = |t: f32| ((t + phase) / period).floor().rem_euclid(2.0) < 1.0;
            let on = match c % PATTERNS.len() {
                0 => u * u + v * v < 1.0,
                1 => u.abs().max(v.abs()) < 0.85,
                2 => (-0.8..0.8).contains(&v) && u.abs() < (v + 0.8) * 0.62,
                3 => (0.3..1.0).contains(&(u * u + v * v)),
                4 => (u.abs() < 0.28 && v.abs() < 1.0) || (v.abs() < 0.28 && u.abs() < 1.0),
                5 => band(yf),
                6 => band(xf),
                7 => band(xf) ^ band(yf),
                8 => band((xf + yf) * std::f32::consts::FRAC_1_SQRT_2),
                _ => {
                    let (du, dv) = (
                        ((xf + phase) % period) - period / 2.0,
                        ((yf + phase) % period) - period / 2.0,
                    );
                    du * du + dv * dv < (period * 0.3).powi(2)
                }
            };
            let col = if on { fg } else { bg };
            for ch in col {
                let n = rng.random_range(-noise..=noise);
                px.push((ch as i32 + n).clamp(0, 255) as u8);
            }
        }
    }
    px
}

/// Foreground and background colours: a light foreground (value 0.7–0.95) on a dark background
/// (value 0.05–0.35), each tinted by lowering every channel by up to `saturation` (≤ 0.3) of its
/// value. Every channel of the foreground is brighter than every channel of the background.
fn colours(rng: &mut ChaCha8Rng) -> ([u8; 3], [u8; 3]) {
    let mut tinted = |lo: f32, hi: f32| -> [u8; 3] {
        let v = rng.random_range(lo..hi);
        let s = rng.random_range(0.0..0.3f32);
        let ch: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        ch.map(|u| (255.0 * v * (1.0 - s * u)).round() as u8)
    };
    let fg = tinted(0.7, 0.95);
    let bg = tinted(0.05, 0.35);
    (fg, bg)
}

/// Writes `<dir>/<class_name>/<i>.jpg` for `classes × per_class` images of `size` pixels (JPEG q90).
pub fn write_imagefolder(
    dir: &Path,
    classes: usize,
    per_class: usize,
    size: u32,
    seed: u64,
) -> Result<()> {
    anyhow::ensure!(size >= 8, "synthetic images must be at least 8 px");
    let mut compressor = turbojpeg::Compressor::new()?;
    compressor.set_quality(90)?;
    compressor.set_subsamp(turbojpeg::Subsamp::Sub2x2)?;
    for c in 0..classes {
        let class_dir = dir.join(class_name(c, classes));
        std::fs::create_dir_all(&class_dir)
            .with_context(|| format!("creating {}", class_dir.display()))?;
        let digits = per_class.saturating_sub(1).to_string().len();
        for i in 0..per_class {
            let px = draw(c, i, size, seed);
            let image = turbojpeg::Image {
                pixels: &px[..],
                width: size as usize,
                pitch: size as usize * 3,
                height: size as usize,
                format: turbojpeg::PixelFormat::RGB,
            };
            let jpeg = compressor.compress_to_vec(image)?;
            let path = class_dir.join(format!("{i:0digits$}.jpg"));
            std::fs::write(&path, jpeg).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
