//! `loader preview`: one PNG to look at a sample's augmentation.
//!
//! Top: the source image with every crop's rectangle (one colour per crop; a flipped crop has a
//! filled tab on its right edge, where its column 0 comes from). Below: the two global crops and
//! the local crops as the network sees them (after photometric augmentation). On every crop the
//! SRS source patches are outlined in white; on the global crops, the projected positions of the
//! other crops' samples are dots in the source crop's colour.

use std::path::PathBuf;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage as Canvas};
use shared::config::AugmentConfig;
use shared::geometry::{global_pair, local_pair, Sample};

use crate::decode::RgbImage;
use crate::engine::CropEngine;
use crate::source::DatasetSource;

const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [170, 110, 40],
];

fn colour(k: usize) -> Rgb<u8> {
    Rgb(PALETTE[k % PALETTE.len()])
}

fn put(c: &mut Canvas, x: i64, y: i64, col: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < c.width() && (y as u32) < c.height() {
        c.put_pixel(x as u32, y as u32, col);
    }
}

fn rect(c: &mut Canvas, x0: i64, y0: i64, x1: i64, y1: i64, col: Rgb<u8>, thick: i64) {
    for t in 0..thick {
        for x in x0..=x1 {
            put(c, x, y0 + t, col);
            put(c, x, y1 - t, col);
        }
        for y in y0..=y1 {
            put(c, x0 + t, y, col);
            put(c, x1 - t, y, col);
        }
    }
}

fn dot(c: &mut Canvas, x: i64, y: i64, r: i64, col: Rgb<u8>) {
    for dy in -r..=r {
        for dx in -r..=r {
            put(c, x + dx, y + dy, col);
        }
    }
    rect(
        c,
        x - r - 1,
        y - r - 1,
        x + r + 1,
        y + r + 1,
        Rgb([0, 0, 0]),
        1,
    );
}

/// Nearest-neighbour copy of an RGB buffer at `zoom`× to (x0, y0).
fn blit(c: &mut Canvas, data: &[u8], w: usize, h: usize, x0: i64, y0: i64, zoom: f64) {
    let (zw, zh) = ((w as f64 * zoom) as i64, (h as f64 * zoom) as i64);
    for y in 0..zh {
        for x in 0..zw {
            let sx = ((x as f64 / zoom) as usize).min(w - 1);
            let sy = ((y as f64 / zoom) as usize).min(h - 1);
            let o = (sy * w + sx) * 3;
            put(c, x0 + x, y0 + y, Rgb([data[o], data[o + 1], data[o + 2]]));
        }
    }
}

