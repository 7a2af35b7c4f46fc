//! The backbone (udi-spec §2.1–§2.2): patch embedding, class tokens + position embedding, the
//! pre-norm blocks, the final LayerNorm of the class tokens.
//!
//! Block: x₁ = x + m_a·proj(attn(LN₁(x))), x₂ = x₁ + m_m·fc2(gelu(fc1(LN₂(x₁)))), with m the
//! per-sample stochastic-depth multipliers (0 or 1/keep; none on the teacher). The residual
//! stream is in the parameter dtype, the branches in the compute dtype.
//!
//! Saved per block (student only; the teacher's forward keeps nothing): the block input x,
//! what the attention's backward reads (the qkv rows and the flash output, or Q/K/V and P), the
//! merged heads (proj input), x₁ and fc1's pre-bias product; the backward recomputes the
//! LayerNorm and GELU outputs (the GELU's over fc1's product, in its backward's pass). The
//! attention adds the qkv bias as it reads the qkv rows, and each residual update runs in one
//! pass with the bias of the branch before it and the LayerNorm after it (LN₂ in the block, the
//! next block's LN₁); backward, each LayerNorm's backward adds the stream's gradient and makes
//! the next branch's masked gradient in the same pass.

use super::attention::{self, AttnSaved};
use super::layernorm::LayerNorm;
use super::linear::Linear;
use super::{Grads, Ops};
use crate::kernels::ln_residual::{scale_cast, Branch};
use crate::kernels::residual_add;
use crate::prof;
use candle_core::{Result, Tensor};

pub struct Block {
    pub norm1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// What a block's backward reads. By default the LayerNorm outputs and the MLP's GELU output are
/// not kept: the backward recomputes them from x, x₁ and the fc1 product (elementwise work, as
/// llm.c's recompute option), which leaves 10 of the 16 D-wide values per token to keep;
/// `keep_activations` keeps them instead (`kept`).
pub struct BlockSaved {
    x: Tensor,
    attn: AttnSaved,
    heads_out: Tensor,
    x1: Tensor,
    fc1_pre: Tensor,
    kept: Option<Kept>,
}

/// LN₁(x), LN₂(x₁) and gelu(fc1) rows, as the forward made them.
struct Kept {
    ln1: Tensor,
    ln2: Tensor,
    gelu: Tensor,
}

/// The residual stream's gradient entering a block's backward from above: `dx` and the MLP
/// branch's gradient `dx·m₂` in the compute dtype (made by the LayerNorm backward above, in the
/// same pass as dx).
pub struct DStream {
    pub dx: Tensor,
    pub branch: Tensor,
}

impl Block {
    /// `x` `[B, T, D]` (parameter dtype) and `ln1` = LN₁(x) rows → x₂, LN of x₂ by `next` (the
    /// next block's first LayerNorm, made in the residual update's pass) and what the backward
    /// needs when `save`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ops: &Ops,
        heads: usize,
        x: &Tensor,
        ln1: Tensor,
        drop: Option<&(Tensor, Tensor)>,
        next: Option<&LayerNorm>,
        save: bool,
    ) -> Result<(Tensor, Option<Tensor>, Option<BlockSaved>)> {
        let (b, t, d) = x.dims3()?;
        let scale = ((d / heads) as f64).powf(-0.5);
        // The qkv bias is added by the attention as it reads the rows.
        let qkv = self.qkv.product(&ln1)?;
        let keep = save && ops.keep_activations;
        let ln1 = keep.then_some(ln1);
        let (heads_out, attn) =
            attention::forward_rows(ops, &qkv, self.qkv.b.as_ref(), b, heads, scale, save)?;
        // The proj and fc2 biases are added in the residual updates' passes.
        let a = self.proj.product(&heads_out)?.reshape((b, t, d))?;
        let (x1, ln2) = self.norm2.forward_residual(
            ops,
            x,
            &a,
            self.proj.b.as_ref(),
            drop.map(|m| &m.0),
            ops.cdt,
        )?;
        let (gelu, fc1_pre) = self.fc1.forward_gelu(ops, &ln2)?;
        std::mem::drop(a);
        // Freed as soon as they are read unless kept.
        let ln2 = keep.then_some(ln2);
        let (x2, ln_next) = match next {
            Some(norm) => {
                let m = self.fc2.product(&gelu)?.reshape((b, t, d))?;
                let fc2_b = self.fc2.b.as_ref();
                let (x2, ln) =
                    norm.forward_residual(ops, &x1, &m, fc2_b, drop.map(|m| &m.1), ops.cdt)?;
                (x2, Some(ln))
            }
            None => {
                let m = self.fc2.forward(ops, &gelu)?.reshape((b, t, d))?;
                (residual_add(&x1, &m, drop.map(|m| &m.1), ops.fused)?, None)
            }
        };
        let gelu = keep.then_some(gelu);
        let kept = match (ln1, ln2, gelu) {
            (Some(ln1), Some(ln2), Some(gelu)) => Some(Kept { ln1, ln2, gelu }),
            _ => None,
        };
        let saved = save.then(|| BlockSaved {
            x: x.clone(),
            attn: attn.expect("saved"),
            heads_out,
            x1,
            fc1_pre,
            kept,
        });
        Ok((x2, ln_next, saved))
    }

