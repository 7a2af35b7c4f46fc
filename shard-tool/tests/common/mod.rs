//! Helpers shared by the shard-tool integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use shard_tool::pack::{pack, PackConfig, PackSummary};

/// `<repo>/../shared/data/<name>` when present (extra real-data checks only); `$UDI_SHARED_DATA`
/// overrides, and `<repo>/../../shared/data` covers a git worktree one level further down.
pub fn shared_data(name: &str) -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut roots: Vec<PathBuf> = std::env::var_os("UDI_SHARED_DATA")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    roots.push(repo.join("../shared/data"));
    roots.push(repo.join("../../shared/data"));
    roots.into_iter().map(|r| r.join(name)).find(|p| p.is_dir())
}

pub fn quiet(cfg: PackConfig) -> PackConfig {
    PackConfig {
        progress: false,
        ..cfg
    }
}

pub fn pack_quiet(input: &Path, out: &Path, cfg: PackConfig) -> PackSummary {
    pack(input, out, &quiet(cfg)).unwrap()
}

/// A small RGB test image with structure (gradients + a square).
pub fn test_rgb(w: usize, h: usize) -> Vec<u8> {
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let inside = x > w / 4 && x < w / 2 && y > h / 3 && y < 2 * h / 3;
            px.extend_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                if inside { 230 } else { 40 },
            ]);
        }
    }
    px
}

pub fn jpeg(
    px: &[u8],
    w: usize,
    h: usize,
    format: turbojpeg::PixelFormat,
    subsamp: turbojpeg::Subsamp,
    progressive: bool,
) -> Vec<u8> {
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(90).unwrap();
    c.set_subsamp(subsamp).unwrap();
    c.set_progressive(progressive).unwrap();
    let image = turbojpeg::Image {
        pixels: px,
        width: w,
        pitch: w * format.size(),
        height: h,
        format,
    };
    c.compress_to_vec(image).unwrap()
}

/// Generates the edge-case collection (the same kinds as ../shared/data/edge-cases) into `dir`.
pub fn write_edge_cases(dir: &Path) {
    use turbojpeg::{PixelFormat as PF, Subsamp as S};
    std::fs::create_dir_all(dir).unwrap();
    let (w, h) = (96, 64);
    let rgb = test_rgb(w, h);
    let base = jpeg(&rgb, w, h, PF::RGB, S::Sub2x2, false);
    std::fs::write(dir.join("baseline_420.jpg"), &base).unwrap();
    std::fs::write(
        dir.join("progressive.jpg"),
        jpeg(&rgb, w, h, PF::RGB, S::Sub2x2, true),
    )
    .unwrap();
    std::fs::write(
        dir.join("subsampling_444.jpg"),
        jpeg(&rgb, w, h, PF::RGB, S::None, false),
    )
    .unwrap();
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[1]).collect();
    std::fs::write(
        dir.join("grayscale.jpg"),
        jpeg(&gray, w, h, PF::GRAY, S::Gray, false),
    )
    .unwrap();
    // Adobe-style inverted CMYK: stored = 255 - ink, with ink from the RGB image.
    let cmyk: Vec<u8> = rgb
        .chunks(3)
        .flat_map(|p| {
            let k = 255 - *p.iter().max().unwrap();
            let ink = |v: u8| {
                if k == 255 {
                    0
                } else {
                    (255 - v as u32 - k as u32) * 255 / (255 - k as u32)
                }
            };
            [
                255 - ink(p[0]) as u8,
                255 - ink(p[1]) as u8,
                255 - ink(p[2]) as u8,
                255 - k,
            ]
        })
        .collect();
    std::fs::write(
        dir.join("cmyk.jpg"),
        jpeg(&cmyk, w, h, PF::CMYK, S::None, false),
    )
    .unwrap();
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb.clone()).unwrap();
    img.save_with_format(dir.join("png_named.JPEG"), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(
        dir.join("tiny_32x21.jpg"),
        jpeg(&test_rgb(32, 21), 32, 21, PF::RGB, S::Sub2x2, false),
    )
    .unwrap();
    std::fs::write(dir.join("truncated.jpg"), &base[..base.len() / 2]).unwrap();
    let garbage: Vec<u8> = (0..2048u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("garbage.jpg"), garbage).unwrap();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
}

/// The files every edge-case set must skip.
pub const EDGE_BAD: [&str; 3] = ["empty.jpg", "garbage.jpg", "truncated.jpg"];

/// All regular files of a directory, by name, with their bytes.
pub fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}
