//! The photometric pipeline of udi-spec §1.4 on the trainer's device, from the loader's
//! per-crop decisions ([`PhotoRecord`], `[augment] photometric = "device"`).
//!
//! [`apply`] is bit-identical to the loader's CPU reference
//! (`loader::photometric::PhotoParams::apply_reference`, Pillow/torchvision semantics) and uses
//! candle tensor ops only, so it runs on CUDA through candle's kernels. Batched over crops:
//!
//! * The colour jitter runs as four slots (the record's random op order). Brightness, contrast
//!   and saturation are one blend `D + α·(x − D)` per slot over the whole batch, with a per-crop
//!   degenerate `D` (0, the contrast mean or the luma plane) and factor `α`; crops whose slot holds
//!   another op get `α = 1`, which is exact: `D + 1·(x − D) = x` for integer values in f32.
//! * Hue (not an identity even with shift 0: Pillow round-trips through uint8 HSV) and blur run
//!   on the subset of crops that need them (`index_select`, then back in batch order).
//! * Gaussian blur = Pillow's 3 extended box passes per axis as banded per-crop weight matrices
//!   in F64 (24-bit fixed-point weights, products and sums are integers < 2^32, so the batched
//!   matmul is exact), rounded like the reference after every pass.
//!
//! Exactness rules followed throughout: every value that the reference keeps in an integer is an
//! integer-valued float here; every float step is the same single IEEE operation in the same
//! precision (f32 or f64) as the reference. Divisions use `broadcast_div` by a tensor (a true
//! division); scalars are applied with `affine` only as `x·c + 0` or `x·(±1) + c`, where the
//! product is exact, so a fused multiply-add (CUDA's affine kernel) rounds once, like the single
//! op. No f32 matmul is used (TF32 on GPUs would not be exact).

use candle_core::{bail, DType, Device, Result, Tensor};
use loader::photometric::{box_radius, hue_shift, BoxWeights, HSV_PICK};
use shared::geometry::PhotoRecord;

/// Applies the photometric pipeline of `records` to a batch of crops.
///
/// `x`: `[N, H, W, 3]` F32 holding integer values 0..=255 (HWC, the batch's byte order), on any
/// device; `records`: N entries (host). Returns the same shape, dtype and device, with the
/// pipeline applied: bytes equal to `apply_reference` on each crop.
pub fn apply(x: &Tensor, records: &[PhotoRecord]) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    if c != 3 {
        bail!(
            "photometric: crops must be [N, H, W, 3] RGB, got shape {:?}",
            x.dims()
        );
    }
    if x.dtype() != DType::F32 {
        bail!("photometric: crops must be F32, got {:?}", x.dtype());
    }
    if n != records.len() {
        bail!("photometric: {n} crops but {} photo records", records.len());
    }
    for (i, r) in records.iter().enumerate() {
        check_record(i, r)?;
    }
    if n == 0 || h == 0 || w == 0 {
        return Ok(x.clone());
    }
    let mut x = x.clone();
    for slot in 0..4 {
        let ops: Vec<Option<u8>> = records
            .iter()
            .map(|r| r.has(PhotoRecord::JITTER).then_some(r.order[slot]))
            .collect();
        x = blend_slot(&x, records, &ops)?;
        let hue_crops: Vec<usize> = (0..n)
            .filter(|&i| ops[i] == Some(PhotoRecord::HUE))
            .collect();
        if !hue_crops.is_empty() {
            let shifts: Vec<f64> = hue_crops
                .iter()
                .map(|&i| hue_shift(records[i].hue) as f64)
                .collect();
            x = on_subset(&x, &hue_crops, |sub| {
                let shift = per_crop(&shifts, DType::F64, sub.device())?;
                hue(sub, &shift)
            })?;
        }
    }
    let gray: Vec<f64> = flags(records, PhotoRecord::GRAYSCALE);
    if gray.iter().any(|&g| g != 0.0) {
        // x + g·(L − x): exactly L for g = 1, exactly x for g = 0.
        let g = per_crop(&gray, DType::F32, x.device())?;
        x = luma(&x)?
            .broadcast_sub(&x)?
            .broadcast_mul(&g)?
            .broadcast_add(&x)?;
    }
    let blur: Vec<(usize, BoxWeights)> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.has(PhotoRecord::BLUR))
        .filter_map(|(i, r)| {
            // Pillow (and the reference) skip the blur when the box radius is 0.
            let fr = box_radius(r.blur_sigma, 3);
            (fr != 0.0).then(|| (i, BoxWeights::new(fr)))
        })
        .collect();
    if !blur.is_empty() {
        let crops: Vec<usize> = blur.iter().map(|b| b.0).collect();
        let weights: Vec<BoxWeights> = blur.iter().map(|b| b.1).collect();
        x = on_subset(&x, &crops, |sub| gaussian_blur(sub, &weights))?;
    }
    let sol: Vec<f64> = flags(records, PhotoRecord::SOLARIZE);
    if sol.iter().any(|&s| s != 0.0) {
        let s = per_crop(&sol, DType::F32, x.device())?;
        x = solarize(&x, &s)?;
    }
    Ok(x)
}

