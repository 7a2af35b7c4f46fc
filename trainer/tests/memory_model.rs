//! The CPU model of device memory (`candle_core::memory`, what `trainer bench` reports as the
//! peak on the CPU): a storage counts once from its creation until the last tensor holding it is
//! dropped; views, in-place ops and dtype no-ops allocate nothing. One test in its own process,
//! so that no other test allocates meanwhile.

use candle_core::memory::{live_cpu_bytes, peak_cpu_bytes, reset_peak_cpu_bytes};
use candle_core::{DType, Device, Tensor};

#[test]
fn storage_counts_until_its_last_tensor_is_dropped() {
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
