//! The shared DINO projection head (udi-spec §2.4): Linear→GELU→Linear→GELU→Linear, L2-norm
//! (eps 1e-12), then the weight-normalised last layer W = g ⊙ V/‖V_row‖ without bias. g and V are
//! stored (and decayed, averaged, optimised) separately.

use crate::config::TrainConfig;
use crate::kernels::Compute;
use crate::nn::{l2_normalize, Linear};
use crate::params::ParamStore;
use crate::prof;
use candle_core::{Result, Tensor, D};

pub struct Head {
    fc: [Linear; 3],
    g: Tensor,
    v: Tensor,
    compute: Compute,
}

impl Head {
    pub fn new(
        _cfg: &TrainConfig,
        store: &ParamStore,
        tracked: bool,
        compute: Compute,
    ) -> Result<Self> {
        let get = |n: &str| store.layer_tensor(n, tracked);
        let lin = |i: usize| -> Result<Linear> {
            Ok(Linear {
                weight: get(&format!("head.mlp.{i}.weight"))?,
                bias: Some(get(&format!("head.mlp.{i}.bias"))?),
                compute,
            })
        };
        Ok(Self {
            fc: [lin(0)?, lin(2)?, lin(4)?],
            g: get("head.last_layer.weight_g")?,
            v: get("head.last_layer.weight_v")?,
            compute,
        })
    }

    /// Raw logits `[.., K]` of features `[.., D]`, in the compute dtype (bf16 under bf16: the
    /// loss reads them in f32). The L2 normalisation and the weight norm run in the parameter
    /// dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.bottleneck(x)?;
        self.last_layer()?.forward(&z)
    }

    /// The L2-normalised bottleneck features `[.., 256]` (parameter dtype): everything before
    /// the last layer.
    pub fn bottleneck(&self, x: &Tensor) -> Result<Tensor> {
        prof::time(x.device(), "head: mlp + l2 norm", || {
            let x = self.fc[0].forward_gelu(x)?;
            let x = self.fc[1].forward_gelu(&x)?;
            l2_normalize(&self.fc[2].forward(&x)?.to_dtype(self.v.dtype())?, 1e-12)
        })
    }

    /// The weight-normalised last layer W = g ⊙ V/‖V_row‖ (linear, no bias).
    pub fn last_layer(&self) -> Result<LastLayer> {
        let w = self
            .v
            .broadcast_div(&self.v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?
            .broadcast_mul(&self.g)?;
        Ok(LastLayer(Linear {
            weight: w,
            bias: None,
            compute: self.compute,
        }))
    }
}

/// The head's last layer with its weight normalised once: logits `[.., K]` of bottleneck
/// features, in the compute dtype. Linear, so a weighted mean of logits equals the logits of
/// the same weighted mean of features (the teacher's local T-rows use this).
pub struct LastLayer(Linear);

impl LastLayer {
    /// A last layer of an already normalised weight `[K, E]`.
    pub fn from_weight(weight: Tensor, compute: Compute) -> Self {
        Self(Linear {
            weight,
            bias: None,
            compute,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        prof::time(z.device(), "head: last layer (K wide)", || {
            self.0.forward(z)
        })
    }
}
