//! A pre-norm block's residual update fused with the next LayerNorm, forward and backward.
//!
//! Forward ([`residual_add_layer_norm`]): y = x + m·(a + ab) (the branch output with its last
//! bias added to the stream, m its per-sample stochastic-depth multiplier) and LN(y) for the
//! next branch in one pass, where composed the bias add writes a + ab and reads it back and the
//! LayerNorm reads y back (20 → 12 bytes per element in bf16 training: x 4, a 2, y 4, LN(y) 2).
//!
//! Backward ([`layer_norm_backward_residual`]):
//! In a block, the stream's gradient `dres` passes the branch by and the branch's LayerNorm adds
//! its input gradient to it: dx = dres + rstd·(g − mean(g·x̂)·x̂ − mean g), g = w·dy. The next
//! branch down reads dx·m (its stochastic-depth multiplier per sample) in the compute dtype, and
//! dw += Σ dy·x̂, db += Σ dy. Composed, that is the LN input-gradient kernel, the dw/db kernel
//! (each reading x and dy), an add and a scale-and-cast; fused, one pass reads x, dy and dres once
//! and writes dx and the branch's gradient (34 → 16 bytes per element in bf16 training).

use super::cpu;
use super::ops::ln_stats;
use super::{bias_add, layer_norm, layer_norm_backward, residual_add};
use candle_core::memory;
use candle_core::{DType, Result, Tensor};

/// What the fused backward returns: dx (dres's dtype and shape), the next branch's gradient
/// when asked for, and the parameter gradients (w's dtype).
pub struct LnResidualGrads {
    pub dx: Tensor,
    pub branch: Option<Tensor>,
    pub dw: Tensor,
    pub db: Tensor,
}

/// The next branch's gradient: `dx·m` (`m` one multiplier per sample of dres's leading dim, or
/// none) in `dtype`.
#[derive(Clone, Copy)]
pub struct Branch<'a> {
    pub m: Option<&'a Tensor>,
    pub dtype: DType,
}

/// `dx·m` in `dtype`, composed (what the fused op's branch output replaces).
pub fn scale_cast(dx: &Tensor, m: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
    match m {
        Some(m) => {
            let mut per_sample = vec![1; dx.rank()];
            per_sample[0] = dx.dim(0)?;
            dx.broadcast_mul(&m.reshape(per_sample)?)?.to_dtype(dtype)
        }
        None => dx.to_dtype(dtype),
    }
}

/// `(y, LN(y))` with y = x + m·cast(a + ab): x `[B, T, D]` (the stream, parameter dtype), a the
/// branch output before its last bias (same shape, compute dtype; a + ab rounded to it, as
/// [`bias_add`] does), `m` one multiplier per sample or none; LN(y) as `[B·T, D]` rows in `out`,
/// y in x's dtype and shape.
#[allow(clippy::too_many_arguments)]
pub fn residual_add_layer_norm(
    x: &Tensor,
    a: &Tensor,
    ab: Option<&Tensor>,
    m: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    out: DType,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let d = w.elem_count();
    let n = x.elem_count();
    let ab_len = ab.map_or(d, |ab| ab.elem_count());
    if a.elem_count() != n || d == 0 || !n.is_multiple_of(d) || b.elem_count() != d || ab_len != d {
        candle_core::bail!(
            "residual + ln: x {n}, a {}, w {d}, b {}, a's bias {ab_len}",
            a.elem_count(),
            b.elem_count()
        );
    }
    if fused {
        // What the CUDA kernel takes, checked on every device (see `cpu::full`).
        let stream_and_params = [
            (x, "residual + ln x"),
            (w, "residual + ln w"),
            (b, "residual + ln b"),
        ];
        for (t, what) in stream_and_params
            .into_iter()
            .chain(ab.map(|t| (t, "residual + ln a's bias")))
        {
            cpu::full(t.dtype(), what)?;
        }
    }
    #[cfg(feature = "cuda")]
    if fused && x.device().is_cuda() {
        return cuda_forward(x, a, ab, m, w, b, eps, out);
    }
    if fused && x.device().is_cpu() {
        let r = memory::one_op(|| reference_forward(x, a, ab, m, w, b, eps, out))?;
        let reads = [Some(x), Some(a), ab, m, Some(w), Some(b)];
        record("residual_ln_fwd", reads.into_iter().flatten(), [&r.0, &r.1]);
        return Ok(r);
    }
    let a = match ab {
        Some(ab) => bias_add(a, ab, fused)?,
        None => a.clone(),
    };
    let y = residual_add(x, &a, m, fused)?;
    let ln = layer_norm(&y.reshape(((), d))?, w, b, eps, out, fused)?;
    Ok((y, ln))
}

