//! Pillow's antialiased bicubic resize of 8-bit RGB, bit for bit (`libImaging/Resample.c` of
//! Pillow 13.0.0; older Pillow differs only in the pass order, see [`PassOrder`]).
//!
//! What makes a byte Pillow's:
//! * coefficients (`precompute_coeffs`): the bicubic (a = −0.5) support 2 is widened by the
//!   shrink factor `in/out` (never narrowed), output `x` is centred at `(x + 0.5)·in/out`, its
//!   taps run from `trunc(centre − support + 0.5)` to `trunc(centre + support + 0.5)` clamped to
//!   the source, each tap weighs `filter((i − centre + 0.5) / filterscale)`, and the weights are
//!   divided by their sum — all in f64, in that order;
//! * weights as 22-bit fixed point (`PRECISION_BITS = 32 − 8 − 2`), rounded half away from zero;
//! * per output value `clip8((2²¹ + Σ pᵢ·kᵢ) >> 22)` in i32: each pass rounds and clips, so the
//!   image between the two passes is 8-bit too;
//! * pass order: [`PassOrder`].
//!
//! The source is the crop rectangle itself, as torchvision's `resized_crop` does it on PIL
//! images (`img.crop(box).resize(size, BICUBIC)`): the taps of edge pixels are clamped at the
//! crop's edges and never read outside it. (`Image.resize(size, box=...)` on the whole image
//! would differ: its coefficients start at the box's float origin and clamp at the image edges.)
//! So a coefficient table depends only on (crop extent, output size), and [`Resampler`] caches
//! the tables.
//!
//! The SIMD kernels (AVX2; AVX-512 with VNNI's fused `dpwssd`) are exact integer arithmetic
//! too: each 23-bit weight is split as `hi·2¹⁵ + lo` (both fit i16) so that `madd_epi16` can
//! multiply pixel pairs by it; the two partial sums recombine with wrapping i32 adds, which equal
//! the true sum because that sum fits i32 (as Pillow's own accumulator does).

use std::collections::HashMap;
use std::rc::Rc;

use shared::geometry::CropMeta;

use crate::decode::RgbImage;
use crate::simd::Simd;

/// `PRECISION_BITS` of Pillow's 8-bit resample.
const BITS: u32 = 22;
const HALF: i32 = 1 << (BITS - 1);
/// Bicubic support before widening.
const SUPPORT: f64 = 2.0;
/// Bytes of tables kept per thread; beyond this the cache starts over (bounded memory whatever
/// the images' sizes: a table for a 96- or 224-pixel output takes 20–70 KB).
const CACHE_BYTES: usize = 64 << 20;

/// Which pass runs first when both are needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PassOrder {
    /// Pillow ≥ 13: vertical first when the height shrinks by more than twice as many pixels as
    /// the width (`in_h − out_h > 0 && in_h − out_h > 2·(in_w − out_w)`), else horizontal first.
    #[default]
    Pillow13,
    /// Pillow ≤ 12: always horizontal first.
    HorizontalFirst,
}

impl PassOrder {
    fn horizontal_first(self, in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
        match self {
            PassOrder::HorizontalFirst => true,
            PassOrder::Pillow13 => {
                let dy = in_h as i64 - out_h as i64;
                let dx = in_w as i64 - out_w as i64;
                !(dy > 0 && dy > 2 * dx)
            }
        }
    }
}

/// Pillow's `bicubic_filter` (a = −0.5), with its operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The coefficient table of one axis: `in_size` source pixels → `out_size` outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taps {
    /// Taps per output in `k` (Pillow's `ksize`; unused ones are 0).
    pub ksize: usize,
    /// Per output: first source index and number of taps.
    pub bounds: Vec<(u32, u32)>,
    /// `out_size × ksize` fixed-point weights.
    pub k: Vec<i32>,
    /// The AVX2 horizontal kernel's table, made at its first use (CPUs with AVX-512 need it only
    /// for the shrinks [`Chunks`] cannot take).
    quads: std::cell::OnceCell<Quads>,
    /// Per output, the weights as the AVX2 vertical kernel multiplies them: pairs of taps
    /// `(k_2i, k_2i+1)` as `[lo pair, hi pair]` packed i16 pairs, `ksize.div_ceil(2)` slots.
    vk: Vec<[i32; 2]>,
    /// The AVX-512 horizontal kernel's table (none when some chunk's taps do not fit its
    /// 128-byte window), made at its first use.
    chunks: std::cell::OnceCell<Option<Chunks>>,
}

/// The horizontal pass as the AVX2 kernel runs it: four output pixels per step.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Quads {
    /// First tap per output, padded to a multiple of 4 outputs (the padding repeats the last
    /// start, under zero weights).
    hstart: Vec<u32>,
    /// Per quad of outputs and group of 4 taps, the weights as the kernel multiplies them:
    /// `[taps 0–1 lo, taps 0–1 hi, taps 2–3 lo, taps 2–3 hi]`, each 32 i16 = one 128-bit lane per
    /// output of the quad holding `(k_t, k_t+1)` per channel `r, g, b, x`; the kernel reads the
    /// half of its pair of outputs.
    hk: Vec<[[i16; 32]; 4]>,
    /// Groups of 4 taps per output in `hk` (`ceil(taps / 4)` of the widest output).
    groups: usize,
    /// Source pixels the groups reach: max of `start + 4·groups`.
    simd_reach: usize,
}