    /// dx₂ `[B, T, D]` (and its MLP-branch part) → dx (parameter dtype) and, with `below`, the
    /// MLP-branch gradient of the block below (its multipliers applied).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ops: &Ops,
        heads: usize,
        s: &BlockSaved,
        d2: DStream,
        drop: Option<&(Tensor, Tensor)>,
        below: Option<Branch<'_>>,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d) = d2.dx.dims3()?;
        // MLP branch.
        let dm = d2.branch.reshape((b * t, d))?;
        let kept = s.kept.as_ref();
        let rows1 = s.x1.reshape((b * t, d))?;
        let dln2 = match kept {
            Some(k) => {
                let dgelu = self
                    .fc2
                    .backward(ops, &k.gelu, &dm, grads, true)?
                    .expect("dx");
                std::mem::drop(dm);
                self.fc1
                    .backward_gelu(ops, &k.ln2, &s.fc1_pre, &dgelu, grads)?
            }
            None => {
                // One pass over fc1's product makes the GELU's input gradient and fc1's bias
                // gradient, and overwrites the product (read for the last time) with the GELU
                // output again, which fc2's weight gradient then reads.
                let dgelu = self.fc2.input_grad(&dm)?;
                let du = self
                    .fc1
                    .gelu_backward_recompute(ops, &s.fc1_pre, &dgelu, grads)?;
                std::mem::drop(dgelu);
                let gelu = &s.fc1_pre;
                self.fc2.backward(ops, gelu, &dm, grads, false)?;
                std::mem::drop(dm);
                let ln2 = self.norm2.forward(ops, &rows1, ops.cdt)?;
                self.fc1.backward_product(&ln2, &du, grads)?
            }
        };
        let attn_branch = Branch {
            m: drop.map(|m| &m.0),
            dtype: ops.cdt,
        };
        let (dx1, da) =
            self.norm2
                .backward_residual(ops, &rows1, &dln2, &d2.dx, Some(attn_branch), grads)?;
        std::mem::drop((d2, dln2));
        // Attention branch.
        let da = da.expect("asked for").reshape((b * t, d))?;
        let dheads = self
            .proj
            .backward(ops, &s.heads_out, &da, grads, true)?
            .expect("dx");
        let scale = ((d / heads) as f64).powf(-0.5);
        let dqkv = attention::backward_rows(ops, &s.attn, &dheads, b, heads, scale)?;
        let rows = s.x.reshape((b * t, d))?;
        let ln1 = match kept {
            Some(k) => k.ln1.clone(),
            None => self.norm1.forward(ops, &rows, ops.cdt)?,
        };
        let dln1 = self
            .qkv
            .backward(ops, &ln1, &dqkv, grads, true)?
            .expect("dx");
        std::mem::drop(ln1);
        self.norm1
            .backward_residual(ops, &rows, &dln1, &dx1, below, grads)
    }
}

pub struct Backbone {
    /// The patch embedding as a linear map of unfolded patches: W `[D, 3·p²]`.
    pub patch: Linear,
    pub cls_token: Tensor,
    pub reg_token: Tensor,
    pub pos_embed: Tensor,
    pub cls_ids: [usize; 2],
    pub pos_id: usize,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub heads: usize,
    pub patch_size: usize,
    pub pos_grid: usize,
    /// Bicubic resampling matrices `[g², G₀²]` by grid side (constants; udi-spec §2.2).
    pub resample: Vec<(usize, Tensor)>,
}

/// What the backbone's backward needs of one crop group.
pub struct BackboneSaved {
    cols: Tensor,
    grid: usize,
    blocks: Vec<BlockSaved>,
}

/// Images `[B, 3, S, S]` → unfolded patches `[B·G², 3·p²]` (row-major grid, (c, i, j) inside a
/// patch: the conv weight's layout).
fn unfold(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b * gh * gw, c * p * p))
}

impl Backbone {
    fn resample_for(&self, grid: usize) -> Option<&Tensor> {
        self.resample
            .iter()
            .find(|(g, _)| *g == grid)
            .map(|(_, m)| m)
    }

    /// Position embedding for a grid: `[1, 2 + g², D]`.
    fn pos_for(&self, grid: usize) -> Result<Tensor> {
        let g0 = self.pos_grid;
        let prefix = self.pos_embed.narrow(1, 0, 2)?;
        let patches = self.pos_embed.narrow(1, 2, g0 * g0)?;
        let patches = match self.resample_for(grid) {
            Some(m) => m.matmul(&patches.squeeze(0)?)?.unsqueeze(0)?,
            None if grid == g0 => patches,
            None => candle_core::bail!("no position-embedding resampling for a {grid}² grid"),
        };
        Tensor::cat(&[prefix, patches], 1)
    }