/// The forward's definitions in f64; y is rounded to x's dtype before the LayerNorm reads it,
/// as the kernel does.
#[allow(clippy::too_many_arguments)]
fn reference_forward(
    x: &Tensor,
    a: &Tensor,
    ab: Option<&Tensor>,
    m: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    out: DType,
) -> Result<(Tensor, Tensor)> {
    let d = w.elem_count();
    let n = x.elem_count();
    let (xs, ws, bs) = (f64s(x)?, f64s(w)?, f64s(b)?);
    // a + ab rounded to a's dtype, as the bias add it replaces.
    let as_ = match ab {
        Some(ab) => {
            let ab = f64s(ab)?;
            let sum: Vec<f64> = f64s(a)?
                .iter()
                .enumerate()
                .map(|(i, v)| v + ab[i % d])
                .collect();
            f64s(&Tensor::from_vec(sum, a.shape(), a.device())?.to_dtype(a.dtype())?)?
        }
        None => f64s(a)?,
    };
    let (m, per) = multipliers(x, n / d, m, DType::F64)?;
    let m = f64s(&m)?;
    let y: Vec<f64> = (0..n).map(|i| xs[i] + m[i / d / per] * as_[i]).collect();
    let y = Tensor::from_vec(y, x.shape(), x.device())?.to_dtype(x.dtype())?;
    let ys = f64s(&y)?;
    let mut ln = vec![0.0; n];
    for (yr, lr) in ys.chunks(d).zip(ln.chunks_mut(d)) {
        let (mean, rstd) = ln_stats(yr, eps);
        for j in 0..d {
            lr[j] = (yr[j] - mean) * rstd * ws[j] + bs[j];
        }
    }
    let ln = Tensor::from_vec(ln, (n / d, d), x.device())?.to_dtype(out)?;
    Ok((y, ln))
}

/// A tensor's values as f64, in order (the references' inputs).
fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// The most columns the CUDA kernel takes (32 lanes × 16 per lane); wider rows are composed.
#[cfg(feature = "cuda")]
const CUDA_MAX_D: usize = 512;

/// x `[rows, D]` (the LN input, parameter dtype), w `[D]`, dy `[rows, D]` (the LN output's
/// gradient), dres (the stream's gradient, x's dtype, rows·D elements, any shape).
pub fn layer_norm_backward_residual(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dres: &Tensor,
    eps: f64,
    branch: Option<Branch<'_>>,
    fused: bool,
) -> Result<LnResidualGrads> {
    let (rows, d) = x.dims2()?;
    let (g, r) = (dy.elem_count(), dres.elem_count());
    if g != rows * d || r != rows * d || w.elem_count() != d {
        candle_core::bail!(
            "ln backward: x [{rows}, {d}], dy {g}, dres {r}, w {}",
            w.elem_count()
        );
    }
    if !fused {
        let (dl, dw, db) = layer_norm_backward(x, w, dy, eps, false)?;
        let dx = (dres + dl.reshape(dres.shape())?)?;
        let branch = branch.map(|b| scale_cast(&dx, b.m, b.dtype)).transpose()?;
        return Ok(LnResidualGrads { dx, branch, dw, db });
    }
    // What the CUDA kernel takes, checked on every device (see `cpu::full`).
    for (t, what) in [
        (x, "ln backward x"),
        (w, "ln backward w"),
        (dres, "ln backward dres"),
    ] {
        cpu::full(t.dtype(), what)?;
    }
    if let Some(b) = branch {
        cpu::same(
            b.dtype,
            dy.dtype(),
            "ln backward: the branch gradient and dy",
        )?;
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && w.elem_count() <= CUDA_MAX_D {
        return cuda(x, w, dy, dres, eps, branch);
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return layer_norm_backward_residual(x, w, dy, dres, eps, branch, false);
    }
    let m = branch.and_then(|b| b.m);
    let g = memory::one_op(|| reference(x, w, dy, dres, eps, branch))?;
    let written = [Some(&g.dx), g.branch.as_ref(), Some(&g.dw), Some(&g.db)];
    record(
        "ln_bwd_residual",
        [x, w, dy, dres].into_iter().chain(m),
        written.into_iter().flatten(),
    );
    Ok(g)
}

/// Records a CPU reference as the one kernel it stands for: what it reads and writes, by the
/// rule the storage ops are counted by ([`memory::view_bytes`]).
fn record<'a>(
    name: &'static str,
    reads: impl IntoIterator<Item = &'a Tensor>,
    written: impl IntoIterator<Item = &'a Tensor>,
) {
    if memory::recording() {
        let bytes = |ts: &mut dyn Iterator<Item = &'a Tensor>| {
            ts.map(|t| memory::view_bytes(t.dtype(), t.layout())).sum()
        };
        memory::record_op(
            name,
            bytes(&mut reads.into_iter()),
            bytes(&mut written.into_iter()),
            0,
        );
    }
}

