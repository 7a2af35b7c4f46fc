//! Choosing where tensors live: `--device auto|cpu|cuda`.
//!
//! A `--features cuda` binary loads the CUDA libraries at run time (cudarc's dynamic loading, see
//! vendor/README.md), so the same binary starts on a machine without a GPU. `pick` therefore
//! checks that the driver and the libraries candle calls can be opened *before* creating the CUDA
//! device: cudarc panics on first use of a library it cannot load, and we want an error that says
//! what is missing instead.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// The `--device` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceFlag {
    /// the CUDA GPU LOCAL_RANK (default 0) when this binary has CUDA support and a GPU is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// the CUDA GPU LOCAL_RANK (default 0); an error if there is none.
    Cuda,
}

impl FromStr for DeviceFlag {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            _ => Err(DeviceError::UnknownFlag(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected auto, cpu or cuda")]
    UnknownFlag(String),
    #[error(
        "--device cuda: this trainer binary was built without CUDA support; rebuild it with \
         `cargo build --release --features cuda -p trainer` (README, section \"GPU machines\")"
    )]
    NotCompiled,
    #[error(
        "--device cuda: cannot load {missing} (the NVIDIA driver and CUDA 13 libraries); \
         on a GPU machine put the directory holding them on LD_LIBRARY_PATH \
         (e.g. /usr/local/cuda/lib64 or PyTorch's site-packages/nvidia/cu13/lib)"
    )]
    LibrariesMissing { missing: String },
    #[error("--device cuda: no usable CUDA GPU (LOCAL_RANK, default 0): {0}")]
    NoGpu(String),
}

/// True when this binary was compiled with the `cuda` feature.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// The device for `flag`. `Auto` falls back to the CPU (with a log line saying why); `Cuda`
/// fails with a message naming what is missing.
pub fn pick(flag: DeviceFlag) -> Result<Device, DeviceError> {
    match flag {
        DeviceFlag::Cpu => Ok(Device::Cpu),
        DeviceFlag::Cuda => cuda_local(),
        DeviceFlag::Auto => match cuda_local() {
            Ok(dev) => Ok(dev),
            Err(why) => {
                if CUDA_COMPILED {
                    tracing::info!("using the CPU: {why}");
                }
                Ok(Device::Cpu)
            }
        },
    }
}

/// Short name for logs and JSON reports: "cpu" or "cuda:0".
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_local() -> Result<Device, DeviceError> {
    Err(DeviceError::NotCompiled)
}

