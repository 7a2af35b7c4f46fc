//! ViT backbone with two class tokens, [cls] (index 0) and [cls+] (index 1) (udi-spec §2.1–§2.2).
//!
//! Images are normalised NCHW `[B, 3, S, S]`. The patch embedding is written as an unfold +
//! matmul (identical to the stride-p convolution, simply differentiable). Tokens are
//! `[cls, cls+, patches row-major]`; with `dino_only` the [cls+] token is left out entirely.

use crate::config::TrainConfig;
use crate::kernels::{residual_add, Compute};
use crate::nn::{attention, merge_heads, split_heads, LayerNorm, Linear};
use crate::params::ParamStore;
use crate::prof;
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;

/// Which class token `features` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassToken {
    /// The regular [cls] (index 0): the paper's default for image-level tasks.
    Cls,
    /// [cls+] (index 1): the "UDI+" variant.
    ClsPlus,
}

/// The 1-D bicubic resampling weights `[dst][src]` of PyTorch's `interpolate(mode="bicubic",
/// align_corners=False)` called with DINO's `scale_factor = (dst + 0.1)/src` (udi-spec §2.2):
/// output o reads x = (o + 0.5)·src/(dst + 0.1) − 0.5, cubic-convolution kernel A = −0.75, taps
/// ⌊x⌋−1 … ⌊x⌋+2 clamped to [0, src−1] (clamped taps accumulate on the border).
pub fn bicubic_weights_1d(src: usize, dst: usize) -> Vec<Vec<f64>> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = src as f64 / (dst as f64 + 0.1);
    (0..dst)
        .map(|o| {
            let x = (o as f64 + 0.5) * scale - 0.5;
            let f = x.floor();
            let t = x - f;
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let mut row = vec![0.0; src];
            for (i, wi) in w.iter().enumerate() {
                let idx = (f as i64 - 1 + i as i64).clamp(0, src as i64 - 1) as usize;
                row[idx] += wi;
            }
            row
        })
        .collect()
}

/// The separable 2-D resampling matrix `[dst², src²]` (row-major grids): M = W ⊗ W.
pub fn bicubic_matrix_2d(src: usize, dst: usize) -> Vec<f64> {
    let w = bicubic_weights_1d(src, dst);
    let (n_src, n_dst) = (src * src, dst * dst);
    let mut m = vec![0.0; n_dst * n_src];
    for oi in 0..dst {
        for oj in 0..dst {
            for si in 0..src {
                for sj in 0..src {
                    m[(oi * dst + oj) * n_src + si * src + sj] = w[oi][si] * w[oj][sj];
                }
            }
        }
    }
    m
}

