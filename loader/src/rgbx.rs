//! The exact resize on 4-byte pixels: RGB → RGBX once per sample, fast_image_resize's U8x4
//! convolution per crop, RGBX → RGB into the crop buffer.
//!
//! Why it is the same bytes as the U8x3 resize: both pixel types get the same `Normalizer16`
//! coefficients (computed from the crop and output sizes only), run the same vertical pass (it is
//! byte-wise, shared by every u8 pixel type), and their horizontal passes compute, per channel,
//! `clamp((Σ cᵢ·pᵢ + 2^(P−1)) >> P, 0, 255)` in exact i32 arithmetic (`madd_epi16`, no
//! saturating steps). Channels never mix (`use_alpha(false)`: no premultiplication), so the
//! X byte is ignored. `tests/resize_rgbx.rs` checks the bytes on random images and crops for
//! every CPU extension the machine has. The U8x4 kernels are faster because a pixel fills a
//! 32-bit lane: no 3-byte gathers.

use fast_image_resize as fr;
use shared::geometry::CropMeta;

use crate::decode::RgbImage;

/// RGB → RGBX (X = 255) into `dst`, resized to fit.
pub fn rgb_to_rgbx(src: &[u8], dst: &mut Vec<u8>) {
    let n = src.len() / 3;
    dst.resize(n * 4, 0);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: ssse3 checked above.
        done = unsafe { rgb_to_rgbx_ssse3(src, dst) };
    }
    for (s, d) in src[done * 3..]
        .chunks_exact(3)
        .zip(dst[done * 4..].chunks_exact_mut(4))
    {
        d.copy_from_slice(&[s[0], s[1], s[2], 255]);
    }
}

/// RGBX → RGB (`dst.len() == src.len() / 4 * 3`).
pub fn rgbx_to_rgb(src: &[u8], dst: &mut [u8]) {
    assert_eq!(
        src.len() / 4 * 3,
        dst.len(),
        "RGBX and RGB pixel counts differ"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: ssse3 checked above.
        done = unsafe { rgbx_to_rgb_ssse3(src, dst) };
    }
    for (s, d) in src[done * 4..]
        .chunks_exact(4)
        .zip(dst[done * 3..].chunks_exact_mut(3))
    {
        d.copy_from_slice(&s[..3]);
    }
}

/// Converts pixels in blocks of 4 while a 16-byte load stays inside `src`; returns the count.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn rgb_to_rgbx_ssse3(src: &[u8], dst: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 3;
    // Blocks whose 16-byte load ends inside src.
    let blocks = if src.len() >= 16 {
        (src.len() - 16) / 12 + 1
    } else {
        0
    }
    .min(n / 4);
    let shuf = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    let alpha = _mm_set1_epi32(0xFF00_0000u32 as i32);
    for i in 0..blocks {
        let v = _mm_loadu_si128(src.as_ptr().add(12 * i) as *const __m128i);
        let o = _mm_or_si128(_mm_shuffle_epi8(v, shuf), alpha);
        _mm_storeu_si128(dst.as_mut_ptr().add(16 * i) as *mut __m128i, o);
    }
    blocks * 4
}

/// Converts pixels in blocks of 4 while a 16-byte store stays inside `dst`; returns the count.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn rgbx_to_rgb_ssse3(src: &[u8], dst: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 4;
    let blocks = if dst.len() >= 16 {
        (dst.len() - 16) / 12 + 1
    } else {
        0
    }
    .min(n / 4);
    let shuf = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    for i in 0..blocks {
        let v = _mm_loadu_si128(src.as_ptr().add(16 * i) as *const __m128i);
        // The 4 trailing bytes are overwritten by the next block (or lie inside dst).
        _mm_storeu_si128(
            dst.as_mut_ptr().add(12 * i) as *mut __m128i,
            _mm_shuffle_epi8(v, shuf),
        );
    }
    blocks * 4
}

/// Buffers of the RGBX resize, reused across crops and samples (one per worker thread).
#[derive(Debug, Default)]
pub struct RgbxResizer {
    resizer: fr::Resizer,
    /// The current sample's source as RGBX (filled by [`Self::load`]).
    src: Vec<u8>,
    size: (u32, u32),
    /// One crop's RGBX output.
    out: Vec<u8>,
}

impl RgbxResizer {
    /// Converts `img` once; the following [`Self::resize`] calls read it.
    pub fn load(&mut self, img: &RgbImage) {
        rgb_to_rgbx(&img.data, &mut self.src);
        self.size = (img.width, img.height);
    }

    /// The crop rectangle of the loaded image, bicubic-resized (PIL semantics, as
    /// [`crate::engine::resize_crop`]) to `size × size` RGB in `dst`.
    pub fn resize(&mut self, meta: &CropMeta, dst: &mut [u8], size: usize) {
        let (w, h) = self.size;
        let src = fr::images::ImageRef::new(w, h, &self.src, fr::PixelType::U8x4)
            .expect("RGBX buffer matches its size");
        let view = fr::images::CroppedImage::new(&src, meta.left, meta.top, meta.w, meta.h)
            .expect("crop rectangle inside the image");
        self.out.resize(size * size * 4, 0);
        let mut out = fr::images::Image::from_slice_u8(
            size as u32,
            size as u32,
            &mut self.out,
            fr::PixelType::U8x4,
        )
        .expect("RGBX scratch matches the crop size");
        let opts = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
            .use_alpha(false);
        self.resizer
            .resize(&view, &mut out, &opts)
            .expect("u8x4 → u8x4 resize");
        rgbx_to_rgb(&self.out, dst);
    }

    /// The CPU extensions the resizer uses (tests pin each one).
    ///
    /// # Safety
    /// As [`fr::Resizer::set_cpu_extensions`]: the CPU must support `ext`.
    pub unsafe fn set_cpu_extensions(&mut self, ext: fr::CpuExtensions) {
        unsafe { self.resizer.set_cpu_extensions(ext) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repacking_round_trips_at_every_length() {
        for n in 0..70usize {
            let rgb: Vec<u8> = (0..n * 3).map(|i| (i * 37 + 11) as u8).collect();
            let mut x = Vec::new();
            rgb_to_rgbx(&rgb, &mut x);
            assert_eq!(x.len(), n * 4);
            assert!(x.chunks_exact(4).all(|p| p[3] == 255));
            let mut back = vec![0u8; n * 3];
            rgbx_to_rgb(&x, &mut back);
            assert_eq!(back, rgb, "n = {n}");
        }
    }
}