/// Per-sample multipliers as `[B]` in `dtype` (ones without a mask; B = the stream's leading
/// dim) and the rows per sample.
fn multipliers(
    stream: &Tensor,
    rows: usize,
    m: Option<&Tensor>,
    dtype: DType,
) -> Result<(Tensor, usize)> {
    let samples = stream.dim(0)?;
    if samples == 0 || !rows.is_multiple_of(samples) {
        candle_core::bail!("residual stream: {rows} rows do not split over {samples} samples");
    }
    let m = match m {
        Some(m) => m.flatten_all()?.to_dtype(dtype)?,
        None => Tensor::ones(samples, dtype, stream.device())?,
    };
    if m.elem_count() != samples {
        candle_core::bail!(
            "residual stream: {} multipliers for {samples} samples",
            m.elem_count()
        );
    }
    Ok((m, rows / samples))
}

/// The definitions in f64 (the CPU reference of the CUDA kernel).
fn reference(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dres: &Tensor,
    eps: f64,
    branch: Option<Branch<'_>>,
) -> Result<LnResidualGrads> {
    let (rows, d) = x.dims2()?;
    let (xs, ws, gs, rs) = (f64s(x)?, f64s(w)?, f64s(dy)?, f64s(dres)?);
    let (m, per) = multipliers(dres, rows, branch.and_then(|b| b.m), DType::F64)?;
    let m = f64s(&m)?;
    let (mut dx, mut br) = (vec![0.0; rows * d], vec![0.0; rows * d]);
    let mut dwdb = vec![0.0; 2 * d];
    for r in 0..rows {
        let o = r * d;
        let xr = &xs[o..o + d];
        let (mean, rstd) = ln_stats(xr, eps);
        let (mut c1, mut c2) = (0.0, 0.0);
        for j in 0..d {
            let xh = (xr[j] - mean) * rstd;
            let g = ws[j] * gs[o + j];
            c1 += g * xh;
            c2 += g;
            dwdb[j] += gs[o + j] * xh;
            dwdb[d + j] += gs[o + j];
        }
        let (c1, c2) = (c1 / d as f64, c2 / d as f64);
        for j in 0..d {
            let xh = (xr[j] - mean) * rstd;
            dx[o + j] = rs[o + j] + rstd * (ws[j] * gs[o + j] - c1 * xh - c2);
            br[o + j] = dx[o + j] * m[r / per];
        }
    }
    let dev = x.device();
    let dx_t = Tensor::from_vec(dx, dres.shape(), dev)?.to_dtype(dres.dtype())?;
    let branch = branch
        .map(|b| Tensor::from_vec(br, dres.shape(), dev)?.to_dtype(b.dtype))
        .transpose()?;
    let dw = Tensor::from_vec(dwdb[..d].to_vec(), w.shape(), dev)?.to_dtype(w.dtype())?;
    let db = Tensor::from_vec(dwdb[d..].to_vec(), w.shape(), dev)?.to_dtype(w.dtype())?;
    Ok(LnResidualGrads {
        dx: dx_t,
        branch,
        dw,
        db,
    })
}

