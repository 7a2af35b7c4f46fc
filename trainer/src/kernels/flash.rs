//! Fused (flash-style) attention of a ViT block on its packed qkv rows: forward and backward
//! without the `[B·H, T, T]` scores in memory and without splitting or merging heads.
//!
//! * forward: qkv `[B·T, 3·H·dh]` (the qkv projection's output, q | k | v, head-major) → the
//!   merged heads O `[B·T, H·dh]` (the proj input) and, when the backward will run, the row
//!   log-sum-exps of scale·QKᵀ (`[B, H, T]`), packed behind O in one buffer ([`FlashOut`]).
//! * backward: (qkv, the packed forward output, dO `[B·T, H·dh]`) → dqkv `[B·T, 3·H·dh]`,
//!   recomputing P = exp(scale·QKᵀ − lse); D = Σ dO⊙O is the softmax backward's row term.
//! * Both take the qkv projection's bias (f32 `[3·H·dh]`) when qkv is its product before the
//!   bias: the kernels add it as they load each tile (rounded to qkv's dtype, as the bias add
//!   they replace), so the bias add's pass over the qkv rows is saved.
//!
//! `cpu_fwd` is the reference (f64, the definitions, any float dtype and head dim); `cuda_fwd`
//! launches the tiled tensor-core kernels of `udi_kernels.cu` (bf16, head dim 64), whose
//! arithmetic differs only by bf16 rounding of P and dS and the order of sums.

use super::cpu;
#[cfg(feature = "cuda")]
use super::gpu;
use candle_core::backend::BackendStorage;
use candle_core::Tensor;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape};
#[cfg(feature = "cuda")]
use candle_core::{cuda_backend::cudarc::driver::PushKernelArg, CudaStorage};
use half::{bf16, f16};

/// The head dim of the CUDA kernels.
pub const CUDA_HEAD_DIM: usize = 64;

/// Whether [`forward`]/[`backward`] run on `device` for activations of `dtype` and head dim `dh`:
/// anywhere on the CPU (the reference); bf16 with head dim 64 on CUDA.
pub fn supported(device: &Device, dtype: DType, dh: usize) -> bool {
    !device.is_cuda() || (dtype == DType::BF16 && dh == CUDA_HEAD_DIM)
}

/// The forward's output: O `[B·T, H·dh]` (a view of `packed`) and, with `save`, the packed
/// buffer holding O followed by the log-sum-exps that the backward reads.
pub struct FlashOut {
    pub o: Tensor,
    pub packed: Option<Tensor>,
}

/// Elements of the activation dtype one f32 log-sum-exp takes in the packed buffer: its bits
/// split over two 16-bit elements, or one element of a 32/64-bit dtype (the value itself).
fn lse_width(dtype: DType) -> usize {
    match dtype {
        DType::BF16 | DType::F16 => 2,
        _ => 1,
    }
}

/// `[O | lse]` as storage of `dtype` (O rounded to `dtype`, lse stored as described at
/// [`lse_width`]).
fn pack(o: &[f64], lse: &[f64], dtype: DType) -> Result<CpuStorage> {
    let bits = |x: f64| {
        let u = (x as f32).to_bits();
        [(u & 0xffff) as u16, (u >> 16) as u16]
    };
    Ok(match dtype {
        DType::BF16 => CpuStorage::BF16(
            o.iter()
                .map(|&x| bf16::from_f64(x))
                .chain(lse.iter().flat_map(|&x| bits(x).map(bf16::from_bits)))
                .collect(),
        ),
        DType::F16 => CpuStorage::F16(
            o.iter()
                .map(|&x| f16::from_f64(x))
                .chain(lse.iter().flat_map(|&x| bits(x).map(f16::from_bits)))
                .collect(),
        ),
        DType::F32 => CpuStorage::F32(o.iter().chain(lse).map(|&x| x as f32).collect()),
        DType::F64 => CpuStorage::F64(o.iter().chain(lse).copied().collect()),
        d => bail!("flash attention: unsupported dtype {d:?}"),
    })
}

