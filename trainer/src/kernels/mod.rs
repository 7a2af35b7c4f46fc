//! Precision and kernel selection, and the trainer's own fused ops.
//!
//! * [`Precision`] (`--precision bf16|f32`): bf16 runs the matmuls, GELU and attention in bf16
//!   with f32 master weights (cast per forward; autograd flows back to the f32 masters through
//!   the cast). LayerNorm statistics, the residual stream, softmax/log-softmax of the loss, the
//!   centres, the EMA and AdamW stay f32.
//! * [`Kernels`] (`--kernels candle|fused`): `candle` composes candle ops (differentiable by
//!   candle's autograd); `fused` uses the ops below, each a candle `CustomOp` whose `cpu_fwd` is
//!   the reference implementation and whose `cuda_fwd` launches our PTX (`udi_kernels.cu`).
//!
//! Fused ops: [`layer_norm`] (fwd + bwd), [`bias_add`] and [`bias_gelu`] (fwd + bwd, bias
//! gradients summed in f32; the GELU's in its backward's pass), [`attn_softmax`] (fwd + bwd),
//! [`flash`] (whole attention on packed qkv rows, fwd + bwd), [`ln_residual`] (a block's residual
//! update with the LayerNorm after it, and that LayerNorm's backward with the stream's gradient),
//! [`centered_softmax_entropy`] (teacher targets and their entropy in one pass, no bwd),
//! [`local_multimodal_targets`] (the local crops' blended [cls+] targets of both views in one pass),
//! [`other_view_softmax_entropy`] and [`other_view_weighted_sum`] (the patch targets and sums
//! from the other view's logits as they are), [`normalise_crops`] (uint8 crops to normalised f32
//! in one pass), [`weight_norm`] (the head's last layer, fwd + bwd, one pass each),
//! [`soft_ce_rows`] (student cross-entropy with temperature, fwd + bwd) and [`soft_ce_in_place`]
//! (both in one pass, the gradient written over the logits), [`adamw::AdamwEma`] (multi-tensor
//! AdamW + EMA over flat buffers), [`accumulate`] (a gradient added in place into the flat
//! gradient buffer), [`sq_norms`] (every parameter's squared gradient norm in two launches). Each
//! public function takes `fused: bool` and falls back to the composed candle ops, so the two paths
//! can be compared op by op (`trainer kernel-check`).
//!
//! Launch grids are pure functions in [`geometry`], shared by the CUDA path and
//! trainer/tests/cuda_source_on_cpu.rs, which runs `udi_kernels.cu` on the CPU (emu/).

pub mod adamw;

pub mod check;
mod cpu;
pub mod flash;
pub mod geometry;
#[cfg(feature = "cuda")]
mod gpu;
pub mod ln_residual;
mod ops;
pub mod sq_norms;

pub use ops::{
    accumulate, attn_softmax, attn_softmax_backward, bias_add, bias_gelu, bias_gelu_backward,
    bias_gelu_backward_recompute, centered_softmax_entropy, col_sum, layer_norm,
    layer_norm_backward, local_multimodal_targets, normalise_crops, other_view,
    other_view_softmax_entropy, other_view_weighted_sum, residual_add, soft_ce_in_place,
    soft_ce_rows, weight_norm, weight_norm_backward, Accumulate, AttnSoftmax, BiasAdd, BiasGelu,
    ColSum, LayerNormOp, ResidualAdd, RowScale, SoftCe,
};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The element range of an in-place op's destination, which must be contiguous and hold `want`
/// elements.
fn span(
    l: &candle_core::Layout,
    want: usize,
    what: &str,
) -> candle_core::Result<std::ops::Range<usize>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the destination must be contiguous")
    };
    if b - a != want {
        candle_core::bail!(
            "{what}: the destination has {} elements, expected {want}",
            b - a
        );
    }
    Ok(a..b)
}

/// The `--precision` flag / `[run] precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 matmuls/activations, f32 master weights, statistics and loss (default on CUDA).
    Bf16,
    /// Everything in the parameter dtype (default on the CPU).
    F32,
}

