//! The whole run config: `[data]` and `[augment]` (shared with the loader, see
//! `shared::config`) plus the trainer's `[model]`, `[loss]` and `[optim]` tables.
//!
//! Every field has the paper's default (udi-spec §2–§4), so `configs/udi_vit_s16_in1k.toml`
//! only needs to spell what differs. Unknown keys inside the trainer's tables are refused;
//! unknown top-level tables are left to other owners (checkpoint, logging).

use serde::{Deserialize, Serialize};
use shared::config::{AugmentConfig, DataConfig};
use std::path::Path;

/// Backbone, SRS and head sizes (udi-spec §2). Defaults: ViT-S/16 with the DINO head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Token width (384 for ViT-S).
    pub dim: usize,
    /// Number of transformer blocks (12).
    pub depth: usize,
    /// Attention heads (6); `dim` must be a multiple.
    pub heads: usize,
    /// MLP hidden width = `mlp_ratio · dim` (4).
    pub mlp_ratio: usize,
    /// Grid side the position embedding is learned at (14 = 224/16). `None`: the global grid.
    pub pos_grid: Option<usize>,
    /// Stochastic depth of the last block; block b uses linspace(0, drop_path, depth)[b] (0.1).
    pub drop_path: f64,
    /// LayerNorm epsilon (1e-6) for every LayerNorm of the backbone and the SRS.
    pub ln_eps: f64,
    /// SRS skip connection (on in the official code, off in the paper text; §7 D1).
    pub srs_skip: bool,
    /// DINO head hidden width (2048).
    pub head_hidden: usize,
    /// DINO head bottleneck (256).
    pub head_bottleneck: usize,
    /// Number of prototypes K (65 536).
    pub out_dim: usize,
    /// `true`: the last layer's g is frozen at 1 (not trained). README command: false.
    pub norm_last_layer: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dim: 384,
            depth: 12,
            heads: 6,
            mlp_ratio: 4,
            pos_grid: None,
            drop_path: 0.1,
            ln_eps: 1e-6,
            srs_skip: true,
            head_hidden: 2048,
            head_bottleneck: 256,
            out_dim: 65536,
            norm_last_layer: false,
        }
    }
}

/// Loss weights and temperatures (udi-spec §3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Weights of (L_cls, L_udi, L_patch); the code uses 1/3 each.
    pub weights: [f64; 3],
    /// Blend of the patch-logit average in the multimodal target (0.5).
    pub alpha: f64,
    /// Student temperature (0.1).
    pub student_temp: f64,
    /// Teacher temperature: linear from `warmup_teacher_temp` to `teacher_temp` over
    /// `warmup_teacher_temp_epochs` epochs (np.linspace, both ends included), then constant.
    pub warmup_teacher_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp_epochs: u64,
    /// Centre momentum (0.9) for all three centres.
    pub center_momentum: f64,
    /// The DINO ablation: L_cls only, no [cls+] and no SRS in the loss (their parameters still
    /// exist so checkpoints keep one layout, but they get no gradient and are not updated).
    pub dino_only: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            weights: [1.0 / 3.0; 3],
            alpha: 0.5,
            student_temp: 0.1,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            warmup_teacher_temp_epochs: 30,
            center_momentum: 0.9,
            dino_only: false,
        }
    }
}

/// AdamW, schedules, clipping and EMA (udi-spec §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Total epochs the schedules span (300).
    pub epochs: u64,
    /// Peak lr per 256 images; the peak is `lr · batch_size / 256` (5e-4).
    pub lr: f64,
    /// Final lr of the cosine (1e-5).
    pub min_lr: f64,
    /// Linear warm-up epochs from 0 to the peak (10).
    pub warmup_epochs: u64,
    /// Weight decay cosine from `weight_decay` to `weight_decay_end` over all iterations.
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    /// Teacher EMA momentum cosine from `momentum_teacher` to 1.
    pub momentum_teacher: f64,
    /// Per-parameter gradient-norm clip (3.0); 0 disables.
    pub clip_grad: f64,
    /// Epochs during which the head's last layer gets no update at all (1).
    pub freeze_last_layer: u64,
    /// AdamW betas and eps (PyTorch defaults).
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            epochs: 300,
            lr: 5e-4,
            min_lr: 1e-5,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.1,
            momentum_teacher: 0.996,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// A whole run config. Top-level tables other than these are ignored here (the e2e owner adds
/// its own fields to this struct or reads them separately).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub augment: AugmentConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
}

impl TrainConfig {
    pub fn from_toml_str(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Self::from_toml_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e:#}", path.display()))
    }

    /// Grid side of a global crop.
    pub fn global_grid(&self) -> usize {
        self.augment.global_grid() as usize
    }
    /// Grid side of a local crop.
    pub fn local_grid(&self) -> usize {
        self.augment.local_grid() as usize
    }
    /// Grid side of the learned position embedding.
    pub fn pos_grid(&self) -> usize {
        self.model.pos_grid.unwrap_or_else(|| self.global_grid())
    }
    /// Peak learning rate after linear scaling with the batch size.
    pub fn peak_lr(&self) -> f64 {
        self.optim.lr * self.data.batch_size as f64 / 256.0
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.augment
            .validate()
            .map_err(|e| anyhow::anyhow!("[augment]: {e}"))?;
        anyhow::ensure!(self.data.batch_size > 0, "[data]: batch_size must be > 0");
        let m = &self.model;
        anyhow::ensure!(
            m.dim > 0 && m.heads > 0 && m.dim.is_multiple_of(m.heads),
            "[model]: dim must be a positive multiple of heads"
        );
        anyhow::ensure!(m.depth > 0, "[model]: depth must be > 0");
        anyhow::ensure!(
            m.head_hidden > 0 && m.head_bottleneck > 0 && m.out_dim > 0,
            "[model]: head sizes must be > 0"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&m.drop_path),
            "[model]: drop_path must be in [0, 1)"
        );
        anyhow::ensure!(self.optim.epochs > 0, "[optim]: epochs must be > 0");
        anyhow::ensure!(
            self.optim.warmup_epochs <= self.optim.epochs,
            "[optim]: warmup_epochs > epochs"
        );
        anyhow::ensure!(
            self.loss.student_temp > 0.0 && self.loss.teacher_temp > 0.0,
            "[loss]: temperatures must be > 0"
        );
        Ok(())
    }
}
