//! The linear probe's feature (udi-spec §5): the class token of each of the last `blocks`
//! blocks, each through the final LayerNorm, concatenated (1536-d for ViT-S with 4 blocks).
//! [`write`] stores the features of a whole labelled set for any other evaluation.

use crate::knn_eval::{features_shared, Extractor, LabelledImages};
use crate::vit::Vit;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Which class tokens the feature holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSel {
    /// [cls] (index 0): the paper's default.
    Cls,
    /// [cls+] (index 1): the "UDI+" rows.
    ClsPlus,
    /// [cls] features of the last blocks, then the [cls+] ones.
    Both,
}

/// What [`FeatureSpec::extract`] concatenates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureSpec {
    /// How many of the last blocks (DINO's `n_last_blocks`: 4 for ViT-S).
    pub blocks: usize,
    pub token: TokenSel,
}

impl FeatureSpec {
    /// The feature width for a backbone of width `dim`.
    pub fn dim(&self, dim: usize) -> usize {
        let tokens = if self.token == TokenSel::Both { 2 } else { 1 };
        self.blocks * tokens * dim
    }

    /// Checks the spec against a backbone (depth, [cls+] present).
    pub fn check(&self, vit: &Vit) -> Result<()> {
        ensure!(
            self.blocks >= 1 && self.blocks <= vit.depth(),
            "--blocks {} but the backbone has {} blocks",
            self.blocks,
            vit.depth()
        );
        ensure!(
            self.token == TokenSel::Cls || vit.n_prefix() == 2,
            "this backbone (dino_only) has no [cls+] token"
        );
        Ok(())
    }

    /// `[B, self.dim(D)]` features of normalised images `[B, 3, S, S]`.
    pub fn extract(&self, vit: &Vit, images: &Tensor) -> candle_core::Result<Tensor> {
        let all = vit.block_class_tokens(images)?;
        let last = &all[all.len().saturating_sub(self.blocks)..];
        let tokens: &[usize] = match self.token {
            TokenSel::Cls => &[0],
            TokenSel::ClsPlus => &[1],
            TokenSel::Both => &[0, 1],
        };
        let mut parts = Vec::with_capacity(tokens.len() * last.len());
        for &t in tokens {
            for x in last {
                parts.push(vit.final_norm(&x.narrow(1, t, 1)?.squeeze(1)?)?);
            }
        }
        Tensor::cat(&parts, 1)
    }
}

/// Features, labels and sources of a whole set, as [`write`] stores them.
pub struct FeatureSet {
    /// `[N, F]` f32 on the CPU.
    pub features: Tensor,
    pub labels: Vec<i32>,
    pub sources: Vec<String>,
    pub class_names: Vec<String>,
}

/// Extracts the features of every item of `set` (eval transform, `chunk` images a pass), the
/// ranks of `comm` sharing the work ([`crate::knn_eval::features_shared`]).
pub fn extract_set(
    vit: &Vit,
    spec: FeatureSpec,
    set: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    device: &Device,
    comm: &mut dyn crate::dist::Collective,
) -> Result<FeatureSet> {
    spec.check(vit)?;
    let extractor = Extractor::Probe(vit, spec);
    let (features, labels) = features_shared(extractor, set, crop, chunk, device, comm)?;
    Ok(FeatureSet {
        features,
        labels,
        sources: (0..set.len()).map(|i| set.source(i)).collect(),
        class_names: set.class_names(),
    })
}

/// Writes `features` (`[N, F]` f32), `labels` (`[N]` i64, −1 = unlabelled) and `indices`
/// (`[N]` i64, the item index in the set) to a safetensors file; the metadata holds
/// `sources` (JSON list: file paths, or the records' original paths), `classes` (JSON list)
/// and `spec` (JSON object).
pub fn write(fs: &FeatureSet, spec: FeatureSpec, out: &Path) -> Result<()> {
    let n = fs.labels.len();
    let feats: Vec<f32> = fs.features.flatten_all()?.to_vec1()?;
    let (_, f) = fs.features.dims2()?;
    let labels: Vec<i64> = fs.labels.iter().map(|&l| l as i64).collect();
    let indices: Vec<i64> = (0..n as i64).collect();
    let f32_bytes: Vec<u8> = feats.iter().flat_map(|x| x.to_le_bytes()).collect();
    let lab_bytes: Vec<u8> = labels.iter().flat_map(|x| x.to_le_bytes()).collect();
    let idx_bytes: Vec<u8> = indices.iter().flat_map(|x| x.to_le_bytes()).collect();
    use safetensors::tensor::{Dtype, TensorView};
    let views = vec![
        (
            "features",
            TensorView::new(Dtype::F32, vec![n, f], &f32_bytes)?,
        ),
        ("labels", TensorView::new(Dtype::I64, vec![n], &lab_bytes)?),
        ("indices", TensorView::new(Dtype::I64, vec![n], &idx_bytes)?),
    ];
    let mut meta = HashMap::new();
    meta.insert("sources".into(), serde_json::to_string(&fs.sources)?);
    meta.insert("classes".into(), serde_json::to_string(&fs.class_names)?);
    meta.insert(
        "spec".into(),
        serde_json::json!({"blocks": spec.blocks, "token": spec.token}).to_string(),
    );
    safetensors::serialize_to_file(views, Some(meta), out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
