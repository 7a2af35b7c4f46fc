//! Launch helpers for `udi_kernels.cu` (compiled to PTX by build.rs, loaded once per device as
//! the custom module "udi_kernels").

use super::geometry::Geometry;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::bf16;
use std::sync::Arc;

pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/udi_kernels.ptx"));

/// A read-only, typed view of a contiguous input.
pub enum In<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
    U32(CudaView<'a, u32>),
    U8(CudaView<'a, u8>),
}

impl<'c> In<'c> {
    pub fn new(s: &'c CudaStorage, l: &Layout, what: &str) -> Result<Self> {
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("{what}: input must be contiguous")
        };
        Ok(match &s.slice {
            CudaStorageSlice::F32(v) => In::F32(v.slice(a..b)),
            CudaStorageSlice::BF16(v) => In::Bf16(v.slice(a..b)),
            CudaStorageSlice::U32(v) => In::U32(v.slice(a..b)),
            CudaStorageSlice::U8(v) => In::U8(v.slice(a..b)),
            _ => bail!("{what}: unsupported dtype {:?} on CUDA", s.dtype()),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            In::F32(_) => DType::F32,
            In::Bf16(_) => DType::BF16,
            In::U32(_) => DType::U32,
            In::U8(_) => DType::U8,
        }
    }

    pub fn push<'a, 'b: 'a>(&'b self, b: &mut LaunchArgs<'a>)
    where
        'c: 'b,
    {
        match self {
            In::F32(v) => b.arg(v),
            In::Bf16(v) => b.arg(v),
            In::U32(v) => b.arg(v),
            In::U8(v) => b.arg(v),
        };
    }
}

/// A freshly allocated output buffer.
pub enum Out {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Out {
    /// Uninitialised unless `zero` (every kernel here writes all of its output).
    pub fn alloc(dev: &CudaDevice, dtype: DType, n: usize, zero: bool) -> Result<Self> {
        Ok(match (dtype, zero) {
            (DType::F32, false) => Out::F32(unsafe { dev.alloc::<f32>(n)? }),
            (DType::F32, true) => Out::F32(dev.alloc_zeros::<f32>(n)?),
            (DType::BF16, false) => Out::Bf16(unsafe { dev.alloc::<bf16>(n)? }),
            (DType::BF16, true) => Out::Bf16(dev.alloc_zeros::<bf16>(n)?),
            (d, _) => bail!("unsupported output dtype {d:?} on CUDA"),
        })
    }

    pub fn push<'a, 'b: 'a>(&'b mut self, b: &mut LaunchArgs<'a>) {
        match self {
            Out::F32(v) => b.arg(v),
            Out::Bf16(v) => b.arg(v),
        };
    }

    pub fn into_storage(self, dev: &CudaDevice) -> CudaStorage {
        let slice = match self {
            Out::F32(v) => CudaStorageSlice::F32(v),
            Out::Bf16(v) => CudaStorageSlice::BF16(v),
        };
        CudaStorage {
            slice,
            device: dev.clone(),
        }
    }
}

/// A tensor's storage (held by the caller's read guard) as a kernel input; with `f32`, other
/// dtypes are refused (parameters and the residual stream are f32 on CUDA).
pub fn input<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str, f32: bool) -> Result<In<'a>> {
    let candle_core::Storage::Cuda(c) = s else {
        bail!("{what}: not on a CUDA device")
    };
    let i = In::new(c, l, what)?;
    if f32 && i.dtype() != DType::F32 {
        bail!("{what} must be f32 on CUDA, got {:?}", i.dtype());
    }
    Ok(i)
}

/// A kernel's output buffer as a contiguous tensor of `shape` (no gradient).
pub fn tensor(
    o: Out,
    dev: &CudaDevice,
    shape: impl Into<candle_core::Shape>,
) -> candle_core::Tensor {
    candle_core::Tensor::from_storage(
        candle_core::Storage::Cuda(o.into_storage(dev)),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// Kernel-name suffix of a dtype.
pub fn suffix(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        d => bail!("no CUDA kernel for dtype {d:?}"),
    })
}

/// A loaded kernel and the device's stream (candle's single stream: ordering with candle's own
/// kernels is preserved).
pub struct Kernel {
    stream: Arc<CudaStream>,
    func: CudaFunction,
}

impl Kernel {
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Loads (once per device) and returns kernel `name`.
pub fn func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    if PTX.is_empty() {
        bail!("this binary was built with CANDLE_KERNELS_CHECK_ONLY=1: it has no PTX for {name}");
    }
    let f = dev.get_or_load_custom_func(name, "udi_kernels", PTX)?;
    Ok(Kernel {
        stream: dev.cuda_stream(),
        func: f.into_cuda_function(),
    })
}

/// Launches `builder` on `g`.
pub fn launch(mut b: LaunchArgs<'_>, g: Geometry) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (g.grid[0], g.grid[1], g.grid[2]),
        block_dim: (g.block[0], g.block[1], g.block[2]),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
