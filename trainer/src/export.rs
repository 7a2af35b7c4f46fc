//! `trainer export --format timm`: the teacher backbone under timm's names, loadable by
//! `timm.create_model('vit_small_patch16_224', reg_tokens=1, num_classes=0)`
//! (`../shared/timm-vit-s16-keys.json`, `udi_export_variant`).
//!
//! timm's ViT with `reg_tokens=1` prepends `[cls_token, reg_token, patches]` and adds a
//! `pos_embed` of `1 + 1 + N` rows — exactly UDI's `[cls], [cls+]` layout with a position vector
//! per class token (udi-spec §2.1). So [cls] → `cls_token`, [cls+] → `reg_token`, and the two class
//! tokens stored as one `[1, 2, D]` parameter are split.

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};

/// Shape of a ViT backbone, as timm names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VitShape {
    pub depth: usize,
    pub dim: usize,
    pub mlp_hidden: usize,
    pub patch: usize,
    /// Patch tokens of the pretraining resolution (196 for 224/16).
    pub n_patches: usize,
}

impl VitShape {
    pub const VIT_S16: VitShape = VitShape {
        depth: 12,
        dim: 384,
        mlp_hidden: 1536,
        patch: 16,
        n_patches: 196,
    };
}

/// timm's tensor names and shapes of the `reg_tokens=1, num_classes=0` variant, in timm's order.
pub fn timm_keys(s: VitShape) -> Vec<(String, Vec<usize>)> {
    let d = s.dim;
    let mut k = vec![
        ("cls_token".to_string(), vec![1, 1, d]),
        ("reg_token".to_string(), vec![1, 1, d]),
        ("pos_embed".to_string(), vec![1, 2 + s.n_patches, d]),
        (
            "patch_embed.proj.weight".to_string(),
            vec![d, 3, s.patch, s.patch],
        ),
        ("patch_embed.proj.bias".to_string(), vec![d]),
    ];
    for b in 0..s.depth {
        let p = format!("blocks.{b}.");
        for (n, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![s.mlp_hidden, d]),
            ("mlp.fc1.bias", vec![s.mlp_hidden]),
            ("mlp.fc2.weight", vec![d, s.mlp_hidden]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            k.push((format!("{p}{n}"), shape));
        }
    }
    k.push(("norm.weight".into(), vec![d]));
    k.push(("norm.bias".into(), vec![d]));
    k
}

/// Picks the backbone tensors under `prefix` (e.g. `"teacher.backbone."`) and renames/reshapes
/// them to timm's names. Accepted spellings of the class tokens: `cls_token` `[1, 2, D]` or
/// `[2, D]` (both tokens in one parameter, as the official code), or `cls_token` + `reg_token`.
/// `pos_embed` may be `[2 + N, D]` or `[1, 2 + N, D]`. Every other key is expected under its timm
/// name; anything missing or misshapen is an error naming it.
pub fn to_timm(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    shape: VitShape,
) -> Result<BTreeMap<String, Tensor>> {
    let get = |name: &str| tensors.get(&format!("{prefix}{name}"));
    let d = shape.dim;
    let mut out = BTreeMap::new();
    let cls = get("cls_token").with_context(|| format!("checkpoint has no `{prefix}cls_token`"))?;
    match (cls.elem_count() / d, get("reg_token")) {
        (2, _) => {
            let both = cls.reshape((1, 2, d))?;
            out.insert("cls_token".to_string(), both.narrow(1, 0, 1)?.contiguous()?);
            out.insert("reg_token".to_string(), both.narrow(1, 1, 1)?.contiguous()?);
        }
        (1, Some(reg)) => {
            out.insert("cls_token".to_string(), cls.reshape((1, 1, d))?);
            out.insert("reg_token".to_string(), reg.reshape((1, 1, d))?);
        }
        (n, _) => {
            bail!("`{prefix}cls_token` holds {n} tokens of dim {d}; UDI needs [cls] and [cls+]")
        }
    }
    for (name, want) in timm_keys(shape) {
        if name == "cls_token" || name == "reg_token" {
            continue;
        }
        let t = get(&name)
            .with_context(|| format!("checkpoint has no `{prefix}{name}` (timm key `{name}`)"))?;
        let t = if t.elem_count() == want.iter().product::<usize>()
            && t.dims() != want.as_slice()
            && name == "pos_embed"
        {
            t.reshape(want.as_slice())?
        } else {
            t.clone()
        };
        ensure!(
            t.dims() == want.as_slice(),
            "`{prefix}{name}` has shape {:?}, timm expects {want:?}",
            t.dims()
        );
        out.insert(name, t.to_dtype(candle_core::DType::F32)?.contiguous()?);
    }
    Ok(out)
}