impl Quads {
    fn new(bounds: &[(u32, u32)], k: &[i32], ksize: usize) -> Quads {
        // The widest output decides: upscales have ksize 5 but 4 taps inside the image.
        let groups = bounds
            .iter()
            .map(|&(_, n)| (n as usize).div_ceil(4))
            .max()
            .unwrap_or(1)
            .max(1);
        let n_out = bounds.len();
        let padded = n_out.div_ceil(4) * 4;
        let hstart = (0..padded).map(|xx| bounds[xx.min(n_out - 1)].0).collect();
        let mut hk = vec![[[0i16; 32]; 4]; padded / 4 * groups];
        for xx in 0..n_out {
            let (_, n) = bounds[xx];
            for i in 0..n as usize {
                let (lo, hi) = split(k[xx * ksize + i]);
                let e = &mut hk[xx / 4 * groups + i / 4];
                // Taps 0–1 of a group in entries 0/1, taps 2–3 in 2/3; lane xx % 4; the tap's
                // position in each (r, g, b, x) pair.
                let (slot, t) = (2 * (i % 4 / 2), i % 2);
                for c in 0..4 {
                    e[slot][8 * (xx % 4) + 2 * c + t] = lo;
                    e[slot + 1][8 * (xx % 4) + 2 * c + t] = hi;
                }
            }
        }
        let simd_reach = bounds
            .iter()
            .map(|&(s, _)| s as usize + 4 * groups)
            .max()
            .unwrap_or(0);
        Quads {
            hstart,
            hk,
            groups,
            simd_reach,
        }
    }
}

/// The horizontal pass as the AVX-512 kernel runs it: an output row is cut into chunks of 16
/// values (bytes, whatever pixel and channel they belong to), one i32 lane each. A chunk's taps
/// lie in a window of 128 source bytes, so per pair of taps one two-register byte permute
/// fetches every lane's two source bytes, zero-extended to the i16 pair `madd` multiplies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunks {
    /// Pairs of taps per chunk (those of the widest output; the others pad with zero weights).
    pairs: usize,
    /// Per chunk, the first byte of its window, relative to the row.
    window: Vec<u32>,
    /// `window.len() × pairs` entries.
    pair: Vec<ChunkPair>,
}

/// One pair of taps of one chunk: lane j's two source bytes at bytes `4j`, `4j + 2` of `index`
/// (into the window), and their split weights packed as `(k_t, k_t+1)` i16 pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
struct ChunkPair {
    index: [u8; 64],
    lo: [i32; 16],
    hi: [i32; 16],
}

impl Chunks {
    /// Window bytes a chunk may span.
    const WINDOW: usize = 128;

    /// `None` when some chunk's taps span more than [`Self::WINDOW`] bytes (shrinks beyond ~5×).
    fn new(bounds: &[(u32, u32)], k: &[i32], ksize: usize) -> Option<Chunks> {
        let values = bounds.len() * 3;
        let pairs = bounds
            .iter()
            .map(|&(_, n)| (n as usize).div_ceil(2))
            .max()?
            .max(1);
        let n_chunks = values.div_ceil(16);
        let mut window = Vec::with_capacity(n_chunks);
        let zero = ChunkPair {
            index: [0; 64],
            lo: [0; 16],
            hi: [0; 16],
        };
        let mut pair = vec![zero; n_chunks * pairs];
        for c in 0..n_chunks {
            let lanes = 16.min(values - 16 * c);
            let px = |j: usize| (16 * c + j) / 3;
            let start = 3 * bounds[px(0)].0 as usize;
            let (ls, ln) = bounds[px(lanes - 1)];
            if 3 * (ls + ln) as usize - start > Self::WINDOW {
                return None;
            }
            window.push(start as u32);
            for j in 0..lanes {
                let (x, ch) = (px(j), (16 * c + j) % 3);
                let (s, n) = bounds[x];
                let taps = &k[x * ksize..][..n as usize];
                for (p, e) in pair[c * pairs..][..pairs].iter_mut().enumerate() {
                    let tap = |t: usize| {
                        // Past the output's taps: any byte of the window, under weight 0.
                        let at =
                            3 * (s as usize + t.min((n as usize).saturating_sub(1))) + ch - start;
                        (at as u8, taps.get(t).map_or((0, 0), |&kt| split(kt)))
                    };
                    let ((i0, (l0, h0)), (i1, (l1, h1))) = (tap(2 * p), tap(2 * p + 1));
                    e.index[4 * j] = i0;
                    e.index[4 * j + 2] = i1;
                    e.lo[j] = pack(l0, l1);
                    e.hi[j] = pack(h0, h1);
                }
            }
        }
        Some(Chunks {
            pairs,
            window,
            pair,
        })
    }
}