    /// Last-block tokens `[B, 2 + G², D]` (before the final LN).
    pub fn forward(
        &self,
        ops: &Ops,
        images: &Tensor,
        drop: Option<&Vec<(Tensor, Tensor)>>,
        save: bool,
    ) -> Result<(Tensor, Option<BackboneSaved>)> {
        let (b, _, h, _) = images.dims4()?;
        let grid = h / self.patch_size;
        let d = self.pos_embed.dim(2)?;
        let cols = unfold(&images.to_dtype(ops.cdt)?, self.patch_size)?;
        let patches = self
            .patch
            .forward(ops, &cols)?
            .to_dtype(ops.pdt)?
            .reshape((b, grid * grid, d))?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let reg = self.reg_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &reg, &patches], 1)?.broadcast_add(&self.pos_for(grid)?)?;
        let mut saved = Vec::new();
        let scope = match save {
            true => "engine: block forward (student, saving)",
            false => "engine: block forward (teacher)",
        };
        let (_, t, _) = x.dims3()?;
        let mut ln = Some(
            self.blocks[0]
                .norm1
                .forward(ops, &x.reshape((b * t, d))?, ops.cdt)?,
        );
        for (i, blk) in self.blocks.iter().enumerate() {
            let next = self.blocks.get(i + 1).map(|n| &n.norm1);
            let ln1 = ln
                .take()
                .expect("each block's LN₁ comes from the update before it");
            let (y, l, s) = prof::time(images.device(), scope, || {
                blk.forward(ops, self.heads, &x, ln1, drop.map(|m| &m[i]), next, save)
            })?;
            (x, ln) = (y, l);
            saved.extend(s);
        }
        Ok((
            x,
            save.then_some(BackboneSaved {
                cols,
                grid,
                blocks: saved,
            }),
        ))
    }

    /// Final-LN outputs of the class tokens `[B, 2, D]` (parameter dtype) of last-block tokens.
    pub fn class_outputs(&self, ops: &Ops, tokens: &Tensor) -> Result<Tensor> {
        self.class_outputs_of(ops, &tokens.narrow(1, 0, 2)?.contiguous()?)
    }

    /// The final LN of class tokens `[R, 2, D]` already taken out of their sequences.
    pub fn class_outputs_of(&self, ops: &Ops, cls: &Tensor) -> Result<Tensor> {
        self.norm.forward(ops, cls, ops.pdt)
    }

    /// Gradient of the last-block tokens `[B, T, D]` → parameter gradients. Each block's saved
    /// activations are freed as soon as its backward is done.
    pub fn backward(
        &self,
        ops: &Ops,
        s: BackboneSaved,
        d_tokens: &Tensor,
        drop: Option<&Vec<(Tensor, Tensor)>>,
        grads: &mut Grads,
    ) -> Result<()> {
        let BackboneSaved {
            cols,
            grid,
            blocks: mut saved,
        } = s;
        let mlp_branch = |i: usize| Branch {
            m: drop.map(|m: &Vec<(Tensor, Tensor)>| &m[i].1),
            dtype: ops.cdt,
        };
        let top = mlp_branch(self.blocks.len() - 1);
        let mut d2 = DStream {
            dx: d_tokens.clone(),
            branch: scale_cast(d_tokens, top.m, top.dtype)?,
        };
        let mut dx = None;
        for (i, blk) in self.blocks.iter().enumerate().rev() {
            let bs = saved.pop().expect("one saved entry per block");
            let below = (i > 0).then(|| mlp_branch(i - 1));
            let (d, branch) = prof::time(d_tokens.device(), "engine: block backward", || {
                blk.backward(ops, self.heads, &bs, d2, drop.map(|m| &m[i]), below, grads)
            })?;
            match branch {
                Some(branch) => d2 = DStream { dx: d, branch },
                None => {
                    dx = Some(d);
                    break;
                }
            }
        }
        let dx = dx.expect("block 0 returns dx alone");
        let (b, t, d) = dx.dims3()?;
        // Tokens: [cls, cls+, patches] + pos.
        let dsum = dx.sum_keepdim(0)?; // [1, T, D]
        grads.add(self.cls_ids[0], &dsum.narrow(1, 0, 1)?)?;
        grads.add(self.cls_ids[1], &dsum.narrow(1, 1, 1)?)?;
        let d_pos_patches = match self.resample_for(grid) {
            Some(m) => m
                .t()?
                .matmul(&dsum.narrow(1, 2, t - 2)?.squeeze(0)?)?
                .unsqueeze(0)?,
            None => dsum.narrow(1, 2, t - 2)?,
        };
        grads.add(
            self.pos_id,
            &Tensor::cat(&[&dsum.narrow(1, 0, 2)?, &d_pos_patches], 1)?,
        )?;
        let dpatch = dx
            .narrow(1, 2, t - 2)?
            .contiguous()?
            .reshape((b * (t - 2), d))?;
        self.patch
            .backward(ops, &cols, &dpatch.to_dtype(ops.cdt)?, grads, false)?;
        Ok(())
    }

    /// Backward of [`Self::class_outputs`] for the concatenated class tokens of several crop
    /// groups: `tokens` `[R, 2, D]` (the LN inputs), `dy` `[R, 2, D]` → dx `[R, 2, D]`.
    pub fn class_backward(
        &self,
        ops: &Ops,
        tokens: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        self.norm.backward(ops, tokens, dy, grads)
    }
}
