//! `trainer kernel-check`: every fused op on a device against its CPU reference (`cpu_fwd`),
//! forward and backward, on random inputs at training shapes; then composed-vs-fused timings
//! (forward + backward) on the device. Flash attention is timed against the composed attention
//! it replaces in the explicit engine's blocks.
//!
//! Inputs are drawn on the CPU (f32, cast to bf16 where the op runs in bf16) and copied to the
//! device, so both sides read identical values. Errors are reported as the largest absolute
//! difference and that difference relative to the largest reference magnitude; an op passes
//! when the relative error is within its dtype's tolerance (f32 1e-4: f32 reductions over up to
//! 65 536 terms against an f64 reference; bf16 1.6e-2: two bf16 roundings of 2^-9 each,
//! plus f32 accumulation order).

use super::adamw::{meta_tensor, AdamwEma, Segment};
use super::flash;
use super::ln_residual::{layer_norm_backward_residual, residual_add_layer_norm, Branch};
use super::sq_norms::SqNormPlan;
use super::{
    attn_softmax, bias_add, bias_gelu, centered_softmax_entropy, layer_norm, soft_ce_rows,
};
use crate::config::TrainConfig;
use crate::optim::{ema_update, AdamW};
use crate::params::{param_specs, ParamStore};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// Problem sizes of one check.
#[derive(Clone, Debug, Serialize)]
pub struct Shapes {
    pub name: String,
    /// Images per batch.
    pub batch: usize,
    /// Token rows (batch × tokens) and width of the LayerNorm / bias+GELU inputs.
    pub rows: usize,
    pub dim: usize,
    pub mlp: usize,
    /// Attention score rows (batch × heads × queries) and keys.
    pub attn_rows: usize,
    pub keys: usize,
    /// Head rows (crops × batch), target rows, K.
    pub ce_rows: usize,
    pub ce_targets: usize,
    pub k: usize,
    /// Parameter tensor sizes for the multi-tensor AdamW.
    pub params: Vec<usize>,
    /// The config whose parameters the AdamW timing uses.
    #[serde(skip)]
    pub cfg: TrainConfig,
}

impl Shapes {
    /// `vits`: ViT-S/16 at the paper's recipe (global crops: 198 tokens, D 384, MLP 1536, 6 heads;
    /// head rows 12·B — 2 global + 10 local crops — against B targets; K = 65 536; the UDI
    /// parameter set). `tiny`: the same structure at CPU size.
    pub fn named(name: &str, batch: usize) -> Result<Self> {
        let (cfg, tokens) = match name {
            "vits" => (TrainConfig::from_toml_str("")?, 198),
            "tiny" => {
                let text = "[augment]\nglobal_size = 64\nlocal_size = 32\nn_local = 4\n\
                            patch_size = 8\nglobal_window = 2\nlocal_window = 2\n\
                            [model]\ndim = 64\ndepth = 2\nheads = 4\nhead_hidden = 128\n\
                            head_bottleneck = 32\nout_dim = 512\n";
                (TrainConfig::from_toml_str(text)?, 66)
            }
            other => bail!("unknown --shapes {other:?}: vits or tiny"),
        };
        let m = &cfg.model;
        let crops = 2 + cfg.augment.n_local as usize;
        Ok(Self {
            name: name.to_string(),
            batch,
            rows: batch * tokens,
            dim: m.dim,
            mlp: m.mlp_ratio * m.dim,
            attn_rows: batch * m.heads * tokens,
            keys: tokens,
            ce_rows: crops * batch,
            ce_targets: batch,
            k: m.out_dim,
            params: param_specs(&cfg).iter().map(|s| s.numel()).collect(),
            cfg,
        })
    }
}

/// One op × dtype.
#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    pub op: String,
    pub dtype: String,
    pub shape: String,
    pub fwd_max_abs: f64,
    pub fwd_max_rel: f64,
    /// Over every input gradient (None: the op has no backward).
    pub bwd_max_abs: Option<f64>,
    pub bwd_max_rel: Option<f64>,
    pub tolerance: f64,
    pub pass: bool,
    /// Forward + backward on the device, ms per call (median of the repetitions).
    pub composed_ms: f64,
    pub fused_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub device: String,
    pub shapes: Shapes,
    pub results: Vec<KernelResult>,
    pub ok: bool,
}

impl CheckReport {
    /// A markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "kernel-check on {} ({} shapes)\n\n| op | dtype | shape | fwd rel err | bwd rel err | tol | pass | composed ms | fused ms | speed-up |\n|---|---|---|---:|---:|---:|---|---:|---:|---:|\n",
            self.device, self.shapes.name
        );
        for r in &self.results {
            s += &format!(
                "| {} | {} | {} | {:.1e} | {} | {:.1e} | {} | {:.3} | {:.3} | {:.2}× |\n",
                r.op,
                r.dtype,
                r.shape,
                r.fwd_max_rel,
                r.bwd_max_rel.map_or("—".into(), |e| format!("{e:.1e}")),
                r.tolerance,
                if r.pass { "ok" } else { "FAIL" },
                r.composed_ms,
                r.fused_ms,
                r.composed_ms / r.fused_ms.max(1e-9)
            );
        }
        s += &format!(
            "\n{}\n",
            if self.ok {
                "all kernels match their CPU references"
            } else {
                "SOME KERNELS DIFFER"
            }
        );
        s
    }
}