impl Taps {
    /// `precompute_coeffs(in_size, 0.0, in_size, out_size)` + `normalize_coeffs_8bpc`.
    pub fn new(in_size: u32, out_size: u32) -> Self {
        assert!(in_size > 0 && out_size > 0, "resize of an empty axis");
        let (in0, in1) = (0.0f32, in_size as f32);
        let scale = (in1 - in0) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size as usize);
        let mut k = vec![0i32; out_size as usize * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size as usize {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i32).max(0);
            let xmax = ((center + support + 0.5) as i32).min(in_size as i32) - xmin;
            let n = xmax.max(0) as usize;
            let mut ww = 0.0;
            for (x, wx) in w[..n].iter_mut().enumerate() {
                *wx = bicubic(((x as i32 + xmin) as f64 - center + 0.5) * inv);
                ww += *wx;
            }
            let row = &mut k[xx * ksize..][..n];
            for (kx, &wx) in row.iter_mut().zip(&w[..n]) {
                let wx = if ww != 0.0 { wx / ww } else { wx };
                *kx = if wx < 0.0 {
                    (-0.5 + wx * (1 << BITS) as f64) as i32
                } else {
                    (0.5 + wx * (1 << BITS) as f64) as i32
                };
            }
            bounds.push((xmin as u32, n as u32));
        }
        let n_out = out_size as usize;
        let half_k = ksize.div_ceil(2);
        let mut vk = vec![[0i32; 2]; n_out * half_k];
        for xx in 0..n_out {
            let (_, n) = bounds[xx];
            let row = &k[xx * ksize..][..n as usize];
            for (slot, kk) in vk[xx * half_k..].iter_mut().zip(row.chunks(2)) {
                let (l0, h0) = split(kk[0]);
                let (l1, h1) = if kk.len() == 2 { split(kk[1]) } else { (0, 0) };
                *slot = [pack(l0, l1), pack(h0, h1)];
            }
        }
        Taps {
            chunks: std::cell::OnceCell::new(),
            ksize,
            bounds,
            k,
            quads: std::cell::OnceCell::new(),
            vk,
        }
    }

    /// The heap bytes of the table (what the cache counts).
    fn bytes(&self) -> usize {
        use std::mem::size_of_val;
        let chunks = self.chunks.get().and_then(Option::as_ref).map_or(0, |c| {
            size_of_val(c.window.as_slice()) + size_of_val(c.pair.as_slice())
        });
        size_of_val(self.bounds.as_slice())
            + size_of_val(self.k.as_slice())
            + self.quads.get().map_or(0, |q| {
                size_of_val(q.hstart.as_slice()) + size_of_val(q.hk.as_slice())
            })
            + size_of_val(self.vk.as_slice())
            + chunks
    }

    /// The AVX-512 horizontal kernel's table, if the taps fit its windows.
    fn chunks(&self) -> Option<&Chunks> {
        self.chunks
            .get_or_init(|| Chunks::new(&self.bounds, &self.k, self.ksize))
            .as_ref()
    }

    /// The AVX2 horizontal kernel's table.
    fn quads(&self) -> &Quads {
        self.quads
            .get_or_init(|| Quads::new(&self.bounds, &self.k, self.ksize))
    }

    fn weights(&self, out: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[out];
        (start as usize, &self.k[out * self.ksize..][..n as usize])
    }

    /// The packed pairs of [`Taps::vk`] that output `out` uses.
    #[cfg(target_arch = "x86_64")]
    fn vertical_pairs(&self, out: usize) -> &[[i32; 2]] {
        let half_k = self.ksize.div_ceil(2);
        let n = self.bounds[out].1 as usize;
        &self.vk[out * half_k..][..n.div_ceil(2)]
    }
}

/// `k = hi·2¹⁵ + lo` with `0 ≤ lo < 2¹⁵`.
fn split(k: i32) -> (i16, i16) {
    ((k & 0x7fff) as i16, (k >> 15) as i16)
}

/// Two i16 as the (low, high) halves of an i32 lane: the pair `madd` multiplies.
fn pack(a: i16, b: i16) -> i32 {
    (a as u16 as u32 | (b as u16 as u32) << 16) as i32
}

/// Pillow's `clip8`: the sum (rounding term included) shifted down and clamped to a byte.
#[inline(always)]
fn clip8(ss: i32) -> u8 {
    (ss >> BITS).clamp(0, 255) as u8
}

/// An 8-bit image plane as the passes read it: `rows` rows of `row_bytes` bytes, `stride` apart,
/// starting at `data[offset]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [u8],
    offset: usize,
    stride: usize,
}

impl View<'_> {
    #[inline(always)]
    fn at(&self, row: usize, byte: usize) -> usize {
        self.offset + row * self.stride + byte
    }
}

/// Per-thread tables and the image between the passes.
#[derive(Debug, Default)]
pub struct Resampler {
    cache: HashMap<(u32, u32), Rc<Taps>>,
    /// [`Taps::bytes`] of the cached tables.
    cached_bytes: usize,
    tmp: Vec<u8>,
}

impl Resampler {
    /// The (cached) table for `in_size → out_size`.
    pub fn taps(&mut self, in_size: u32, out_size: u32) -> Rc<Taps> {
        if let Some(t) = self.cache.get(&(in_size, out_size)) {
            return t.clone();
        }
        let t = Rc::new(Taps::new(in_size, out_size));
        // Make the part the CPU's horizontal kernel will use, so that the bytes count it.
        if !(Simd::detect() >= Simd::Avx512 && t.chunks().is_some()) {
            t.quads();
        }
        if self.cached_bytes + t.bytes() > CACHE_BYTES {
            self.cache.clear();
            self.cached_bytes = 0;
        }
        self.cached_bytes += t.bytes();
        self.cache.insert((in_size, out_size), t.clone());
        t
    }

    /// Pillow's `img.crop(meta box).resize((size, size), BICUBIC)` as RGB into `dst`
    /// (`size·size·3` bytes), with the widest SIMD kernels the CPU has. `meta.hflip` is not
    /// applied here.
    pub fn resize(
        &mut self,
        img: &RgbImage,
        meta: &CropMeta,
        order: PassOrder,
        dst: &mut [u8],
        size: usize,
    ) {
        self.resize_using(Simd::detect(), img, meta, order, dst, size);
    }

