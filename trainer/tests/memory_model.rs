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

/// One step timed on the tiny config at batch 16 with the GPU's dtypes and kernels (after one
/// warm-up step), its traffic counted when `traffic`.
fn tiny_gpu_like_step(engine: EngineKind, traffic: bool) -> trainer::debug::BenchResult {
    let gpu_like = Compute {
        precision: Precision::Bf16,
        kernels: Kernels::Fused,
        keep_activations: false,
    };
    let cfg = common::tiny_cfg();
    trainer::debug::bench(
        &cfg,
        &Device::Cpu,
        16,
        1,
        1,
        gpu_like,
        engine,
        false,
        traffic,
    )
    .unwrap()
}

/// The explicit step keeps what its backward needs and nothing more (block activations with the
/// LayerNorm and GELU outputs recomputed, flash attention's output and row statistics, targets
/// freed after the loss): on the tiny config, with the GPU's dtypes and kernels, its peak tensor
/// memory is 0.46× the autograd step's (the count is deterministic). Saving the attention
/// probabilities instead (`--kernels fused-no-flash`) gives 0.53×, so the bound is 0.5.
#[test]
fn explicit_step_peaks_well_below_autograd() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let peak = |engine| {
        tiny_gpu_like_step(engine, false)
            .peak_mem_gib
            .expect("a peak on the CPU")
    };
    let (explicit, autograd) = (peak(EngineKind::Explicit), peak(EngineKind::Autograd));
    assert!(
        explicit > 0.0 && explicit <= 0.5 * autograd,
        "peak tensor memory: explicit {explicit:.4} GiB, autograd {autograd:.4} GiB"
    );
}

/// The traffic count (`candle_core::memory::start_traffic`): each op's distinct input bytes
/// (a broadcast dim once), its output bytes (an in-place op: its destination, read and written)
/// and a matmul's FLOPs, written out here; ops run inside `one_op` count as the one op its
/// caller records.
#[test]
fn traffic_counts_what_each_op_reads_and_writes() {
    use candle_core::memory::{one_op, record_op, start_traffic, stop_traffic, OpTraffic};
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 24.0, &dev)
        .unwrap()
        .reshape((6, 4))
        .unwrap();
    let b = Tensor::arange(0f32, 20.0, &dev)
        .unwrap()
        .reshape((4, 5))
        .unwrap();
    let row = Tensor::arange(0f32, 4.0, &dev).unwrap();
    start_traffic();
    let c = a.matmul(&b).unwrap();
    let _sum = a.broadcast_add(&row).unwrap();
    let _half = a.to_dtype(DType::BF16).unwrap();
    let _t = a.t().unwrap().contiguous().unwrap();
    let _z = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let _nested = one_op(|| (a.exp().unwrap() + 1.0).unwrap());
    record_op("fused", 96, 96, 0);
    let ops = stop_traffic();
    // Not recording: nothing is added.
    let _after = (&c + 1.0).unwrap();
    let t = |calls, read_bytes, written_bytes, flops| OpTraffic {
        calls,
        read_bytes,
        written_bytes,
        flops,
    };
    assert_eq!(
        ops,
        vec![
            ("add", t(1, 96 + 16, 96, 0)),
            ("copy", t(1, 96, 96, 0)),
            ("fused", t(1, 96, 96, 0)),
            ("matmul", t(1, 96 + 80, 120, 2 * 6 * 5 * 4)),
            ("to_dtype", t(1, 96, 48, 0)),
            ("zeros", t(1, 0, 64, 0)),
        ]
    );
    assert!(stop_traffic().is_empty());
    // In place: 10 bf16 values added into 10 of 30 f32 (read and written there).
    let flat = Tensor::zeros(30, DType::F32, &dev).unwrap();
    let g = Tensor::ones(10, DType::BF16, &dev).unwrap();
    start_traffic();
    trainer::kernels::accumulate(&flat, 5, &g, true).unwrap();
    let inplace = stop_traffic();
    assert_eq!(inplace, vec![("udi-accumulate", t(1, 40 + 20, 40, 0))]);
    // An op's second outputs count as its writes: the bias-GELU backward over [6, 4] bf16 in
    // place reads y (its destination), b (f32) and dy, writes the GELU output over y and hands
    // over dx and db (f32); the loss in place reads and writes the [6, 4] logits, reads the
    // targets and weights and hands over the loss rows.
    let y = a.to_dtype(DType::BF16).unwrap();
    let w = Tensor::ones(6, DType::F32, &dev).unwrap();
    let p = Tensor::full(0.25f32, (3, 4), &dev).unwrap();
    let logits = a.copy().unwrap();
    start_traffic();
    trainer::kernels::bias_gelu_backward_recompute(&y, &row, &y.copy().unwrap(), true).unwrap();
    trainer::kernels::soft_ce_in_place(&logits, &p, &w, 0.1, true).unwrap();
    let two = stop_traffic();
    assert_eq!(
        two,
        vec![
            ("udi-bias-gelu-bwd", t(1, 48 + 16 + 48, 48 + 16 + 48, 0)),
            ("udi-soft-ce-fused", t(1, 96 + 48 + 24, 96 + 24, 0)),
        ]
    );
}

/// The explicit step moves fewer bytes in fewer ops than the autograd step (no zero-pad + cat
/// of the qkv gradient, no copies for views, fused residual updates), counted on the tiny
/// config with the GPU's dtypes and kernels: 0.60× the bytes and 0.40× the ops today.
#[test]
fn explicit_step_moves_fewer_bytes_in_fewer_ops() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let traffic = |engine| {
        let t = tiny_gpu_like_step(engine, true)
            .traffic
            .expect("counted on the CPU");
        (t.read_gib + t.written_gib, t.ops, t.matmul_tflop)
    };
    let (explicit, autograd) = (traffic(EngineKind::Explicit), traffic(EngineKind::Autograd));
    assert!(
        explicit.0 > 0.0 && explicit.0 <= 0.7 * autograd.0,
        "bytes: explicit {explicit:?}, autograd {autograd:?}"
    );
    assert!(explicit.1 <= 0.5 * autograd.1, "ops");
    // The same model, but flash attention's products are not matmuls: the explicit step's
    // matmul FLOPs are the autograd step's less the composed attention's (0.89× at these shapes).
    assert!(
        explicit.2 < autograd.2 && explicit.2 > 0.8 * autograd.2,
        "FLOPs"
    );
}
