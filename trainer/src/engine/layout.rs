//! Where every parameter lives: one table built from the config, indexing five flat buffers of
//! the same layout.
//!
//! | buffer | elements | content |
//! |---|---|---|
//! | `state[0..n]` | n | student parameters (f32 masters) |
//! | `state[n..2n]` | n | AdamW first moments |
//! | `state[2n..3n]` | n | AdamW second moments |
//! | `state[3n..4n]` | n | teacher parameters |
//! | `grads` | n | this step's raw student gradients (written once per step) |
//!
//! `state` is one allocation because the fused AdamW + EMA kernel updates all four parts in one
//! launch ([`crate::kernels::adamw`]). Offsets follow [`crate::params::param_specs`] order, the
//! timm names of the table are the checkpoint names, and roles (weight decay, clip group, last
//! layer, trainable) are decided here once, never by matching names inside a step.

use crate::config::TrainConfig;
use crate::params::{is_last_layer, param_specs};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// One parameter's place and roles.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// AdamW group 0 (udi-spec §4).
    pub decay: bool,
    /// False only for g with `norm_last_layer`.
    pub trainable: bool,
    /// `head.last_layer.*`: no update while `epoch < freeze_last_layer`.
    pub last_layer: bool,
}

/// The table of every parameter of one network, in store order.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub entries: Vec<Entry>,
    index: HashMap<String, usize>,
    /// Total element count n.
    pub n: usize,
    /// Parameter ids clipped on one joint norm: the two class tokens (one [1,2,D] parameter in
    /// the official code) together, every other parameter alone.
    pub clip_groups: Vec<Vec<usize>>,
}

impl ParamLayout {
    pub fn new(cfg: &TrainConfig) -> Self {
        let mut entries = Vec::new();
        let mut offset = 0;
        for s in param_specs(cfg) {
            let len = s.numel();
            entries.push(Entry {
                decay: s.decays(),
                trainable: !(cfg.model.norm_last_layer && s.name == "head.last_layer.weight_g"),
                last_layer: is_last_layer(&s.name),
                name: s.name,
                shape: s.shape,
                offset,
                len,
            });
            offset += len;
        }
        let index: HashMap<String, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let cls_pair: Vec<usize> = ["backbone.cls_token", "backbone.reg_token"]
            .iter()
            .filter_map(|n| index.get(*n).copied())
            .collect();
        let mut clip_groups = vec![cls_pair.clone()];
        clip_groups.extend(
            (0..entries.len())
                .filter(|i| !cls_pair.contains(i))
                .map(|i| vec![i]),
        );
        Self {
            entries,
            index,
            n: offset,
            clip_groups,
        }
    }

    pub fn id(&self, name: &str) -> Result<usize> {
        match self.index.get(name) {
            Some(&i) => Ok(i),
            None => bail!("no parameter named {name}"),
        }
    }

    /// Parameter `id`'s view into a flat buffer of this layout (no copy).
    pub fn view(&self, flat: &Tensor, id: usize) -> candle_core::Result<Tensor> {
        let e = &self.entries[id];
        flat.narrow(0, e.offset, e.len)?.reshape(e.shape.as_slice())
    }

    /// As [`Self::view`] by name.
    pub fn view_of(&self, flat: &Tensor, name: &str) -> Result<(usize, Tensor)> {
        let id = self.id(name)?;
        Ok((id, self.view(flat, id)?))
    }
}