    /// [`Self::resize`] with the kernels of level `simd` (at most [`Simd::detect`]'s); the bytes
    /// are the same at every level.
    pub fn resize_using(
        &mut self,
        simd: Simd,
        img: &RgbImage,
        meta: &CropMeta,
        order: PassOrder,
        dst: &mut [u8],
        size: usize,
    ) {
        assert!(
            simd <= Simd::hardware(),
            "{simd:?} is not available on this CPU"
        );
        let out = size as u32;
        assert_eq!(dst.len(), size * size * 3, "destination matches the size");
        assert!(
            meta.w > 0
                && meta.h > 0
                && meta.left + meta.w <= img.width
                && meta.top + meta.h <= img.height,
            "crop rectangle inside the image"
        );
        let (cw, ch) = (meta.w, meta.h);
        let stride = img.width as usize * 3;
        let src = View {
            data: &img.data,
            offset: meta.top as usize * stride + meta.left as usize * 3,
            stride,
        };
        let need_h = cw != out;
        let need_v = ch != out;
        let row_out = size * 3;
        let mut tmp = std::mem::take(&mut self.tmp);
        match (need_h, need_v) {
            (false, false) => {
                for (y, d) in dst.chunks_exact_mut(row_out).enumerate() {
                    d.copy_from_slice(&src.data[src.at(y, 0)..][..row_out]);
                }
            }
            (true, false) => {
                let th = self.taps(cw, out);
                horizontal(simd, src, 0..size, &th, dst, row_out);
            }
            (false, true) => {
                let tv = self.taps(ch, out);
                vertical(simd, src, 0, row_out, &tv, dst, row_out);
            }
            (true, true) => {
                let (th, tv) = (self.taps(cw, out), self.taps(ch, out));
                if order.horizontal_first(cw, ch, out, out) {
                    // Only the source rows some output row reads.
                    let first = tv.bounds[0].0 as usize;
                    let (ls, ln) = tv.bounds[size - 1];
                    let last = (ls + ln) as usize;
                    let tmp = grown(&mut tmp, (last - first) * row_out);
                    horizontal(simd, src, first..last, &th, tmp, row_out);
                    let mid = View {
                        data: &*tmp,
                        offset: 0,
                        stride: row_out,
                    };
                    vertical(simd, mid, first, row_out, &tv, dst, row_out);
                } else {
                    let row_mid = cw as usize * 3;
                    let tmp = grown(&mut tmp, size * row_mid);
                    vertical(simd, src, 0, row_mid, &tv, tmp, row_mid);
                    let mid = View {
                        data: &*tmp,
                        offset: 0,
                        stride: row_mid,
                    };
                    horizontal(simd, mid, 0..size, &th, dst, row_out);
                }
            }
        }
        self.tmp = tmp;
    }
}

/// The first `n` bytes of `buf`, grown if needed (never cleared: every pass writes all the
/// bytes it later reads).
fn grown(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Horizontal pass: source rows `rows` (of `src`) → consecutive rows of `dst`, `dst_stride`
/// apart, each `taps.bounds.len()` RGB pixels.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn horizontal(
    simd: Simd,
    src: View,
    rows: std::ops::Range<usize>,
    taps: &Taps,
    dst: &mut [u8],
    dst_stride: usize,
) {
    let n_out = taps.bounds.len();
    for (r, y) in rows.enumerate() {
        let line = &mut dst[r * dst_stride..][..n_out * 3];
        let base = src.at(y, 0);
        #[cfg(target_arch = "x86_64")]
        if simd >= Simd::Avx2 {
            // SAFETY: the CPU has the level (`Resampler::resize_using` checks).
            unsafe {
                // (The AVX-512 table is made only where that kernel runs.)
                let chunks = (simd == Simd::Avx512).then(|| taps.chunks()).flatten();
                if let Some(chunks) = chunks {
                    kernels::horizontal_row_avx512(src.data, base, chunks, line)
                } else {
                    kernels::horizontal_row(src.data, base, taps, line)
                }
            };
            continue;
        }
        for (xx, px) in line.chunks_exact_mut(3).enumerate() {
            let (start, k) = taps.weights(xx);
            let mut ss = [HALF; 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &src.data[base + 3 * (start + x)..][..3];
                for c in 0..3 {
                    ss[c] += p[c] as i32 * kx;
                }
            }
            for c in 0..3 {
                px[c] = clip8(ss[c]);
            }
        }
    }
}