/// A CPU f32 tensor of uniform values in [lo, hi) from `seed`.
pub fn rand_t(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (lo + (hi - lo) * rng.random::<f64>()) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// (max |a − b|, that / max |a|) over equally shaped tensors (any device / dtype).
pub fn errors(reference: &Tensor, got: &Tensor) -> Result<(f64, f64)> {
    let a = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let abs = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = a.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok((abs, abs / scale.max(1e-30)))
}

/// The largest relative error an op in activation dtype `dt` may show (module docs).
pub fn tolerance(dt: DType) -> f64 {
    if dt == DType::BF16 {
        1.6e-2
    } else {
        1e-4
    }
}

type OpFn<'a> = &'a dyn Fn(&[Tensor], bool) -> candle_core::Result<Tensor>;
type PairFn<'a> = &'a dyn Fn(&[Tensor], bool) -> candle_core::Result<(Tensor, Tensor)>;

/// Output and input gradients of `f(inputs, fused = true)` on `dev` (inputs copied there;
/// gradients for the indices in `grad`, from the upstream gradient `r`).
fn run_once(
    f: OpFn<'_>,
    inputs: &[Tensor],
    grad: &[usize],
    r: &Tensor,
    dev: &Device,
    fused: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut ts = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        let t = t.to_device(dev)?;
        ts.push(if grad.contains(&i) {
            Var::from_tensor(&t)?.as_tensor().clone()
        } else {
            t
        });
    }
    let y = f(&ts, fused)?;
    let mut gs = Vec::new();
    if !grad.is_empty() {
        let loss = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?;
        let g = loss.backward()?;
        for &i in grad {
            match g.get(&ts[i]) {
                Some(t) => gs.push(t.clone()),
                None => bail!("no gradient for input {i}"),
            }
        }
    }
    Ok((y, gs))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ms per forward+backward on `dev` (2 warm-up calls, then `reps` timed, median).
fn time_it(
    f: OpFn<'_>,
    inputs: &[Tensor],
    grad: &[usize],
    r: &Tensor,
    dev: &Device,
    fused: bool,
    reps: usize,
) -> Result<f64> {
    let inputs: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(dev))
        .collect::<candle_core::Result<_>>()?;
    let r = r.to_device(dev)?;
    let mut ms = Vec::new();
    for i in 0..reps + 2 {
        dev.synchronize()?;
        let t0 = Instant::now();
        run_once(f, &inputs, grad, &r, dev, fused)?;
        dev.synchronize()?;
        if i >= 2 {
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(ms))
}

#[allow(clippy::too_many_arguments)]
fn check(
    out: &mut Vec<KernelResult>,
    op: &str,
    shape: String,
    dt: DType,
    f: OpFn<'_>,
    inputs: Vec<Tensor>,
    grad: &[usize],
    dev: &Device,
    reps: usize,
) -> Result<()> {
    let tol = tolerance(dt);
    check_within(out, op, shape, dt, tol, f, inputs, grad, dev, reps)
}

/// [`check`] of each output of an op with two, under the names `ops`.
#[allow(clippy::too_many_arguments)]
fn check_pair(
    out: &mut Vec<KernelResult>,
    ops: [&str; 2],
    shape: String,
    dt: DType,
    f: PairFn<'_>,
    inputs: Vec<Tensor>,
    dev: &Device,
    reps: usize,
) -> Result<()> {
    let first = |t: &[Tensor], fused: bool| f(t, fused).map(|r| r.0);
    let second = |t: &[Tensor], fused: bool| f(t, fused).map(|r| r.1);
    for (op, g) in ops.into_iter().zip([&first as OpFn<'_>, &second]) {
        check(
            out,
            op,
            shape.clone(),
            dt,
            g,
            inputs.clone(),
            &[],
            dev,
            reps,
        )?;
    }
    Ok(())
}

/// [`check`] against the relative tolerance `tol` (0: the same bits).
#[allow(clippy::too_many_arguments)]
fn check_within(
    out: &mut Vec<KernelResult>,
    op: &str,
    shape: String,
    dt: DType,
    tol: f64,
    f: OpFn<'_>,
    inputs: Vec<Tensor>,
    grad: &[usize],
    dev: &Device,
    reps: usize,
) -> Result<()> {
    let (y_ref, _) = run_once(
        f,
        &inputs,
        &[],
        &Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        &Device::Cpu,
        true,
    )?;
    let r = rand_t(y_ref.dims(), 77, -1.0, 1.0)?;
    let (y_ref, g_ref) = run_once(f, &inputs, grad, &r, &Device::Cpu, true)?;
    let (y_dev, g_dev) = run_once(f, &inputs, grad, &r, dev, true)?;
    let (fa, fr) = errors(&y_ref, &y_dev)?;
    let mut bwd: Option<(f64, f64)> = None;
    for (a, b) in g_ref.iter().zip(&g_dev) {
        let (ea, er) = errors(a, b)?;
        let cur = bwd.unwrap_or((0.0, 0.0));
        bwd = Some((cur.0.max(ea), cur.1.max(er)));
    }
    let pass = fr <= tol && bwd.is_none_or(|(_, r)| r <= tol) && fa.is_finite();
    let composed_ms = time_it(f, &inputs, grad, &r, dev, false, reps)?;
    let fused_ms = time_it(f, &inputs, grad, &r, dev, true, reps)?;
    out.push(KernelResult {
        op: op.into(),
        dtype: format!("{dt:?}").to_lowercase(),
        shape,
        fwd_max_abs: fa,
        fwd_max_rel: fr,
        bwd_max_abs: bwd.map(|b| b.0),
        bwd_max_rel: bwd.map(|b| b.1),
        tolerance: tol,
        pass,
        composed_ms,
        fused_ms,
    });
    Ok(())
}

/// The multi-tensor AdamW + EMA: device vs CPU reference on one flat state, then the
/// per-tensor optimiser + EMA (composed) vs the fused launch on a whole parameter store.
fn check_adamw(out: &mut Vec<KernelResult>, s: &Shapes, dev: &Device, reps: usize) -> Result<()> {
    let n: usize = s.params.iter().sum();
    let mut segs = Vec::new();
    let mut off = 0;
    for (i, &len) in s.params.iter().enumerate() {
        segs.push(Segment {
            offset: off,
            len,
            update: i % 7 != 3, // some frozen segments
            decay: 1.0 - 1e-3 * 0.04,
            step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
            bc2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
            clip: if i % 2 == 0 { 1.0 } else { 0.3 },
        });
        off += len;
    }
    let p = rand_t(&[n], 1, -0.1, 0.1)?;
    let m = rand_t(&[n], 2, -1e-3, 1e-3)?;
    // v ≥ 1e-8 like a real second moment after a few steps (v ≈ 0 with m ≠ 0 makes single
    // updates of O(1), far from training and dominated by f32 rounding of p).
    let v = rand_t(&[n], 3, 1e-8, 1e-6)?;
    let t = rand_t(&[n], 4, -0.1, 0.1)?;
    let g = rand_t(&[n], 5, -1e-2, 1e-2)?;
    let op = AdamwEma {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        momentum: 0.996,
    };
    let run = |d: &Device| -> Result<Tensor> {
        let st = Tensor::cat(&[&p, &m, &v, &t], 0)?.to_device(d)?;
        st.inplace_op3(&g.to_device(d)?, &meta_tensor(&segs, d)?, &op)?;
        Ok(st)
    };
    let reference = run(&Device::Cpu)?;
    let got = run(dev)?;
    // Relative to the largest change the step makes to any value (the update, not the
    // parameters: an error of one f32 ulp of p would otherwise always pass).
    let (fa, _) = errors(&reference, &got)?;
    let before = Tensor::cat(&[&p, &m, &v, &t], 0)?;
    let (change, _) = errors(&reference, &before)?;
    let fr = fa / change.max(1e-30);

    // Timing on a real parameter store: per-tensor AdamW + EMA vs one fused launch.
    let store = ParamStore::init(&s.cfg, 0, DType::F32, dev)?;
    let teacher = store.deep_copy()?;
    let grads: Vec<Tensor> = store
        .params()
        .iter()
        .map(|p| Ok(p.var.as_tensor().affine(1e-3, 1e-4)?))
        .collect::<Result<_>>()?;
    let mut opt = AdamW::new(store.len(), 0.9, 0.999, 1e-8);
    let mut composed = Vec::new();
    let mut fused = Vec::new();
    for i in 0..reps + 2 {
        dev.synchronize()?;
        let t0 = Instant::now();
        for (j, (pp, g)) in store.params().iter().zip(&grads).enumerate() {
            opt.update(j, &pp.var, &(g * 0.5)?, 1e-3, 0.04)?;
        }
        ema_update(&teacher, &store, 0.996)?;
        dev.synchronize()?;
        if i >= 2 {
            composed.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let gs: Vec<Option<(Tensor, f64, f64)>> =
        grads.iter().map(|g| Some((g.clone(), 0.5, 0.04))).collect();
    for i in 0..reps + 2 {
        dev.synchronize()?;
        let t0 = Instant::now();
        opt.fused_update_ema(&store, &teacher, &gs, 1e-3, 0.996)?;
        dev.synchronize()?;
        if i >= 2 {
            fused.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    out.push(forward_row(
        "adamw+ema",
        "f32",
        format!("{} tensors, {n} values", s.params.len()),
        (fa, fr),
        1e-4,
        (composed, fused),
    ));
    Ok(())
}

/// The row of an op without a backward: it passes when the forward's relative error is within
/// `tol`; the median composed and fused milliseconds.
fn forward_row(
    op: &str,
    dtype: &str,
    shape: String,
    (fa, fr): (f64, f64),
    tol: f64,
    (composed, fused): (Vec<f64>, Vec<f64>),
) -> KernelResult {
    KernelResult {
        op: op.into(),
        dtype: dtype.into(),
        shape,
        fwd_max_abs: fa,
        fwd_max_rel: fr,
        bwd_max_abs: None,
        bwd_max_rel: None,
        tolerance: tol,
        pass: fr <= tol && fa.is_finite(),
        composed_ms: median(composed),
        fused_ms: median(fused),
    }
}

/// The per-parameter squared gradient norms of the flat gradient (clipping): device vs CPU
/// reference on every parameter of the config, then the per-tensor norms through candle's ops
/// (what the autograd step does) vs the two launches, each with its read to the host.
fn check_sq_norms(
    out: &mut Vec<KernelResult>,
    s: &Shapes,
    dev: &Device,
    reps: usize,
) -> Result<()> {
    let n: usize = s.params.iter().sum();
    let mut segs = Vec::new();
    let mut off = 0;
    for &len in &s.params {
        segs.push((off, len));
        off += len;
    }
    let g = rand_t(&[n], 6, -1e-2, 1e-2)?;
    let reference = SqNormPlan::new(&segs, &Device::Cpu)?.squared_norms(&g)?;
    let plan = SqNormPlan::new(&segs, dev)?;
    let gd = g.to_device(dev)?;
    let got = plan.squared_norms(&gd)?.to_device(&Device::Cpu)?;
    let (fa, fr) = errors(&reference, &got)?;
    let views: Vec<Tensor> = segs
        .iter()
        .map(|&(o, len)| gd.narrow(0, o, len))
        .collect::<candle_core::Result<_>>()?;
    let refs: Vec<&Tensor> = views.iter().collect();
    let mut composed = Vec::new();
    let mut fused = Vec::new();
    for i in 0..reps + 2 {
        dev.synchronize()?;
        let t0 = Instant::now();
        crate::optim::squared_norms(&refs)?;
        let t1 = Instant::now();
        plan.squared_norms(&gd)?.to_vec1::<f64>()?;
        if i >= 2 {
            composed.push((t1 - t0).as_secs_f64() * 1e3);
            fused.push(t1.elapsed().as_secs_f64() * 1e3);
        }
    }
    // f64 sums of f32 squares in different orders.
    out.push(forward_row(
        "squared norms",
        "f32",
        format!("{} tensors, {n} values", s.params.len()),
        (fa, fr),
        1e-10,
        (composed, fused),
    ));
    Ok(())
}

/// Gradient accumulation into the flat buffer (f32 and bf16 gradients): device vs CPU reference
/// on a ViT-S-sized buffer, then candle's cast + add + copy back vs the one in-place pass.
fn check_accumulate(
    out: &mut Vec<KernelResult>,
    s: &Shapes,
    dev: &Device,
    reps: usize,
) -> Result<()> {
    let n: usize = s.params.iter().sum();
    let flat0 = rand_t(&[n], 7, -1e-2, 1e-2)?;
    for dt in [DType::F32, DType::BF16] {
        let g = rand_t(&[n], 8, -1e-2, 1e-2)?.to_dtype(dt)?;
        let run = |d: &Device, fused: bool| -> Result<Tensor> {
            let flat = flat0.to_device(d)?;
            super::accumulate(&flat, 0, &g.to_device(d)?, fused)?;
            Ok(flat.to_device(&Device::Cpu)?)
        };
        let reference = run(&Device::Cpu, true)?;
        let (fa, fr) = errors(&reference, &run(dev, true)?)?;
        let (flat, gd) = (flat0.to_device(dev)?, g.to_device(dev)?);
        let mut composed = Vec::new();
        let mut fused = Vec::new();
        for i in 0..reps + 2 {
            for (f, times) in [(false, &mut composed), (true, &mut fused)] {
                dev.synchronize()?;
                let t0 = Instant::now();
                super::accumulate(&flat, 0, &gd, f)?;
                dev.synchronize()?;
                if i >= 2 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        // Both sides add the same two f32 values: exact.
        out.push(forward_row(
            "gradient accumulate",
            &format!("{dt:?}").to_lowercase(),
            format!("{n} values"),
            (fa, fr),
            0.0,
            (composed, fused),
        ));
    }
    Ok(())
}

/// One attention forward + backward: (qkv, dO, sequences) → (O, dqkv).
type AttnStep<'a> = dyn Fn(&Tensor, &Tensor, usize) -> Result<(Tensor, Tensor)> + 'a;

/// Crops whose flash attention the CPU reference recomputes (f64 loops over T² scores per head:
/// a few crops are enough to compare every tile position, the timing uses them all).
const FLASH_REF_CROPS: usize = 6;

/// Flash attention (bf16) on the device against its CPU reference, forward (O) and backward
/// (dqkv), for the global and the local crops' token counts; then forward + backward ms against
/// the attention the engine composes without it (split heads, batched GEMMs, the fused softmax,
/// merge heads). Skipped where the device has no flash kernel for the shapes (head dim ≠ 64 on
/// CUDA).
fn check_flash(out: &mut Vec<KernelResult>, s: &Shapes, dev: &Device, reps: usize) -> Result<()> {
    use crate::engine::{attention, Ops};
    let (m, a) = (&s.cfg.model, &s.cfg.augment);
    let (heads, dh) = (m.heads, m.dim / m.heads);
    if !flash::supported(dev, DType::BF16, dh) {
        return Ok(());
    }
    let scale = (dh as f64).powf(-0.5);
    let local_tokens = (a.local_size / a.patch_size).pow(2) as usize + 2;
    let crop_sets = [
        (2 * s.batch, s.keys),
        (a.n_local as usize * s.batch, local_tokens),
    ];
    for (crops, t) in crop_sets {
        let qkv = rand_t(&[crops * t, 3 * m.dim], 20, -2.0, 2.0)?.to_dtype(DType::BF16)?;
        let d_o = rand_t(&[crops * t, m.dim], 21, -1.0, 1.0)?.to_dtype(DType::BF16)?;
        // The qkv bias, added by the flash kernels as they load the rows.
        let bias_cpu = rand_t(&[3 * m.dim], 22, -0.5, 0.5)?;
        let bias_dev = bias_cpu.to_device(dev)?;
        let bias_for = |q: &Tensor| match q.device().is_cpu() {
            true => bias_cpu.clone(),
            false => bias_dev.clone(),
        };
        let flash_step = |q: &Tensor, g: &Tensor, n: usize| -> Result<(Tensor, Tensor)> {
            let bias = bias_for(q);
            let f = flash::forward(q, Some(&bias), n, heads, scale, true)?;
            let packed = f.packed.as_ref().expect("saved");
            let dq = flash::backward(q, Some(&bias), packed, g, n, heads, scale)?;
            Ok((f.o, dq))
        };
        let n_ref = crops.min(FLASH_REF_CROPS);
        let (q_ref, g_ref) = (qkv.narrow(0, 0, n_ref * t)?, d_o.narrow(0, 0, n_ref * t)?);
        let (o_ref, dq_ref) = flash_step(&q_ref, &g_ref, n_ref)?;
        let (o_dev, dq_dev) = flash_step(&q_ref.to_device(dev)?, &g_ref.to_device(dev)?, n_ref)?;
        let (fa, fr) = errors(&o_ref, &o_dev)?;
        let (ba, br) = errors(&dq_ref, &dq_dev)?;
        let ops = Ops {
            fused: true,
            flash: false,
            cdt: DType::BF16,
            pdt: DType::F32,
            keep_activations: false,
        };
        // The engine's own composed path (`flash: false` in `ops`).
        let composed_step = |q: &Tensor, g: &Tensor, n: usize| -> Result<(Tensor, Tensor)> {
            let bias = bias_for(q);
            let (o, saved) = attention::forward_rows(&ops, q, Some(&bias), n, heads, scale, true)?;
            let saved = saved.expect("saved");
            Ok((
                o,
                attention::backward_rows(&ops, &saved, g, n, heads, scale)?,
            ))
        };
        let (q_dev, g_dev) = (qkv.to_device(dev)?, d_o.to_device(dev)?);
        let time = |f: &AttnStep| {
            let mut ms = Vec::new();
            for i in 0..reps + 2 {
                dev.synchronize()?;
                let t0 = Instant::now();
                f(&q_dev, &g_dev, crops)?;
                dev.synchronize()?;
                if i >= 2 {
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok::<f64, anyhow::Error>(median(ms))
        };
        let tol = tolerance(DType::BF16);
        out.push(KernelResult {
            op: "flash_attention".into(),
            dtype: "bf16".into(),
            shape: format!("{crops} × {heads} heads × [{t}, {dh}] (reference: {n_ref} crops)"),
            fwd_max_abs: fa,
            fwd_max_rel: fr,
            bwd_max_abs: Some(ba),
            bwd_max_rel: Some(br),
            tolerance: tol,
            pass: fr <= tol && br <= tol && fa.is_finite() && ba.is_finite(),
            composed_ms: time(&composed_step)?,
            fused_ms: time(&flash_step)?,
        });
    }
    Ok(())
}

/// The photometric pipeline on the device (`[augment] photometric = "device"`) against the same
/// function on the CPU, which is bit-identical to the loader's PIL reference
/// (trainer/tests/photometric_device.rs): any difference fails (tolerance 0). `composed ms` is
/// the loader's fused CPU path on one thread for the same crops (what the device replaces),
/// `fused ms` the device. Records are drawn with the recipe's probabilities.
fn check_photometric(
    out: &mut Vec<KernelResult>,
    aug: &shared::config::AugmentConfig,
    crops: usize,
    size: usize,
    dev: &Device,
    reps: usize,
) -> Result<()> {
    use loader::photometric::{PhotoParams, PhotoScratch};
    let mut rng = shared::rng::sample_rng(7, 0, crops as u64);
    let params: Vec<PhotoParams> = (0..crops)
        .map(|_| PhotoParams::draw(aug, &mut rng))
        .collect();
    let records: Vec<_> = params.iter().map(PhotoParams::record).collect();
    // Smooth content with an edge and colour (random noise would make every op trivial).
    let px = size * size * 3;
    let mut bytes = vec![0u8; crops * px];
    for (c, img) in bytes.chunks_exact_mut(px).enumerate() {
        for (i, v) in img.iter_mut().enumerate() {
            let (y, x, ch) = (i / (3 * size), (i / 3) % size, i % 3);
            let edge = if (x + c) % size < size / 2 { 60 } else { 0 };
            *v = ((x * (ch + 1) * 255 / size + y * 97 / size + edge + 13 * c) % 256) as u8;
        }
    }
    let x =
        Tensor::from_slice(&bytes, (crops, size, size, 3), &Device::Cpu)?.to_dtype(DType::F32)?;
    let reference = crate::photometric::apply(&x, &records)?;
    let xd = x.to_device(dev)?;
    let got = crate::photometric::apply(&xd, &records)?;
    let (abs, rel) = errors(&reference, &got)?;
    let mut device_ms = Vec::new();
    for i in 0..reps + 1 {
        dev.synchronize()?;
        let t0 = Instant::now();
        crate::photometric::apply(&xd, &records)?;
        dev.synchronize()?;
        if i >= 1 {
            device_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut scratch = PhotoScratch::default();
    let mut work = bytes.clone();
    let t0 = Instant::now();
    for (img, p) in work.chunks_exact_mut(px).zip(&params) {
        p.apply(img, size, size, &mut scratch);
    }
    let loader_ms = t0.elapsed().as_secs_f64() * 1e3;
    out.push(forward_row(
        "photometric (loader CPU 1 thread → device)",
        "f32",
        format!("[{crops}, {size}, {size}, 3]"),
        (abs, rel),
        0.0,
        (vec![loader_ms], device_ms),
    ));
    Ok(())
}

/// Runs every check on `dev` (the CPU reference always runs on the CPU).
pub fn run(dev: &Device, s: &Shapes, reps: usize) -> Result<CheckReport> {
    let mut out = Vec::new();
    let reps = reps.max(1);
    for dt in [DType::F32, DType::BF16] {
        let cast = |t: Tensor| t.to_dtype(dt);
        // LayerNorm: activations in dt, f32 parameters, output in dt.
        let x = cast(rand_t(&[s.rows, s.dim], 10, -3.0, 3.0)?)?;
        let w = rand_t(&[s.dim], 11, 0.5, 1.5)?;
        let b = rand_t(&[s.dim], 12, -0.5, 0.5)?;
        let f = move |t: &[Tensor], fused: bool| layer_norm(&t[0], &t[1], &t[2], 1e-6, dt, fused);
        check(
            &mut out,
            "layer_norm",
            format!("[{}, {}]", s.rows, s.dim),
            dt,
            &f,
            vec![x, w, b],
            &[0, 1, 2],
            dev,
            reps,
        )?;

        // Residual stream f32, branch in dt, a stochastic-depth mask (0 or 1/0.9) per row.
        let x = rand_t(&[s.rows, s.dim], 22, -4.0, 4.0)?;
        let a = cast(rand_t(&[s.rows, s.dim], 23, -4.0, 4.0)?)?;
        let m = rand_t(&[s.rows], 24, 0.0, 1.0)?
            .ge(0.1)?
            .to_dtype(DType::F32)?
            / 0.9;
        let f = |t: &[Tensor], fused: bool| super::residual_add(&t[0], &t[1], Some(&t[2]), fused);
        check(
            &mut out,
            "residual_add",
            format!("[{}, {}]", s.rows, s.dim),
            dt,
            &f,
            vec![x, a, m?],
            &[0, 1],
            dev,
            reps,
        )?;

        // The residual update (with the branch's last bias) and the LayerNorm after it: y and LN(y)
        // in one vector.
        let x = rand_t(&[s.batch, s.rows / s.batch, s.dim], 30, -3.0, 3.0)?;
        let a = cast(rand_t(&[s.batch, s.rows / s.batch, s.dim], 31, -3.0, 3.0)?)?;
        let ab = rand_t(&[s.dim], 35, -0.5, 0.5)?;
        let m = (rand_t(&[s.batch], 32, 0.0, 1.0)?
            .ge(0.1)?
            .to_dtype(DType::F32)?
            / 0.9)?;
        let w = rand_t(&[s.dim], 33, 0.5, 1.5)?;
        let b = rand_t(&[s.dim], 34, -0.5, 0.5)?;
        let f = move |t: &[Tensor], fused: bool| {
            let (y, ln) = residual_add_layer_norm(
                &t[0],
                &t[1],
                Some(&t[2]),
                Some(&t[3]),
                &t[4],
                &t[5],
                1e-6,
                dt,
                fused,
            )?;
            Tensor::cat(
                &[y.flatten_all()?, ln.flatten_all()?.to_dtype(DType::F32)?],
                0,
            )
        };
        check(
            &mut out,
            "residual_add_layer_norm",
            format!("[{}, {}]", s.rows, s.dim),
            dt,
            &f,
            vec![x, a, ab, m, w, b],
            &[],
            dev,
            reps,
        )?;

        // The LayerNorm backward inside the residual stream (f32 stream and parameters, dy and
        // the next branch's gradient in dt): dx, that branch, dw and db in one vector.
        let x = rand_t(&[s.rows, s.dim], 25, -3.0, 3.0)?;
        let w = rand_t(&[s.dim], 26, 0.5, 1.5)?;
        let dy = cast(rand_t(&[s.rows, s.dim], 27, -1.0, 1.0)?)?;
        let dres = rand_t(&[s.batch, s.rows / s.batch, s.dim], 28, -1.0, 1.0)?;
        let m = (rand_t(&[s.batch], 29, 0.0, 1.0)?
            .ge(0.1)?
            .to_dtype(DType::F32)?
            / 0.9)?;
        let f = move |t: &[Tensor], fused: bool| {
            let branch = Some(Branch {
                m: Some(&t[4]),
                dtype: dt,
            });
            let g = layer_norm_backward_residual(&t[0], &t[1], &t[2], &t[3], 1e-6, branch, fused)?;
            let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32);
            Tensor::cat(
                &[
                    flat(&g.dx)?,
                    flat(&g.branch.expect("asked for"))?,
                    flat(&g.dw)?,
                    flat(&g.db)?,
                ],
                0,
            )
        };
        check(
            &mut out,
            "layer_norm_backward_residual",
            format!("[{}, {}]", s.rows, s.dim),
            dt,
            &f,
            vec![x, w, dy, dres, m],
            &[],
            dev,
            reps,
        )?;

        let x = cast(rand_t(&[s.rows, 3 * s.dim], 20, -4.0, 4.0)?)?;
        let b = rand_t(&[3 * s.dim], 21, -0.5, 0.5)?;
        let f = |t: &[Tensor], fused: bool| bias_add(&t[0], &t[1], fused);
        check(
            &mut out,
            "bias_add",
            format!("[{}, {}]", s.rows, 3 * s.dim),
            dt,
            &f,
            vec![x, b],
            &[0, 1],
            dev,
            reps,
        )?;

        let x = cast(rand_t(&[s.rows, s.mlp], 13, -4.0, 4.0)?)?;
        let b = rand_t(&[s.mlp], 14, -0.5, 0.5)?;
        let f = |t: &[Tensor], fused: bool| bias_gelu(&t[0], &t[1], fused);
        check(
            &mut out,
            "bias_gelu",
            format!("[{}, {}]", s.rows, s.mlp),
            dt,
            &f,
            vec![x, b],
            &[0, 1],
            dev,
            reps,
        )?;

        let x = cast(rand_t(&[s.attn_rows, s.keys], 15, -20.0, 20.0)?)?;
        let f = |t: &[Tensor], fused: bool| attn_softmax(&t[0], 0.125, fused);
        check(
            &mut out,
            "attn_softmax",
            format!("[{}, {}]", s.attn_rows, s.keys),
            dt,
            &f,
            vec![x],
            &[0],
            dev,
            reps,
        )?;

        // The teacher-side op on logits and a centre: its probabilities, then its entropies.
        let t = cast(rand_t(&[2 * s.ce_targets, s.k], 16, -1.0, 1.0)?)?;
        let c = rand_t(&[s.k], 17, -0.1, 0.1)?;
        check_pair(
            &mut out,
            ["centered_softmax", "centered_entropy"],
            format!("[{}, {}]", 2 * s.ce_targets, s.k),
            dt,
            &|t, fused| centered_softmax_entropy(&t[0], &t[1], 0.04, fused),
            vec![t.clone(), c.clone()],
            dev,
            reps,
        )?;

        // The local crops' [cls+] targets: both views' pooled logits blended with their [cls]
        // logits, one softmax each, summed per crop; then the entropies. At most 8 images: the
        // CPU reference of these rows is the slow side.
        let (b, l) = (s.ce_targets.min(8), s.cfg.augment.n_local as usize);
        let avg = cast(rand_t(&[2, b, l, s.k], 29, -1.0, 1.0)?)?;
        let cls = rand_t(&[2, b, s.k], 30, -1.0, 1.0)?;
        check_pair(
            &mut out,
            ["local_multimodal", "local_multimodal entropy"],
            format!("[2, {b}, {l}, {}]", s.k),
            dt,
            &|t, fused| super::local_multimodal_targets(&t[0], &t[1], &t[2], 0.5, 0.04, fused),
            vec![avg, cls, c.clone()],
            dev,
            reps,
        )?;

        // The patch targets and the validity-weighted sums of the patch logits, each view's from
        // the other view's rows (16 rows per image and view).
        let rows = 16;
        let tp = cast(rand_t(&[2, b, rows, s.k], 31, -1.0, 1.0)?)?;
        let w = rand_t(&[2, b, rows], 32, 0.0, 1.0)?
            .ge(0.3)?
            .to_dtype(DType::F32)?;
        let targets = |t: &[Tensor], fused: bool| {
            super::other_view_softmax_entropy(&t[0], &t[1], 0.04, fused)
        };
        let probs = |t: &[Tensor], fused: bool| targets(t, fused).map(|r| r.0);
        let sums = |t: &[Tensor], fused: bool| super::other_view_weighted_sum(&t[0], &t[1], fused);
        for (op, f, second) in [
            ("other_view_softmax", &probs as OpFn<'_>, &c),
            ("other_view_weighted_sum", &sums, &w),
        ] {
            check(
                &mut out,
                op,
                format!("[2, {b}, {rows}, {}]", s.k),
                dt,
                f,
                vec![tp.clone(), second.clone()],
                &[],
                dev,
                reps,
            )?;
        }

        // The weight-normalised last layer W in the compute dtype; its backward (f32) once.
        let e = s.cfg.model.head_bottleneck;
        let v = rand_t(&[s.k, e], 34, -1.0, 1.0)?;
        let gw = rand_t(&[s.k, 1], 35, 0.5, 2.0)?;
        let f = |t: &[Tensor], fused: bool| super::weight_norm(&t[0], &t[1], dt, fused);
        let shape = format!("[{}, {e}]", s.k);
        let inputs = vec![v.clone(), gw.clone()];
        check(
            &mut out,
            "weight_norm",
            shape.clone(),
            dt,
            &f,
            inputs,
            &[],
            dev,
            reps,
        )?;
        if dt == DType::F32 {
            let dw = rand_t(&[s.k, e], 36, -1.0, 1.0)?;
            check_pair(
                &mut out,
                ["weight_norm_backward dg", "weight_norm_backward dV"],
                shape,
                dt,
                &|t, fused| super::weight_norm_backward(&t[0], &t[1], &t[2], fused),
                vec![dw, v, gw],
                dev,
                reps,
            )?;
        }

        // The bias gradient of fc1: a column sum over every token row, f32 out.
        let g = cast(rand_t(&[s.rows, s.mlp], 27, -1.0, 1.0)?)?;
        let f = |t: &[Tensor], fused: bool| super::col_sum(&t[0], DType::F32, fused);
        check(
            &mut out,
            "col_sum",
            format!("[{}, {}]", s.rows, s.mlp),
            dt,
            &f,
            vec![g],
            &[],
            dev,
            reps,
        )?;

        let st = cast(rand_t(&[s.ce_rows, s.k], 18, -1.0, 1.0)?)?;
        let p = centered_softmax_entropy(
            &rand_t(&[s.ce_targets, s.k], 19, -1.0, 1.0)?,
            &Tensor::zeros(s.k, DType::F32, &Device::Cpu)?,
            0.04,
            false,
        )?
        .0;
        let f = |t: &[Tensor], fused: bool| soft_ce_rows(&t[0], &t[1], 0.1, fused);
        check(
            &mut out,
            "soft_ce",
            format!("[{}, {}] vs [{}, {}]", s.ce_rows, s.k, s.ce_targets, s.k),
            dt,
            &f,
            vec![st.clone(), p.clone()],
            &[0],
            dev,
            reps,
        )?;

        // The explicit step's loss: the loss rows and the gradient in one pass, written over a
        // copy of the logits; each output compared on its own scale.
        let g = rand_t(&[s.ce_rows], 28, 0.5, 1.5)?;
        check_pair(
            &mut out,
            ["soft_ce_in_place loss", "soft_ce_in_place ds"],
            format!("[{}, {}] vs [{}, {}]", s.ce_rows, s.k, s.ce_targets, s.k),
            dt,
            &|t, fused| {
                let s = t[0].copy()?;
                let h = super::soft_ce_in_place(&s, &t[1], &t[2], 0.1, fused)?;
                Ok((h, s))
            },
            vec![st, p, g],
            dev,
            reps,
        )?;
    }
    check_adamw(&mut out, s, dev, reps.min(10))?;
    check_sq_norms(&mut out, s, dev, reps.min(10))?;
    check_accumulate(&mut out, s, dev, reps.min(10))?;
    for (crops, size) in [
        (2 * s.batch, s.cfg.augment.global_size as usize),
        (
            s.cfg.augment.n_local as usize * s.batch,
            s.cfg.augment.local_size as usize,
        ),
    ] {
        check_photometric(&mut out, &s.cfg.augment, crops, size, dev, reps.min(5))?;
        // The crops as they arrive from the ring, normalised in one pass (bit for bit).
        let x = rand_t(&[crops, size, size, 3], 33, 0.0, 255.99)?.to_dtype(DType::U8)?;
        let f = |t: &[Tensor], fused: bool| {
            super::normalise_crops(&t[0], crate::data::MEAN, crate::data::STD, fused)
        };
        let shape = format!("[{crops}, {size}, {size}, 3] u8");
        // Every step is one f32 operation on both sides: nothing but the same bits passes.
        check_within(
            &mut out,
            "normalise_crops",
            shape,
            DType::F32,
            0.0,
            &f,
            vec![x],
            &[],
            dev,
            reps.min(5),
        )?;
    }
    // Last: a kernel fault can leave the device unusable for the rest of the process. An error
    // is a failed row, not a lost report.
    if let Err(e) = check_flash(&mut out, s, dev, reps) {
        eprintln!("kernel-check: flash attention: {e:#}");
        out.push(KernelResult {
            op: "flash_attention (error, see stderr)".into(),
            dtype: "bf16".into(),
            shape: String::new(),
            fwd_max_abs: f64::NAN,
            fwd_max_rel: f64::NAN,
            bwd_max_abs: None,
            bwd_max_rel: None,
            tolerance: tolerance(DType::BF16),
            pass: false,
            composed_ms: f64::NAN,
            fused_ms: f64::NAN,
        });
    }
    let ok = out.iter().all(|r| r.pass);
    Ok(CheckReport {
        device: crate::device::name(dev),
        shapes: s.clone(),
        results: out,
        ok,
    })
}