/// A record the loader cannot have written: an unknown op code or a non-finite parameter.
fn check_record(i: usize, r: &PhotoRecord) -> Result<()> {
    if r.has(PhotoRecord::JITTER) {
        if let Some(op) = r.order.iter().find(|&&op| op > PhotoRecord::HUE) {
            bail!("photometric: photo record {i}: jitter op code {op} is not 0..=3 ({r:?})");
        }
        let factors = [r.brightness, r.contrast, r.saturation, r.hue];
        if factors.iter().any(|f| !f.is_finite()) {
            bail!("photometric: photo record {i}: non-finite jitter factor ({r:?})");
        }
    }
    if r.has(PhotoRecord::BLUR) && !r.blur_sigma.is_finite() {
        bail!("photometric: photo record {i}: non-finite blur sigma ({r:?})");
    }
    Ok(())
}

/// 1.0 for the records with `flag`, 0.0 for the others.
fn flags(records: &[PhotoRecord], flag: u32) -> Vec<f64> {
    records
        .iter()
        .map(|r| if r.has(flag) { 1.0 } else { 0.0 })
        .collect()
}

/// Per-crop values as an `[n, 1, 1, 1]` tensor.
fn per_crop(v: &[f64], dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(v.to_vec(), (v.len(), 1, 1, 1), dev)?.to_dtype(dtype)
}

/// A scalar tensor of `x`'s dtype and device (for true divisions).
fn scalar_like(v: f64, x: &Tensor) -> Result<Tensor> {
    Tensor::new(v, x.device())?.to_dtype(x.dtype())
}

/// `x·c`, one rounding (see the module docs on `affine`).
fn mul_c(x: &Tensor, c: f64) -> Result<Tensor> {
    x.affine(c, 0.0)
}

/// `x + c`, one rounding.
fn add_c(x: &Tensor, c: f64) -> Result<Tensor> {
    x.affine(1.0, c)
}

/// `c − x`, one rounding.
fn rsub_c(c: f64, x: &Tensor) -> Result<Tensor> {
    x.affine(-1.0, c)
}

/// Runs `f` on the crops `idx` (ascending) of `x` only, and puts its result back in batch order.
fn on_subset(
    x: &Tensor,
    idx: &[usize],
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    if idx.len() == n {
        return f(x);
    }
    let dev = x.device();
    let mut chosen = vec![false; n];
    for &i in idx {
        chosen[i] = true;
    }
    let rest: Vec<usize> = (0..n).filter(|&i| !chosen[i]).collect();
    let ids = |v: &[usize]| Tensor::from_vec(v.iter().map(|&i| i as u32).collect(), v.len(), dev);
    let done = f(&x.index_select(&ids(idx)?, 0)?)?;
    let kept = x.index_select(&ids(&rest)?, 0)?;
    // Crop i sits at row inv[i] of [done; kept].
    let mut inv = vec![0usize; n];
    for (row, &i) in idx.iter().chain(&rest).enumerate() {
        inv[i] = row;
    }
    Tensor::cat(&[done, kept], 0)?.index_select(&ids(&inv)?, 0)
}

/// Pillow `rgb2l` per pixel: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`, as `[N, H, W, 1]`.
/// Exact in f32: every product and partial sum is an integer below 2^24.
pub fn luma(x: &Tensor) -> Result<Tensor> {
    let wts = Tensor::new(&[19595f32, 38470., 7471.], x.device())?;
    let s = x.broadcast_mul(&wts)?.sum_keepdim(3)?;
    mul_c(&add_c(&s, 32768.0)?, 1.0 / 65536.0)?.floor()
}

