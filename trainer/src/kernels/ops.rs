//! The fused ops as candle custom ops. `cpu_fwd` is the reference (f64 arithmetic, any float
//! dtype); `cuda_fwd` launches `udi_kernels.cu` (f32 / bf16 activations, f32 parameters).
//! The public functions pick the fused op or the composed candle ops (`fused = false`).

use super::cpu;
#[cfg(feature = "cuda")]
use super::{geometry, gpu};
use crate::nn;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout,
    Result, Shape, Tensor, D,
};
#[cfg(feature = "cuda")]
use candle_core::{cuda_backend::cudarc::driver::PushKernelArg, CudaStorage};

/// f32 for half types, else the dtype itself: where statistics are computed.
fn upcast(d: DType) -> DType {
    match d {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

#[cfg(feature = "cuda")]
fn need_f32(i: &gpu::In<'_>, what: &str) -> Result<()> {
    if i.dtype() != DType::F32 {
        bail!("{what} must be f32 on CUDA, got {:?}", i.dtype());
    }
    Ok(())
}

// ---- LayerNorm ------------------------------------------------------------------------------

/// LayerNorm over the last dim: `(x − mean)/√(var + eps)·w + b`, output in `out`.
pub struct LayerNormOp {
    pub eps: f64,
    pub out: DType,
}

/// (mean, 1/√(var + eps)) of a row: the LayerNorm references' statistics.
pub(super) fn ln_stats(row: &[f64], eps: f64) -> (f64, f64) {
    let d = row.len() as f64;
    let mean = row.iter().sum::<f64>() / d;
    let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "udi-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::read(s1, l1, "layer_norm x")?;
        let w = cpu::read_full(s2, l2, "layer_norm w")?;
        let b = cpu::read_full(s3, l3, "layer_norm b")?;
        let (_, d) = cpu::rows_cols(l1)?;
        let mut y = vec![0.0; x.len()];
        for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
            let (mean, rstd) = ln_stats(xr, self.eps);
            for j in 0..d {
                yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
            }
        }
        Ok((cpu::write(&y, self.out)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (x, w, b) = (
            gpu::In::new(s1, l1, "layer_norm x")?,
            gpu::In::new(s2, l2, "layer_norm w")?,
            gpu::In::new(s3, l3, "layer_norm b")?,
        );
        need_f32(&w, "layer_norm w")?;
        need_f32(&b, "layer_norm b")?;
        let (rows, d) = cpu::rows_cols(l1)?;
        let name = format!(
            "ln_fwd_{}_{}",
            gpu::suffix(x.dtype())?,
            gpu::suffix(self.out)?
        );
        let k = gpu::func(dev, &name)?;
        let mut y = gpu::Out::alloc(dev, self.out, rows * d, false)?;
        let (di, eps) = (d as i32, self.eps as f32);
        let mut a = k.builder();
        x.push(&mut a);
        w.push(&mut a);
        b.push(&mut a);
        y.push(&mut a);
        a.arg(&di).arg(&eps);
        gpu::launch(a, geometry::layer_norm(rows, d))?;
        Ok((y.into_storage(dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &LnBwdDx { eps: self.eps })?;
        let d = w.elem_count();
        let dwdb = x.apply_op2_no_bwd(
            &dy,
            &LnBwdWb {
                eps: self.eps,
                out: w.dtype(),
            },
        )?;
        let dw = dwdb.narrow(0, 0, 1)?.reshape(w.shape())?;
        let db = dwdb.narrow(0, 1, 1)?.reshape(d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm backward, input gradient: (x, w, dy) → dx in x's dtype.
struct LnBwdDx {
    eps: f64,
}

impl CustomOp3 for LnBwdDx {
    fn name(&self) -> &'static str {
        "udi-layer-norm-bwd-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::read(s1, l1, "ln bwd x")?;
        let w = cpu::read_full(s2, l2, "ln bwd w")?;
        let dy = cpu::read(s3, l3, "ln bwd dy")?;
        let (_, d) = cpu::rows_cols(l1)?;
        let mut dx = vec![0.0; x.len()];
        for ((xr, gr), dr) in x.chunks(d).zip(dy.chunks(d)).zip(dx.chunks_mut(d)) {
            let (mean, rstd) = ln_stats(xr, self.eps);
            let (mut c1, mut c2) = (0.0, 0.0);
            for j in 0..d {
                let g = w[j] * gr[j];
                c1 += g * (xr[j] - mean) * rstd;
                c2 += g;
            }
            let (c1, c2) = (c1 / d as f64, c2 / d as f64);
            for j in 0..d {
                let xh = (xr[j] - mean) * rstd;
                dr[j] = rstd * (w[j] * gr[j] - c1 * xh - c2);
            }
        }
        Ok((cpu::write(&dx, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (x, w, dy) = (
            gpu::In::new(s1, l1, "ln bwd x")?,
            gpu::In::new(s2, l2, "ln bwd w")?,
            gpu::In::new(s3, l3, "ln bwd dy")?,
        );
        need_f32(&w, "layer_norm w")?;
        let (rows, d) = cpu::rows_cols(l1)?;
        let name = format!(
            "ln_bwd_dx_{}_{}",
            gpu::suffix(x.dtype())?,
            gpu::suffix(dy.dtype())?
        );
        let k = gpu::func(dev, &name)?;
        let mut dx = gpu::Out::alloc(dev, x.dtype(), rows * d, false)?;
        let (di, eps) = (d as i32, self.eps as f32);
        let mut a = k.builder();
        x.push(&mut a);
        w.push(&mut a);
        dy.push(&mut a);
        dx.push(&mut a);
        a.arg(&di).arg(&eps);
        gpu::launch(a, geometry::layer_norm(rows, d))?;
        Ok((dx.into_storage(dev), l1.shape().clone()))
    }
}

/// LayerNorm backward, parameter gradients: (x, dy) → `[2, D]` = [dw; db] in `out`.
struct LnBwdWb {
    eps: f64,
    out: DType,
}

impl CustomOp2 for LnBwdWb {
    fn name(&self) -> &'static str {
        "udi-layer-norm-bwd-wb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::full(self.out, "layer_norm parameter gradients")?;
        let x = cpu::read(s1, l1, "ln bwd x")?;
        let dy = cpu::read(s2, l2, "ln bwd dy")?;
        let (_, d) = cpu::rows_cols(l1)?;
        let mut out = vec![0.0; 2 * d];
        for (xr, gr) in x.chunks(d).zip(dy.chunks(d)) {
            let (mean, rstd) = ln_stats(xr, self.eps);
            for j in 0..d {
                out[j] += gr[j] * (xr[j] - mean) * rstd;
                out[d + j] += gr[j];
            }
        }
        Ok((cpu::write(&out, self.out)?, Shape::from((2, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (x, dy) = (
            gpu::In::new(s1, l1, "ln bwd x")?,
            gpu::In::new(s2, l2, "ln bwd dy")?,
        );
        if self.out != DType::F32 {
            bail!("layer_norm parameters must be f32 on CUDA");
        }
        let (rows, d) = cpu::rows_cols(l1)?;
        let (g, rpb) = geometry::layer_norm_wb(rows, d)?;
        let name = format!(
            "ln_bwd_wb_{}_{}",
            gpu::suffix(x.dtype())?,
            gpu::suffix(dy.dtype())?
        );
        let k = gpu::func(dev, &name)?;
        let mut out = gpu::Out::alloc(dev, DType::F32, 2 * d, true)?;
        let (ri, di, eps, rpb) = (rows as i32, d as i32, self.eps as f32, rpb as i32);
        let mut a = k.builder();
        x.push(&mut a);
        dy.push(&mut a);
        out.push(&mut a);
        a.arg(&ri).arg(&di).arg(&eps).arg(&rpb);
        gpu::launch(a, g)?;
        Ok((out.into_storage(dev), Shape::from((2, d))))
    }
}

/// LayerNorm over the last dimension with f32 (parameter-dtype) statistics, output in `out`.
/// Composed: candle ops (differentiable); fused: [`LayerNormOp`].
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    out: DType,
    fused: bool,
) -> Result<Tensor> {
    if fused {
        return x.contiguous()?.apply_op3(w, b, LayerNormOp { eps, out });
    }
    let x = x.to_dtype(upcast(w.dtype()))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)?.to_dtype(out)
}

// ---- bias + GELU ------------------------------------------------------------------------------

/// `y = f(x + b)` with `b` broadcast over rows: one thread per element, for kernel `{kernel}_{dtype}`.
#[cfg(feature = "cuda")]
fn bias_elementwise(
    kernel: &str,
    what: &str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let (x, b) = (
        gpu::In::new(s1, l1, &format!("{what} x"))?,
        gpu::In::new(s2, l2, &format!("{what} b"))?,
    );
    need_f32(&b, &format!("{what} b"))?;
    let n = l1.shape().elem_count();
    let d = l2.shape().elem_count() as i32;
    let k = gpu::func(dev, &format!("{kernel}_{}", gpu::suffix(x.dtype())?))?;
    let mut y = gpu::Out::alloc(dev, x.dtype(), n, false)?;
    let mut a = k.builder();
    x.push(&mut a);
    b.push(&mut a);
    y.push(&mut a);
    a.arg(&n).arg(&d);
    gpu::launch(a, geometry::elementwise(n))?;
    Ok((y.into_storage(dev), l1.shape().clone()))
}

/// `gelu_erf(x + b)` with b broadcast over the last dim; output in x's dtype.
pub struct BiasGelu;

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + cpu::erf(v / std::f64::consts::SQRT_2))
}

fn gelu_grad(v: f64) -> f64 {
    0.5 * (1.0 + cpu::erf(v / std::f64::consts::SQRT_2))
        + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "udi-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::read(s1, l1, "bias_gelu x")?;
        let b = cpu::read_full(s2, l2, "bias_gelu b")?;
        let d = b.len();
        let y: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| gelu(v + b[i % d]))
            .collect();
        Ok((cpu::write(&y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bias_elementwise("bias_gelu_fwd", "bias_gelu", s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = bias_gelu_backward(x, b, dy, true)?;
        Ok((Some(dx), Some(db)))
    }
}

/// The bias-GELU backward's reference, for both ops: from the (x, b, dy) storages, dx =
/// dy·gelu'(x + b) in x's dtype (returned), db = Σ_rows dx of dx as rounded (what a column sum of
/// dx reads; left in `db`, b's dtype) and, with `gelu_too`, the forward's output gelu(x + b) as
/// f64 values.
#[allow(clippy::too_many_arguments)]
fn bias_gelu_bwd_reference(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    db_out: &Second,
    gelu_too: bool,
) -> Result<(CpuStorage, Option<Vec<f64>>)> {
    cpu::same(s1.dtype(), s3.dtype(), "bias_gelu backward x and dy")?;
    let x = cpu::read(s1, l1, "bias_gelu x")?;
    let b = cpu::read_full(s2, l2, "bias_gelu b")?;
    let dy = cpu::read(s3, l3, "bias_gelu dy")?;
    let d = b.len();
    let dx: Vec<f64> = x
        .iter()
        .zip(&dy)
        .enumerate()
        .map(|(i, (&v, &g))| g * gelu_grad(v + b[i % d]))
        .collect();
    let dx = cpu::write(&dx, s1.dtype())?;
    let rounded = cpu::read(&dx, &Layout::contiguous(x.len()), "bias_gelu dx")?;
    let mut db = vec![0.0; d];
    for row in rounded.chunks(d) {
        db.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    db_out.put(Tensor::from_vec(db, d, &candle_core::Device::Cpu)?.to_dtype(s2.dtype())?)?;
    let y = gelu_too.then(|| {
        x.iter()
            .enumerate()
            .map(|(i, &v)| gelu(v + b[i % d]))
            .collect()
    });
    Ok((dx, y))
}

/// `$body` with `$v` a mutable typed view of an in-place op's destination `$s1` (f32 or bf16,
/// elements `$span`), to push onto a launch. A macro: the view's borrow must outlive the launch
/// arguments that hold it.
#[cfg(feature = "cuda")]
macro_rules! with_dest_view {
    ($s1:expr, $span:expr, |$v:ident| $body:expr) => {
        match $s1.dtype() {
            DType::F32 => {
                let mut $v = $s1.as_cuda_slice_mut::<f32>()?.slice_mut($span);
                $body
            }
            _ => {
                let mut $v = $s1.as_cuda_slice_mut::<half::bf16>()?.slice_mut($span);
                $body
            }
        }
    };
}

/// `bias_gelu_bwd_{dtype}`: dx and db (and the GELU output over x when in place) in one pass on
/// `col_sum`'s grid; `|a| push` pushes x onto the launch `a` (read-only, or the in-place
/// destination). A macro: x's borrow must live as long as the launch's arguments.
#[cfg(feature = "cuda")]
macro_rules! launch_bias_gelu_bwd {
    (
        $dev:expr, |$a:ident| $push_x:expr, $b:expr, $dy:expr, $rows:expr, $d:expr,
        $in_place:expr
    ) => {{
        need_f32($b, "bias_gelu b")?;
        let (geo, rpb) = geometry::col_sum($rows, $d);
        let k = gpu::func(
            $dev,
            &format!("bias_gelu_bwd_{}", gpu::suffix($dy.dtype())?),
        )?;
        let mut dx = gpu::Out::alloc($dev, $dy.dtype(), $rows * $d, false)?;
        let mut db = gpu::Out::alloc($dev, DType::F32, $d, true)?;
        let (ri, di, rpbi, gi) = ($rows as i32, $d as i32, rpb as i32, $in_place as i32);
        let mut $a = k.builder();
        $push_x;
        $b.push(&mut $a);
        $dy.push(&mut $a);
        dx.push(&mut $a);
        db.push(&mut $a);
        $a.arg(&ri).arg(&di).arg(&rpbi).arg(&gi);
        gpu::launch($a, geo)?;
        (dx, db)
    }};
}

/// (x, b, dy) → dx = dy·gelu'(x + b) in x's dtype, and the bias gradient db = Σ_rows dx (of dx
/// as rounded, in b's dtype) from the same pass, left in `db`.
#[derive(Default)]
struct BiasGeluBwd {
    db: Second,
}

impl CustomOp3 for BiasGeluBwd {
    fn name(&self) -> &'static str {
        "udi-bias-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dx, _) = bias_gelu_bwd_reference(s1, l1, s2, l2, s3, l3, &self.db, false)?;
        Ok((dx, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (x, b, dy) = (
            gpu::In::new(s1, l1, "bias_gelu x")?,
            gpu::In::new(s2, l2, "bias_gelu b")?,
            gpu::In::new(s3, l3, "bias_gelu dy")?,
        );
        cpu::same(x.dtype(), dy.dtype(), "bias_gelu backward x and dy")?;
        let d = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / d.max(1);
        let (dx, db) = launch_bias_gelu_bwd!(dev, |a| x.push(&mut a), &b, &dy, rows, d, false);
        self.db.put(gpu::tensor(db, dev, d))?;
        Ok((dx.into_storage(dev), l1.shape().clone()))
    }
}

/// The same backward in place over x for a backward that did not keep the forward's output:
/// (x, b, dy) → x overwritten by gelu(x + b) (bit for bit [`BiasGelu`]'s), dx and db left in
/// `dx` and `db`. One pass, and no new buffer for the output it makes again.
#[derive(Default)]
struct BiasGeluBwdRecompute {
    dx: Second,
    db: Second,
}

impl InplaceOp3 for BiasGeluBwdRecompute {
    fn name(&self) -> &'static str {
        "udi-bias-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (dx, y) = bias_gelu_bwd_reference(s1, l1, s2, l2, s3, l3, &self.db, true)?;
        let y = y.expect("asked for");
        cpu::write_into(s1, super::span(l1, y.len(), "bias_gelu in place")?, &y)?;
        // dx as the kernel allocates it (no f64 copy: the memory model counts every storage).
        let dx = Tensor::from_storage(
            candle_core::Storage::Cpu(dx),
            y.len(),
            candle_core::op::BackpropOp::none(),
            false,
        );
        self.dx.put(dx)?;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let dev = s1.device.clone();
        let (b, dy) = (
            gpu::In::new(s2, l2, "bias_gelu b")?,
            gpu::In::new(s3, l3, "bias_gelu dy")?,
        );
        cpu::same(s1.dtype(), dy.dtype(), "bias_gelu backward x and dy")?;
        let d = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / d.max(1);
        let span = super::span(l1, rows * d, "bias_gelu in place")?;
        let (dx, db) = with_dest_view!(s1, span, |v| {
            launch_bias_gelu_bwd!(&dev, |a| a.arg(&mut v), &b, &dy, rows, d, true)
        });
        self.dx.put(gpu::tensor(dx, &dev, rows * d))?;
        self.db.put(gpu::tensor(db, &dev, d))?;
        Ok(())
    }
}

/// An op's second output, which candle's custom ops (one output each) cannot return: the op
/// leaves it here and the caller takes it after the call.
#[derive(Default)]
struct Second(std::sync::Mutex<Option<Tensor>>);

impl Second {
    /// Leaves `t`, counted as written by the op that makes it (`trainer bench --traffic`).
    fn put(&self, t: Tensor) -> Result<()> {
        candle_core::memory::written_by_op(candle_core::memory::view_bytes(t.dtype(), t.layout()));
        match self.0.lock() {
            Ok(mut slot) => {
                *slot = Some(t);
                Ok(())
            }
            Err(_) => bail!("an op's second output: poisoned"),
        }
    }

    fn take(&self, what: &str) -> Result<Tensor> {
        match self.0.lock().map(|mut s| s.take()) {
            Ok(Some(t)) => Ok(t),
            _ => bail!("{what}: the op left no second output"),
        }
    }
}

/// `x + b` with b (f32) broadcast over the last dim; output in x's dtype. The backward sums
/// the bias gradient in b's dtype: candle's own broadcast-add backward would sum thousands of
/// bf16 rows in bf16 (30–45 % off for the qkv biases in `bias_add_keeps_f32_bias_gradients`).
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "udi-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::read(s1, l1, "bias_add x")?;
        let b = cpu::read_full(s2, l2, "bias_add b")?;
        let d = b.len();
        let y: Vec<f64> = x.iter().enumerate().map(|(i, &v)| v + b[i % d]).collect();
        Ok((cpu::write(&y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bias_elementwise("bias_add", "bias_add", s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = col_sum(dy, b.dtype(), true)?.reshape(b.shape())?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

/// `x + b` (b over the last dim) in x's dtype with the bias gradient summed in b's dtype.
/// Composed: the add runs in b's dtype when x is narrower (a cast there and back), so that
/// candle's reduction for the bias gradient is f32 too.
pub fn bias_add(x: &Tensor, b: &Tensor, fused: bool) -> Result<Tensor> {
    if fused {
        return x.contiguous()?.apply_op2(b, BiasAdd);
    }
    if x.dtype() == b.dtype() {
        return x.broadcast_add(b);
    }
    x.to_dtype(b.dtype())?.broadcast_add(b)?.to_dtype(x.dtype())
}

/// `gelu_erf(x + b)` (b over the last dim, cast to x's dtype in the composed path).
pub fn bias_gelu(x: &Tensor, b: &Tensor, fused: bool) -> Result<Tensor> {
    if fused {
        return x.contiguous()?.apply_op2(b, BiasGelu);
    }
    bias_add(x, b, false)?.gelu_erf()
}

// ---- input crops ---------------------------------------------------------------------------------

/// uint8 HWC crops `[N, S, S, 3]` → f32 NCHW `[N, 3, S, S]`: `(x/255 − mean[c])/std[c]`, each
/// step an f32 operation (true division), as torchvision's ToTensor + Normalize and the composed
/// ops of [`crate::data::normalise`]: bit for bit, so the reference is f32 too.
struct NormaliseCrops {
    mean: [f32; 3],
    std: [f32; 3],
}

impl NormaliseCrops {
    fn dims(l: &Layout) -> Result<(usize, usize)> {
        let (n, s, s2, c) = l.shape().dims4()?;
        if s != s2 || c != 3 {
            bail!(
                "normalise_crops: crops must be [N, S, S, 3], got {:?}",
                l.shape()
            );
        }
        Ok((n, s))
    }
}

impl CustomOp1 for NormaliseCrops {
    fn name(&self) -> &'static str {
        "udi-normalise-crops"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, side) = Self::dims(l)?;
        let (CpuStorage::U8(x), Some((a, b))) = (s, l.contiguous_offsets()) else {
            bail!("normalise_crops: crops must be contiguous uint8");
        };
        let x = &x[a..b];
        let hw = side * side;
        let mut y = vec![0f32; x.len()];
        for (i, v) in y.iter_mut().enumerate() {
            let (img, c, p) = (i / (3 * hw), i / hw % 3, i % hw);
            *v = (x[(img * hw + p) * 3 + c] as f32 / 255.0 - self.mean[c]) / self.std[c];
        }
        Ok((CpuStorage::F32(y), Shape::from((n, 3, side, side))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let (n, side) = Self::dims(l)?;
        let x = gpu::In::new(s, l, "normalise_crops x")?;
        if x.dtype() != DType::U8 {
            bail!("normalise_crops: crops must be uint8, got {:?}", x.dtype());
        }
        let len = l.shape().elem_count();
        let k = gpu::func(dev, "normalise_crops")?;
        let mut y = gpu::Out::alloc(dev, DType::F32, len, false)?;
        let si = side as i32;
        let ([m0, m1, m2], [d0, d1, d2]) = (self.mean, self.std);
        let mut a = k.builder();
        x.push(&mut a);
        y.push(&mut a);
        a.arg(&len).arg(&si);
        a.arg(&m0).arg(&m1).arg(&m2).arg(&d0).arg(&d1).arg(&d2);
        gpu::launch(a, geometry::elementwise(len))?;
        Ok((y.into_storage(dev), Shape::from((n, 3, side, side))))
    }
}

/// uint8 HWC crops `[N, S, S, 3]` → normalised f32 NCHW `[N, 3, S, S]`, `(x/255 − mean)/std`
/// per channel, every step in f32 as torchvision's ToTensor + Normalize. Fused: one pass
/// ([`NormaliseCrops`]), bit for bit the composed ops (a cast, a division, a subtraction, a
/// division and a layout copy, each a pass over f32 crops).
pub fn normalise_crops(x: &Tensor, mean: [f32; 3], std: [f32; 3], fused: bool) -> Result<Tensor> {
    if fused {
        return x
            .contiguous()?
            .apply_op1_no_bwd(&NormaliseCrops { mean, std });
    }
    let dev = x.device();
    // True f32 division (candle's `t / 255.0` multiplies by the reciprocal: 1 ulp off torch).
    let t = x
        .to_dtype(DType::F32)?
        .broadcast_div(&Tensor::new(&[255f32], dev)?)?
        .broadcast_sub(&Tensor::new(&mean, dev)?)?
        .broadcast_div(&Tensor::new(&std, dev)?)?;
    t.permute((0, 3, 1, 2))?.contiguous()
}

// ---- column sums (bias gradients) ----------------------------------------------------------------

/// Σ over rows of a `[rows, d]` matrix, in `out` (f32 under bf16): the bias gradient. candle's
/// `sum(0)` reduces a column per thread block with strided reads, which dominated the bias
/// gradients of ViT-S at batch 128 (99 328 rows).
pub struct ColSum {
    pub out: DType,
}

impl CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "udi-col-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::full(self.out, "col_sum output")?;
        let x = cpu::read(s, l, "col_sum x")?;
        let (_, d) = cpu::rows_cols(l)?;
        let mut out = vec![0.0; d];
        for r in x.chunks(d) {
            for (o, v) in out.iter_mut().zip(r) {
                *o += v;
            }
        }
        Ok((cpu::write(&out, self.out)?, Shape::from(d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let x = gpu::In::new(s, l, "col_sum x")?;
        if self.out != DType::F32 {
            bail!("col_sum: output must be f32 on CUDA");
        }
        let (rows, d) = cpu::rows_cols(l)?;
        let (g, rpb) = geometry::col_sum(rows, d);
        let k = gpu::func(dev, &format!("col_sum_{}", gpu::suffix(x.dtype())?))?;
        let mut out = gpu::Out::alloc(dev, DType::F32, d, true)?;
        let (ri, di, rpbi) = (rows as i32, d as i32, rpb as i32);
        let mut a = k.builder();
        x.push(&mut a);
        out.push(&mut a);
        a.arg(&ri).arg(&di).arg(&rpbi);
        gpu::launch(a, g)?;
        Ok((out.into_storage(dev), Shape::from(d)))
    }
}

/// The sum over every leading dim of `x` (`[.., d]` → `[d]`) in `out`, e.g. a bias gradient.
/// Fused on CUDA: [`ColSum`]; composed: a cast and candle's `sum(0)`.
pub fn col_sum(x: &Tensor, out: DType, fused: bool) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x = x.reshape(((), d))?;
    if fused {
        return x.contiguous()?.apply_op1_no_bwd(&ColSum { out });
    }
    x.to_dtype(out)?.sum(0)
}

// ---- residual add ------------------------------------------------------------------------------

/// `x + m[b]·a`: a block's residual update in one pass. `x` is the residual stream (parameter
/// dtype), `a` the branch output (compute dtype, cast up), `m` one multiplier per sample of the
/// leading dim (the stochastic-depth mask, 0 or 1/keep).
pub struct ResidualAdd;

impl CustomOp3 for ResidualAdd {
    fn name(&self) -> &'static str {
        "udi-residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::read_full(s1, l1, "residual x")?;
        let a = cpu::read(s2, l2, "residual a")?;
        let m = cpu::read_full(s3, l3, "residual m")?;
        if a.len() != x.len() || m.is_empty() || x.len() % m.len() != 0 {
            bail!(
                "residual_add: x {} a {} m {} elements",
                x.len(),
                a.len(),
                m.len()
            );
        }
        let per = x.len() / m.len();
        let y: Vec<f64> = (0..x.len()).map(|i| x[i] + m[i / per] * a[i]).collect();
        Ok((cpu::write(&y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (x, a, m) = (
            gpu::In::new(s1, l1, "residual x")?,
            gpu::In::new(s2, l2, "residual a")?,
            gpu::In::new(s3, l3, "residual m")?,
        );
        need_f32(&x, "residual x")?;
        need_f32(&m, "residual m")?;
        let n = l1.shape().elem_count();
        let per = n / l3.shape().elem_count().max(1);
        let k = gpu::func(dev, &format!("residual_add_{}", gpu::suffix(a.dtype())?))?;
        let mut y = gpu::Out::alloc(dev, DType::F32, n, false)?;
        let mut b = k.builder();
        x.push(&mut b);
        a.push(&mut b);
        m.push(&mut b);
        y.push(&mut b);
        b.arg(&n).arg(&per);
        gpu::launch(b, geometry::elementwise(n))?;
        Ok((y.into_storage(dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        a: &Tensor,
        m: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let da = dy.apply_op2_no_bwd(m, &RowScale { out: a.dtype() })?;
        Ok((Some(dy.clone()), Some(da), None))
    }
}

/// `g·m[b]` cast to `out`: the branch gradient of [`ResidualAdd`].
pub struct RowScale {
    pub out: DType,
}

impl CustomOp2 for RowScale {
    fn name(&self) -> &'static str {
        "udi-row-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = cpu::read_full(s1, l1, "row_scale g")?;
        let m = cpu::read_full(s2, l2, "row_scale m")?;
        let per = g.len() / m.len().max(1);
        let y: Vec<f64> = (0..g.len()).map(|i| g[i] * m[i / per]).collect();
        Ok((cpu::write(&y, self.out)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (g, m) = (
            gpu::In::new(s1, l1, "row_scale g")?,
            gpu::In::new(s2, l2, "row_scale m")?,
        );
        need_f32(&g, "row_scale g")?;
        need_f32(&m, "row_scale m")?;
        let n = l1.shape().elem_count();
        let per = n / l2.shape().elem_count().max(1);
        let k = gpu::func(dev, &format!("row_scale_{}", gpu::suffix(self.out)?))?;
        let mut y = gpu::Out::alloc(dev, self.out, n, false)?;
        let mut b = k.builder();
        g.push(&mut b);
        m.push(&mut b);
        y.push(&mut b);
        b.arg(&n).arg(&per);
        gpu::launch(b, geometry::elementwise(n))?;
        Ok((y.into_storage(dev), l1.shape().clone()))
    }
}

/// The residual update `x + m[b]·cast(a)` (`m`: per-sample multipliers `[B]`/`[B,1,1]`, or
/// none), in x's dtype.
pub fn residual_add(x: &Tensor, a: &Tensor, m: Option<&Tensor>, fused: bool) -> Result<Tensor> {
    if fused {
        let m = match m {
            Some(m) => m.flatten_all()?.to_dtype(x.dtype())?,
            None => Tensor::ones(x.dim(0)?, x.dtype(), x.device())?,
        };
        return x.contiguous()?.apply_op3(&a.contiguous()?, &m, ResidualAdd);
    }
    let a = a.to_dtype(x.dtype())?;
    let a = match m {
        Some(m) => {
            let mut per_sample = vec![1; x.rank()];
            per_sample[0] = x.dim(0)?;
            a.broadcast_mul(&m.reshape(per_sample)?)?
        }
        None => a,
    };
    x + a
}

// ---- gradient accumulation into the flat gradient buffer ----------------------------------------

/// `dst += g` in place: dst a contiguous slice of the flat gradient buffer (f32, or f64 in the
/// f64 references), g a parameter's gradient in any float dtype (cast up as it is read).
pub struct Accumulate;

impl InplaceOp2 for Accumulate {
    fn name(&self) -> &'static str {
        "udi-accumulate"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = cpu::read(s2, l2, "accumulate g")?;
        let r = super::span(l1, g.len(), "accumulate")?;
        match s1 {
            CpuStorage::F32(d) => d[r].iter_mut().zip(&g).for_each(|(d, &g)| *d += g as f32),
            CpuStorage::F64(d) => d[r].iter_mut().zip(&g).for_each(|(d, g)| *d += g),
            other => bail!("accumulate into f32 or f64, not {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dev = s1.device.clone();
        let g = gpu::In::new(s2, l2, "accumulate g")?;
        let n = l2.shape().elem_count();
        let r = super::span(l1, n, "accumulate")?;
        let k = gpu::func(
            &dev,
            &format!("grad_accumulate_{}", gpu::suffix(g.dtype())?),
        )?;
        let dst = s1.as_cuda_slice_mut::<f32>()?;
        let mut dst = dst.slice_mut(r);
        let mut args = k.builder();
        args.arg(&mut dst);
        g.push(&mut args);
        args.arg(&n);
        gpu::launch(args, geometry::elementwise(n))
    }
}

/// `flat[offset .. offset + |g|] += g` (g's elements in order, cast to flat's dtype). Fused: one
/// pass in place; composed: candle's add and a copy back.
pub fn accumulate(flat: &Tensor, offset: usize, g: &Tensor, fused: bool) -> Result<()> {
    let n = g.elem_count();
    let dst = flat.narrow(0, offset, n)?;
    if fused {
        return dst.inplace_op2(&g.contiguous()?, &Accumulate);
    }
    let sum = (dst + g.to_dtype(flat.dtype())?.flatten_all()?)?;
    flat.slice_set(&sum, 0, offset)
}

// ---- attention softmax ------------------------------------------------------------------------

/// `softmax(x·scale)` over the last dim, computed in f32 (f64 for f64), output in x's dtype.
pub struct AttnSoftmax {
    pub scale: f64,
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "udi-attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu::read(s, l, "attn_softmax x")?;
        let (_, n) = cpu::rows_cols(l)?;
        let mut y = vec![0.0; x.len()];
        for (xr, yr) in x.chunks(n).zip(y.chunks_mut(n)) {
            let m = xr
                .iter()
                .fold(f64::NEG_INFINITY, |a, &v| a.max(v * self.scale));
            let mut s = 0.0;
            for j in 0..n {
                yr[j] = (xr[j] * self.scale - m).exp();
                s += yr[j];
            }
            yr.iter_mut().for_each(|v| *v /= s);
        }
        Ok((cpu::write(&y, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let x = gpu::In::new(s, l, "attn_softmax x")?;
        let (rows, n) = cpu::rows_cols(l)?;
        let k = gpu::func(
            dev,
            &format!("attn_softmax_fwd_{}", gpu::suffix(x.dtype())?),
        )?;
        let mut y = gpu::Out::alloc(dev, x.dtype(), rows * n, false)?;
        let (ni, sc) = (n as i32, self.scale as f32);
        let mut a = k.builder();
        x.push(&mut a);
        y.push(&mut a);
        a.arg(&rows).arg(&ni).arg(&sc);
        gpu::launch(a, geometry::warp_rows(rows))?;
        Ok((y.into_storage(dev), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &dy.contiguous()?,
            &AttnSoftmaxBwd { scale: self.scale },
        )?))
    }
}

/// (y, dy) → scale·y·(dy − Σ y·dy).
struct AttnSoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "udi-attn-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::same(s1.dtype(), s2.dtype(), "attn_softmax backward y and dy")?;
        let y = cpu::read(s1, l1, "attn_softmax y")?;
        let dy = cpu::read(s2, l2, "attn_softmax dy")?;
        let (_, n) = cpu::rows_cols(l1)?;
        let mut dx = vec![0.0; y.len()];
        for ((yr, gr), dr) in y.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
            let s: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for j in 0..n {
                dr[j] = self.scale * yr[j] * (gr[j] - s);
            }
        }
        Ok((cpu::write(&dx, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (y, dy) = (
            gpu::In::new(s1, l1, "attn_softmax y")?,
            gpu::In::new(s2, l2, "attn_softmax dy")?,
        );
        if y.dtype() != dy.dtype() {
            bail!("attn_softmax backward: dtypes differ");
        }
        let (rows, n) = cpu::rows_cols(l1)?;
        let k = gpu::func(
            dev,
            &format!("attn_softmax_bwd_{}", gpu::suffix(y.dtype())?),
        )?;
        let mut dx = gpu::Out::alloc(dev, y.dtype(), rows * n, false)?;
        let (ni, sc) = (n as i32, self.scale as f32);
        let mut a = k.builder();
        y.push(&mut a);
        dy.push(&mut a);
        dx.push(&mut a);
        a.arg(&rows).arg(&ni).arg(&sc);
        gpu::launch(a, geometry::warp_rows(rows))?;
        Ok((dx.into_storage(dev), l1.shape().clone()))
    }
}

/// `softmax(x·scale)` over the last dim: statistics in f32 for bf16 inputs, output in x's dtype.
pub fn attn_softmax(x: &Tensor, scale: f64, fused: bool) -> Result<Tensor> {
    if fused {
        return x.contiguous()?.apply_op1(AttnSoftmax { scale });
    }
    let z = (x.to_dtype(upcast(x.dtype()))? * scale)?;
    nn::softmax(&z)?.to_dtype(x.dtype())
}

// ---- the head's weight-normalised last layer -----------------------------------------------------

/// `W = g ⊙ V/‖V_row‖` (udi-spec §2.4) for V `[K, E]`, g `[K, 1]` (f32 parameters), in `out`:
/// one pass over V instead of a square, a sum, a division, a product and a cast.
struct WeightNorm {
    out: DType,
}

/// The rows and width of V, and g's shape checked against them.
fn weight_norm_dims(lv: &Layout, lg: &Layout) -> Result<(usize, usize)> {
    let (k, e) = lv.shape().dims2()?;
    if lg.shape().dims() != [k, 1] {
        bail!(
            "weight_norm: V {:?} needs g [{k}, 1], got {:?}",
            lv.shape(),
            lg.shape()
        );
    }
    Ok((k, e))
}

impl CustomOp2 for WeightNorm {
    fn name(&self) -> &'static str {
        "udi-weight-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, e) = weight_norm_dims(l1, l2)?;
        let v = cpu::read_full(s1, l1, "weight_norm V")?;
        let g = cpu::read_full(s2, l2, "weight_norm g")?;
        let mut w = vec![0.0; v.len()];
        for ((vr, wr), g) in v.chunks(e).zip(w.chunks_mut(e)).zip(&g) {
            let n = vr.iter().map(|x| x * x).sum::<f64>().sqrt();
            wr.iter_mut().zip(vr).for_each(|(w, v)| *w = v / n * g);
        }
        Ok((cpu::write(&w, self.out)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (k, e) = weight_norm_dims(l1, l2)?;
        let v = gpu::In::new(s1, l1, "weight_norm V")?;
        let g = gpu::In::new(s2, l2, "weight_norm g")?;
        need_f32(&v, "weight_norm V")?;
        need_f32(&g, "weight_norm g")?;
        let f = gpu::func(dev, &format!("weight_norm_{}", gpu::suffix(self.out)?))?;
        let mut w = gpu::Out::alloc(dev, self.out, k * e, false)?;
        let ei = e as i32;
        let mut a = f.builder();
        v.push(&mut a);
        g.push(&mut a);
        w.push(&mut a);
        a.arg(&k).arg(&ei);
        gpu::launch(a, geometry::warp_rows(k))?;
        Ok((w.into_storage(dev), l1.shape().clone()))
    }
}

/// The weight-normalised last layer `W = g ⊙ V/‖V_row‖` in `out` (V `[K, E]`, g `[K, 1]`, f32).
pub fn weight_norm(v: &Tensor, g: &Tensor, out: DType, fused: bool) -> Result<Tensor> {
    if fused {
        return v
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &WeightNorm { out });
    }
    let v_norm = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    v.broadcast_div(&v_norm)?.broadcast_mul(g)?.to_dtype(out)
}

/// The gradients of [`weight_norm`] from dW (`[K, E]`, V's dtype): with u = V/‖V‖, dg = Σ_e dW ⊙ u
/// (the second output, `[K, 1]`) and dV = g/‖V‖ ⊙ (dW − u ⊙ dg). ‖V‖ is recomputed from V in the
/// same pass (a warp holds a row), so the forward saves nothing.
struct WeightNormBwd {
    dg: Second,
}

impl WeightNormBwd {
    /// (K, E) of V, with g `[K, 1]` and dW V's shape.
    fn dims(ldw: &Layout, lv: &Layout, lg: &Layout) -> Result<(usize, usize)> {
        if ldw.shape() != lv.shape() {
            bail!(
                "weight_norm_backward: dW {:?} for V {:?}",
                ldw.shape(),
                lv.shape()
            );
        }
        weight_norm_dims(lv, lg)
    }
}

impl CustomOp3 for WeightNormBwd {
    fn name(&self) -> &'static str {
        "udi-weight-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (k, e) = WeightNormBwd::dims(l1, l2, l3)?;
        let dw = cpu::read_full(s1, l1, "weight_norm_backward dW")?;
        let v = cpu::read_full(s2, l2, "weight_norm_backward V")?;
        let g = cpu::read_full(s3, l3, "weight_norm_backward g")?;
        let mut dv = vec![0.0; v.len()];
        let mut dg = vec![0.0; k];
        for (r, dvr) in dv.chunks_mut(e).enumerate() {
            let (vr, dwr) = (&v[r * e..][..e], &dw[r * e..][..e]);
            let n = vr.iter().map(|x| x * x).sum::<f64>().sqrt();
            dg[r] = dwr.iter().zip(vr).map(|(d, v)| d * v / n).sum::<f64>();
            for ((o, d), v) in dvr.iter_mut().zip(dwr).zip(vr) {
                *o = (d - v / n * dg[r]) * (g[r] / n);
            }
        }
        let dev = &candle_core::Device::Cpu;
        self.dg
            .put(Tensor::from_vec(dg, (k, 1), dev)?.to_dtype(s3.dtype())?)?;
        Ok((cpu::write(&dv, s2.dtype())?, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (k, e) = WeightNormBwd::dims(l1, l2, l3)?;
        let (dw, v, g) = (
            gpu::In::new(s1, l1, "weight_norm_backward dW")?,
            gpu::In::new(s2, l2, "weight_norm_backward V")?,
            gpu::In::new(s3, l3, "weight_norm_backward g")?,
        );
        need_f32(&dw, "weight_norm_backward dW")?;
        need_f32(&v, "weight_norm_backward V")?;
        need_f32(&g, "weight_norm_backward g")?;
        let f = gpu::func(dev, "weight_norm_bwd")?;
        let mut dv = gpu::Out::alloc(dev, DType::F32, k * e, false)?;
        let mut dg = gpu::Out::alloc(dev, DType::F32, k, false)?;
        let ei = e as i32;
        let mut a = f.builder();
        dw.push(&mut a);
        v.push(&mut a);
        g.push(&mut a);
        dv.push(&mut a);
        dg.push(&mut a);
        a.arg(&k).arg(&ei);
        gpu::launch(a, geometry::warp_rows(k))?;
        self.dg.put(gpu::tensor(dg, dev, (k, 1)))?;
        Ok((dv.into_storage(dev), l2.shape().clone()))
    }
}

/// The gradients of [`weight_norm`]: (dg `[K, 1]`, dV `[K, E]`) from dW `[K, E]` (all f32, as V
/// and g). Fused: one pass over dW and V, ‖V‖ recomputed there.
pub fn weight_norm_backward(
    dw: &Tensor,
    v: &Tensor,
    g: &Tensor,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    if fused {
        let op = WeightNormBwd {
            dg: Second::default(),
        };
        let dv = dw
            .contiguous()?
            .apply_op3_no_bwd(&v.contiguous()?, &g.contiguous()?, &op)?;
        return Ok((op.dg.take("weight norm backward")?, dv));
    }
    let v_norm = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let u = v.broadcast_div(&v_norm)?;
    let dg = (dw * &u)?.sum_keepdim(D::Minus1)?;
    let dv = dw
        .sub(&u.broadcast_mul(&dg)?)?
        .broadcast_mul(&g.broadcast_div(&v_norm)?)?;
    Ok((dg, dv))
}

// ---- the head's teacher softmax and student cross-entropy ------------------------------------

/// Adds softmax(z) to `out` and returns its entropy −Σ p·log p (the teacher ops' references).
fn add_softmax(z: &[f64], out: &mut [f64]) -> f64 {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
    let (mut s, mut sz) = (0.0, 0.0);
    for v in z {
        let e = (v - m).exp();
        s += e;
        sz += e * (v - m);
    }
    for (o, v) in out.iter_mut().zip(z) {
        *o += (v - m).exp() / s;
    }
    s.ln() - sz / s
}

/// Teacher targets `softmax((t − c)/tau)` over the last dim, in c's dtype (f32), and each row's
/// entropy `H(softmax((t − c)/tau))` `[rows]` (c's dtype; a monitoring statistic) from the same
/// pass, left in `entropy`. Output row r reads input row (r + shift) mod rows (shift = rows/2:
/// each view's targets from the other view's logits, without a swapped copy). No backward.
struct CenteredSoftmax {
    tau: f64,
    shift: usize,
    entropy: Second,
}

impl CustomOp2 for CenteredSoftmax {
    fn name(&self) -> &'static str {
        "udi-centered-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = cpu::read(s1, l1, "centered_softmax t")?;
        let c = cpu::read_full(s2, l2, "centered_softmax c")?;
        let k = c.len();
        let mut p = vec![0.0; t.len()];
        let rows = t.len() / k.max(1);
        let mut h = Vec::with_capacity(rows);
        let mut z = vec![0.0; k];
        for (r, pr) in p.chunks_mut(k).enumerate() {
            let tr = &t[(r + self.shift) % rows * k..][..k];
            for j in 0..k {
                z[j] = (tr[j] - c[j]) / self.tau;
            }
            h.push(add_softmax(&z, pr));
        }
        let h = Tensor::from_vec(h, rows, &candle_core::Device::Cpu)?.to_dtype(s2.dtype())?;
        self.entropy.put(h)?;
        Ok((cpu::write(&p, s2.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (t, c) = (
            gpu::In::new(s1, l1, "centered_softmax t")?,
            gpu::In::new(s2, l2, "centered_softmax c")?,
        );
        need_f32(&c, "centre")?;
        let (rows, k) = cpu::rows_cols(l1)?;
        let f = gpu::func(
            dev,
            &format!("centered_softmax_{}", gpu::suffix(t.dtype())?),
        )?;
        let mut p = gpu::Out::alloc(dev, DType::F32, rows * k, false)?;
        let mut h = gpu::Out::alloc(dev, DType::F32, rows, false)?;
        let (ki, it, sh) = (k as i32, (1.0 / self.tau) as f32, self.shift as i32);
        let mut a = f.builder();
        t.push(&mut a);
        c.push(&mut a);
        p.push(&mut a);
        h.push(&mut a);
        a.arg(&ki).arg(&it).arg(&sh);
        gpu::launch(a, geometry::head_rows(rows, k))?;
        self.entropy.put(gpu::tensor(h, dev, rows))?;
        Ok((p.into_storage(dev), l1.shape().clone()))
    }
}

/// Teacher probabilities `softmax((t − c)/tau)` over the last dim (t's shape) and their entropy
/// −Σ p·log p (t's leading shape; no 0·log 0 NaNs), both in c's dtype, without a gradient. Fused:
/// one pass over t.
pub fn centered_softmax_entropy(
    t: &Tensor,
    c: &Tensor,
    tau: f64,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    if fused {
        return centered_softmax_fused(t, c, tau, 0);
    }
    let z = (t.to_dtype(c.dtype())?.broadcast_sub(c)? / tau)?;
    let p = nn::softmax(&z)?;
    let h = (&p * nn::log_softmax(&z)?)?.sum(D::Minus1)?.neg()?;
    Ok((p, h))
}

/// [`CenteredSoftmax`] over t's rows with output row r reading row (r + shift) mod rows.
fn centered_softmax_fused(
    t: &Tensor,
    c: &Tensor,
    tau: f64,
    shift: usize,
) -> Result<(Tensor, Tensor)> {
    let dims = t.dims();
    let lead = dims[..dims.len() - 1].to_vec();
    let k = c.elem_count();
    let t2 = t.detach().contiguous()?.reshape(((), k))?;
    let op = CenteredSoftmax {
        tau,
        shift,
        entropy: Second::default(),
    };
    let p = t2.apply_op2_no_bwd(&c.detach().contiguous()?, &op)?;
    let h = op.entropy.take("centered softmax")?;
    Ok((p.reshape(t.shape())?, h.reshape(lead)?))
}

/// The two views swapped along the leading dim of x `[2, ..]`: x[1], x[0] (each student view
/// reads the teacher's other view).
pub fn other_view(x: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[x.narrow(0, 1, 1)?, x.narrow(0, 0, 1)?], 0)
}

/// [`centered_softmax_entropy`] of the other view: t `[2, .., K]` holds logits by view, and
/// view v's targets and entropies (`[2, .., K]`, `[2, ..]`) are those of t[1 − v] (the patch
/// targets: each student view against the teacher's other view). Fused: the kernel reads the
/// other view's rows in place, no swapped copy.
pub fn other_view_softmax_entropy(
    t: &Tensor,
    c: &Tensor,
    tau: f64,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    if t.dim(0)? != 2 {
        bail!("other_view_softmax_entropy: {:?} has no 2 views", t.shape());
    }
    if fused {
        return centered_softmax_fused(t, c, tau, t.elem_count() / c.elem_count().max(1) / 2);
    }
    centered_softmax_entropy(&other_view(t)?, c, tau, false)
}

/// `out[g, :] = Σ_i w[g, i]·x[(g + shift) mod G, i, :]` for x `[G, R, K]` (any float dtype),
/// w `[G, R]`; `[G, K]` in w's dtype (f32 on CUDA), accumulated in f32 on CUDA.
struct WeightedRows {
    shift: usize,
}

impl WeightedRows {
    /// (G, R, K) of x `[G, R, K]`, with w checked to be `[G, R]`.
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (g, r, k) = l1.shape().dims3()?;
        if l2.shape().dims() != [g, r] {
            bail!(
                "weighted_rows: x {:?} needs weights [{g}, {r}], got {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        Ok((g, r, k))
    }
}

impl CustomOp2 for WeightedRows {
    fn name(&self) -> &'static str {
        "udi-weighted-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, r, k) = WeightedRows::dims(l1, l2)?;
        let x = cpu::read(s1, l1, "weighted_rows x")?;
        let w = cpu::read_full(s2, l2, "weighted_rows w")?;
        let mut out = vec![0.0; g * k];
        for (gi, o) in out.chunks_mut(k).enumerate() {
            let src = (gi + self.shift) % g;
            for i in 0..r {
                let xr = &x[(src * r + i) * k..][..k];
                let wi = w[gi * r + i];
                o.iter_mut().zip(xr).for_each(|(o, x)| *o += wi * x);
            }
        }
        Ok((cpu::write(&out, s2.dtype())?, Shape::from((g, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (g, r, k) = WeightedRows::dims(l1, l2)?;
        let (x, w) = (
            gpu::In::new(s1, l1, "weighted_rows x")?,
            gpu::In::new(s2, l2, "weighted_rows w")?,
        );
        need_f32(&w, "weighted_rows w")?;
        let f = gpu::func(dev, &format!("weighted_rows_{}", gpu::suffix(x.dtype())?))?;
        let mut out = gpu::Out::alloc(dev, DType::F32, g * k, false)?;
        let (ri, ki, sh) = (r as i32, k as i32, self.shift as i32);
        let mut a = f.builder();
        x.push(&mut a);
        w.push(&mut a);
        out.push(&mut a);
        a.arg(&ri).arg(&ki).arg(&sh);
        gpu::launch(a, geometry::weighted_rows(g, k))?;
        Ok((out.into_storage(dev), Shape::from((g, k))))
    }
}

/// The validity-weighted sums of the other view's rows: x `[2, B, R, K]` by view (any float
/// dtype), w `[2, B, R]`; `out[v, b] = Σ_r w[v, b, r]·x[1 − v, b, r]` `[2, B, K]` in w's dtype.
/// Fused: one pass over x as it is (no swapped copy, no cast).
pub fn other_view_weighted_sum(x: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
    let (two, b, r, k) = x.dims4()?;
    if two != 2 || w.dims() != [2, b, r] {
        bail!(
            "other_view_weighted_sum: x {:?} needs 2 views and w [2, {b}, {r}], got {:?}",
            x.shape(),
            w.shape()
        );
    }
    if fused {
        let op = WeightedRows { shift: b };
        let out = x
            .detach()
            .contiguous()?
            .reshape((2 * b, r, k))?
            .apply_op2_no_bwd(&w.detach().contiguous()?.reshape((2 * b, r))?, &op)?;
        return out.reshape((2, b, k));
    }
    let x = other_view(x)?.to_dtype(w.dtype())?;
    w.unsqueeze(2)?.matmul(&x)?.squeeze(2)
}

/// The local crops' [cls+] targets (udi-spec §3.2) from one pass over the pooled logits: for
/// image b, local crop l and both global views t, `z_t = (α·avg[t, b, l] + (1 − α)·cls[t, b] −
/// c)/τ`; the output row l·B + b is `softmax(z_0) + softmax(z_1)` and the second output each
/// softmax's entropy `[2, B, L]`, both in c's dtype (f32). The blended logits stay in registers.
struct LocalMultimodal {
    alpha: f64,
    tau: f64,
    entropy: Second,
}

impl LocalMultimodal {
    /// (2, B, L, K) from avg `[2, B, L, K]` and cls `[2, B, K]`.
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (two, b, l, k) = l1.shape().dims4()?;
        if two != 2 || l2.shape().dims() != [2, b, k] {
            bail!(
                "local_multimodal: avg {:?} needs cls [2, B, K], got {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        Ok((b, l, k))
    }
}

impl CustomOp3 for LocalMultimodal {
    fn name(&self) -> &'static str {
        "udi-local-multimodal"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, l, k) = Self::dims(l1, l2)?;
        let avg = cpu::read(s1, l1, "local_multimodal avg")?;
        let cls = cpu::read(s2, l2, "local_multimodal cls")?;
        let c = cpu::read_full(s3, l3, "local_multimodal c")?;
        cpu::same(s2.dtype(), s3.dtype(), "local_multimodal cls and c")?;
        if c.len() != k {
            bail!("local_multimodal: centre of {} for K = {k}", c.len());
        }
        let mut p = vec![0.0; l * b * k];
        let mut h = vec![0.0; 2 * b * l];
        let mut z = vec![0.0; k];
        for (row, pr) in p.chunks_mut(k).enumerate() {
            let (li, bi) = (row / b, row % b);
            for t in 0..2 {
                let a = &avg[((t * b + bi) * l + li) * k..][..k];
                let cl = &cls[(t * b + bi) * k..][..k];
                for j in 0..k {
                    z[j] = (self.alpha * a[j] + (1.0 - self.alpha) * cl[j] - c[j]) / self.tau;
                }
                h[(t * b + bi) * l + li] = add_softmax(&z, pr);
            }
        }
        let dev = &candle_core::Device::Cpu;
        let h = Tensor::from_vec(h, (2, b, l), dev)?.to_dtype(s3.dtype())?;
        self.entropy.put(h)?;
        Ok((cpu::write(&p, s3.dtype())?, Shape::from((l, b, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (b, l, k) = Self::dims(l1, l2)?;
        let (avg, cls, c) = (
            gpu::In::new(s1, l1, "local_multimodal avg")?,
            gpu::In::new(s2, l2, "local_multimodal cls")?,
            gpu::In::new(s3, l3, "local_multimodal c")?,
        );
        need_f32(&cls, "local_multimodal cls")?;
        need_f32(&c, "centre")?;
        let f = gpu::func(
            dev,
            &format!("local_multimodal_{}", gpu::suffix(avg.dtype())?),
        )?;
        let mut p = gpu::Out::alloc(dev, DType::F32, l * b * k, false)?;
        let mut h = gpu::Out::alloc(dev, DType::F32, 2 * b * l, false)?;
        let (bi, li, ki) = (b as i32, l as i32, k as i32);
        let (al, it) = (self.alpha as f32, (1.0 / self.tau) as f32);
        let mut a = f.builder();
        avg.push(&mut a);
        cls.push(&mut a);
        c.push(&mut a);
        p.push(&mut a);
        h.push(&mut a);
        a.arg(&bi).arg(&li).arg(&ki).arg(&al).arg(&it);
        gpu::launch(a, geometry::head_rows(l * b, k))?;
        self.entropy.put(gpu::tensor(h, dev, (2, b, l)))?;
        Ok((p.into_storage(dev), Shape::from((l, b, k))))
    }
}

/// The local crops' [cls+] targets (udi-spec §3.2): with the blended logits
/// `mm[t, b, l] = α·avg[t, b, l] + (1 − α)·cls[t, b]` of both global views t (avg `[2, B, L, K]`,
/// the validity-weighted mean of the patch logits a local crop reads on view t; cls `[2, B, K]`),
/// `P[l, b] = softmax((mm[0, b, l] − c)/τ) + softmax((mm[1, b, l] − c)/τ)` `[L, B, K]` (crop-major:
/// the student's local rows) and each softmax's entropy `[2, B, L]`, both in c's dtype, without
/// a gradient. Fused: one pass over avg, which may be in a narrower dtype than c.
pub fn local_multimodal_targets(
    avg: &Tensor,
    cls: &Tensor,
    c: &Tensor,
    alpha: f64,
    tau: f64,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    if fused {
        let op = LocalMultimodal {
            alpha,
            tau,
            entropy: Second::default(),
        };
        let p = avg.detach().contiguous()?.apply_op3_no_bwd(
            &cls.detach().contiguous()?,
            &c.detach().contiguous()?,
            &op,
        )?;
        return Ok((p, op.entropy.take("local multimodal targets")?));
    }
    let mm =
        ((avg.to_dtype(c.dtype())? * alpha)?.broadcast_add(&(cls.unsqueeze(2)? * (1.0 - alpha))?))?; // [2, B, L, K]
    let (p, h) = centered_softmax_entropy(&mm, c, tau, false)?;
    // Summed from transposed views: the sum is written crop-major, no copy after it.
    let p = (p.get(0)?.transpose(0, 1)? + p.get(1)?.transpose(0, 1)?)?;
    Ok((p, h))
}

/// Student cross-entropy rows: `loss[r] = −Σ_k p[r mod P, k]·log_softmax(s[r]/tau)_k` for
/// s `[R, K]`, p `[P, K]` (P divides R: a target broadcast over leading groups); `[R]` in p's
/// dtype. Backward to s only (p is a teacher target).
pub struct SoftCe {
    pub tau: f64,
}

/// (max z, log Σ exp(z − max), Σ p, Σ p·z) of z = s/tau.
fn ce_stats(s: &[f64], p: &[f64], tau: f64) -> (f64, f64, f64, f64) {
    let m = s.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v / tau));
    let (mut e, mut sp, mut spz) = (0.0, 0.0, 0.0);
    for (&sv, &pv) in s.iter().zip(p) {
        let z = sv / tau;
        e += (z - m).exp();
        sp += pv;
        spz += pv * z;
    }
    (m, e.ln(), sp, spz)
}

/// Loss rows and ds = g_r·(Σp·softmax(s_r/tau) − p)/tau of s `[rows, k]` against p `[p_rows, k]`
/// (row r reads row r mod p_rows): the reference of both halves.
fn soft_ce_reference(s: &[f64], p: &[f64], g: &[f64], k: usize, tau: f64) -> (Vec<f64>, Vec<f64>) {
    let (rows, p_rows) = (s.len() / k.max(1), p.len() / k.max(1));
    let mut loss = vec![0.0; rows];
    let mut ds = vec![0.0; s.len()];
    for r in 0..rows {
        let pr = &p[(r % p_rows) * k..(r % p_rows + 1) * k];
        let sr = &s[r * k..(r + 1) * k];
        let (m, lse, sp, spz) = ce_stats(sr, pr, tau);
        loss[r] = sp * (m + lse) - spz;
        for j in 0..k {
            let q = (sr[j] / tau - m - lse).exp();
            ds[r * k + j] = g[r] * (sp * q - pr[j]) / tau;
        }
    }
    (loss, ds)
}

impl CustomOp2 for SoftCe {
    fn name(&self) -> &'static str {
        "udi-soft-ce"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = cpu::read(s1, l1, "soft_ce s")?;
        let p = cpu::read_full(s2, l2, "soft_ce p")?;
        let (rows, k) = cpu::rows_cols(l1)?;
        let (p_rows, _) = cpu::rows_cols(l2)?;
        let loss: Vec<f64> = (0..rows)
            .map(|r| {
                let pr = r % p_rows;
                let (m, lse, sp, spz) =
                    ce_stats(&s[r * k..(r + 1) * k], &p[pr * k..(pr + 1) * k], self.tau);
                sp * (m + lse) - spz
            })
            .collect();
        Ok((cpu::write(&loss, s2.dtype())?, Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (s, p) = (
            gpu::In::new(s1, l1, "soft_ce s")?,
            gpu::In::new(s2, l2, "soft_ce p")?,
        );
        need_f32(&p, "soft_ce target")?;
        let (rows, k) = cpu::rows_cols(l1)?;
        let (p_rows, _) = cpu::rows_cols(l2)?;
        let f = gpu::func(dev, &format!("soft_ce_fwd_{}", gpu::suffix(s.dtype())?))?;
        let mut loss = gpu::Out::alloc(dev, DType::F32, rows, false)?;
        let (ki, pi, it) = (k as i32, p_rows as i32, (1.0 / self.tau) as f32);
        let mut a = f.builder();
        s.push(&mut a);
        p.push(&mut a);
        loss.push(&mut a);
        a.arg(&ki).arg(&pi).arg(&it);
        gpu::launch(a, geometry::head_rows(rows, k))?;
        Ok((loss.into_storage(dev), Shape::from(rows)))
    }

    fn bwd(
        &self,
        s: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = s.apply_op3_no_bwd(p, &g.contiguous()?, &SoftCeBwd { tau: self.tau })?;
        Ok((Some(ds), None))
    }
}

/// (s, p, g) → ds = g_r·(Σp·softmax(s/tau) − p)/tau in s's dtype.
struct SoftCeBwd {
    tau: f64,
}

impl CustomOp3 for SoftCeBwd {
    fn name(&self) -> &'static str {
        "udi-soft-ce-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = cpu::read(s1, l1, "soft_ce s")?;
        let p = cpu::read_full(s2, l2, "soft_ce p")?;
        let g = cpu::read_full(s3, l3, "soft_ce g")?;
        let (_, k) = cpu::rows_cols(l1)?;
        let (_, ds) = soft_ce_reference(&s, &p, &g, k, self.tau);
        Ok((cpu::write(&ds, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (s, p, g) = (
            gpu::In::new(s1, l1, "soft_ce s")?,
            gpu::In::new(s2, l2, "soft_ce p")?,
            gpu::In::new(s3, l3, "soft_ce g")?,
        );
        need_f32(&p, "soft_ce target")?;
        need_f32(&g, "soft_ce gradient")?;
        let (rows, k) = cpu::rows_cols(l1)?;
        let (p_rows, _) = cpu::rows_cols(l2)?;
        let f = gpu::func(dev, &format!("soft_ce_bwd_{}", gpu::suffix(s.dtype())?))?;
        let mut ds = gpu::Out::alloc(dev, s.dtype(), rows * k, false)?;
        let (ki, pi, it) = (k as i32, p_rows as i32, (1.0 / self.tau) as f32);
        let mut a = f.builder();
        s.push(&mut a);
        p.push(&mut a);
        g.push(&mut a);
        ds.push(&mut a);
        a.arg(&ki).arg(&pi).arg(&it);
        gpu::launch(a, geometry::head_rows(rows, k))?;
        Ok((ds.into_storage(dev), l1.shape().clone()))
    }
}

/// The student cross-entropy's forward and backward in one pass, in place over s `[R, K]`:
/// (s, p, g) → loss rows `[R]` (left in `loss`) and s overwritten by
/// ds = g_r·(Σp·softmax(s/tau) − p)/tau.
struct SoftCeInPlace {
    tau: f64,
    loss: Second,
}

impl InplaceOp3 for SoftCeInPlace {
    fn name(&self) -> &'static str {
        "udi-soft-ce-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let s = cpu::read(s1, l1, "soft_ce s")?;
        let p = cpu::read_full(s2, l2, "soft_ce p")?;
        let g = cpu::read_full(s3, l3, "soft_ce g")?;
        let (rows, k) = cpu::rows_cols(l1)?;
        if g.len() != rows {
            bail!("soft_ce: {} row weights for {rows} rows", g.len());
        }
        let (loss, ds) = soft_ce_reference(&s, &p, &g, k, self.tau);
        cpu::write_into(s1, super::span(l1, s.len(), "soft_ce in place")?, &ds)?;
        let loss = Tensor::from_vec(loss, rows, &candle_core::Device::Cpu)?.to_dtype(s2.dtype())?;
        self.loss.put(loss)?;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let dev = s1.device.clone();
        let (p, g) = (
            gpu::In::new(s2, l2, "soft_ce p")?,
            gpu::In::new(s3, l3, "soft_ce g")?,
        );
        need_f32(&p, "soft_ce target")?;
        need_f32(&g, "soft_ce gradient")?;
        let (rows, k) = cpu::rows_cols(l1)?;
        let (p_rows, _) = cpu::rows_cols(l2)?;
        let span = super::span(l1, rows * k, "soft_ce in place")?;
        let dt = s1.dtype();
        let f = gpu::func(&dev, &format!("soft_ce_fused_{}", gpu::suffix(dt)?))?;
        let mut loss = gpu::Out::alloc(&dev, DType::F32, rows, false)?;
        let (ki, pi, it) = (k as i32, p_rows as i32, (1.0 / self.tau) as f32);
        let geo = geometry::head_rows(rows, k);
        // The logits are read and overwritten in place.
        with_dest_view!(s1, span, |v| {
            let mut a = f.builder();
            a.arg(&mut v);
            p.push(&mut a);
            g.push(&mut a);
            loss.push(&mut a);
            a.arg(&ki).arg(&pi).arg(&it);
            gpu::launch(a, geo)?
        });
        self.loss.put(gpu::tensor(loss, &dev, rows))?;
        Ok(())
    }
}

/// The student cross-entropy's forward and backward in one pass over the logits: for s `[R, K]`
/// (a contiguous view, compute dtype) against targets p `[P, K]` (P divides R; row r reads row
/// `r mod P`) with row weights g `[R]` (p's dtype), returns the loss rows `[R]` (p's dtype, as
/// [`soft_ce_rows`]) and overwrites s with ds = g_r·(Σp·softmax(s/tau) − p)/tau, the backward of
/// Σ_r g_r·loss_r. No second `[R, K]` buffer exists: the logits become their own gradient.
pub fn soft_ce_in_place(
    s: &Tensor,
    p: &Tensor,
    g: &Tensor,
    tau: f64,
    fused: bool,
) -> Result<Tensor> {
    let k = s.dim(D::Minus1)?;
    let s2 = s.reshape(((), k))?;
    let p2 = p.reshape(((), k))?;
    let (r, pr) = (s2.dim(0)?, p2.dim(0)?);
    if pr == 0 || r % pr != 0 {
        bail!("soft_ce: {pr} target rows do not divide {r} student rows");
    }
    if g.elem_count() != r {
        bail!("soft_ce: {} row weights for {r} rows", g.elem_count());
    }
    if !s2.is_contiguous() {
        bail!("soft_ce in place: the logits must be contiguous");
    }
    if fused {
        let op = SoftCeInPlace {
            tau,
            loss: Default::default(),
        };
        s2.inplace_op3(&p2.contiguous()?, &g.contiguous()?, &op)?;
        return op.loss.take("soft_ce in place");
    }
    let h = soft_ce_rows(&s2, &p2, tau, false)?;
    let q = nn::softmax(&(s2.to_dtype(p.dtype())? / tau)?)?.reshape((r / pr, pr, k))?;
    let p3 = p2.unsqueeze(0)?;
    let sp = p3.sum_keepdim(D::Minus1)?;
    let d = q.broadcast_mul(&sp)?.broadcast_sub(&p3)?.reshape((r, k))?;
    let ds = (d.broadcast_mul(&g.reshape((r, 1))?)? / tau)?.to_dtype(s.dtype())?;
    s2.slice_set(&ds, 0, 0)?;
    Ok(h)
}

/// Per-row cross-entropy `−Σ_k p·log_softmax(s/tau)` of student logits s `[.., K]` (any float
/// dtype, gradient flows) against targets p `[.., K]` (p's dtype, no gradient) whose row count
/// divides s's: row r of s reads row `r mod P` of p. Returns `[R]` (R = rows of s) in p's dtype.
pub fn soft_ce_rows(s: &Tensor, p: &Tensor, tau: f64, fused: bool) -> Result<Tensor> {
    let k = s.dim(D::Minus1)?;
    if p.dim(D::Minus1)? != k {
        bail!("soft_ce: K differs ({k} vs {})", p.dim(D::Minus1)?);
    }
    let s2 = s.reshape(((), k))?;
    let p2 = p.detach().reshape(((), k))?;
    let (r, pr) = (s2.dim(0)?, p2.dim(0)?);
    if pr == 0 || r % pr != 0 {
        bail!("soft_ce: {pr} target rows do not divide {r} student rows");
    }
    if fused {
        return s2
            .contiguous()?
            .apply_op2(&p2.contiguous()?, SoftCe { tau });
    }
    let ls = nn::log_softmax(&(s2.to_dtype(p.dtype())? / tau)?)?;
    let h = ls
        .reshape((r / pr, pr, k))?
        .broadcast_mul(&p2.unsqueeze(0)?)?
        .sum(D::Minus1)?
        .neg()?;
    h.reshape(r)
}

// ---- backward halves, called directly by the explicit engine ------------------------------------

/// LayerNorm backward from the input `x` (statistics recomputed in f32 from x) and the output
/// gradient `dy`: `(dx in x's dtype, dw, db in w's dtype)`. Composed:
/// x̂ = (x − μ)·rstd, g = dy·w, dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), dw = Σ dy·x̂, db = Σ dy.
pub fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    fused: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = w.elem_count();
    if fused {
        let (x, dy) = (x.contiguous()?, dy.contiguous()?);
        let dx = x.apply_op3_no_bwd(w, &dy, &LnBwdDx { eps })?;
        let dwdb = x.apply_op2_no_bwd(
            &dy,
            &LnBwdWb {
                eps,
                out: w.dtype(),
            },
        )?;
        let dw = dwdb.narrow(0, 0, 1)?.reshape(w.shape())?;
        let db = dwdb.narrow(0, 1, 1)?.reshape(w.shape())?;
        return Ok((dx, dw, db));
    }
    let st = upcast(w.dtype());
    let x2 = x.to_dtype(st)?.reshape(((), d))?;
    let dy2 = dy.to_dtype(st)?.reshape(((), d))?;
    let mean = x2.mean_keepdim(D::Minus1)?;
    let xc = x2.broadcast_sub(&mean)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let g = dy2.broadcast_mul(w)?;
    let g_mean = g.mean_keepdim(D::Minus1)?;
    let gx_mean = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .broadcast_sub(&g_mean)?
        .sub(&xhat.broadcast_mul(&gx_mean)?)?
        .broadcast_mul(&rstd)?;
    let dw = (&dy2 * &xhat)?.sum(0)?.to_dtype(w.dtype())?;
    let db = dy2.sum(0)?.to_dtype(w.dtype())?;
    Ok((dx.to_dtype(x.dtype())?.reshape(x.shape())?, dw, db))
}

/// `gelu_erf(u)` backward for u = y + b: `(du = dy·gelu'(u) in y's dtype, db = Σ du in b's
/// dtype)`, gelu'(u) = Φ(u) + u·φ(u).
pub fn bias_gelu_backward(
    y: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    if fused {
        let op = BiasGeluBwd::default();
        let du = y
            .contiguous()?
            .apply_op3_no_bwd(b, &dy.contiguous()?, &op)?;
        let db = op.db.take("bias_gelu backward")?.reshape(b.shape())?;
        return Ok((du, db));
    }
    let du = {
        let u = bias_add(y, b, false)?.to_dtype(upcast(y.dtype()))?;
        let cdf = ((u.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let pdf = (u.sqr()? * -0.5)?.exp()? * (2.0 * std::f64::consts::PI).sqrt().recip();
        let grad = (cdf + (&u * pdf?)?)?;
        (dy.to_dtype(grad.dtype())? * grad)?.to_dtype(y.dtype())?
    };
    let db = col_sum(&du, b.dtype(), false)?.reshape(b.shape())?;
    Ok((du, db))
}

/// [`bias_gelu_backward`] for a backward that did not keep the forward's output: returns `(du,
/// db)` and overwrites `y` (the saved pre-bias product, no longer needed after this) with the
/// output gelu(y + b), bit for bit as [`bias_gelu`] made it, for the next layer's weight
/// gradient. Fused, all three come from one pass over y, with no new buffer for the output.
pub fn bias_gelu_backward_recompute(
    y: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    if !y.is_contiguous() {
        bail!("bias_gelu backward in place: y must be contiguous");
    }
    if fused {
        let op = BiasGeluBwdRecompute::default();
        y.inplace_op3(b, &dy.contiguous()?, &op)?;
        let du = op.dx.take("bias_gelu backward")?.reshape(y.shape())?;
        let db = op.db.take("bias_gelu backward")?.reshape(b.shape())?;
        return Ok((du, db));
    }
    let (du, db) = bias_gelu_backward(y, b, dy, false)?;
    y.slice_set(&bias_gelu(y, b, false)?, 0, 0)?;
    Ok((du, db))
}

/// `softmax(x·scale)` backward from its output `y`: `scale·y·(dy − Σ y·dy)` in y's dtype.
pub fn attn_softmax_backward(y: &Tensor, dy: &Tensor, scale: f64, fused: bool) -> Result<Tensor> {
    if fused {
        return y
            .contiguous()?
            .apply_op2_no_bwd(&dy.contiguous()?, &AttnSoftmaxBwd { scale });
    }
    let st = upcast(y.dtype());
    let (y32, dy32) = (y.to_dtype(st)?, dy.to_dtype(st)?);
    let s = (&y32 * &dy32)?.sum_keepdim(D::Minus1)?;
    ((dy32.broadcast_sub(&s)? * y32)? * scale)?.to_dtype(y.dtype())
}
