//! The parameter store: every learnable tensor of one network (student or teacher) by name.
//!
//! Names spell the official/timm layout so that checkpoints and exports need no renaming:
//!
//! | prefix | tensors |
//! |---|---|
//! | `backbone.` | timm `vit_small_patch16_224` with `reg_tokens=1`: `cls_token` [1,1,D] ([cls]), `reg_token` [1,1,D] ([cls+]), `pos_embed` [1,2+G²,D] (rows: cls, cls+, patches row-major), `patch_embed.proj.{weight [D,3,p,p], bias}`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}`, `norm.{weight,bias}` |
//! | `srs.` | `norm1` (pre-LN), `attn.qkv`, `attn.proj`, `attn.norm` (post-LN) — `.weight`/`.bias` |
//! | `head.` | `mlp.0`, `mlp.2`, `mlp.4` (`.weight` [out,in], `.bias`), `last_layer.weight_g` [K,1], `last_layer.weight_v` [K,bottleneck] |
//!
//! Initialisation (udi-spec §2.1, §2.4) is deterministic: parameter i draws from
//! `shared::rng::rng_for(seed, Domain::Init, 0, i)` in f64 (Box–Muller normals), so the result
//! does not depend on the device or on thread scheduling.

use crate::config::TrainConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use shared::rng::{rng_for, Domain};
use std::collections::HashMap;

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, std²) (the official trunc-normal truncates at ±2 absolute: effectively untruncated).
    Normal(f64),
    /// U(−b, b).
    Uniform(f64),
    Zeros,
    Ones,
}

/// Name, shape and init of one parameter; the full list is [`param_specs`].
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// AdamW group 0 (weight decay): ≥2-D and not a bias (udi-spec §4).
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2 && !self.name.ends_with(".bias")
    }
}

fn spec(out: &mut Vec<ParamSpec>, name: String, shape: &[usize], init: Init) {
    out.push(ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
    });
}

fn linear(out: &mut Vec<ParamSpec>, name: &str, d_in: usize, d_out: usize) {
    spec(
        out,
        format!("{name}.weight"),
        &[d_out, d_in],
        Init::Normal(0.02),
    );
    spec(out, format!("{name}.bias"), &[d_out], Init::Zeros);
}

fn layer_norm(out: &mut Vec<ParamSpec>, name: &str, d: usize) {
    spec(out, format!("{name}.weight"), &[d], Init::Ones);
    spec(out, format!("{name}.bias"), &[d], Init::Zeros);
}

/// Backbone parameters only (prefix `backbone.`).
pub fn backbone_specs(cfg: &TrainConfig) -> Vec<ParamSpec> {
    let m = &cfg.model;
    let d = m.dim;
    let p = cfg.augment.patch_size as usize;
    let g = cfg.pos_grid();
    let mut v = Vec::new();
    spec(
        &mut v,
        "backbone.cls_token".into(),
        &[1, 1, d],
        Init::Normal(0.02),
    );
    spec(
        &mut v,
        "backbone.reg_token".into(),
        &[1, 1, d],
        Init::Normal(0.02),
    );
    spec(
        &mut v,
        "backbone.pos_embed".into(),
        &[1, 2 + g * g, d],
        Init::Normal(0.02),
    );
    // PyTorch's default Conv2d init: kaiming_uniform(a=√5) → U(±1/√fan_in), bias likewise.
    let bound = 1.0 / ((3 * p * p) as f64).sqrt();
    spec(
        &mut v,
        "backbone.patch_embed.proj.weight".into(),
        &[d, 3, p, p],
        Init::Uniform(bound),
    );
    spec(
        &mut v,
        "backbone.patch_embed.proj.bias".into(),
        &[d],
        Init::Uniform(bound),
    );
    for b in 0..m.depth {
        let n = format!("backbone.blocks.{b}");
        layer_norm(&mut v, &format!("{n}.norm1"), d);
        linear(&mut v, &format!("{n}.attn.qkv"), d, 3 * d);
        linear(&mut v, &format!("{n}.attn.proj"), d, d);
        layer_norm(&mut v, &format!("{n}.norm2"), d);
        linear(&mut v, &format!("{n}.mlp.fc1"), d, m.mlp_ratio * d);
        linear(&mut v, &format!("{n}.mlp.fc2"), m.mlp_ratio * d, d);
    }
    layer_norm(&mut v, "backbone.norm", d);
    v
}

/// SRS parameters (prefix `srs.`).
pub fn srs_specs(cfg: &TrainConfig) -> Vec<ParamSpec> {
    let d = cfg.model.dim;
    let mut v = Vec::new();
    layer_norm(&mut v, "srs.norm1", d);
    linear(&mut v, "srs.attn.qkv", d, 3 * d);
    linear(&mut v, "srs.attn.proj", d, d);
    layer_norm(&mut v, "srs.attn.norm", d);
    v
}

