//! The `features`, `linear` and `attention` subcommands: argument structs and the calls they
//! make into [`super`].

use super::features::{self, FeatureSpec, TokenSel};
use super::linear::{self, ProbeOptions};
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::device::DeviceFlag;
use crate::knn_eval::{self, open_images};
use crate::train_cli::{device, load_config};
use crate::vit::Vit;
use anyhow::Result;
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;

/// Which backbone to evaluate (as for `knn`).
#[derive(Args, Debug)]
pub struct BackboneArgs {
    /// A checkpoint dir, or a run dir (its newest checkpoint).
    #[arg(long, required_unless_present = "random_init")]
    pub checkpoint: Option<PathBuf>,
    /// A randomly initialised backbone (the config's seed) instead of the checkpoint's.
    #[arg(long)]
    pub random_init: bool,
    /// The student's backbone instead of the teacher's (diagnostics).
    #[arg(long)]
    pub student: bool,
    /// Config (default: the one saved in the checkpoint).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// auto, cpu or cuda (bf16 backbone on CUDA).
    #[arg(long, default_value_t = DeviceFlag::Auto)]
    pub device: DeviceFlag,
}

/// A loaded backbone and where it came from.
pub struct Backbone {
    pub cfg: TrainConfig,
    pub vit: Vit,
    pub device: Device,
    /// The checkpoint dir, or "random init".
    pub weights: String,
}

impl BackboneArgs {
    pub fn load(&self) -> Result<Backbone> {
        let dev = device(self.device, false)?;
        let ckpt = self
            .checkpoint
            .as_deref()
            .map(checkpoint::resolve)
            .transpose()?;
        let cfg = load_config(self.config.as_deref(), ckpt.as_ref())?;
        let tensors = match (&ckpt, self.random_init) {
            (Some(c), false) => Some(checkpoint::load(c, &dev)?.0),
            _ => None,
        };
        let prefix = if self.student { "student." } else { "teacher." };
        let (_store, vit) = knn_eval::backbone_from(&cfg, tensors.as_ref(), prefix, &dev)?;
        let weights = match &ckpt {
            Some(c) if !self.random_init => c.dir.display().to_string(),
            _ => "random init".to_string(),
        };
        Ok(Backbone {
            cfg,
            vit,
            device: dev,
            weights,
        })
    }
}

/// The probe feature's options.
#[derive(Args, Debug, Clone, Copy)]
pub struct FeatureArgs {
    /// Concatenate the class token of the last N blocks (default: 4, or the depth if smaller).
    #[arg(long)]
    pub blocks: Option<usize>,
    /// cls, cls-plus or both ([cls] blocks then [cls+] blocks).
    #[arg(long, value_enum, default_value_t = TokenSel::Cls)]
    pub token: TokenSel,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
}

impl FeatureArgs {
    fn spec(&self, vit: &Vit) -> FeatureSpec {
        FeatureSpec {
            blocks: self.blocks.unwrap_or(4.min(vit.depth())),
            token: self.token,
        }
    }
}

#[derive(Args, Debug)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Images: a packed shard dir or an ImageFolder (DIR/<class>/<image>).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub feature: FeatureArgs,
    /// Output safetensors: features [N, F] f32, labels [N] i64, indices [N] i64; metadata
    /// sources, classes, spec.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn features_main(a: &FeaturesArgs) -> Result<()> {
    let b = a.backbone.load()?;
    // Under `trainer launch` / torchrun / SLURM the ranks share the extraction; rank 0 writes.
    let mut comm = crate::dist::join(crate::dist::EVAL_TIMEOUT, &b.device)?;
    let spec = a.feature.spec(&b.vit);
    let set = open_images(&a.data)?;
    let t0 = std::time::Instant::now();
    let fs = features::extract_set(
        &b.vit,
        spec,
        set.as_ref(),
        b.cfg.augment.global_size,
        a.feature.chunk.max(1),
        &b.device,
        comm.as_mut(),
    )?;
    if comm.world().rank > 0 {
        return Ok(());
    }
    let secs = t0.elapsed().as_secs_f64();
    features::write(&fs, spec, &a.out)?;
    let (n, f) = fs.features.dims2()?;
    println!(
        "wrote {} ({n} × {f} features of {}, last {} blocks, token {:?}; {:.1} s, {:.1} s per 1000 images)",
        a.out.display(),
        b.weights,
        spec.blocks,
        spec.token,
        secs,
        1000.0 * secs / n.max(1) as f64
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct LinearArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Train images: a packed shard dir or an ImageFolder.
    #[arg(long)]
    pub train: PathBuf,
    /// Val images, same forms.
    #[arg(long)]
    pub val: PathBuf,
    #[command(flatten)]
    pub feature: FeatureArgs,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Per 256 images (used: lr × batch / 256).
    #[arg(long, default_value_t = 0.02)]
    pub lr: f64,
    /// Seed of the classifier init, the epoch order and the augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train features computed once with the val transform (no train augmentation): a quick
    /// look, not the protocol; the output says so.
    #[arg(long)]
    pub cached: bool,
    /// Print one JSON object (with the per-epoch history) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn linear_main(a: &LinearArgs) -> Result<()> {
    let b = a.backbone.load()?;
    let spec = a.feature.spec(&b.vit);
    let train = open_images(&a.train)?;
    let val = open_images(&a.val)?;
    let opts = ProbeOptions {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        momentum: 0.9,
        seed: a.seed,
    };
    let quiet = a.json;
    let r = linear::evaluate(
        &b.vit,
        spec,
        train.as_ref(),
        val.as_ref(),
        b.cfg.augment.global_size,
        a.feature.chunk.max(1),
        a.cached,
        &opts,
        &b.device,
        &mut |s| {
            if !quiet {
                eprintln!(
                    "epoch {:>3}  lr {:.5}  loss {:.4}  top-1 {:.2}%  top-5 {:.2}%",
                    s.epoch, s.lr, s.train_loss, s.top1, s.top5
                )
            }
        },
    )?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["weights"] = serde_json::json!(b.weights);
        v["blocks"] = serde_json::json!(spec.blocks);
        v["token"] = serde_json::json!(spec.token);
        println!("{v}");
    } else {
        println!(
            "linear probe [{}] ({}, last {} blocks, token {:?}, {} epochs): best top-1 {:.2}% (epoch {}, top-5 {:.2}%), last top-1 {:.2}% top-5 {:.2}%  ({} train, {} val)",
            r.mode, b.weights, spec.blocks, spec.token, r.epochs, r.best_top1, r.best_epoch, r.best_top5, r.last_top1, r.last_top5, r.n_train, r.n_val
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// The image (any format the loader decodes); resized and centre-cropped to the config's
    /// global crop size.
    #[arg(long)]
    pub image: PathBuf,
    /// Whose attention: cls or cls-plus.
    #[arg(long, value_enum, default_value_t = TokenSel::Cls)]
    pub token: TokenSel,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn attention_main(a: &AttentionArgs) -> Result<()> {
    let b = a.backbone.load()?;
    let token = match a.token {
        TokenSel::Cls => 0,
        TokenSel::ClsPlus => 1,
        TokenSel::Both => anyhow::bail!("--token both: draw cls and cls-plus separately"),
    };
    let maps = super::attention::write_png(
        &b.vit,
        &a.image,
        token,
        b.cfg.augment.global_size,
        &a.out,
        &b.device,
    )?;
    println!(
        "wrote {} ({} heads, {}×{} patches, {}, token {:?})",
        a.out.display(),
        maps.heads.len(),
        maps.grid,
        maps.grid,
        b.weights,
        a.token
    );
    Ok(())
}