/// The inverse of [`pack`]: (O, lse) as f64, O having `n_o` elements.
fn unpack(s: &CpuStorage, l: &Layout, n_o: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("flash attention: the packed forward output must be contiguous")
    };
    let from_bits = |p: &[u16]| f32::from_bits(p[0] as u32 | (p[1] as u32) << 16) as f64;
    let bits: Option<Vec<u16>> = match s {
        CpuStorage::BF16(v) => Some(v[a..b].iter().map(|x| x.to_bits()).collect()),
        CpuStorage::F16(v) => Some(v[a..b].iter().map(|x| x.to_bits()).collect()),
        _ => None,
    };
    let all = cpu::read(s, l, "flash packed")?;
    let lse = match bits {
        Some(bits) => bits[n_o..].chunks(2).map(from_bits).collect(),
        None => all[n_o..].to_vec(),
    };
    Ok((all[..n_o].to_vec(), lse))
}

/// Shapes of one call: B, T, H, dh.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    dh: usize,
}

impl Dims {
    fn of_qkv(l: &Layout, b: usize, heads: usize) -> Result<Self> {
        let (rows, cols) = cpu::rows_cols(l)?;
        if b == 0 || rows % b != 0 || cols % (3 * heads) != 0 {
            bail!(
                "flash attention: qkv {:?} is not [B·T, 3·H·dh] for B {b}, H {heads}",
                l.dims()
            );
        }
        Ok(Self {
            b,
            t: rows / b,
            heads,
            dh: cols / (3 * heads),
        })
    }

    fn hd(&self) -> usize {
        self.heads * self.dh
    }

    /// Elements of O.
    fn n_o(&self) -> usize {
        self.b * self.t * self.hd()
    }

    /// Rows of the statistics `[B, H, T]`.
    fn n_stats(&self) -> usize {
        self.b * self.heads * self.t
    }

    /// Element index of q (`part` 0), k (1) or v (2) of row (b, i), head h, in qkv.
    fn qkv_at(&self, part: usize, b: usize, i: usize, h: usize) -> usize {
        (b * self.t + i) * 3 * self.hd() + part * self.hd() + h * self.dh
    }

    /// Element index of row (b, i), head h, in O/dO.
    fn o_at(&self, b: usize, i: usize, h: usize) -> usize {
        (b * self.t + i) * self.hd() + h * self.dh
    }

