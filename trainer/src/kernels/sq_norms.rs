//! ‖g‖² of every parameter of the flat gradient, accumulated in f64, for per-parameter gradient
//! clipping: two launches on CUDA whatever the number of parameters (three small kernels per
//! parameter through candle's ops otherwise, ~450 per ViT-S step).
//!
//! Each parameter is cut into chunks of at most [`CHUNK`] elements, planned once per layout
//! ([`SqNormPlan`]); a block sums a chunk, then each parameter's chunks are added in order. The
//! CPU reference keeps the same chunks and order.

use super::cpu;
#[cfg(feature = "cuda")]
use super::{geometry, gpu};
use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{
    cuda_backend::{cudarc::driver::PushKernelArg, CudaStorageSlice},
    CudaStorage, DType,
};

/// Elements per chunk (one block each).
pub const CHUNK: usize = 16_384;

/// The chunk tables of a set of (offset, length) segments of a flat buffer, on its device.
pub struct SqNormPlan {
    /// (offset, length) per chunk, u32 `[2·chunks]`.
    pub chunks: Tensor,
    /// Segment s's chunks are `first[s] .. first[s+1]`, u32 `[segments + 1]`.
    pub first: Tensor,
}

impl SqNormPlan {
    pub fn new(segments: &[(usize, usize)], device: &Device) -> Result<Self> {
        if segments.is_empty() {
            bail!("squared norms: no segment");
        }
        let mut chunks = Vec::new();
        let mut first = vec![0u32];
        for &(offset, len) in segments {
            if len == 0 || offset + len > u32::MAX as usize {
                bail!("squared norms: segment ({offset}, {len}) is empty or beyond 2^32");
            }
            for start in (0..len).step_by(CHUNK) {
                chunks.extend([(offset + start) as u32, CHUNK.min(len - start) as u32]);
            }
            first.push((chunks.len() / 2) as u32);
        }
        let (n_chunks, n_first) = (chunks.len(), first.len());
        Ok(Self {
            chunks: Tensor::from_vec(chunks, n_chunks, device)?,
            first: Tensor::from_vec(first, n_first, device)?,
        })
    }

    /// ‖g[offset .. offset + len)‖² per segment, f64 `[segments]` on g's device (f32 or f64 g).
    pub fn squared_norms(&self, g: &Tensor) -> Result<Tensor> {
        g.apply_op3_no_bwd(&self.chunks, &self.first, &SqNorms)
    }
}

struct SqNorms;

impl CustomOp3 for SqNorms {
    fn name(&self) -> &'static str {
        "udi-sq-norms"
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
        let g = cpu::read_full(s1, l1, "squared norms g")?;
        let chunks = cpu::read(s2, l2, "squared norms chunks")?;
        let first = cpu::read(s3, l3, "squared norms first")?;
        let part: Vec<f64> = chunks
            .chunks(2)
            .map(|c| {
                let (a, n) = (c[0] as usize, c[1] as usize);
                g.get(a..a + n).map(|r| r.iter().map(|x| x * x).sum())
            })
            .collect::<Option<_>>()
            .ok_or_else(|| candle_core::Error::Msg("squared norms: chunk beyond g".into()))?;
        let out: Vec<f64> = first
            .windows(2)
            .map(|w| part[w[0] as usize..w[1] as usize].iter().sum())
            .collect();
        let n = out.len();
        Ok((CpuStorage::F64(out), Shape::from(n)))
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
        let g = gpu::In::new(s1, l1, "squared norms g")?;
        let chunks = gpu::In::new(s2, l2, "squared norms chunks")?;
        let first = gpu::In::new(s3, l3, "squared norms first")?;
        if g.dtype() != DType::F32 || chunks.dtype() != DType::U32 || first.dtype() != DType::U32 {
            bail!("squared norms on CUDA: g must be f32, the tables u32");
        }
        let n_chunks = l2.shape().elem_count() / 2;
        let n_seg = l3.shape().elem_count() - 1;
        // SAFETY: every element is written by the launches below.
        let mut part = unsafe { dev.alloc::<f64>(n_chunks)? };
        let mut out = unsafe { dev.alloc::<f64>(n_seg)? };
        let k = gpu::func(dev, "sq_norm_chunks")?;
        let mut a = k.builder();
        g.push(&mut a);
        chunks.push(&mut a);
        a.arg(&mut part);
        gpu::launch(a, geometry::sq_norm_chunks(n_chunks))?;
        let k = gpu::func(dev, "sq_norm_segments")?;
        let n = n_seg as i32;
        let mut a = k.builder();
        a.arg(&part);
        first.push(&mut a);
        a.arg(&n).arg(&mut out);
        gpu::launch(a, geometry::sq_norm_segments(n_seg))?;
        let storage = CudaStorage {
            slice: CudaStorageSlice::F64(out),
            device: dev.clone(),
        };
        Ok((storage, Shape::from(n_seg)))
    }
}