/// `ln_bwd_residual_{dy}`: f32 x, dres and parameters (the residual stream and the masters),
/// dy and the branch gradient in the compute dtype.
#[cfg(feature = "cuda")]
fn cuda(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dres: &Tensor,
    eps: f64,
    branch: Option<Branch<'_>>,
) -> Result<LnResidualGrads> {
    use super::gpu;
    use candle_core::bail;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;

    let (rows, d) = x.dims2()?;
    let (x, dy, dres) = (x.contiguous()?, dy.contiguous()?, dres.contiguous()?);
    let (m, per) = multipliers(&dres, rows, branch.and_then(|b| b.m), DType::F32)?;
    let [(xs, xl), (ws, wl), (gs, gl), (rs, rl), (ms, ml)] =
        [&x, w, &dy, &dres, &m].map(|t| t.storage_and_layout());
    let xi = gpu::input(&xs, xl, "ln backward x", true)?;
    let wi = gpu::input(&ws, wl, "ln backward w", true)?;
    let gi = gpu::input(&gs, gl, "ln backward dy", false)?;
    let ri = gpu::input(&rs, rl, "ln backward dres", true)?;
    let mi = gpu::input(&ms, ml, "ln backward m", true)?;
    let dev = match x.device() {
        candle_core::Device::Cuda(dev) => dev,
        _ => bail!("ln backward: x is not on a CUDA device"),
    };
    let k = gpu::func(
        dev,
        &format!("ln_bwd_residual_{}", gpu::suffix(gi.dtype())?),
    )?;
    let mut dx = gpu::Out::alloc(dev, DType::F32, rows * d, false)?;
    let mut br = match branch {
        Some(_) => Some(gpu::Out::alloc(dev, gi.dtype(), rows * d, false)?),
        None => None,
    };
    let mut dwdb = gpu::Out::alloc(dev, DType::F32, 2 * d, true)?;
    let (cfg, rows_per_block) = super::geometry::ln_residual(rows);
    let (ri32, di, epsf, rpb, peri, wb) = (
        rows as i32,
        d as i32,
        eps as f32,
        rows_per_block as i32,
        per as i32,
        branch.is_some() as i32,
    );
    let mut a = k.builder();
    xi.push(&mut a);
    wi.push(&mut a);
    gi.push(&mut a);
    ri.push(&mut a);
    mi.push(&mut a);
    dx.push(&mut a);
    match br.as_mut() {
        Some(o) => o.push(&mut a),
        // Not written when `write_branch` is 0; any pointer of the right type will do.
        None => gi.push(&mut a),
    }
    dwdb.push(&mut a);
    a.arg(&ri32)
        .arg(&di)
        .arg(&epsf)
        .arg(&rpb)
        .arg(&peri)
        .arg(&wb);
    gpu::launch(a, cfg)?;
    let dx = gpu::tensor(dx, dev, dres.shape());
    let branch = br.map(|o| gpu::tensor(o, dev, dres.shape()));
    let dwdb = gpu::tensor(dwdb, dev, (2, d));
    Ok(LnResidualGrads {
        dx,
        branch,
        dw: dwdb.narrow(0, 0, 1)?.reshape(w.shape())?,
        db: dwdb.narrow(0, 1, 1)?.reshape(w.shape())?,
    })
}

/// `residual_ln_fwd_{a}_{out}`: f32 stream and parameters, a and LN(y) in the compute dtype.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn cuda_forward(
    x: &Tensor,
    a: &Tensor,
    ab: Option<&Tensor>,
    m: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    out: DType,
) -> Result<(Tensor, Tensor)> {
    use super::gpu;
    use candle_core::bail;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;

    let d = w.elem_count();
    let rows = x.elem_count() / d.max(1);
    let (x, a) = (x.contiguous()?, a.contiguous()?);
    let (m, per) = multipliers(&x, rows, m, DType::F32)?;
    let ab = match ab {
        Some(ab) => ab.clone(),
        None => Tensor::zeros(d, DType::F32, x.device())?,
    };
    let [(xs, xl), (as_, al), (abs_, abl), (ms, ml), (ws, wl), (bs, bl)] =
        [&x, &a, &ab, &m, w, b].map(|t| t.storage_and_layout());
    let xi = gpu::input(&xs, xl, "residual + ln x", true)?;
    let ai = gpu::input(&as_, al, "residual + ln a", false)?;
    let abi = gpu::input(&abs_, abl, "residual + ln a's bias", true)?;
    let mi = gpu::input(&ms, ml, "residual + ln m", true)?;
    let wi = gpu::input(&ws, wl, "residual + ln w", true)?;
    let bi = gpu::input(&bs, bl, "residual + ln b", true)?;
    let dev = match x.device() {
        candle_core::Device::Cuda(dev) => dev,
        _ => bail!("residual + ln: x is not on a CUDA device"),
    };
    let k = gpu::func(
        dev,
        &format!(
            "residual_ln_fwd_{}_{}",
            gpu::suffix(ai.dtype())?,
            gpu::suffix(out)?
        ),
    )?;
    let mut y = gpu::Out::alloc(dev, DType::F32, rows * d, false)?;
    let mut ln = gpu::Out::alloc(dev, out, rows * d, false)?;
    let (di, peri, epsf) = (d as i32, per as i32, eps as f32);
    let mut args = k.builder();
    xi.push(&mut args);
    ai.push(&mut args);
    abi.push(&mut args);
    mi.push(&mut args);
    wi.push(&mut args);
    bi.push(&mut args);
    y.push(&mut args);
    ln.push(&mut args);
    args.arg(&di).arg(&peri).arg(&epsf);
    gpu::launch(args, super::geometry::layer_norm(rows, d))?;
    Ok((
        gpu::tensor(y, dev, x.shape()),
        gpu::tensor(ln, dev, (rows, d)),
    ))
}