/// `int(Σ luma / n + 0.5)` per crop in f64 (Pillow's `ImageStat` mean), as `[N, 1, 1, 1]` F32.
fn contrast_mean(l: &Tensor) -> Result<Tensor> {
    let (_, h, w, _) = l.dims4()?;
    let npx = h * w;
    // Sums of integers are exact in f32 while they stay below 2^24.
    let sum = if npx * 255 < 1 << 24 {
        l.sum_keepdim((1, 2, 3))?.to_dtype(DType::F64)?
    } else {
        l.to_dtype(DType::F64)?.sum_keepdim((1, 2, 3))?
    };
    let mean = sum.broadcast_div(&scalar_like(npx as f64, &sum)?)?;
    add_c(&mean, 0.5)?.floor()?.to_dtype(DType::F32)
}

/// One jitter slot's blend ops: `Image.blend(D, x, α)` = `D + α·(x − D)` in f32, clipped to
/// [0, 255] and truncated, with `D` = 0 (brightness), the contrast mean or the luma plane
/// (saturation) per crop; `α = 1` (exact identity) for crops without a blend op in this slot.
fn blend_slot(x: &Tensor, records: &[PhotoRecord], ops: &[Option<u8>]) -> Result<Tensor> {
    let n = records.len();
    let mut alpha = vec![1.0f64; n];
    let mut sat = vec![0.0f64; n];
    let mut con = vec![0.0f64; n];
    for (i, (r, op)) in records.iter().zip(ops).enumerate() {
        match *op {
            Some(PhotoRecord::BRIGHTNESS) => alpha[i] = r.brightness as f64,
            Some(PhotoRecord::CONTRAST) => {
                alpha[i] = r.contrast as f64;
                con[i] = 1.0;
            }
            Some(PhotoRecord::SATURATION) => {
                alpha[i] = r.saturation as f64;
                sat[i] = 1.0;
            }
            _ => {}
        }
    }
    if alpha.iter().all(|&a| a == 1.0) {
        return Ok(x.clone());
    }
    let dev = x.device();
    // Factors are f32 in the records: the f64 round trip is exact.
    let alpha = per_crop(&alpha, DType::F32, dev)?;
    let any = |v: &[f64]| v.iter().any(|&f| f != 0.0);
    let degenerate = if any(&sat) || any(&con) {
        let l = luma(x)?;
        let mut d = l.broadcast_mul(&per_crop(&sat, DType::F32, dev)?)?;
        if any(&con) {
            let m = contrast_mean(&l)?.broadcast_mul(&per_crop(&con, DType::F32, dev)?)?;
            d = d.broadcast_add(&m)?;
        }
        Some(d)
    } else {
        None
    };
    let t = match &degenerate {
        Some(d) => x
            .broadcast_sub(d)?
            .broadcast_mul(&alpha)?
            .broadcast_add(d)?,
        // Brightness only: 0 + α·x = α·x.
        None => x.broadcast_mul(&alpha)?,
    };
    t.clamp(0f32, 255f32)?.floor()
}

