//! Reference decoding of payloads to RGB8: JPEG via libjpeg-turbo (incl. grayscale and Adobe
//! CMYK/YCCK), PNG via the `image` crate, `RawZstd` via zstd. Formats are sniffed by magic bytes.

use std::cell::RefCell;

use shared::shard::{Encoding, RecordRef, ShardError};
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};

/// Largest image (in pixels) we agree to decode: a lying header must not become a huge allocation.
pub const MAX_PIXELS: u64 = 1 << 28;

/// Encoding of `bytes`, from their magic bytes (`None`: neither JPEG nor PNG).
pub fn sniff(bytes: &[u8]) -> Option<Encoding> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Encoding::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Encoding::Png)
    } else {
        None
    }
}

/// Width and height from the image header only (no pixel decode).
pub fn probe(encoding: Encoding, bytes: &[u8]) -> Result<(u32, u32), String> {
    let (w, h) = match encoding {
        Encoding::Jpeg => with_decompressor(|d| d.read_header(bytes))
            .map(|h| (h.width as u32, h.height as u32))
            .map_err(|e| e.to_string())?,
        Encoding::Png => {
            if bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
                return Err("PNG without an IHDR header".into());
            }
            let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
            (be(16), be(20))
        }
        Encoding::RawZstd => return Err("raw payloads carry no header".into()),
    };
    check_dims(w, h)?;
    Ok((w, h))
}

fn check_dims(w: u32, h: u32) -> Result<(), String> {
    if w == 0 || h == 0 || w as u64 * h as u64 > MAX_PIXELS {
        return Err(format!("image size {w}x{h} is empty or too large"));
    }
    Ok(())
}

fn with_decompressor<T>(
    f: impl FnOnce(&mut Decompressor) -> turbojpeg::Result<T>,
) -> turbojpeg::Result<T> {
    thread_local!(static DEC: RefCell<Option<Decompressor>> = const { RefCell::new(None) });
    DEC.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decompressor::new()?);
        }
        let result = f(slot.as_mut().unwrap());
        if result.is_err() {
            // A handle that failed can keep failing on later, valid images: start afresh.
            *slot = None;
        }
        result
    })
}

/// libjpeg reports recoverable problems as warnings (the image is still produced). We accept them
/// as PIL does, except the ones that mean the data ended early: a truncated file must fail.
fn is_benign_warning(msg: &str) -> bool {
    let lower = msg.to_ascii_lowercase();
    if lower.contains("premature end") {
        return false;
    }
    [
        "corrupt jpeg data",
        "warning: unknown jfif",
        "unknown adobe color transform",
        "inconsistent progression sequence",
        "invalid sos parameters for sequential jpeg",
    ]
    .iter()
    .any(|w| lower.starts_with(w))
}

/// Decodes a JPEG to RGB8 (grayscale expanded, CMYK/YCCK converted as Adobe inverted CMYK).
pub fn decode_jpeg(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), String> {
    with_decompressor(|d| {
        let h = d.read_header(bytes)?;
        Ok((h.width, h.height, h.colorspace))
    })
    .map_err(|e| e.to_string())
    .and_then(|(w, h, cs)| {
        check_dims(w as u32, h as u32)?;
        let cmyk = matches!(cs, Colorspace::CMYK | Colorspace::YCCK);
        let (format, channels) = if cmyk {
            (PixelFormat::CMYK, 4)
        } else {
            (PixelFormat::RGB, 3)
        };
        let mut pixels = vec![0u8; w * h * channels];
        let image = Image {
            pixels: &mut pixels[..],
            width: w,
            pitch: w * channels,
            height: h,
            format,
        };
        match with_decompressor(|d| d.decompress(bytes, image)) {
            Ok(()) => {}
            Err(turbojpeg::Error::TurboJpegError(msg)) if is_benign_warning(&msg) => {}
            Err(e) => return Err(e.to_string()),
        }
        if cmyk {
            pixels = cmyk_to_rgb(&pixels);
        }
        Ok((w as u32, h as u32, pixels))
    })
}

/// Adobe (inverted) CMYK to RGB: `R = C·K/255` on the stored values, as zune-jpeg and PIL do.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mul = |a: u8, b: u8| {
        let t = a as u32 * b as u32 + 128;
        ((t + (t >> 8)) >> 8) as u8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        out.extend_from_slice(&[mul(p[0], p[3]), mul(p[1], p[3]), mul(p[2], p[3])]);
    }
    out
}

/// Decodes a PNG to RGB8 (alpha dropped, 16-bit reduced to 8).
pub fn decode_png(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), String> {
    let (w, h) = probe(Encoding::Png, bytes)?;
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    let rgb = img.to_rgb8();
    debug_assert_eq!((rgb.width(), rgb.height()), (w, h));
    Ok((rgb.width(), rgb.height(), rgb.into_raw()))
}

/// Decodes `bytes` of a known encoding; `dims` is required for `RawZstd` (which has no header).
pub fn decode_bytes(
    encoding: Encoding,
    bytes: &[u8],
    dims: Option<(u32, u32)>,
) -> Result<(u32, u32, Vec<u8>), String> {
    match encoding {
        Encoding::Jpeg => decode_jpeg(bytes),
        Encoding::Png => decode_png(bytes),
        Encoding::RawZstd => {
            let (w, h) = dims.ok_or("raw payload without dimensions")?;
            check_dims(w, h)?;
            let want = w as usize * h as usize * 3;
            let px = zstd::bulk::decompress(bytes, want).map_err(|e| format!("zstd: {e}"))?;
            if px.len() != want {
                return Err(format!(
                    "raw payload holds {} bytes, {w}x{h} RGB needs {want}",
                    px.len()
                ));
            }
            Ok((w, h, px))
        }
    }
}

/// Decodes a record to `(width, height, RGB8 pixels)`; checks the size against the index.
pub fn decode_rgb(rec: &RecordRef) -> Result<(u32, u32, Vec<u8>), ShardError> {
    let err = |msg: String| ShardError::Decode {
        index: rec.index,
        path: rec.path.to_string(),
        msg,
    };
    if rec.encoding != Encoding::RawZstd && sniff(rec.payload) != Some(rec.encoding) {
        return Err(err(format!(
            "payload is not {:?} (magic bytes)",
            rec.encoding
        )));
    }
    let (w, h, px) =
        decode_bytes(rec.encoding, rec.payload, Some((rec.width, rec.height))).map_err(err)?;
    if (w, h) != (rec.width, rec.height) {
        return Err(err(format!(
            "decoded {w}x{h}, index says {}x{}",
            rec.width, rec.height
        )));
    }
    Ok((w, h, px))
}