/// Vertical pass: output row `yy` of `dst` (`dst_stride` apart) is the weighted sum of source
/// rows `bounds[yy].0 − row0 ..` of `src`, over `row_bytes` bytes (byte-wise: any pixel layout).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn vertical(
    simd: Simd,
    src: View,
    row0: usize,
    row_bytes: usize,
    taps: &Taps,
    dst: &mut [u8],
    dst_stride: usize,
) {
    for yy in 0..taps.bounds.len() {
        let (start, k) = taps.weights(yy);
        let line = &mut dst[yy * dst_stride..][..row_bytes];
        let first = src.at(start - row0, 0);
        #[cfg(target_arch = "x86_64")]
        if simd >= Simd::Avx2 && row_bytes >= 32 {
            let pairs = taps.vertical_pairs(yy);
            // SAFETY: the CPU has the level (as above); rows `first + i·stride .. + row_bytes`
            // are inside `src.data` for every tap i (the taps lie inside the source).
            unsafe {
                if simd == Simd::Avx512 && row_bytes >= 64 {
                    kernels::vertical_row_avx512(src.data, first, src.stride, pairs, k.len(), line)
                } else {
                    kernels::vertical_row(src.data, first, src.stride, pairs, k.len(), line)
                }
            };
            continue;
        }
        for (b, o) in line.iter_mut().enumerate() {
            let mut ss = HALF;
            for (y, &ky) in k.iter().enumerate() {
                ss += src.data[first + y * src.stride + b] as i32 * ky;
            }
            *o = clip8(ss);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{Chunks, Quads, Taps, BITS, HALF};
    use std::arch::x86_64::*;

    /// One row of the horizontal pass, four output pixels per step. An output pixel pair
    /// shares a register, one pixel per 128-bit lane: per group of 4 taps, each lane loads the
    /// 12 source bytes of its pixel, two in-lane shuffles spread them into `(c of tap t, c of
    /// tap t+1)` i16 pairs, and `madd` multiplies them by the split weights. The lanes need no
    /// reduction: each ends as its pixel's `[r, g, b, x]` sums.
    ///
    /// # Safety
    /// AVX2. The taps of `taps` lie inside the row starting at `src[base]`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn horizontal_row(src: &[u8], base: usize, taps: &Taps, line: &mut [u8]) {
        let (q, n_out) = (taps.quads(), taps.bounds.len());
        // Every 16-byte load of this row stays inside `src` (all rows but the image's last
        // one or two): no per-load check. The last load starts 4 pixels before the reach.
        if base + 3 * q.simd_reach + 4 <= src.len() {
            match q.groups {
                1 => row_kernel::<false, 1>(src, base, q, n_out, line),
                2 => row_kernel::<false, 2>(src, base, q, n_out, line),
                3 => row_kernel::<false, 3>(src, base, q, n_out, line),
                _ => row_kernel::<false, 0>(src, base, q, n_out, line),
            }
        } else {
            row_kernel::<true, 0>(src, base, q, n_out, line);
        }
    }

    /// 16 bytes from `src[at]`; with `CHECKED`, through a zero-padded copy near the end of
    /// `src` (bytes beyond the taps meet zero weights).
    #[inline(always)]
    unsafe fn load16<const CHECKED: bool>(src: &[u8], at: usize) -> __m128i {
        if !CHECKED || at + 16 <= src.len() {
            _mm_loadu_si128(src.as_ptr().add(at) as *const __m128i)
        } else {
            let mut spare = [0u8; 16];
            // A group past the row's last tap may start past the end of `src`.
            let m = src.len().saturating_sub(at).min(16);
            if m > 0 {
                spare[..m].copy_from_slice(&src[at..at + m]);
            }
            _mm_loadu_si128(spare.as_ptr() as *const __m128i)
        }
    }

    /// The rounded, shifted `[r, g, b, x]` i32 sums of outputs `2·pair` (lane 0) and
    /// `2·pair + 1` (lane 1). `G` groups of taps (0: `q.groups`, not known at compile time).
    #[inline(always)]
    unsafe fn pair<const CHECKED: bool, const G: usize>(
        src: &[u8],
        base: usize,
        q: &Quads,
        pair: usize,
    ) -> __m256i {
        // Taps 0–1 and 2–3 of a group (the 12 bytes from the group's first pixel), per lane.
        let spread_a = _mm256_setr_epi8(
            0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1, 0, -1, 3, -1, 1, -1, 4, -1,
            2, -1, 5, -1, -1, -1, -1, -1,
        );
        let spread_b = _mm256_setr_epi8(
            6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1, 6, -1, 9, -1, 7, -1, 10,
            -1, 8, -1, 11, -1, -1, -1, -1, -1,
        );
        let groups = if G > 0 { G } else { q.groups };
        let k = &q.hk[pair / 2 * groups..][..groups];
        let half = 16 * (pair % 2);
        let mut at0 = base + 3 * q.hstart[2 * pair] as usize;
        let mut at1 = base + 3 * q.hstart[2 * pair + 1] as usize;
        let mut lo = _mm256_setzero_si256();
        let mut hi = _mm256_setzero_si256();
        for kg in k {
            let p = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(load16::<CHECKED>(src, at0)),
                load16::<CHECKED>(src, at1),
            );
            let a = _mm256_shuffle_epi8(p, spread_a);
            let b = _mm256_shuffle_epi8(p, spread_b);
            let w = |i: usize| _mm256_loadu_si256(kg[i][half..].as_ptr() as *const __m256i);
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(a, w(0)));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(a, w(1)));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(b, w(2)));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(b, w(3)));
            at0 += 12;
            at1 += 12;
        }
        let sum = _mm256_add_epi32(_mm256_slli_epi32::<15>(hi), lo);
        _mm256_srai_epi32::<{ BITS as i32 }>(_mm256_add_epi32(sum, _mm256_set1_epi32(HALF)))
    }

    #[inline(always)]
    unsafe fn row_kernel<const CHECKED: bool, const G: usize>(
        src: &[u8],
        base: usize,
        q: &Quads,
        n_out: usize,
        line: &mut [u8],
    ) {
        // Pixels 0, 1, 2, 3 from the dwords of the packed pairs (lane 0: 0, 2; lane 1: 1, 3),
        // then their r, g, b bytes side by side.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0);
        let compact = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
        for quad in 0..n_out.div_ceil(4) {
            let v01 = pair::<CHECKED, G>(src, base, q, 2 * quad);
            let v23 = pair::<CHECKED, G>(src, base, q, 2 * quad + 1);
            // i32 → u8 with clamping (Pillow's clip8), in lane order.
            let v = _mm256_packs_epi32(v01, v23);
            let v = _mm256_packus_epi16(v, v);
            let v = _mm256_permutevar8x32_epi32(v, order);
            store_quad(
                line,
                quad,
                _mm_shuffle_epi8(_mm256_castsi256_si128(v), compact),
            );
        }
    }

    /// The 12 bytes of output pixels `4·quad ..` (the first 12 of `px`) into `line`.
    #[inline(always)]
    unsafe fn store_quad(line: &mut [u8], quad: usize, px: __m128i) {
        let o = 12 * quad;
        if o + 16 <= line.len() {
            // The 4 bytes past this quad are overwritten by the next one.
            _mm_storeu_si128(line.as_mut_ptr().add(o) as *mut __m128i, px);
        } else {
            let mut spare = [0u8; 16];
            _mm_storeu_si128(spare.as_mut_ptr() as *mut __m128i, px);
            let m = line.len() - o;
            line[o..].copy_from_slice(&spare[..m]);
        }
    }

    /// One row of the horizontal pass, 16 output values per step (see [`Chunks`]): per pair
    /// of taps, one `vpermi2b` gathers each lane's two source bytes from the chunk's 128-byte
    /// window (zero-extended by the mask), and two `dpwssd` multiply them by the split weights.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, VNNI and VBMI. `chunks` belongs to a table whose taps lie inside the row
    /// starting at `src[base]`, and `line` is that table's output row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    pub unsafe fn horizontal_row_avx512(src: &[u8], base: usize, chunks: &Chunks, line: &mut [u8]) {
        let len = line.len();
        assert_eq!(
            len.div_ceil(16),
            chunks.window.len(),
            "row matches the table"
        );
        let zero_ext = 0x5555_5555_5555_5555u64;
        let half = _mm512_set1_epi32(HALF);
        for (c, (&w, pairs)) in chunks
            .window
            .iter()
            .zip(chunks.pair.chunks_exact(chunks.pairs))
            .enumerate()
        {
            let at = base + w as usize;
            // The window may run past the row (unused bytes); near the end of `src`, masked
            // loads keep it inside.
            let (a, b) = if at + Chunks::WINDOW <= src.len() {
                let p = src.as_ptr().add(at);
                (
                    _mm512_loadu_si512(p as _),
                    _mm512_loadu_si512(p.add(64) as _),
                )
            } else {
                let rest = src.len() - at;
                let mask = |from: usize| match rest.saturating_sub(from) {
                    n if n >= 64 => !0u64,
                    n => (1u64 << n) - 1,
                };
                let p = src.as_ptr().add(at);
                (
                    _mm512_maskz_loadu_epi8(mask(0), p as _),
                    _mm512_maskz_loadu_epi8(mask(64), p.wrapping_add(64) as _),
                )
            };
            let mut lo = _mm512_setzero_si512();
            let mut hi = _mm512_setzero_si512();
            for e in pairs {
                let index = _mm512_load_si512(e.index.as_ptr() as _);
                let x = _mm512_maskz_permutex2var_epi8(zero_ext, a, index, b);
                lo = _mm512_dpwssd_epi32(lo, x, _mm512_load_si512(e.lo.as_ptr() as _));
                hi = _mm512_dpwssd_epi32(hi, x, _mm512_load_si512(e.hi.as_ptr() as _));
            }
            let s = _mm512_add_epi32(_mm512_slli_epi32::<15>(hi), lo);
            let v = _mm512_srai_epi32::<{ BITS }>(_mm512_add_epi32(s, half));
            // Pillow's clip8: clamp at 0 here, at 255 by the unsigned saturating narrowing.
            let v = _mm512_cvtusepi32_epi8(_mm512_max_epi32(v, _mm512_setzero_si512()));
            let o = 16 * c;
            let keep = match len - o {
                m if m >= 16 => !0,
                m => (1u16 << m) - 1,
            };
            _mm_mask_storeu_epi8(line.as_mut_ptr().add(o) as _, keep, v);
        }
    }

    /// One output row of the vertical pass, 32 bytes at a time (the last block overlaps the one
    /// before it when the row is not a multiple of 32: it recomputes the same bytes).
    /// `pairs` are the output's packed weight pairs ([`Taps::vk`]).
    ///
    /// # Safety
    /// AVX2; `line.len() ≥ 32`; for every tap i, `src[first + i·stride ..][..line.len()]` is in
    /// bounds.
    #[target_feature(enable = "avx2")]
    pub unsafe fn vertical_row(
        src: &[u8],
        first: usize,
        stride: usize,
        pairs: &[[i32; 2]],
        n_taps: usize,
        line: &mut [u8],
    ) {
        let len = line.len();
        debug_assert!(len >= 32);
        debug_assert_eq!(pairs.len(), n_taps.div_ceil(2));
        if let Some(t) = n_taps.checked_sub(1) {
            assert!(
                first + t * stride + len <= src.len(),
                "vertical taps in bounds"
            );
        }
        let odd = n_taps % 2 == 1;
        let zero = _mm256_setzero_si256();
        let half = _mm256_set1_epi32(HALF);
        let mut b = 0;
        loop {
            let b0 = b.min(len - 32);
            let mut acc_lo = [zero; 4];
            let mut acc_hi = [zero; 4];
            for (j, &[pl, ph]) in pairs.iter().enumerate() {
                let (kl, kh) = (_mm256_set1_epi32(pl), _mm256_set1_epi32(ph));
                let y = 2 * j;
                let r0 = _mm256_loadu_si256(src.as_ptr().add(first + y * stride + b0) as _);
                // The unpaired last tap pairs with itself under a zero weight.
                let y1 = if odd && j + 1 == pairs.len() {
                    y
                } else {
                    y + 1
                };
                let r1 = _mm256_loadu_si256(src.as_ptr().add(first + y1 * stride + b0) as _);
                let ab = [_mm256_unpacklo_epi8(r0, r1), _mm256_unpackhi_epi8(r0, r1)];
                for h in 0..2 {
                    let w = [
                        _mm256_unpacklo_epi8(ab[h], zero),
                        _mm256_unpackhi_epi8(ab[h], zero),
                    ];
                    for q in 0..2 {
                        acc_lo[2 * h + q] =
                            _mm256_add_epi32(acc_lo[2 * h + q], _mm256_madd_epi16(w[q], kl));
                        acc_hi[2 * h + q] =
                            _mm256_add_epi32(acc_hi[2 * h + q], _mm256_madd_epi16(w[q], kh));
                    }
                }
            }
            let v: [__m256i; 4] = std::array::from_fn(|i| {
                let s = _mm256_add_epi32(_mm256_slli_epi32::<15>(acc_hi[i]), acc_lo[i]);
                _mm256_srai_epi32::<{ BITS as i32 }>(_mm256_add_epi32(s, half))
            });
            // In-lane unpacks and packs cancel: bytes come back in order.
            let out = _mm256_packus_epi16(
                _mm256_packs_epi32(v[0], v[1]),
                _mm256_packs_epi32(v[2], v[3]),
            );
            _mm256_storeu_si256(line.as_mut_ptr().add(b0) as _, out);
            b += 32;
            if b0 + 32 >= len {
                break;
            }
        }
    }

    /// [`vertical_row`] 64 bytes at a time, with VNNI's fused multiply-add of the pairs.
    ///
    /// # Safety
    /// AVX-512 F/BW and VNNI; `line.len() ≥ 64`; the rows as in [`vertical_row`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn vertical_row_avx512(
        src: &[u8],
        first: usize,
        stride: usize,
        pairs: &[[i32; 2]],
        n_taps: usize,
        line: &mut [u8],
    ) {
        let len = line.len();
        assert!(len >= 64);
        if let Some(t) = n_taps.checked_sub(1) {
            assert!(
                first + t * stride + len <= src.len(),
                "vertical taps in bounds"
            );
        }
        let odd = n_taps % 2 == 1;
        let zero = _mm512_setzero_si512();
        let half = _mm512_set1_epi32(HALF);
        let mut b = 0;
        loop {
            let b0 = b.min(len - 64);
            let mut acc_lo = [zero; 4];
            let mut acc_hi = [zero; 4];
            for (j, &[pl, ph]) in pairs.iter().enumerate() {
                let (kl, kh) = (_mm512_set1_epi32(pl), _mm512_set1_epi32(ph));
                let y = 2 * j;
                let r0 = _mm512_loadu_si512(src.as_ptr().add(first + y * stride + b0) as _);
                let y1 = if odd && j + 1 == pairs.len() {
                    y
                } else {
                    y + 1
                };
                let r1 = _mm512_loadu_si512(src.as_ptr().add(first + y1 * stride + b0) as _);
                let ab = [_mm512_unpacklo_epi8(r0, r1), _mm512_unpackhi_epi8(r0, r1)];
                for h in 0..2 {
                    let w = [
                        _mm512_unpacklo_epi8(ab[h], zero),
                        _mm512_unpackhi_epi8(ab[h], zero),
                    ];
                    for q in 0..2 {
                        acc_lo[2 * h + q] = _mm512_dpwssd_epi32(acc_lo[2 * h + q], w[q], kl);
                        acc_hi[2 * h + q] = _mm512_dpwssd_epi32(acc_hi[2 * h + q], w[q], kh);
                    }
                }
            }
            let v: [__m512i; 4] = std::array::from_fn(|i| {
                let s = _mm512_add_epi32(_mm512_slli_epi32::<15>(acc_hi[i]), acc_lo[i]);
                _mm512_srai_epi32::<{ BITS }>(_mm512_add_epi32(s, half))
            });
            let out = _mm512_packus_epi16(
                _mm512_packs_epi32(v[0], v[1]),
                _mm512_packs_epi32(v[2], v[3]),
            );
            _mm512_storeu_si512(line.as_mut_ptr().add(b0) as _, out);
            b += 64;
            if b0 + 64 >= len {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_stay_inside() {
        for (i, o) in [(517, 224), (224, 224), (37, 96), (1, 5), (1000, 3)] {
            let t = Taps::new(i, o);
            for xx in 0..o as usize {
                let (s, k) = t.weights(xx);
                assert!(s + k.len() <= i as usize);
                let sum: i64 = k.iter().map(|&v| v as i64).sum();
                // Each weight is rounded on its own: the sum is 2^22 up to one unit per tap.
                assert!(
                    (sum - (1 << BITS)).abs() <= k.len() as i64,
                    "{i}->{o} @{xx}"
                );
            }
        }
        // Upscaling keeps support 2 (4 or 5 taps), a 4x shrink widens it to 8 (17 slots).
        assert_eq!(Taps::new(10, 40).ksize, 5);
        // ... but 4 taps inside the image: one AVX2 group.
        assert_eq!(Taps::new(10, 40).quads().groups, 1);
        assert_eq!(Taps::new(400, 100).ksize, 17);
    }

    #[test]
    fn split_recombines() {
        for k in [-300_000, -1, 0, 1, 32767, 32768, 4_194_304, 5_000_000] {
            let (lo, hi) = split(k);
            assert!(lo >= 0);
            assert_eq!(hi as i32 * 32768 + lo as i32, k);
        }
    }

    /// Every SIMD level the CPU has gives the scalar path's bytes: random
    /// images with saturated speckle, random rectangles (one-pixel edges, equal sizes, up- and
    /// large downscales), both pass orders.
    #[test]
    fn every_simd_level_equals_the_scalar_path() {
        let mut k = 12345u64;
        let mut next = |m: u64| {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (k >> 33) % m
        };
        let mut r = Resampler::default();
        for _ in 0..40 {
            let (w, h) = (1 + next(700) as u32, 1 + next(500) as u32);
            let data = (0..w * h * 3)
                .map(|i| match next(4) {
                    0 => 0,
                    1 => 255,
                    _ => (i.wrapping_mul(2654435761) >> 13) as u8,
                })
                .collect();
            let img = RgbImage::from_raw(w, h, data).unwrap();
            for _ in 0..6 {
                let (cw, ch) = (1 + next(w as u64) as u32, 1 + next(h as u64) as u32);
                let meta = CropMeta {
                    img_h: h,
                    img_w: w,
                    top: next((h - ch + 1) as u64) as u32,
                    left: next((w - cw + 1) as u64) as u32,
                    h: ch,
                    w: cw,
                    hflip: 0,
                };
                let size = match next(4) {
                    0 => 224,
                    1 => 96,
                    2 => cw as usize,
                    _ => 1 + next(260) as usize,
                };
                for order in [PassOrder::Pillow13, PassOrder::HorizontalFirst] {
                    let mut want = vec![1u8; size * size * 3];
                    r.resize_using(Simd::Scalar, &img, &meta, order, &mut want, size);
                    for simd in [Simd::Avx2, Simd::Avx512] {
                        if simd <= Simd::hardware() {
                            let mut got = vec![0u8; size * size * 3];
                            r.resize_using(simd, &img, &meta, order, &mut got, size);
                            assert!(got == want, "{meta:?} -> {size} ({order:?}, {simd:?})");
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 kernel's windows at their limit: shrinks on both sides of the widest that
    /// fits 128 bytes (beyond it the AVX2 kernel takes over), on crops in the image's
    /// bottom-right corner, so the last windows run past the end of the pixels (masked loads).
    #[test]
    fn horizontal_windows_at_their_limit_equal_the_scalar_path() {
        let (w, h) = (700u32, 40u32);
        let data = (0..w * h * 3)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let img = RgbImage::from_raw(w, h, data).unwrap();
        let mut r = Resampler::default();
        let (mut fits, mut wider) = (0, 0);
        for out in [16u32, 24, 96] {
            for cw in (3 * out..7 * out).step_by(out as usize / 8) {
                let cw = cw.min(w);
                match Taps::new(cw, out).chunks() {
                    Some(_) => fits += 1,
                    None => wider += 1,
                }
                let meta = CropMeta {
                    img_h: h,
                    img_w: w,
                    top: 8,
                    left: w - cw,
                    h: h - 8,
                    w: cw,
                    hflip: 0,
                };
                let size = out as usize;
                let mut want = vec![1u8; size * size * 3];
                r.resize_using(
                    Simd::Scalar,
                    &img,
                    &meta,
                    PassOrder::Pillow13,
                    &mut want,
                    size,
                );
                for simd in [Simd::Avx2, Simd::Avx512] {
                    if simd <= Simd::hardware() {
                        let mut got = vec![0u8; size * size * 3];
                        r.resize_using(simd, &img, &meta, PassOrder::Pillow13, &mut got, size);
                        assert!(got == want, "{cw} -> {out} ({simd:?})");
                    }
                }
            }
        }
        assert!(
            fits > 10 && wider > 10,
            "{fits} tables fit the window, {wider} do not"
        );
    }

    /// The cache holds at most its byte budget and still hands out the right tables.
    #[test]
    fn table_cache_stays_within_its_budget() {
        let mut r = Resampler::default();
        let mut cleared = false;
        for in_size in (200..4000).step_by(7) {
            let before = r.cached_bytes;
            let t = r.taps(in_size, 224);
            cleared |= r.cached_bytes < before;
            assert!(r.cached_bytes <= CACHE_BYTES);
            // The same table, both with both kernels' parts made.
            let fresh = Taps::new(in_size, 224);
            for x in [&fresh, &*t] {
                x.quads();
                x.chunks();
            }
            assert_eq!(*t, fresh);
            assert!(Rc::ptr_eq(&t, &r.taps(in_size, 224)), "cached");
        }
        assert!(
            cleared,
            "{} bytes of tables never reached the budget",
            r.cached_bytes
        );
    }

    #[test]
    fn pass_order_rule() {
        // 400x1000 → 224x224: height shrinks by 776 > 2·176 → vertical first.
        assert!(!PassOrder::Pillow13.horizontal_first(400, 1000, 224, 224));
        assert!(PassOrder::Pillow13.horizontal_first(400, 500, 224, 224));
        // Upscaling the height never goes vertical first.
        assert!(PassOrder::Pillow13.horizontal_first(10, 100, 224, 224));
        assert!(PassOrder::HorizontalFirst.horizontal_first(400, 1000, 224, 224));
    }
}