/// The `--kernels` flag / `[run] kernels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Composed candle ops (default on the CPU).
    Candle,
    /// Our fused ops (default on CUDA; on the CPU they run their reference `cpu_fwd`),
    /// flash attention in the explicit engine's blocks included.
    Fused,
    /// The fused ops with the explicit engine's attention composed (split heads, batched
    /// GEMMs, the fused softmax, merge heads) instead of flash: for comparing the two.
    #[value(name = "fused-no-flash")]
    #[serde(rename = "fused-no-flash")]
    FusedNoFlash,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        })
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Candle => "candle",
            Self::Fused => "fused",
            Self::FusedNoFlash => "fused-no-flash",
        })
    }
}

/// How a network computes: the activation dtype of matmuls/GELU/attention and whether the fused
/// ops are used. Parameters keep their own dtype (the f32 masters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compute {
    pub precision: Precision,
    pub kernels: Kernels,
    /// The explicit step keeps each block's LayerNorm and GELU outputs for its backward instead
    /// of recomputing them there: about 6 % less memory traffic per step for about 40 % more
    /// peak tensor memory (`bench/results/cpu-2026-12-06-traffic-model.md`). Off by default.
    pub keep_activations: bool,
}

impl Default for Compute {
    /// f32 and composed ops: the reference behaviour (CPU default).
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            kernels: Kernels::Candle,
            keep_activations: false,
        }
    }
}

impl Compute {
    /// The defaults for a device: bf16 + fused on CUDA, f32 + candle on the CPU; `precision` /
    /// `kernels` override them.
    pub fn for_device(
        device: &Device,
        precision: Option<Precision>,
        kernels: Option<Kernels>,
    ) -> Self {
        let cuda = device.is_cuda();
        Self {
            precision: precision.unwrap_or(if cuda {
                Precision::Bf16
            } else {
                Precision::F32
            }),
            kernels: kernels.unwrap_or(if cuda {
                Kernels::Fused
            } else {
                Kernels::Candle
            }),
            keep_activations: false,
        }
    }

    /// The dtype matmul inputs are cast to, given the parameter dtype.
    pub fn dtype(&self, param: DType) -> DType {
        match self.precision {
            Precision::Bf16 => DType::BF16,
            Precision::F32 => param,
        }
    }

    pub fn fused(&self) -> bool {
        matches!(self.kernels, Kernels::Fused | Kernels::FusedNoFlash)
    }

    /// Whether the explicit engine's blocks run flash attention (where the device has it).
    pub fn flash(&self) -> bool {
        self.kernels == Kernels::Fused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_device_and_flags_override() {
        let c = Compute::for_device(&Device::Cpu, None, None);
        assert_eq!((c.precision, c.kernels), (Precision::F32, Kernels::Candle));
        assert_eq!(c.dtype(DType::F32), DType::F32);
        assert_eq!(c.dtype(DType::F64), DType::F64);
        let c = Compute::for_device(&Device::Cpu, Some(Precision::Bf16), Some(Kernels::Fused));
        assert!(c.fused());
        assert_eq!(c.dtype(DType::F32), DType::BF16);
        // `[run] precision = "bf16"` / `kernels = "fused"` spellings.
        #[derive(Deserialize)]
        struct R {
            precision: Precision,
            kernels: Kernels,
        }
        let r: R = toml::from_str("precision = \"bf16\"\nkernels = \"candle\"").unwrap();
        assert_eq!((r.precision, r.kernels), (Precision::Bf16, Kernels::Candle));
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        assert_eq!(Kernels::Fused.to_string(), "fused");
        let r: R = toml::from_str("precision = \"bf16\"\nkernels = \"fused-no-flash\"").unwrap();
        let c = Compute::for_device(&Device::Cpu, Some(r.precision), Some(r.kernels));
        assert!(c.fused() && !c.flash());
        assert_eq!(Kernels::FusedNoFlash.to_string(), "fused-no-flash");
    }
}