/// The inverse of [`to_timm`] for re-loading an export into our own model: the two class tokens
/// joined back into `cls_token [1, 2, D]`, keys prefixed with `prefix`.
pub fn from_timm(
    timm: &HashMap<String, Tensor>,
    prefix: &str,
    join_cls: bool,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (k, v) in timm {
        if join_cls && (k == "cls_token" || k == "reg_token") {
            continue;
        }
        out.insert(format!("{prefix}{k}"), v.clone());
    }
    if join_cls {
        let c = timm.get("cls_token").context("export has no cls_token")?;
        let r = timm.get("reg_token").context("export has no reg_token")?;
        out.insert(format!("{prefix}cls_token"), Tensor::cat(&[c, r], 1)?);
    }
    Ok(out)
}

/// Writes an export (timm's keys, f32) to `path`.
pub fn save(tensors: &BTreeMap<String, Tensor>, path: &std::path::Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const TINY: VitShape = VitShape {
        depth: 2,
        dim: 8,
        mlp_hidden: 32,
        patch: 4,
        n_patches: 16,
    };

    fn fake_model(prefix: &str, s: VitShape) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        let mut i = 0f32;
        for (name, shape) in timm_keys(s) {
            if name == "reg_token" {
                continue;
            }
            let shape = match name.as_str() {
                "cls_token" => vec![1, 2, s.dim],
                "pos_embed" => vec![2 + s.n_patches, s.dim],
                _ => shape,
            };
            let n: usize = shape.iter().product();
            i += 1.0;
            let v: Vec<f32> = (0..n).map(|j| i * 1000.0 + j as f32).collect();
            m.insert(
                format!("{prefix}{name}"),
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            );
        }
        // Head and SRS tensors are not part of the backbone and are left out.
        m.insert(
            format!("{prefix}srs.qkv.weight"),
            Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        m
    }

    #[test]
    fn vit_s16_key_list_matches_timm() {
        let k = timm_keys(VitShape::VIT_S16);
        assert_eq!(k.len(), 151);
        let params: usize = k.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(params, 21_666_432); // udi_export_variant.num_params
                                        // Checked against the reference list when ../shared is present.
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/timm-vit-s16-keys.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let j: serde_json::Value = serde_json::from_str(&text).unwrap();
            let tensors = j["tensors"].as_object().unwrap();
            let changes = j["udi_export_variant"]["changes"].as_object().unwrap();
            for (name, shape) in &k {
                let want = changes
                    .get(name)
                    .or_else(|| tensors.get(name))
                    .unwrap_or_else(|| panic!("{name} not in timm list"));
                let want: Vec<usize> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(&want, shape, "{name}");
            }
            assert_eq!(tensors.len() + 1, k.len());
        }
    }

    #[test]
    fn splits_the_class_tokens_and_round_trips() {
        let m = fake_model("teacher.backbone.", TINY);
        let t = to_timm(&m, "teacher.backbone.", TINY).unwrap();
        assert_eq!(t.len(), timm_keys(TINY).len());
        assert!(!t.keys().any(|k| k.contains("srs")));
        let cls: Vec<f32> = t["cls_token"].flatten_all().unwrap().to_vec1().unwrap();
        let reg: Vec<f32> = t["reg_token"].flatten_all().unwrap().to_vec1().unwrap();
        let both: Vec<f32> = m["teacher.backbone.cls_token"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!([cls, reg].concat(), both);
        assert_eq!(t["pos_embed"].dims(), &[1, 18, 8]);
        // Back into our names: the same values.
        let tm: HashMap<String, Tensor> = t.into_iter().collect();
        let back = from_timm(&tm, "teacher.backbone.", true).unwrap();
        for (k, v) in &back {
            let orig = &m[k];
            let a: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
        // Through a file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.safetensors");
        save(&to_timm(&m, "teacher.backbone.", TINY).unwrap(), &p).unwrap();
        let loaded = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        assert_eq!(loaded.len(), timm_keys(TINY).len());
    }

    #[test]
    fn missing_or_misshapen_keys_are_named() {
        let mut m = fake_model("t.", TINY);
        m.remove("t.blocks.1.mlp.fc2.bias");
        let e = to_timm(&m, "t.", TINY).unwrap_err().to_string();
        assert!(e.contains("t.blocks.1.mlp.fc2.bias"), "{e}");
        let mut m = fake_model("t.", TINY);
        m.insert(
            "t.norm.bias".into(),
            Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let e = to_timm(&m, "t.", TINY).unwrap_err().to_string();
        assert!(e.contains("norm.bias") && e.contains("[7]"), "{e}");
    }
}