/// Draws the preview of `sample` (made from `img`) into a new canvas.
pub fn render(img: &RgbImage, sample: &Sample, aug: &AugmentConfig) -> Canvas {
    let margin = 10i64;
    let src_zoom = (600.0 / img.width as f64)
        .min(360.0 / img.height as f64)
        .min(4.0);
    let (sw, sh) = (
        (img.width as f64 * src_zoom) as i64,
        (img.height as f64 * src_zoom) as i64,
    );
    let crop_zoom = (224.0 / aug.global_size as f64).max(1.0);
    let (gs, ls) = (aug.global_size as usize, aug.local_size as usize);
    let (gz, lz) = (
        (gs as f64 * crop_zoom) as i64,
        (ls as f64 * crop_zoom) as i64,
    );
    let n_local = aug.n_local as usize;
    let per_row = 6usize;
    let local_rows = n_local.div_ceil(per_row) as i64;
    let width = (sw + 2 * margin)
        .max(2 * gz + 3 * margin)
        .max(per_row as i64 * (lz + margin) + margin);
    let height = margin + sh + margin + gz + margin + local_rows * (lz + margin);
    let mut c = Canvas::from_pixel(width as u32, height as u32, Rgb([40, 40, 40]));

    // Source with the crop boxes.
    blit(
        &mut c,
        &img.data,
        img.width as usize,
        img.height as usize,
        margin,
        margin,
        src_zoom,
    );
    for (k, m) in sample.crops.iter().enumerate() {
        let x0 = margin + (m.left as f64 * src_zoom) as i64;
        let y0 = margin + (m.top as f64 * src_zoom) as i64;
        let x1 = margin + ((m.left + m.w) as f64 * src_zoom) as i64 - 1;
        let y1 = margin + ((m.top + m.h) as f64 * src_zoom) as i64 - 1;
        rect(&mut c, x0, y0, x1, y1, colour(k), if k < 2 { 3 } else { 1 });
        if m.hflip != 0 {
            for y in y0..(y0 + 8).min(y1) {
                for x in (x1 - 4).max(x0)..=x1 {
                    put(&mut c, x, y, colour(k));
                }
            }
        }
    }

    // Crop origins on the canvas.
    let mut origin = vec![
        (margin, margin + sh + margin),
        (2 * margin + gz, margin + sh + margin),
    ];
    for k in 0..n_local {
        let (row, col) = ((k / per_row) as i64, (k % per_row) as i64);
        origin.push((
            margin + col * (lz + margin),
            margin + sh + margin + gz + margin + row * (lz + margin),
        ));
    }
    for (v, &(x, y)) in origin.iter().take(2).enumerate() {
        let data = &sample.globals[v * gs * gs * 3..(v + 1) * gs * gs * 3];
        blit(&mut c, data, gs, gs, x, y, crop_zoom);
        rect(&mut c, x - 2, y - 2, x + gz + 1, y + gz + 1, colour(v), 2);
    }
    for k in 0..n_local {
        let data = &sample.locals[k * ls * ls * 3..(k + 1) * ls * ls * 3];
        let (x, y) = origin[2 + k];
        blit(&mut c, data, ls, ls, x, y, crop_zoom);
        rect(
            &mut c,
            x - 2,
            y - 2,
            x + lz + 1,
            y + lz + 1,
            colour(2 + k),
            2,
        );
    }

    // Sampled source patches (white outlines), per crop from its own mask.
    let p = (aug.patch_size as f64 * crop_zoom) as i64;
    for (k, &(ox, oy)) in origin.iter().enumerate() {
        let (mask, grid) = if k < 2 {
            (&sample.global_mask, aug.global_grid())
        } else {
            (&sample.local_mask, aug.local_grid())
        };
        for &cell in mask.iter() {
            let (r, q) = ((cell as u32 / grid) as i64, (cell as u32 % grid) as i64);
            rect(
                &mut c,
                ox + q * p,
                oy + r * p,
                ox + (q + 1) * p - 1,
                oy + (r + 1) * p - 1,
                Rgb([255, 255, 255]),
                1,
            );
        }
    }

    // Projected positions on the targets: align-corners grid coordinates → crop pixels.
    let (ng, nl) = (aug.global_samples() as usize, aug.local_samples() as usize);
    let gg = aug.global_grid() as f64;
    let to_px = |u: f32| (u as f64 / (gg - 1.0) * (gs as f64 - 1.0) * crop_zoom) as i64;
    let mark = |c: &mut Canvas, pair: usize, src_crop: usize, target: usize| {
        let (start, len) = if pair < 2 {
            (pair * ng, ng)
        } else {
            (2 * ng + (pair - 2) * nl, nl)
        };
        let n = sample.n_valid[pair] as usize;
        for row in &sample.rows[start..start + n.min(len)] {
            // Continuous position = weighted corners.
            let (mut u, mut v) = (0f32, 0f32);
            for (t, w) in row.tgt.iter().zip(row.w) {
                u += w * (*t as u32 / aug.global_grid()) as f32;
                v += w * (*t as u32 % aug.global_grid()) as f32;
            }
            let (ox, oy) = origin[target];
            dot(
                c,
                ox + to_px(v),
                oy + to_px(u),
                if src_crop < 2 { 3 } else { 2 },
                colour(src_crop),
            );
        }
    };
    for v in 0..2 {
        mark(&mut c, global_pair(v), v, 1 - v);
    }
    for k in 0..n_local {
        for t in 0..2 {
            mark(&mut c, local_pair(k, t), 2 + k, t);
        }
    }
    c
}

/// `loader preview` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub input: crate::folder::InputArgs,
    /// Sample index (the next decodable record is used if it cannot be decoded).
    #[arg(long, default_value_t = 0)]
    pub index: u64,
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

/// The `loader preview` subcommand.
pub fn cli(args: &PreviewArgs) -> Result<()> {
    let cfg = args.input.config()?;
    let records = args.input.open()?;
    let source = DatasetSource::new(records, CropEngine::new(cfg.augment.clone()), cfg.data.seed);
    let (used, label, img) = source.decode_from(args.index)?;
    let sample = source
        .engine()
        .make_sample(&img, cfg.data.seed, args.epoch, used, label);
    let canvas = render(&img, &sample, &cfg.augment);
    canvas
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let valid: Vec<u32> = sample.n_valid.clone();
    println!(
        "record {used} ({}x{}), label {label}: wrote {}; valid rows per pair {valid:?}",
        img.width,
        img.height,
        args.out.display()
    );
    Ok(())
}
