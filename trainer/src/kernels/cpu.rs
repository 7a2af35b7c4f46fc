//! CPU storage helpers for the reference implementations: every reference reads its inputs as
//! f64, computes in f64 and writes the op's output dtype.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result};
use half::{bf16, f16};

/// The contiguous elements of `s` under `l` as f64.
pub fn read(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f64>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: input must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].iter().map(|&x| x as f64).collect(),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::U32(v) => v[a..b].iter().map(|&x| x as f64).collect(),
        other => bail!("{what}: unsupported dtype {:?}", other.dtype()),
    })
}

/// Refuses a half dtype for an operand or output the CUDA kernels take in f32 only (parameters,
/// the residual stream, centres, targets, parameter gradients), so that the CPU references, and
/// the tests through them, refuse what the GPU would. f64 stays allowed: the f64 references.
pub fn full(dtype: DType, what: &str) -> Result<()> {
    if matches!(dtype, DType::BF16 | DType::F16) {
        bail!("{what} must be f32 (as on CUDA) or f64, got {dtype:?}");
    }
    Ok(())
}

/// Refuses two operands the CUDA kernel reads in one dtype in different ones.
pub fn same(a: DType, b: DType, what: &str) -> Result<()> {
    if a != b {
        bail!("{what}: dtypes differ ({a:?} vs {b:?}), which the CUDA kernel does not take");
    }
    Ok(())
}

/// [`read`] of an operand the CUDA kernel takes in f32 only ([`full`]).
pub fn read_full(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f64>> {
    full(s.dtype(), what)?;
    read(s, l, what)
}

/// f64 values → storage of `dtype` (round to nearest).
pub fn write(v: &[f64], dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v.iter().map(|&x| x as f32).collect()),
        DType::F64 => CpuStorage::F64(v.to_vec()),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
        other => bail!("unsupported output dtype {other:?}"),
    })
}

/// f64 values → `dst[range]` in dst's dtype (round to nearest): an in-place op's output.
pub fn write_into(dst: &mut CpuStorage, range: std::ops::Range<usize>, v: &[f64]) -> Result<()> {
    if range.len() != v.len() {
        bail!(
            "in-place write: {} values for {} elements",
            v.len(),
            range.len()
        );
    }
    match dst {
        CpuStorage::F32(d) => d[range].iter_mut().zip(v).for_each(|(d, &x)| *d = x as f32),
        CpuStorage::F64(d) => d[range].copy_from_slice(v),
        CpuStorage::BF16(d) => d[range]
            .iter_mut()
            .zip(v)
            .for_each(|(d, &x)| *d = bf16::from_f64(x)),
        CpuStorage::F16(d) => d[range]
            .iter_mut()
            .zip(v)
            .for_each(|(d, &x)| *d = f16::from_f64(x)),
        other => bail!("unsupported in-place dtype {:?}", other.dtype()),
    }
    Ok(())
}

/// Rows and last-dim size of a layout.
pub fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    let Some(&d) = dims.last() else {
        bail!("expected at least one dimension")
    };
    Ok((l.shape().elem_count() / d.max(1), d))
}

/// `erf` (Abramowitz–Stegun 7.1.26 is too coarse for a reference: use libm's).
pub fn erf(x: f64) -> f64 {
    libm_erf(x)
}

fn libm_erf(x: f64) -> f64 {
    extern "C" {
        fn erf(x: f64) -> f64;
    }
    // SAFETY: C99 libm `erf` is pure.
    unsafe { erf(x) }
}
