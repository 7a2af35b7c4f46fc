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
