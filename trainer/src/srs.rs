//! The SRS module (udi-spec §2.3): pre-LN, attention whose queries are row-selected (student,
//! one-hot rows) or bilinearly interpolated (teacher, weight rows) from the patch queries, keys
//! and values = all patch tokens of the view, skip connection `R·X̂` (on by default), post-LN.
//!
//! An all-zero row (invalid sample) gives a zero query, hence uniform attention — exactly the
//! official "fill logits with 1e-9" result; such rows are masked out downstream anyway.

use crate::config::TrainConfig;
use crate::kernels::Compute;
use crate::nn::{attention, merge_heads, LayerNorm, Linear};
use crate::params::ParamStore;
use candle_core::{Result, Tensor};

pub struct Srs {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm: LayerNorm,
    heads: usize,
    skip: bool,
    compute: Compute,
}

impl Srs {
    pub fn new(
        cfg: &TrainConfig,
        store: &ParamStore,
        tracked: bool,
        compute: Compute,
    ) -> Result<Self> {
        let get = |n: &str| store.layer_tensor(n, tracked);
        let eps = cfg.model.ln_eps;
        Ok(Self {
            norm1: LayerNorm {
                weight: get("srs.norm1.weight")?,
                bias: get("srs.norm1.bias")?,
                eps,
                compute,
            },
            qkv: Linear {
                weight: get("srs.attn.qkv.weight")?,
                bias: Some(get("srs.attn.qkv.bias")?),
                compute,
            },
            proj: Linear {
                weight: get("srs.attn.proj.weight")?,
                bias: Some(get("srs.attn.proj.bias")?),
                compute,
            },
            norm: LayerNorm {
                weight: get("srs.attn.norm.weight")?,
                bias: get("srs.attn.norm.bias")?,
                eps,
                compute,
            },
            heads: cfg.model.heads,
            skip: cfg.model.srs_skip,
            compute,
        })
    }

    /// `tokens`: last-block output `[B, n_prefix + N, D]`; `rows`: `[B, n, N]` (one-hot or
    /// bilinear). Returns `[B, n, D]`.
    pub fn forward(&self, tokens: &Tensor, n_prefix: usize, rows: &Tensor) -> Result<Tensor> {
        let (b, t, d) = tokens.dims3()?;
        let n_tok = t - n_prefix;
        let x = self
            .norm1
            .forward_compute(&tokens.narrow(1, n_prefix, n_tok)?)?;
        let h = self.heads;
        let dh = d / h;
        // [B, N, 3, H, dh] → q/k/v [B, H, N, dh]
        let qkv = self
            .qkv
            .forward(&x)?
            .reshape((b, n_tok, 3, h, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        // Queries R·Q per head: rows [B, 1, n, N] × q [B, H, N, dh].
        let rows = &rows.to_dtype(x.dtype())?;
        let r = rows.unsqueeze(1)?;
        let n = rows.dim(1)?;
        let q = r.broadcast_as((b, h, n, n_tok))?.contiguous()?.matmul(&q)?;
        let o = attention(&q, &k, &v, (dh as f64).powf(-0.5), self.compute.fused())?;
        let mut o = self.proj.forward(&merge_heads(&o)?)?;
        if self.skip {
            o = (o + rows.matmul(&x)?)?;
        }
        self.norm.forward(&o)
    }
}