/// The position-embedding resampling matrices `[g², G₀²]` (udi-spec §2.2) of the crop grids
/// that differ from the embedding's own, by grid side, in `dtype` on `device`.
pub fn resample_matrices(
    cfg: &TrainConfig,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<Vec<(usize, Tensor)>> {
    let g0 = cfg.pos_grid();
    let mut out: Vec<(usize, Tensor)> = Vec::new();
    for g in [cfg.global_grid(), cfg.local_grid()] {
        if g != g0 && !out.iter().any(|(x, _)| *x == g) {
            let m = Tensor::from_vec(bicubic_matrix_2d(g0, g), (g * g, g0 * g0), &Device::Cpu)?;
            out.push((g, m.to_dtype(dtype)?.to_device(device)?));
        }
    }
    Ok(out)
}

/// Per-sample stochastic-depth multipliers of one forward pass: `masks[block] = (attn, mlp)`,
/// each `[B, 1, 1]` holding 0 or 1/keep.
pub type DropMasks = Vec<(Tensor, Tensor)>;

/// Stochastic-depth rate of each block: linspace(0, drop_path, depth) (udi-spec §2.1).
pub fn drop_rates(cfg: &TrainConfig) -> Vec<f64> {
    let (depth, rate) = (cfg.model.depth, cfg.model.drop_path);
    (0..depth)
        .map(|b| {
            if depth > 1 {
                rate * b as f64 / (depth - 1) as f64
            } else {
                0.0
            }
        })
        .collect()
}

/// The drop-path masks of one step, `(globals, locals)`, drawn from
/// `rng_for(seed, Domain::Step, 0, global_step)`: global crops first, then local crops; per crop
/// batch, block by block, the attention branch then the MLP branch, one uniform per sample (keep
/// iff u < 1 − rate). A resumed run, and either engine, draws the same masks; `group` = (this
/// group, groups per step) in data-parallel training ([`crate::dist`]), `(0, 1)` otherwise.
#[allow(clippy::too_many_arguments)] // the keys of the draw, the group, and where it goes
pub fn drop_masks(
    rates: &[f64],
    seed: u64,
    batch_size: usize,
    n_local: usize,
    global_step: u64,
    group: (usize, usize),
    dtype: candle_core::DType,
    device: &Device,
) -> Result<(DropMasks, DropMasks)> {
    use rand::Rng;
    let mut rng = shared::rng::rng_for(seed, shared::rng::Domain::Step, 0, global_step);
    // Drawn for the whole global batch of `n_groups` groups, then this group's rows kept: a
    // sample's masks depend on its place in the global batch, not on how the batch is split.
    let (g, n_groups) = group;
    let global = batch_size * n_groups;
    // One upload per crop group: values [depth][2][n], sliced per block and branch.
    let mut make = |views: usize| -> Result<DropMasks> {
        let n = views * batch_size;
        let mut v = Vec::with_capacity(rates.len() * 2 * n);
        for &rate in rates {
            let keep = 1.0 - rate;
            for _ in 0..2 {
                for _view in 0..views {
                    for i in 0..global {
                        let u = rng.random::<f64>();
                        if i / batch_size == g {
                            v.push(if u < keep { 1.0 / keep } else { 0.0 });
                        }
                    }
                }
            }
        }
        let all = Tensor::from_vec(v, (rates.len(), 2, n, 1, 1), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        (0..rates.len())
            .map(|i| Ok((all.get(i)?.get(0)?, all.get(i)?.get(1)?)))
            .collect()
    };
    let g = make(2)?;
    // Without local crops there is nothing to mask (and CUDA refuses a zero-byte upload).
    let l = match n_local {
        0 => Vec::new(),
        _ => make(n_local)?,
    };
    Ok((g, l))
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    fused: bool,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        let qkv = prof::time(dev, "block: qkv linear", || self.qkv.forward(x))?;
        let o = prof::time(dev, "block: attention core", || {
            let (q, k, v) = split_heads(&qkv, self.heads)?;
            let dh = q.dim(3)?;
            merge_heads(&attention(&q, &k, &v, (dh as f64).powf(-0.5), self.fused)?)
        })?;
        prof::time(dev, "block: proj linear", || self.proj.forward(&o))
    }
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    /// `x`: the residual stream in the parameter dtype; the branches run in the compute dtype
    /// and are cast back before the residual add (as under PyTorch autocast).
    fn forward(&self, x: &Tensor, drop: Option<&(Tensor, Tensor)>) -> Result<Tensor> {
        let dev = x.device();
        let n1 = prof::time(dev, "block: layer norms", || self.norm1.forward_compute(x))?;
        let a = self.attn.forward(&n1)?;
        let fused = self.attn.fused;
        let x = prof::time(dev, "block: residual adds", || {
            residual_add(x, &a, drop.map(|d| &d.0), fused)
        })?;
        let n2 = prof::time(dev, "block: layer norms", || self.norm2.forward_compute(&x))?;
        let h = prof::time(dev, "block: fc1 linear+gelu", || self.fc1.forward_gelu(&n2))?;
        let h = prof::time(dev, "block: fc2 linear", || self.fc2.forward(&h))?;
        prof::time(dev, "block: residual adds", || {
            residual_add(&x, &h, drop.map(|d| &d.1), fused)
        })
    }
}

/// What [`Vit::probe`] runs.
#[derive(Clone, Copy, Debug)]
pub enum ProbePart {
    /// A whole pre-norm block.
    Block,
    /// qkv projection + attention core (the LayerNorm in front is not differentiated).
    AttentionCore,
    /// LayerNorm + fc1 + GELU + fc2.
    Mlp,
}

/// The backbone of one network.
pub struct Vit {
    patch_w: Tensor,
    patch_b: Tensor,
    cls_token: Tensor,
    reg_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: usize,
    pos_grid: usize,
    dim: usize,
    /// 2 ([cls], [cls+]) or 1 with `dino_only`.
    n_prefix: usize,
    /// Resampling matrices by target grid side (constants; the matmul runs every forward).
    resample: HashMap<usize, Tensor>,
    /// Stochastic-depth rate of each block (linspace(0, drop_path, depth)).
    pub drop_rates: Vec<f64>,
    compute: Compute,
}

impl Vit {
    /// Builds the backbone over `store`; `tracked = false` reads detached tensors (teacher).
    /// Computes in the parameter dtype with composed ops.
    pub fn new(cfg: &TrainConfig, store: &ParamStore, tracked: bool) -> Result<Self> {
        Self::with_compute(cfg, store, tracked, Compute::default())
    }

    /// As [`Self::new`] with a precision / kernel choice.
    pub fn with_compute(
        cfg: &TrainConfig,
        store: &ParamStore,
        tracked: bool,
        compute: Compute,
    ) -> Result<Self> {
        let get = |n: &str| store.layer_tensor(n, tracked);
        let m = &cfg.model;
        let lin = |n: &str| -> Result<Linear> {
            Ok(Linear {
                weight: get(&format!("{n}.weight"))?,
                bias: Some(get(&format!("{n}.bias"))?),
                compute,
            })
        };
        let ln = |n: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{n}.weight"))?,
                bias: get(&format!("{n}.bias"))?,
                eps: m.ln_eps,
                compute,
            })
        };
        let blocks = (0..m.depth)
            .map(|b| {
                let n = format!("backbone.blocks.{b}");
                Ok(Block {
                    norm1: ln(&format!("{n}.norm1"))?,
                    attn: Attention {
                        qkv: lin(&format!("{n}.attn.qkv"))?,
                        proj: lin(&format!("{n}.attn.proj"))?,
                        heads: m.heads,
                        fused: compute.fused(),
                    },
                    norm2: ln(&format!("{n}.norm2"))?,
                    fc1: lin(&format!("{n}.mlp.fc1"))?,
                    fc2: lin(&format!("{n}.mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pos_embed = get("backbone.pos_embed")?;
        let device = pos_embed.device().clone();
        let dtype = pos_embed.dtype();
        let pos_grid = cfg.pos_grid();
        let resample = resample_matrices(cfg, dtype, &device)?
            .into_iter()
            .collect();
        let drop_rates = drop_rates(cfg);
        Ok(Self {
            patch_w: get("backbone.patch_embed.proj.weight")?,
            patch_b: get("backbone.patch_embed.proj.bias")?,
            cls_token: get("backbone.cls_token")?,
            reg_token: get("backbone.reg_token")?,
            pos_embed,
            blocks,
            norm: ln("backbone.norm")?,
            patch: cfg.augment.patch_size as usize,
            pos_grid,
            dim: m.dim,
            n_prefix: if cfg.loss.dino_only { 1 } else { 2 },
            resample,
            drop_rates,
            compute,
        })
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }
    /// Number of class tokens in front of the patch tokens.
    /// One part of block 0 on `x` (`[B, T, D]`, the residual stream dtype), without drop path:
    /// `bench --profile` times its forward and backward in isolation.
    pub fn probe(&self, part: ProbePart, x: &Tensor) -> Result<Tensor> {
        let blk = &self.blocks[0];
        match part {
            ProbePart::Block => blk.forward(x, None),
            ProbePart::AttentionCore => {
                let qkv = blk
                    .attn
                    .qkv
                    .forward(&blk.norm1.forward_compute(x)?.detach())?;
                let (q, k, v) = split_heads(&qkv, blk.attn.heads)?;
                let dh = q.dim(3)?;
                merge_heads(&attention(
                    &q,
                    &k,
                    &v,
                    (dh as f64).powf(-0.5),
                    blk.attn.fused,
                )?)
            }
            ProbePart::Mlp => {
                let h = blk.norm2.forward_compute(x)?;
                blk.fc2.forward(&blk.fc1.forward_gelu(&h)?)
            }
        }
    }

    pub fn n_prefix(&self) -> usize {
        self.n_prefix
    }

    /// The position embedding for a `grid`×`grid` crop: `[1, n_prefix + grid², D]`.
    fn pos_for(&self, grid: usize) -> Result<Tensor> {
        let g0 = self.pos_grid;
        let prefix = self.pos_embed.narrow(1, 0, self.n_prefix)?;
        let patches = self.pos_embed.narrow(1, 2, g0 * g0)?;
        let patches = if grid == g0 {
            patches
        } else {
            let m = match self.resample.get(&grid) {
                Some(m) => m.clone(),
                None => {
                    let mat = Tensor::from_vec(
                        bicubic_matrix_2d(g0, grid),
                        (grid * grid, g0 * g0),
                        &Device::Cpu,
                    )?;
                    mat.to_dtype(self.pos_embed.dtype())?
                        .to_device(self.pos_embed.device())?
                }
            };
            m.matmul(&patches.squeeze(0)?)?.unsqueeze(0)?
        };
        Tensor::cat(&[prefix, patches], 1)
    }

    /// Patch tokens `[B, G², D]` of images `[B, 3, S, S]`.
    fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let cols = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let w = self.patch_w.reshape((self.dim, c * p * p))?;
        Linear {
            weight: w,
            bias: Some(self.patch_b.clone()),
            compute: self.compute,
        }
        .forward(&cols)?
        .to_dtype(self.pos_embed.dtype())
    }

    /// Class, [cls+] and patch tokens plus position embeddings: the input of block 0.
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = images.dims4()?;
        if h != w || h % self.patch != 0 {
            candle_core::bail!("images must be square multiples of the patch size, got {h}x{w}");
        }
        let grid = h / self.patch;
        let patches = prof::time(images.device(), "patch embed", || self.patch_embed(images))?;
        let mut toks = vec![self.cls_token.broadcast_as((b, 1, self.dim))?];
        if self.n_prefix == 2 {
            toks.push(self.reg_token.broadcast_as((b, 1, self.dim))?);
        }
        toks.push(patches);
        Tensor::cat(&toks, 1)?.broadcast_add(&self.pos_for(grid)?)
    }

    /// Last-block output `[B, n_prefix + G², D]` (before the final LayerNorm).
    pub fn forward_tokens(&self, images: &Tensor, drop: Option<&DropMasks>) -> Result<Tensor> {
        let mut x = self.embed(images)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, drop.map(|d| &d[i]))?;
        }
        Ok(x)
    }

    /// The class tokens `[B, n_prefix, D]` of every block's output (before the final
    /// LayerNorm), first block first: DINO's `get_intermediate_layers` without the norm, keeping
    /// only what the linear probe reads (the patch tokens of 12 blocks would not fit a chunk).
    pub fn block_class_tokens(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = self.embed(images)?;
        let mut out = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            x = blk.forward(&x, None)?;
            out.push(x.narrow(1, 0, self.n_prefix)?.contiguous()?);
        }
        Ok(out)
    }

    /// The final LayerNorm (on any `[.., D]` tokens).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// The last block's attention probabilities `[B, heads, T, T]` (f32, softmax over keys;
    /// tokens `[cls, cls+, patches]` as in [`Self::forward_tokens`]).
    pub fn last_attention(&self, images: &Tensor) -> Result<Tensor> {
        let (last, rest) = self.blocks.split_last().expect("a ViT has blocks");
        let mut x = self.embed(images)?;
        for blk in rest {
            x = blk.forward(&x, None)?;
        }
        let qkv = last.attn.qkv.forward(&last.norm1.forward_compute(&x)?)?;
        let (q, k, _v) = split_heads(&qkv, last.attn.heads)?;
        let scale = (q.dim(3)? as f64).powf(-0.5);
        let logits = (q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * scale)?;
        crate::nn::softmax(&logits)
    }

    /// Final-LN outputs of the class tokens `[B, n_prefix, D]` from last-block tokens.
    pub fn class_outputs(&self, tokens: &Tensor) -> Result<Tensor> {
        self.norm.forward(&tokens.narrow(1, 0, self.n_prefix)?)
    }

    /// The final-LN output of one class token, `[B, D]` (k-NN / linear-probe feature).
    pub fn features(&self, images: &Tensor, token: ClassToken) -> Result<Tensor> {
        let x = self.forward_tokens(images, None)?;
        let idx = match token {
            ClassToken::Cls => 0,
            ClassToken::ClsPlus if self.n_prefix == 2 => 1,
            ClassToken::ClsPlus => candle_core::bail!("dino_only model has no [cls+] token"),
        };
        self.norm.forward(&x.narrow(1, idx, 1)?)?.squeeze(1)
    }
}