/// The GPU of this rank: LOCAL_RANK (set by `torchrun` and `trainer launch`; SLURM_LOCALID
/// under SLURM), else 0; always 0 when CUDA_VISIBLE_DEVICES shows this process one GPU (SLURM's
/// per-task GPU binding).
#[cfg(feature = "cuda")]
fn local_gpu() -> usize {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    if !visible.trim().is_empty() && !visible.contains(',') {
        return 0;
    }
    ["LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(feature = "cuda")]
fn cuda_local() -> Result<Device, DeviceError> {
    use candle_core::cuda::cudarc;
    // The libraries candle's CUDA backend opens when the device is created or on the first
    // matmul/random op. nvrtc is only needed for user-compiled kernels, so it is not required.
    // SAFETY: these only try dlopen on the candidate names and drop the handle.
    let checks: [(&str, bool); 4] = unsafe {
        [
            ("libcuda (driver)", cudarc::driver::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
            ("libcurand", cudarc::curand::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(lib, _)| *lib)
        .collect();
    if !missing.is_empty() {
        return Err(DeviceError::LibrariesMissing {
            missing: missing.join(", "),
        });
    }
    let dev = Device::new_cuda(local_gpu()).map_err(|e| DeviceError::NoGpu(e.to_string()))?;
    if let Device::Cuda(cd) = &dev {
        tune(cd).map_err(|e| DeviceError::NoGpu(format!("configuring the memory pool: {e}")))?;
    }
    Ok(dev)
}

/// Two settings that cost nothing in correctness and much in speed on a fresh candle device:
/// - the stream-ordered pool keeps freed memory (release threshold = ∞): with the default (0),
///   every synchronisation hands free blocks back to the driver and the next step maps them
///   again, a cost that grows with the batch (PyTorch's caching allocator does the same);
/// - cudarc's per-buffer event tracking is off: it records CUDA events on every use of every
///   buffer so that several streams can share them, and candle (and our kernels) use one stream.
///
/// `UDI_CUDA_POOL_RELEASE=1` and `UDI_CUDA_EVENTS=1` restore the defaults (for A/B timings).
#[cfg(feature = "cuda")]
fn tune(
    dev: &candle_core::CudaDevice,
) -> Result<(), candle_core::cuda::cudarc::driver::DriverError> {
    if !env_flag("UDI_CUDA_EVENTS") {
        // SAFETY: one stream (candle's) does all the work; see the function's comment.
        unsafe { dev.disable_event_tracking() };
    }
    if !env_flag("UDI_CUDA_POOL_RELEASE") {
        pool::set(dev, pool::Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// The high-water mark of tensor memory since the last [`reset_peak_memory`], in bytes. On CUDA
/// the pool's (every tensor candle and our kernels allocate on the device); on the CPU the same
/// count of tensor storage ([`candle_core::memory`]), which models a device's allocations when
/// the step runs with the device's dtypes and kernels (`--precision bf16 --kernels fused`).
pub fn peak_memory(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cd) => pool::get(cd, pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH).ok(),
        Device::Cpu => Some(candle_core::memory::peak_cpu_bytes() as u64),
        _ => None,
    }
}

/// Starts a new high-water mark for [`peak_memory`] at the memory in use now.
pub fn reset_peak_memory(device: &Device) {
    match device {
        // Writing 0 resets the pool's mark to the current use.
        #[cfg(feature = "cuda")]
        Device::Cuda(cd) => {
            let _ = pool::set(cd, pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
        }
        Device::Cpu => candle_core::memory::reset_peak_cpu_bytes(),
        _ => {}
    }
}

/// The u64 attributes of the default stream-ordered memory pool of candle's device.
#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda::cudarc::driver::{result, sys, DriverError};
    use candle_core::CudaDevice;
    pub use sys::CUmemPool_attribute as Attr;

    fn default_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool, DriverError> {
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread()?;
        // SAFETY: the device comes from the context candle created.
        unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
    }

    pub fn get(dev: &CudaDevice, attr: Attr) -> Result<u64, DriverError> {
        let mut v = 0u64;
        // SAFETY: a valid pool; the attributes used here are u64.
        unsafe {
            result::mem_pool::get_attribute(default_pool(dev)?, attr, (&mut v as *mut u64).cast())?
        };
        Ok(v)
    }

    pub fn set(dev: &CudaDevice, attr: Attr, mut v: u64) -> Result<(), DriverError> {
        // SAFETY: a valid pool; the attributes used here are u64.
        unsafe {
            result::mem_pool::set_attribute(default_pool(dev)?, attr, (&mut v as *mut u64).cast())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_parses_and_prints() {
        for (s, f) in [
            ("auto", DeviceFlag::Auto),
            ("cpu", DeviceFlag::Cpu),
            ("cuda", DeviceFlag::Cuda),
            ("CUDA", DeviceFlag::Cuda),
            ("gpu", DeviceFlag::Cuda),
        ] {
            assert_eq!(s.parse::<DeviceFlag>().unwrap(), f);
        }
        for f in [DeviceFlag::Auto, DeviceFlag::Cpu, DeviceFlag::Cuda] {
            assert_eq!(f.to_string().parse::<DeviceFlag>().unwrap(), f);
        }
        let err = "tpu".parse::<DeviceFlag>().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("cuda"), "{err}");
    }

    #[test]
    fn cpu_is_always_cpu() {
        let dev = pick(DeviceFlag::Cpu).unwrap();
        assert!(dev.is_cpu());
        assert_eq!(name(&dev), "cpu");
    }

    /// On a machine without a usable GPU (CI, the dev machines), `auto` must fall back to the CPU
    /// and `cuda` must fail with a message that says what to do; with a GPU, both give cuda:0.
    #[test]
    // CUDA_COMPILED is a constant per build: each build asserts its own branch.
    #[allow(clippy::assertions_on_constants)]
    fn auto_falls_back_and_cuda_explains() {
        let auto = pick(DeviceFlag::Auto).unwrap();
        match pick(DeviceFlag::Cuda) {
            Ok(dev) => {
                assert!(dev.is_cuda());
                assert!(auto.is_cuda());
                assert_eq!(name(&dev), "cuda:0");
            }
            Err(e) => {
                assert!(auto.is_cpu());
                let msg = e.to_string();
                assert!(msg.starts_with("--device cuda:"), "{msg}");
                match e {
                    DeviceError::NotCompiled => {
                        assert!(!CUDA_COMPILED);
                        assert!(msg.contains("--features cuda"), "{msg}");
                    }
                    DeviceError::LibrariesMissing { .. } => {
                        assert!(CUDA_COMPILED);
                        assert!(msg.contains("LD_LIBRARY_PATH"), "{msg}");
                    }
                    DeviceError::NoGpu(_) => assert!(CUDA_COMPILED),
                    DeviceError::UnknownFlag(_) => panic!("unexpected {msg}"),
                }
            }
        }
    }
}