    #[cfg(feature = "cuda")]
    fn cuda_grid(&self) -> Result<super::geometry::Geometry> {
        if self.dh != CUDA_HEAD_DIM {
            bail!(
                "flash attention on CUDA needs head dim {CUDA_HEAD_DIM}, got {}",
                self.dh
            );
        }
        Ok(super::geometry::flash(self.b, self.t, self.heads))
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Per (b, h, i): the scaled scores of row i against every key, in f64.
fn scores(qkv: &[f64], d: &Dims, b: usize, h: usize, i: usize, scale: f64) -> Vec<f64> {
    let q = &qkv[d.qkv_at(0, b, i, h)..][..d.dh];
    (0..d.t)
        .map(|j| scale * dot(q, &qkv[d.qkv_at(1, b, j, h)..][..d.dh]))
        .collect()
}

struct FlashFwd {
    b: usize,
    heads: usize,
    scale: f64,
    save: bool,
    bias: Option<Tensor>,
}

/// qkv as f64 with `bias` (per column) added and rounded to `dtype`, as a bias add would leave it.
fn with_bias(qkv: Vec<f64>, bias: Option<&Tensor>, dtype: DType) -> Result<Vec<f64>> {
    let Some(bias) = bias else { return Ok(qkv) };
    let b = bias.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if b.is_empty() || !qkv.len().is_multiple_of(b.len()) {
        bail!(
            "flash attention: a qkv bias of {} for {} values",
            b.len(),
            qkv.len()
        );
    }
    let round = |x: f64| match dtype {
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::F32 => x as f32 as f64,
        _ => x,
    };
    Ok(qkv
        .iter()
        .enumerate()
        .map(|(i, v)| round(v + b[i % b.len()]))
        .collect())
}

impl CustomOp1 for FlashFwd {
    fn name(&self) -> &'static str {
        "udi-flash-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of_qkv(l, self.b, self.heads)?;
        let qkv = with_bias(cpu::read(s, l, "flash qkv")?, self.bias.as_ref(), s.dtype())?;
        let mut o = vec![0.0; d.n_o()];
        let mut lse = vec![0.0; if self.save { d.n_stats() } else { 0 }];
        for b in 0..d.b {
            for h in 0..d.heads {
                for i in 0..d.t {
                    let sc = scores(&qkv, &d, b, h, i, self.scale);
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    let out = &mut o[d.o_at(b, i, h)..][..d.dh];
                    for (j, x) in sc.iter().enumerate() {
                        let p = (x - m).exp() / sum;
                        let v = &qkv[d.qkv_at(2, b, j, h)..][..d.dh];
                        for (oe, ve) in out.iter_mut().zip(v) {
                            *oe += p * ve;
                        }
                    }
                    if self.save {
                        lse[(b * d.heads + h) * d.t + i] = m + sum.ln();
                    }
                }
            }
        }
        let n = d.n_o() + lse.len() * lse_width(s.dtype());
        Ok((pack(&o, &lse, s.dtype())?, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let d = Dims::of_qkv(l, self.b, self.heads)?;
        let qkv = gpu::In::new(s, l, "flash qkv")?;
        let gpu::In::Bf16(qkv) = qkv else {
            bail!("flash attention on CUDA runs bf16, got {:?}", qkv.dtype())
        };
        let n_lse = if self.save { 2 * d.n_stats() } else { 0 };
        let mut out = unsafe { dev.alloc::<bf16>(d.n_o() + n_lse)? };
        let (t, heads, scale) = (d.t as i32, d.heads as i32, self.scale as f32);
        let k = gpu::func(dev, "flash_fwd_bf16")?;
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = bias_view(&bias_guard)?;
        {
            let (mut o, mut lse) = out.split_at_mut(d.n_o());
            let null = 0u64;
            let mut a = k.builder();
            a.arg(&qkv);
            match &bias {
                Some(v) => a.arg(v),
                None => a.arg(&null),
            };
            a.arg(&mut o);
            if self.save {
                a.arg(&mut lse);
            } else {
                a.arg(&null);
            }
            a.arg(&t).arg(&heads).arg(&scale);
            gpu::launch(a, d.cuda_grid()?)?;
        }
        let n = d.n_o() + n_lse;
        Ok((gpu::Out::Bf16(out).into_storage(dev), Shape::from(n)))
    }
}

/// The qkv bias (read-locked by the caller) as the kernels' f32 argument, or none.
#[cfg(feature = "cuda")]
fn bias_view<'a>(
    guard: &'a Option<(impl std::ops::Deref<Target = candle_core::Storage>, &Layout)>,
) -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>>> {
    let Some((s, l)) = guard else { return Ok(None) };
    match gpu::input(s, l, "flash qkv bias", true)? {
        gpu::In::F32(v) => Ok(Some(v)),
        _ => unreachable!("gpu::input refuses other dtypes"),
    }
}

struct FlashBwd {
    b: usize,
    heads: usize,
    scale: f64,
    bias: Option<Tensor>,
}

impl CustomOp3 for FlashBwd {
    fn name(&self) -> &'static str {
        "udi-flash-attention-bwd"
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
        let d = Dims::of_qkv(l1, self.b, self.heads)?;
        let qkv = with_bias(
            cpu::read(s1, l1, "flash qkv")?,
            self.bias.as_ref(),
            s1.dtype(),
        )?;
        let (o, lse) = unpack(s2, l2, d.n_o())?;
        let d_o = cpu::read(s3, l3, "flash dO")?;
        if lse.len() != d.n_stats() || d_o.len() != d.n_o() {
            bail!("flash attention backward: the packed output or dO does not match qkv");
        }
        let mut dqkv = vec![0.0; qkv.len()];
        for b in 0..d.b {
            for h in 0..d.heads {
                for i in 0..d.t {
                    let at = d.o_at(b, i, h);
                    let g = &d_o[at..][..d.dh];
                    let row_d = dot(g, &o[at..][..d.dh]);
                    let l = lse[(b * d.heads + h) * d.t + i];
                    let sc = scores(&qkv, &d, b, h, i, self.scale);
                    for (j, x) in sc.iter().enumerate() {
                        let p = (x - l).exp();
                        let (kj, vj) = (d.qkv_at(1, b, j, h), d.qkv_at(2, b, j, h));
                        let dp = dot(g, &qkv[vj..][..d.dh]);
                        let ds = p * (dp - row_d) * self.scale;
                        let qi = d.qkv_at(0, b, i, h);
                        for e in 0..d.dh {
                            dqkv[vj + e] += p * g[e];
                            dqkv[qi + e] += ds * qkv[kj + e];
                            dqkv[kj + e] += ds * qkv[qi + e];
                        }
                    }
                }
            }
        }
        Ok((cpu::write(&dqkv, s1.dtype())?, l1.shape().clone()))
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
        let d = Dims::of_qkv(l1, self.b, self.heads)?;
        let (gpu::In::Bf16(qkv), gpu::In::Bf16(packed), gpu::In::Bf16(d_o)) = (
            gpu::In::new(s1, l1, "flash qkv")?,
            gpu::In::new(s2, l2, "flash packed")?,
            gpu::In::new(s3, l3, "flash dO")?,
        ) else {
            bail!("flash attention backward on CUDA runs bf16")
        };
        if packed.len() != d.n_o() + 2 * d.n_stats() || d_o.len() != d.n_o() {
            bail!("flash attention backward: the packed output or dO does not match qkv");
        }
        let (o, lse) = (packed.slice(..d.n_o()), packed.slice(d.n_o()..));
        let mut dsum = unsafe { dev.alloc::<f32>(d.n_stats())? };
        let (t, heads, scale) = (d.t as i32, d.heads as i32, self.scale as f32);
        let rows = d.b * d.t;
        let k = gpu::func(dev, "flash_bwd_dot_bf16")?;
        let mut a = k.builder();
        a.arg(&o)
            .arg(&d_o)
            .arg(&mut dsum)
            .arg(&rows)
            .arg(&t)
            .arg(&heads);
        gpu::launch(a, super::geometry::flash_bwd_dot(rows, d.heads))?;
        let mut dqkv = unsafe { dev.alloc::<bf16>(3 * d.n_o())? };
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = bias_view(&bias_guard)?;
        let null = 0u64;
        for name in ["flash_bwd_dq_bf16", "flash_bwd_dkdv_bf16"] {
            let k = gpu::func(dev, name)?;
            let mut a = k.builder();
            a.arg(&qkv);
            match &bias {
                Some(v) => a.arg(v),
                None => a.arg(&null),
            };
            a.arg(&d_o).arg(&lse).arg(&dsum).arg(&mut dqkv);
            a.arg(&t).arg(&heads).arg(&scale);
            gpu::launch(a, d.cuda_grid()?)?;
        }
        Ok((gpu::Out::Bf16(dqkv).into_storage(dev), l1.shape().clone()))
    }
}

/// `t` contiguous and starting on a 16-byte boundary for bf16 (the CUDA kernels read rows as
/// 16-byte vectors): a copy when it is not.
fn aligned(t: &Tensor) -> Result<Tensor> {
    let l = t.layout();
    if t.is_contiguous() && l.start_offset().is_multiple_of(8) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// The bias, when there is one, has one value per qkv column (the kernels read that many).
fn check_bias(bias: Option<&Tensor>, cols: usize) -> Result<()> {
    match bias {
        Some(b) if b.elem_count() != cols => {
            candle_core::bail!(
                "flash attention: a qkv bias of {} for {cols} columns",
                b.elem_count()
            )
        }
        _ => Ok(()),
    }
}

/// Attention of `b` sequences on their qkv rows `[B·T, 3·H·dh]` (plus `bias` `[3·H·dh]` when the
/// rows are the projection's product before its bias) → O `[B·T, H·dh]` (and the packed
/// statistics with `save`).
pub fn forward(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    b: usize,
    heads: usize,
    scale: f64,
    save: bool,
) -> Result<FlashOut> {
    let qkv = aligned(qkv)?;
    let (rows, cols) = qkv.dims2()?;
    check_bias(bias, cols)?;
    let hd = cols / 3;
    let out = qkv.apply_op1_no_bwd(&FlashFwd {
        b,
        heads,
        scale,
        save,
        bias: bias.cloned(),
    })?;
    let o = out.narrow(0, 0, rows * hd)?.reshape((rows, hd))?;
    Ok(FlashOut {
        o,
        packed: save.then_some(out),
    })
}

/// dqkv `[B·T, 3·H·dh]` from the forward's inputs, its packed output and dO `[B·T, H·dh]`.
pub fn backward(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    packed: &Tensor,
    d_o: &Tensor,
    b: usize,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    check_bias(bias, qkv.dim(1)?)?;
    // The kernels read 16-byte vectors from all three, as the forward does from qkv.
    aligned(qkv)?.apply_op3_no_bwd(
        &aligned(packed)?,
        &aligned(d_o)?,
        &FlashBwd {
            b,
            heads,
            scale,
            bias: bias.cloned(),
        },
    )
}