/// DINO head parameters (prefix `head.`).
pub fn head_specs(cfg: &TrainConfig) -> Vec<ParamSpec> {
    let m = &cfg.model;
    let mut v = Vec::new();
    linear(&mut v, "head.mlp.0", m.dim, m.head_hidden);
    linear(&mut v, "head.mlp.2", m.head_hidden, m.head_hidden);
    linear(&mut v, "head.mlp.4", m.head_hidden, m.head_bottleneck);
    spec(
        &mut v,
        "head.last_layer.weight_g".into(),
        &[m.out_dim, 1],
        Init::Ones,
    );
    // PyTorch Linear default init (applied after the trunc-normal pass): U(±1/√in).
    let bound = 1.0 / (m.head_bottleneck as f64).sqrt();
    spec(
        &mut v,
        "head.last_layer.weight_v".into(),
        &[m.out_dim, m.head_bottleneck],
        Init::Uniform(bound),
    );
    v
}

/// Every parameter of one network, in store order.
pub fn param_specs(cfg: &TrainConfig) -> Vec<ParamSpec> {
    let mut v = backbone_specs(cfg);
    v.extend(srs_specs(cfg));
    v.extend(head_specs(cfg));
    v
}

/// True for the head's weight-normalised last layer (frozen during the first epochs).
pub fn is_last_layer(name: &str) -> bool {
    name.starts_with("head.last_layer.")
}

/// Deterministic values of one spec (f64, then cast by the caller).
pub fn init_values(spec: &ParamSpec, seed: u64, index: u64) -> Vec<f64> {
    let n = spec.numel();
    let mut rng = rng_for(seed, Domain::Init, 0, index);
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Uniform(b) => (0..n)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * b)
            .collect(),
        Init::Normal(std) => {
            let mut out = Vec::with_capacity(n + 1);
            while out.len() < n {
                // Box–Muller; u1 in (0, 1] so the log is finite.
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let th = 2.0 * std::f64::consts::PI * u2;
                out.push(r * th.cos() * std);
                out.push(r * th.sin() * std);
            }
            out.truncate(n);
            out
        }
    }
}

/// One stored parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// AdamW group 0 (weight decay applies).
    pub decay: bool,
    /// Whether the optimiser updates it (false only for g with `norm_last_layer`).
    pub trainable: bool,
}

/// All parameters of one network, in [`param_specs`] order.
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// Fresh, deterministically initialised parameters.
    pub fn init(cfg: &TrainConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let specs = param_specs(cfg);
        let mut params = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            let vals = init_values(s, seed, i as u64);
            let t = Tensor::from_vec(vals, s.shape.as_slice(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?;
            params.push(Param {
                name: s.name.clone(),
                var: Var::from_tensor(&t)?,
                decay: s.decays(),
                trainable: !(cfg.model.norm_last_layer && s.name == "head.last_layer.weight_g"),
            });
        }
        Ok(Self::from_params(params))
    }

    fn from_params(params: Vec<Param>) -> Self {
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Self { params, index }
    }

    /// An independent copy (new storage) of every parameter: how the teacher starts.
    pub fn deep_copy(&self) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|p| {
                Ok(Param {
                    name: p.name.clone(),
                    var: Var::from_tensor(&p.var.as_tensor().copy()?)?,
                    decay: p.decay,
                    trainable: p.trainable,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_params(params))
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    pub fn get(&self, name: &str) -> Result<&Param> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.params[i]),
            None => bail!("no parameter named {name}"),
        }
    }

    /// The variable's tensor (gradients flow into it).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.get(name)?.var.as_tensor().clone())
    }

    /// The same storage without gradient tracking (teacher forward).
    pub fn detached(&self, name: &str) -> Result<Tensor> {
        Ok(self.get(name)?.var.as_detached_tensor())
    }

    /// The tensor a layer is built from: tracked (student, gradients flow) or detached (teacher),
    /// with the error converted for candle's `Result`.
    pub fn layer_tensor(&self, name: &str, tracked: bool) -> candle_core::Result<Tensor> {
        let r = if tracked {
            self.tensor(name)
        } else {
            self.detached(name)
        };
        r.map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }

    /// `(name, tensor)` for every parameter, in store order (tensors share storage: copy
    /// before keeping them across an optimiser step).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_detached_tensor()))
            .collect()
    }

    /// The backbone tensors under timm's names (`vit_small_patch16_224`, `reg_tokens=1`): the
    /// `backbone.` prefix stripped, nothing else renamed (export reads the teacher's).
    pub fn timm_backbone_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|p| {
                p.name
                    .strip_prefix("backbone.")
                    .map(|n| (n.to_string(), p.var.as_detached_tensor()))
            })
            .collect()
    }

    /// Overwrites every parameter from `map[prefix + name]` (shape and presence checked; the
    /// values are converted to the store's dtype and device).
    pub fn load_from(&self, map: &HashMap<String, Tensor>, prefix: &str, what: &str) -> Result<()> {
        for p in &self.params {
            let key = format!("{prefix}{}", p.name);
            let t = map
                .get(&key)
                .with_context(|| format!("{what}: missing tensor {key}"))?;
            if t.dims() != p.var.dims() {
                bail!(
                    "{what}: tensor {key} has shape {:?}, expected {:?}",
                    t.dims(),
                    p.var.dims()
                );
            }
            let t = t.to_dtype(p.var.dtype())?.to_device(p.var.device())?;
            p.var
                .set(&t)
                .with_context(|| format!("{what}: setting {key}"))?;
        }
        Ok(())
    }
}