/// Pillow `rgb2hsv` of `[N, H, W, 3]` F32 crops: `(h, s, v)` as `[N, H, W, 1]` F64 planes of
/// integers 0..=255, with the reference's f32/f64 steps (see `loader::photometric::rgb_to_hsv`).
pub fn rgb_to_hsv(x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let f64_ = DType::F64;
    let ch = |i| x.narrow(3, i, 1);
    let (r, g, b) = (ch(0)?, ch(1)?, ch(2)?);
    let maxc = r.maximum(&g)?.maximum(&b)?;
    let minc = r.minimum(&g)?.minimum(&b)?;
    let cr = (&maxc - &minc)?;
    // Grays (cr = 0) divide by 1 instead: s = 0 and rc = gc = bc = 0, so h = 0, Pillow's (0, 0, v).
    let s = cr.div(&maxc.maximum(1f32)?)?;
    let c = maxc.broadcast_sub(x)?.broadcast_div(&cr.maximum(1f32)?)?;
    let (rc, gc, bc) = (c.narrow(3, 0, 1)?, c.narrow(3, 1, 1)?, c.narrow(3, 2, 1)?);
    let h_r = (&bc - &gc)?;
    // `2.0 + rc - bc` in double, stored to float.
    let (rc64, gc64, bc64) = (rc.to_dtype(f64_)?, gc.to_dtype(f64_)?, bc.to_dtype(f64_)?);
    let h_g = (add_c(&rc64, 2.0)? - &bc64)?.to_dtype(DType::F32)?;
    let h_b = (add_c(&gc64, 4.0)? - &rc64)?.to_dtype(DType::F32)?;
    let h = r
        .eq(&maxc)?
        .where_cond(&h_r, &g.eq(&maxc)?.where_cond(&h_g, &h_b)?)?;
    // fmod(h/6 + 1, 1) on [5/6, 11/6): one exact subtraction.
    let h = h.to_dtype(f64_)?;
    let xh = add_c(&h.broadcast_div(&scalar_like(6.0, &h)?)?, 1.0)?;
    let h = xh
        .ge(1.0)?
        .where_cond(&add_c(&xh, -1.0)?, &xh)?
        .to_dtype(DType::F32)?
        .to_dtype(f64_)?;
    // `(int)(h·255)` clamped to 0..=255: floor = truncation once clamped.
    let uh = mul_c(&h, 255.0)?.floor()?.clamp(0f64, 255f64)?;
    let us = mul_c(&s.to_dtype(f64_)?, 255.0)?
        .floor()?
        .clamp(0f64, 255f64)?;
    Ok((uh, us, maxc.to_dtype(f64_)?))
}

/// Pillow `hsv2rgb` of `[N, H, W, 1]` F64 planes of integers 0..=255: `[N, H, W, 3]` F32, with
/// the reference's f32/f64 steps (see `loader::photometric::hsv_to_rgb`). With `s = 0`,
/// `p = q = t = v`, so Pillow's gray shortcut needs no branch.
pub fn hsv_to_rgb(h: &Tensor, s: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (f32_, f64_) = (DType::F32, DType::F64);
    let c255 = scalar_like(255.0, h)?;
    let hx = mul_c(h, 6.0)?.broadcast_div(&c255)?;
    let i = hx.floor()?;
    let f = (&hx - &i)?.to_dtype(f32_)?;
    let fs = s.broadcast_div(&c255)?.to_dtype(f32_)?;
    let (f64v, fs64) = (f.to_dtype(f64_)?, fs.to_dtype(f64_)?);
    // C `round` of a value in [0, 255]: floor(x + 0.5) (checked against it for all inputs).
    let round = |x: Tensor| add_c(&x, 0.5)?.floor();
    let p = round((v * rsub_c(1.0, &fs64)?)?)?;
    let q = round((v * rsub_c(1.0, &(&fs * &f)?.to_dtype(f64_)?)?)?)?;
    let t = round((v * rsub_c(1.0, &(&fs64 * rsub_c(1.0, &f64v)?)?)?)?)?;
    // Sector = i mod 6 for i in 0..=6.
    let sector = (&i - mul_c(&i.ge(6.0)?.to_dtype(f64_)?, 6.0)?)?;
    let (n, hh, ww, _) = h.dims4()?;
    // Indices into `[v, t, p, q]` per sector, as in Pillow's switch (the loader's table).
    let pick = Tensor::new(&HSV_PICK.map(|k| k.map(u32::from)), h.device())?;
    let ids = pick
        .index_select(&sector.flatten_all()?.to_dtype(DType::U32)?, 0)?
        .reshape((n, hh, ww, 3))?;
    Tensor::cat(&[v, &t, &p, &q], 3)?
        .to_dtype(f32_)?
        .gather(&ids, 3)
}

/// torchvision `adjust_hue` on PIL: H += shift (uint8, wrapping) in Pillow's uint8 HSV.
/// `shift`: `[N, 1, 1, 1]` F64 integers 0..=255.
fn hue(x: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (h, s, v) = rgb_to_hsv(x)?;
    let h = h.broadcast_add(shift)?;
    let h = (&h - mul_c(&h.ge(256.0)?.to_dtype(DType::F64)?, 256.0)?)?;
    hsv_to_rgb(&h, &s, &v)
}

