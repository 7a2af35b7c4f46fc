//! Multi-tensor AdamW + teacher EMA over flat buffers: one launch updates every parameter.
//!
//! `state` = `[p | m | v | t]` (4·n elements: student parameters, Adam moments, teacher
//! parameters, each the parameters flattened in store order), `g` = the flat raw gradients (n),
//! `meta` = 8 u32 per parameter ([`Segment`]). Per element of segment s (PyTorch AdamW, see
//! `crate::optim`): if s is updated, `g ← g·clip; p ← p·decay; m ← m + (1−β₁)(g − m);
//! v ← β₂v + (1−β₂)g²; p ← p − step·m/(√v/√(1−β₂ᵗ) + ε)`; then for every element
//! `t ← mom·t + (1−mom)·p`.

use super::cpu;
#[cfg(feature = "cuda")]
use super::gpu;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Device, InplaceOp3, Layout, Result, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{cuda_backend::cudarc::driver::PushKernelArg, CudaStorage};

/// One parameter's slice of the flat buffers and its update constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
    /// false: no AdamW (frozen, or no gradient); the EMA still applies.
    pub update: bool,
    /// 1 − lr·wd.
    pub decay: f32,
    /// lr / (1 − β₁ᵗ).
    pub step_size: f32,
    /// √(1 − β₂ᵗ).
    pub bc2_sqrt: f32,
    /// Gradient clipping factor.
    pub clip: f32,
}

/// The `meta` tensor (U32 `[8·segments]`) on `device`.
pub fn meta_tensor(segs: &[Segment], device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(8 * segs.len());
    for s in segs {
        if s.offset > u32::MAX as usize || s.offset + s.len > u32::MAX as usize {
            bail!("adamw_ema: more than 2^32 parameters");
        }
        v.extend_from_slice(&[
            s.offset as u32,
            s.len as u32,
            s.update as u32,
            s.decay.to_bits(),
            s.step_size.to_bits(),
            s.bc2_sqrt.to_bits(),
            s.clip.to_bits(),
            0,
        ]);
    }
    Tensor::from_vec(v, 8 * segs.len(), device)
}

fn segments_from(meta: &[f64]) -> Vec<Segment> {
    meta.chunks(8)
        .map(|c| Segment {
            offset: c[0] as usize,
            len: c[1] as usize,
            update: c[2] as u32 & 1 == 1,
            decay: f32::from_bits(c[3] as u32),
            step_size: f32::from_bits(c[4] as u32),
            bc2_sqrt: f32::from_bits(c[5] as u32),
            clip: f32::from_bits(c[6] as u32),
        })
        .collect()
}

/// The in-place op: `state.inplace_op3(&g, &meta, &AdamwEma { .. })`.
pub struct AdamwEma {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Teacher EMA momentum.
    pub momentum: f64,
}

impl AdamwEma {
    /// The reference update of one element (f64 arithmetic on the stored values).
    fn element(&self, s: &Segment, p: f64, m: f64, v: f64, g: f64) -> (f64, f64, f64) {
        if !s.update {
            return (p, m, v);
        }
        let g = g * s.clip as f64;
        let p = p * s.decay as f64;
        let m = m + (1.0 - self.beta1) * (g - m);
        let v = self.beta2 * v + (1.0 - self.beta2) * g * g;
        let p = p - s.step_size as f64 * (m / (v.sqrt() / s.bc2_sqrt as f64 + self.eps));
        (p, m, v)
    }
}

impl InplaceOp3 for AdamwEma {
    fn name(&self) -> &'static str {
        "udi-adamw-ema"
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
        let g = cpu::read_full(s2, l2, "adamw g")?;
        cpu::same(s3.dtype(), candle_core::DType::U32, "adamw meta and u32")?;
        let segs = segments_from(&cpu::read(s3, l3, "adamw meta")?);
        let n = g.len();
        let r = super::span(l1, 4 * n, "adamw state")?;
        macro_rules! run {
            ($st:expr, $to:expr, $from:expr) => {{
                let st = &mut $st[r];
                for s in &segs {
                    for i in s.offset..s.offset + s.len {
                        let (p, m, v) = self.element(
                            s,
                            $from(st[i]),
                            $from(st[n + i]),
                            $from(st[2 * n + i]),
                            g[i],
                        );
                        st[i] = $to(p);
                        st[n + i] = $to(m);
                        st[2 * n + i] = $to(v);
                        let t = $from(st[3 * n + i]);
                        st[3 * n + i] = $to(self.momentum * t + (1.0 - self.momentum) * p);
                    }
                }
            }};
        }
        match s1 {
            CpuStorage::F32(st) => run!(st, |x: f64| x as f32, |x: f32| x as f64),
            CpuStorage::F64(st) => run!(st, |x: f64| x, |x: f64| x),
            other => bail!("adamw state must be f32 or f64, got {:?}", other.dtype()),
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
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let dev = s1.device.clone();
        let g = gpu::In::new(s2, l2, "adamw g")?;
        let meta = gpu::In::new(s3, l3, "adamw meta")?;
        if g.dtype() != candle_core::DType::F32 || meta.dtype() != candle_core::DType::U32 {
            bail!("adamw_ema on CUDA: g must be f32 and meta u32");
        }
        let n = l2.shape().elem_count();
        let n_seg = (l3.shape().elem_count() / 8) as i32;
        let r = super::span(l1, 4 * n, "adamw state")?;
        let st = s1.as_cuda_slice_mut::<f32>()?;
        let mut st = st.slice_mut(r);
        let k = gpu::func(&dev, "adamw_ema")?;
        let (b1, b2, eps, mom) = (
            self.beta1 as f32,
            self.beta2 as f32,
            self.eps as f32,
            self.momentum as f32,
        );
        let mut args = k.builder();
        args.arg(&mut st);
        g.push(&mut args);
        meta.push(&mut args);
        args.arg(&n_seg)
            .arg(&n)
            .arg(&b1)
            .arg(&b2)
            .arg(&eps)
            .arg(&mom);
        gpu::launch(args, super::geometry::elementwise(n))
    }
}
