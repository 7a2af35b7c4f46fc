//! Does candle work on the picked device? Independent of the model code, so the GPU check can tell
//! "CUDA itself is broken" apart from "the trainer is".
//!
//! Runs a small transformer-ish forward and backward (matmul, layer norm, GELU, softmax,
//! cross-entropy) on the CPU and on the picked device from the same inputs, compares values and
//! gradients, checks `index_select` with non-contiguous ids, and times a 4096² bf16 and f32
//! matmul on the device. Prints one JSON line; exits 1 when a value differs by more than the
//! tolerance.
//!
//!   cargo run --release --example device_smoke -- [auto|cpu|cuda]
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use trainer::device::{self, DeviceFlag};

fn forward(x: &Tensor, w1: &Tensor, w2: &Tensor, ln_w: &Tensor, ln_b: &Tensor) -> Result<Tensor> {
    // The fused `layer_norm` and `softmax_last_dim` ops have no backward in candle-nn 0.11.1:
    // use the composed layer norm where gradients are needed.
    let h = candle_nn::ops::layer_norm_slow(x, ln_w, ln_b, 1e-6)?;
    let h = h.broadcast_matmul(w1)?.gelu_erf()?;
    let logits = h.broadcast_matmul(w2)?;
    let target = candle_nn::ops::softmax_last_dim(&(logits.detach() / 0.04)?)?;
    let logp = candle_nn::ops::log_softmax(&(logits / 0.1)?, D::Minus1)?;
    Ok((target * logp)?.sum_all()?.neg()?)
}

/// Loss and gradients (x, w1, w2) on `dev`, from inputs made on the CPU.
fn run(dev: &Device, inputs: &[Tensor]) -> Result<(f32, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev)?))
        .collect::<candle_core::Result<_>>()?;
    let loss = forward(&vars[0], &vars[1], &vars[2], &vars[3], &vars[4])?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for v in &vars[..3] {
        let g = grads
            .get(v)
            .ok_or_else(|| anyhow::anyhow!("missing gradient"))?;
        out.push(g.to_device(&Device::Cpu)?);
    }
    Ok((loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?, out))
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
    Ok(diff / scale)
}

/// `index_select` with ids that are a column of a matrix (stride 2, not contiguous), on the
/// device and on the CPU: the same rows, exactly.
fn strided_ids_select_the_same_rows(dev: &Device) -> Result<bool> {
    let x = Tensor::randn(0f32, 1., (4, 6), &Device::Cpu)?;
    let ids = Tensor::new(&[[3u32, 0], [0, 1], [2, 2], [1, 3]], &Device::Cpu)?;
    let select = |d: &Device| -> Result<Vec<Vec<f32>>> {
        let col = ids.to_device(d)?.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(x.to_device(d)?
            .index_select(&col, 0)?
            .to_device(&Device::Cpu)?
            .to_vec2()?)
    };
    Ok(select(dev)? == select(&Device::Cpu)?)
}

fn matmul_tflops(dev: &Device, dtype: DType) -> Result<f64> {
    let n = 4096;
    let a = Tensor::randn(0f32, 1., (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1., (n, n), dev)?.to_dtype(dtype)?;
    a.matmul(&b)?; // warm-up (PTX JIT, cuBLAS heuristics)
    dev.synchronize()?;
    let reps = 20;
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    dev.synchronize()?;
    Ok(2.0 * (n as f64).powi(3) * reps as f64 / t0.elapsed().as_secs_f64() / 1e12)
}

fn main() -> Result<()> {
    let flag: DeviceFlag = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("auto")
        .parse()?;
    let dev = device::pick(flag)?;
    let cpu = Device::Cpu;
    let inputs = vec![
        Tensor::randn(0f32, 1., (8, 50, 384), &cpu)?,
        (Tensor::randn(0f32, 1., (384, 1536), &cpu)? * 0.05)?,
        (Tensor::randn(0f32, 1., (1536, 4096), &cpu)? * 0.05)?,
        Tensor::randn(0f32, 1., 384, &cpu)?.affine(0.1, 1.0)?,
        (Tensor::randn(0f32, 1., 384, &cpu)? * 0.1)?,
    ];
    let (loss_ref, grads_ref) = run(&cpu, &inputs)?;
    let (loss, grads) = run(&dev, &inputs)?;
    let loss_rel = ((loss - loss_ref) / loss_ref.abs().max(1e-12)).abs();
    let grad_rel = grads_ref
        .iter()
        .zip(&grads)
        .map(|(a, b)| max_rel(a, b))
        .collect::<Result<Vec<_>>>()?;
    // Timings only where they mean something (the CPU bf16 gemm takes minutes).
    let (bf16, f32) = if dev.is_cpu() {
        (None, None)
    } else {
        (
            Some(matmul_tflops(&dev, DType::BF16)?),
            Some(matmul_tflops(&dev, DType::F32)?),
        )
    };
    // f32 on the GPU may use TF32-free cuBLAS paths or not; 1e-3 leaves room for either.
    let tol = 1e-3;
    let strided_ids = strided_ids_select_the_same_rows(&dev)?;
    let ok = loss_rel <= tol && grad_rel.iter().all(|r| *r <= tol) && strided_ids;
    println!(
        "{}",
        serde_json::json!({
            "device": device::name(&dev),
            "loss": loss, "loss_cpu": loss_ref, "loss_rel_diff": loss_rel,
            "grad_rel_diff": {"x": grad_rel[0], "w1": grad_rel[1], "w2": grad_rel[2]},
            "index_select_strided_ids": strided_ids,
            "matmul_4096_tflops": {"bf16": bf16, "f32": f32},
            "ok": ok,
        })
    );
    if !ok {
        bail!("device results differ from the CPU's by more than {tol}");
    }
    Ok(())
}