/// The banded matrices `M` (`[len(weights), len, len]` F64) of one extended box pass along an
/// axis of `len` pixels, one per crop: `out[y] = Σ_j M[y, j]·src[j]` before rounding, i.e.
/// `ww` on taps `y−r..=y+r`, `fw` on `y−r−1` and `y+r+1`, taps outside the axis moved to the
/// edge pixel (Pillow's edge repetition). Built on the device from the per-crop (r, ww, fw).
pub fn box_matrices(len: usize, weights: &[BoxWeights], dev: &Device) -> Result<Tensor> {
    let m = weights.len();
    let col = |v: Vec<f64>| Tensor::from_vec(v, (m, 1, 1), dev);
    let r = col(weights.iter().map(|b| b.radius as f64).collect())?;
    let ww = col(weights.iter().map(|b| b.ww as f64).collect())?;
    let fw = col(weights.iter().map(|b| b.fw as f64).collect())?;
    let idx = Tensor::arange(0u32, len as u32, dev)?.to_dtype(DType::F64)?;
    let y = idx.reshape((1, len, 1))?;
    let j = idx.reshape((1, 1, len))?;
    let f64_ = DType::F64;
    let dist = j.broadcast_sub(&y)?.abs()?;
    let inner = dist.broadcast_le(&r)?.to_dtype(f64_)?.broadcast_mul(&ww)?;
    let far = dist
        .broadcast_eq(&add_c(&r, 1.0)?)?
        .to_dtype(f64_)?
        .broadcast_mul(&fw)?;
    // Weight moved to column 0 from taps left of the axis: ww per tap y−r..−1, fw if y−r−1 < 0.
    let left = r
        .broadcast_sub(&y)?
        .maximum(0f64)?
        .broadcast_mul(&ww)?
        .broadcast_add(&y.broadcast_le(&r)?.to_dtype(f64_)?.broadcast_mul(&fw)?)?;
    // And to column len−1 from taps right of it: ww per tap len..y+r, fw if y+r+1 >= len.
    let over = add_c(&y.broadcast_add(&r)?, 1.0 - len as f64)?;
    let right = over
        .maximum(0f64)?
        .broadcast_mul(&ww)?
        .broadcast_add(&over.ge(0f64)?.to_dtype(f64_)?.broadcast_mul(&fw)?)?;
    let first = j.eq(0f64)?.to_dtype(f64_)?;
    let last = j.eq((len - 1) as f64)?.to_dtype(f64_)?;
    (inner + far)?
        .broadcast_add(&left.broadcast_mul(&first)?)?
        .broadcast_add(&right.broadcast_mul(&last)?)
}

/// One box pass of `[m, len, k]` F64 integer rows along dim 1: `(M·x + 2^23) >> 24`. The sums are
/// integers below 2^32, exact in f64 in any summation order.
fn box_pass(mat: &Tensor, x: &Tensor) -> Result<Tensor> {
    let s = mat.matmul(x)?;
    mul_c(&add_c(&s, (1u64 << 23) as f64)?, 1.0 / (1u64 << 24) as f64)?.floor()
}

/// Pillow `GaussianBlur`: three horizontal box passes, then three vertical ones, rounded to
/// integers after each, per crop with its own weights.
fn gaussian_blur(x: &Tensor, weights: &[BoxWeights]) -> Result<Tensor> {
    let (m, h, w, _) = x.dims4()?;
    let dev = x.device();
    let mh = box_matrices(h, weights, dev)?;
    let mw = if w == h {
        mh.clone()
    } else {
        box_matrices(w, weights, dev)?
    };
    // Horizontal passes on the transposed crop: rows of [m, W, H·3].
    let mut t = x
        .to_dtype(DType::F64)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((m, w, h * 3))?;
    for _ in 0..3 {
        t = box_pass(&mw, &t)?;
    }
    let mut t = t
        .reshape((m, w, h, 3))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((m, h, w * 3))?;
    for _ in 0..3 {
        t = box_pass(&mh, &t)?;
    }
    t.reshape((m, h, w, 3))?.to_dtype(DType::F32)
}

/// `ImageOps.solarize(img, 128)` on the crops with `s = 1` (`[N, 1, 1, 1]` F32 of 0/1):
/// `x + s·[x ≥ 128]·(255 − 2x)`, exact on integers.
fn solarize(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let hit = x.ge(128f32)?.to_dtype(DType::F32)?.broadcast_mul(s)?;
    (x + (hit * x.affine(-2.0, 255.0)?)?)?.contiguous()
}
