//! DINO's attention visualisation: the last block's attention from a class token to the patch
//! tokens, per head, and the mask keeping 60 % of each head's attention mass (DINO's
//! `visualize_attention.py --threshold 0.6`), drawn over the image as one PNG grid.

use crate::knn::{eval_transform, to_normalised_tensor};
use crate::vit::Vit;
use anyhow::{ensure, Context, Result};
use candle_core::Device;
use image::{Rgb, RgbImage};
use std::path::Path;

/// The attention maps of one image.
#[derive(Clone, Debug)]
pub struct AttentionMaps {
    /// Patch grid side.
    pub grid: usize,
    /// `[head][patch]` (row-major patches): attention of the chosen class token; each head's
    /// row over all tokens sums to 1, so a head's patch values sum to at most 1.
    pub heads: Vec<Vec<f32>>,
}

/// Attention from class token `token` (0 = [cls], 1 = [cls+]) to the patches of one
/// normalised image `[1, 3, S, S]`.
pub fn attention_maps(
    vit: &Vit,
    image: &candle_core::Tensor,
    token: usize,
) -> Result<AttentionMaps> {
    ensure!(
        token < vit.n_prefix(),
        "this backbone has no class token {token} (dino_only models have only [cls])"
    );
    let a = vit.last_attention(image)?; // [1, H, T, T]
    let (_, h, t, _) = a.dims4()?;
    let n = t - vit.n_prefix();
    let grid = (n as f64).sqrt().round() as usize;
    ensure!(grid * grid == n, "{n} patch tokens are not a square grid");
    let rows = a
        .get(0)?
        .narrow(1, token, 1)?
        .squeeze(1)?
        .narrow(1, vit.n_prefix(), n)?
        .to_device(&Device::Cpu)?;
    let heads: Vec<Vec<f32>> = rows.to_vec2()?;
    debug_assert_eq!(heads.len(), h);
    Ok(AttentionMaps { grid, heads })
}

/// DINO's mask: sort the (renormalised) attention ascending, keep the patches whose
/// cumulative sum exceeds 1 − `keep`: the largest patches holding `keep` of the mass.
pub fn mass_mask(map: &[f32], keep: f64) -> Vec<bool> {
    let total: f64 = map.iter().map(|&v| v as f64).sum();
    let mut idx: Vec<usize> = (0..map.len()).collect();
    idx.sort_by(|&a, &b| map[a].total_cmp(&map[b]).then(a.cmp(&b)));
    let mut mask = vec![false; map.len()];
    let mut cum = 0.0;
    for i in idx {
        cum += map[i] as f64 / total;
        mask[i] = cum > 1.0 - keep;
    }
    mask
}

/// A blue → red heat colour for `t` ∈ [0, 1].
fn heat(t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    [
        (1.5 - (4.0 * t - 3.0).abs()).clamp(0.0, 1.0),
        (1.5 - (4.0 * t - 2.0).abs()).clamp(0.0, 1.0),
        (1.5 - (4.0 * t - 1.0).abs()).clamp(0.0, 1.0),
    ]
}

/// The grid: first row the image, then each head's attention over it (its own min → blue,
/// max → red); second row the mean over heads, then each head's 60 % mask (patches outside it
/// darkened). Every tile is the image scaled up (nearest) to at least `min_tile` pixels.
pub fn render(img: &RgbImage, maps: &AttentionMaps, keep: f64, min_tile: u32) -> RgbImage {
    let s = img.width();
    let zoom = min_tile.div_ceil(s).max(1);
    let tile = s * zoom;
    let big = image::imageops::resize(img, tile, tile, image::imageops::FilterType::Nearest);
    let h = maps.heads.len();
    let g = maps.grid;
    let pad = 4;
    let cols = h as u32 + 1;
    let mut out = RgbImage::from_pixel(
        cols * (tile + pad) + pad,
        2 * (tile + pad) + pad,
        Rgb([255; 3]),
    );
    let at = |map: &[f32], x: u32, y: u32| {
        let (px, py) = (
            (x as usize * g) / tile as usize,
            (y as usize * g) / tile as usize,
        );
        map[py * g + px]
    };
    let mean: Vec<f32> = (0..g * g)
        .map(|i| maps.heads.iter().map(|m| m[i]).sum::<f32>() / h as f32)
        .collect();
    let place =
        |out: &mut RgbImage, col: u32, row: u32, f: &dyn Fn(u32, u32, Rgb<u8>) -> Rgb<u8>| {
            let (ox, oy) = (pad + col * (tile + pad), pad + row * (tile + pad));
            for y in 0..tile {
                for x in 0..tile {
                    out.put_pixel(ox + x, oy + y, f(x, y, *big.get_pixel(x, y)));
                }
            }
        };
    place(&mut out, 0, 0, &|_, _, p| p);
    let overlay = |out: &mut RgbImage, col: u32, row: u32, map: &[f32]| {
        let lo = map.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = map.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let span = (hi - lo).max(f32::MIN_POSITIVE);
        place(out, col, row, &|x, y, p| {
            let c = heat((at(map, x, y) - lo) / span);
            Rgb([0, 1, 2].map(|k| (0.4 * p[k] as f32 + 0.6 * 255.0 * c[k]) as u8))
        });
    };
    overlay(&mut out, 0, 1, &mean);
    for (k, map) in maps.heads.iter().enumerate() {
        let col = k as u32 + 1;
        overlay(&mut out, col, 0, map);
        let mask = mass_mask(map, keep);
        let keep: Vec<f32> = mask.iter().map(|&m| m as u8 as f32).collect();
        place(&mut out, col, 1, &|x, y, p| {
            if at(&keep, x, y) > 0.0 {
                p
            } else {
                Rgb(p.0.map(|v| v / 5))
            }
        });
    }
    out
}

/// `trainer attention`: decode `image`, eval-transform it to `crop`, draw the grid to `out`.
pub fn write_png(
    vit: &Vit,
    image_path: &Path,
    token: usize,
    crop: u32,
    out: &Path,
    device: &Device,
) -> Result<AttentionMaps> {
    let bytes =
        std::fs::read(image_path).with_context(|| format!("reading {}", image_path.display()))?;
    let img = loader::decode::decode_bytes(&bytes)
        .with_context(|| format!("decoding {}", image_path.display()))?;
    let img = RgbImage::from_raw(img.width, img.height, img.data).context("decoded image size")?;
    let img = eval_transform(&img, crop);
    let x = to_normalised_tensor(std::slice::from_ref(&img), crop, device)?;
    let maps = attention_maps(vit, &x, token)?;
    render(&img, &maps, 0.6, 160)
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_the_largest_patches_holding_the_mass() {
        // 0.5 + 0.2 = 0.7 ≥ 0.6: the two largest patches; 0.5 alone is not enough.
        let m = [0.1f32, 0.5, 0.05, 0.2, 0.15];
        assert_eq!(mass_mask(&m, 0.6), vec![false, true, false, true, false]);
        // Unnormalised input is renormalised first.
        let m2: Vec<f32> = m.iter().map(|v| v * 3.0).collect();
        assert_eq!(mass_mask(&m2, 0.6), mass_mask(&m, 0.6));
        // keep = 1 keeps everything (cum > 0 for every patch with mass).
        assert!(mass_mask(&m, 1.0).iter().all(|&b| b));
    }
}
