//! The CPU model of device memory (`candle_core::memory`, what `trainer bench` reports as the
//! peak on the CPU): a storage counts once from its creation until the last tensor holding it is
//! dropped; views, in-place ops and dtype no-ops allocate nothing. The tests take turns (the
//! count is process-wide), in a process of their own.
mod common;

use candle_core::memory::{live_cpu_bytes, peak_cpu_bytes, reset_peak_cpu_bytes};
use candle_core::{DType, Device, Tensor};
use std::sync::Mutex;
use trainer::engine::EngineKind;
use trainer::kernels::{Compute, Kernels, Precision};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn storage_counts_until_its_last_tensor_is_dropped() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let base = live_cpu_bytes();
    reset_peak_cpu_bytes();
    let t = Tensor::zeros((100, 10), DType::F32, &dev).unwrap();
    assert_eq!(live_cpu_bytes(), base + 4000);
    let view = t.narrow(0, 10, 20).unwrap().reshape(200).unwrap();
    let same = t.to_dtype(DType::F32).unwrap();
    assert_eq!(live_cpu_bytes(), base + 4000, "views and no-op casts share");
    let half = t.to_dtype(DType::BF16).unwrap();
    assert_eq!(live_cpu_bytes(), base + 6000);
    drop((t, same));
    assert_eq!(
        live_cpu_bytes(),
        base + 6000,
        "the view still holds the storage"
    );
    // candle copies a view's whole storage.
    let copy = view.copy().unwrap();
    assert_eq!(live_cpu_bytes(), base + 10000);
    let ones = Tensor::ones(200, DType::F32, &dev).unwrap();
    copy.slice_set(&ones, 0, 0).unwrap();
    assert_eq!(live_cpu_bytes(), base + 10800, "in place: nothing new");
    drop((view, half, copy, ones));
    assert_eq!(live_cpu_bytes(), base);
    assert_eq!(peak_cpu_bytes(), base + 10800);
    reset_peak_cpu_bytes();
    assert_eq!(peak_cpu_bytes(), base);
}

/// The explicit step keeps what its backward needs and nothing more (block activations with the
/// LayerNorm and GELU outputs recomputed, flash attention's output and row statistics, targets
/// freed after the loss): on the tiny config, with the GPU's dtypes and kernels, its peak tensor
/// memory is 0.48× the autograd step's (the count is deterministic). Saving the attention
/// probabilities instead (`--kernels fused-no-flash`) gives 0.53×, so the bound is 0.5.
#[test]
fn explicit_step_peaks_well_below_autograd() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = common::tiny_cfg();
    let gpu_like = Compute {
        precision: Precision::Bf16,
        kernels: Kernels::Fused,
    };
    let peak = |engine| {
        trainer::debug::bench(&cfg, &Device::Cpu, 16, 1, 1, gpu_like, engine, false)
            .unwrap()
            .peak_mem_gib
            .expect("a peak on the CPU")
    };
    let (explicit, autograd) = (peak(EngineKind::Explicit), peak(EngineKind::Autograd));
    assert!(
        explicit > 0.0 && explicit <= 0.5 * autograd,
        "peak tensor memory: explicit {explicit:.4} GiB, autograd {autograd:.4} GiB"
    );
}
