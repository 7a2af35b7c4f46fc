//! Record payload → RGB8 pixels.
//!
//! JPEG goes through libjpeg-turbo (ISLOW DCT, fancy upsampling: the same defaults PIL uses), PNG
//! through the `image` crate, raw records are zstd-decompressed. The encoding stored in the record
//! is a hint only: the payload's magic bytes decide (ImageNet has PNGs named `.JPEG`).
//!
//! No DCT-domain downscaled decode: a scaled decode changes the pixels every crop reads (the
//! crop + bicubic resize is defined on the full-resolution image), so it would change the recipe.

use anyhow::{bail, Context, Result};
use shared::shard::{Encoding, RecordRef};
use std::cell::RefCell;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `[h][w][3]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            data: vec![0; width as usize * height as usize * 3],
        }
    }

    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        anyhow::ensure!(
            data.len() == width as usize * height as usize * 3,
            "RGB buffer of {} bytes does not match {width}x{height}x3",
            data.len()
        );
        Ok(Self {
            width,
            height,
            data,
        })
    }

    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let o = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[o], self.data[o + 1], self.data[o + 2]]
    }
}

/// The payload formats we can tell apart by their first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Jpeg,
    Png,
    Other,
}

pub fn sniff(bytes: &[u8]) -> Sniffed {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Sniffed::Jpeg
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Sniffed::Png
    } else {
        Sniffed::Other
    }
}

thread_local! {
    // One libjpeg-turbo handle per worker thread: creating one costs more than a small decode.
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

/// Decodes one record to RGB8. Errors name the record.
pub fn decode(rec: &RecordRef) -> Result<RgbImage> {
    decode_payload(rec).with_context(|| format!("decoding {rec}"))
}

fn decode_payload(rec: &RecordRef) -> Result<RgbImage> {
    if rec.encoding == Encoding::RawZstd {
        return decode_raw_zstd(rec.payload, rec.width, rec.height);
    }
    decode_bytes(rec.payload)
}

/// Decodes JPEG or PNG bytes (by magic) to RGB8.
pub fn decode_bytes(bytes: &[u8]) -> Result<RgbImage> {
    match sniff(bytes) {
        Sniffed::Jpeg => decode_jpeg(bytes),
        Sniffed::Png => decode_png(bytes),
        Sniffed::Other if bytes.is_empty() => bail!("empty payload"),
        Sniffed::Other => bail!(
            "not a JPEG or PNG (first bytes {:02x?})",
            &bytes[..bytes.len().min(4)]
        ),
    }
}

/// zstd-compressed `h × w × 3` RGB8.
pub fn decode_raw_zstd(payload: &[u8], width: u32, height: u32) -> Result<RgbImage> {
    let n = width as usize * height as usize * 3;
    anyhow::ensure!(n > 0, "raw record with zero size {width}x{height}");
    let data = zstd::bulk::decompress(payload, n).context("zstd")?;
    anyhow::ensure!(
        data.len() == n,
        "raw record has {} bytes, expected {width}x{height}x3",
        data.len()
    );
    RgbImage::from_raw(width, height, data)
}

fn decode_png(bytes: &[u8]) -> Result<RgbImage> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).context("PNG")?;
    // Alpha is dropped (PIL's convert("RGB") also discards it); 16-bit is reduced to 8-bit.
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    RgbImage::from_raw(w, h, rgb.into_raw())
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(turbojpeg::Decompressor::new().context("libjpeg-turbo init")?);
        }
        let d = slot.as_mut().expect("just set");
        let header = d.read_header(bytes).context("JPEG header")?;
        let (w, h) = (header.width, header.height);
        anyhow::ensure!(w > 0 && h > 0, "JPEG with zero size");
        anyhow::ensure!(w <= 1 << 16 && h <= 1 << 16, "JPEG too large: {w}x{h}");
        match header.colorspace {
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK => {
                let mut cmyk = vec![0u8; w * h * 4];
                let out = turbojpeg::Image {
                    pixels: cmyk.as_mut_slice(),
                    width: w,
                    pitch: w * 4,
                    height: h,
                    format: turbojpeg::PixelFormat::CMYK,
                };
                d.decompress(bytes, out).context("JPEG (CMYK)")?;
                Ok(RgbImage {
                    width: w as u32,
                    height: h as u32,
                    data: adobe_cmyk_to_rgb(&cmyk),
                })
            }
            _ => {
                // Gray JPEGs are expanded to RGB by libjpeg itself (R = G = B = Y).
                let mut data = vec![0u8; w * h * 3];
                let out = turbojpeg::Image {
                    pixels: data.as_mut_slice(),
                    width: w,
                    pitch: w * 3,
                    height: h,
                    format: turbojpeg::PixelFormat::RGB,
                };
                d.decompress(bytes, out).context("JPEG")?;
                Ok(RgbImage {
                    width: w as u32,
                    height: h as u32,
                    data,
                })
            }
        }
    })
}

/// Adobe CMYK JPEGs store inverted ink values; PIL reads them as `CMYK;I` (un-inverting) and
/// its `cmyk2rgb` gives `R = nk − MULDIV255(C, nk)` with `nk = 255 − K`. With the stored values
/// `c' = 255 − C`, `k' = nk`, that is the expression below.
fn adobe_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    fn muldiv255(a: u32, b: u32) -> u32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = px[3] as u32;
        for &c in &px[..3] {
            let ink = 255 - c as u32;
            out.push((nk - muldiv255(ink, nk)) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_white_black_and_primaries() {
        // stored (inverted) values: 255 = no ink.
        let px = [
            255, 255, 255, 255, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 0,
        ];
        let rgb = adobe_cmyk_to_rgb(&px);
        assert_eq!(&rgb[0..3], &[255, 255, 255]);
        assert_eq!(&rgb[3..6], &[0, 0, 0]);
        assert_eq!(&rgb[6..9], &[0, 255, 255]); // full cyan ink → no red
        assert_eq!(&rgb[9..12], &[0, 0, 0]); // full black ink
    }
}
