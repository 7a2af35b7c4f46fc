//! The data and augmentation sections of a run config (`configs/*.toml`).
//!
//! A config file is one TOML document; this crate reads the `[data]` and `[augment]` tables and
//! ignores the others (`[model]`, `[loss]`, `[optim]` belong to the trainer). Every field has the
//! paper's default (udi-spec §1.1), so `[augment]` may be empty for the real recipe.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Batch composition and the seed everything random derives from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Images per batch (per trainer step).
    pub batch_size: u32,
    /// Master seed: crops, batch order and model init derive from it.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            seed: 0,
        }
    }
}

/// How crops are resized to their output size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Pillow's antialiased bicubic (the recipe), bit for bit as Pillow 13 computes it.
    #[default]
    Exact,
    /// The same, with the pass order of Pillow ≤ 12 (always horizontal first; Pillow 13 runs
    /// the vertical pass first when the height shrinks by more than twice as many pixels as the
    /// width, which changes some bytes of such crops).
    Pillow12,
    /// 2-tap bilinear where a crop downsamples by at most 2× (else exact): a deviation from
    /// Pillow's pixels, faster; crop boxes and SRS rows are unchanged, only pixel values differ.
    /// Against Pillow 13 (= the exact mode, byte for byte) on 200 bench-photos: after the resize
    /// MAE 0.84, PSNR 41.4 dB, max |d| 85, 35 % of bytes differ; finished crops MAE 0.65, PSNR
    /// 42.8 dB (`loader bench --resize both` measures it).
    Fast,
}

impl ResizeMode {
    pub fn is_exact(&self) -> bool {
        *self == ResizeMode::Exact
    }
}

/// Where the photometric pipeline (udi-spec §1.4) runs. The loader draws every crop's
/// photometric decisions either way (same RNG stream, so the same crops) and writes them into the
/// batch ([`crate::geometry::PhotoRecord`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhotometricAt {
    /// The loader applies it on uint8 crops (the recipe's PIL semantics, bit for bit).
    #[default]
    Loader,
    /// The loader leaves crops unjittered (only flipped) and the trainer applies the records on
    /// its device before normalising: the loader's per-image CPU cost drops by the photometric
    /// share, which pays where the trainer's device is a GPU.
    Device,
}

impl PhotometricAt {
    pub fn is_loader(&self) -> bool {
        *self == PhotometricAt::Loader
    }
}

/// Multi-crop geometry, photometric augmentation and SRS sampling (udi-spec §1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Side of the two global crops in pixels (224).
    pub global_size: u32,
    /// Side of the local crops in pixels (96).
    pub local_size: u32,
    /// Number of local crops (10, the README value; the code default is 6).
    pub n_local: u32,
    /// Area fraction range of global crops.
    pub global_scale: [f64; 2],
    /// Area fraction range of local crops.
    pub local_scale: [f64; 2],
    /// Aspect-ratio range, sampled log-uniformly.
    pub ratio: [f64; 2],
    /// ViT patch size: the SRS grid is `size / patch_size` per side.
    pub patch_size: u32,
    /// SRS window on the global grid (3: 16 samples of 14×14).
    pub global_window: u32,
    /// SRS window on the local grid (2: 9 samples of 6×6).
    pub local_window: u32,
    /// Horizontal flip probability, per crop.
    pub hflip_p: f64,
    /// D9: flip local crops too (official code at 133c2cb). `false` = the first public commit.
    pub local_hflip: bool,
    /// D4: use `min(j, b0)` for the horizontal extent instead of the official `min(i, b0)` typo.
    pub fix_overlap_typo: bool,
    /// D3: reference region of the local crops = true intersection of the global views instead
    /// of the official min/max of the flip-swapped boxes.
    pub true_intersection: bool,
    /// Colour-jitter probability and strengths (torchvision ColorJitter semantics).
    pub jitter_p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// Random-grayscale probability.
    pub grayscale_p: f64,
    /// Gaussian blur sigma range (PIL radius).
    pub blur_sigma: [f64; 2],
    /// Blur probability in the three recipes of the selector (udi-spec §1.4 step 3).
    pub blur_p_local: f64,
    pub blur_p_global1: f64,
    pub blur_p_global2: f64,
    /// Solarise probability in the "global 2" recipe.
    pub solarize_p: f64,
    /// `"exact"` (Pillow 13 bicubic, default), `"pillow12"` or `"fast"` (see [`ResizeMode`]).
    /// Left out of the serialised config when exact, so fingerprints of configs without the key
    /// are unchanged; the other modes are part of the fingerprint.
    #[serde(skip_serializing_if = "ResizeMode::is_exact")]
    pub resize: ResizeMode,
    /// `"loader"` (default) or `"device"` (see [`PhotometricAt`]). Left out of the serialised
    /// config when `"loader"`, like `resize`; `"device"` is part of the fingerprint (the batch
    /// bytes differ).
    #[serde(skip_serializing_if = "PhotometricAt::is_loader")]
    pub photometric: PhotometricAt,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            global_size: 224,
            local_size: 96,
            n_local: 10,
            global_scale: [0.25, 1.0],
            local_scale: [0.05, 0.25],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            patch_size: 16,
            global_window: 3,
            local_window: 2,
            hflip_p: 0.5,
            local_hflip: true,
            fix_overlap_typo: false,
            true_intersection: false,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_sigma: [0.1, 2.0],
            blur_p_local: 0.5,
            blur_p_global1: 1.0,
            blur_p_global2: 0.1,
            solarize_p: 0.2,
            resize: ResizeMode::Exact,
            photometric: PhotometricAt::Loader,
        }
    }
}

impl AugmentConfig {
    /// Patch grid side of a global crop (14 for 224/16).
    pub fn global_grid(&self) -> u32 {
        self.global_size / self.patch_size
    }
    /// Patch grid side of a local crop (6 for 96/16).
    pub fn local_grid(&self) -> u32 {
        self.local_size / self.patch_size
    }
    /// SRS samples per global view: (grid / window)² (16).
    pub fn global_samples(&self) -> u32 {
        let g = self.global_grid() / self.global_window;
        g * g
    }
    /// SRS samples per local view (9).
    pub fn local_samples(&self) -> u32 {
        let g = self.local_grid() / self.local_window;
        g * g
    }
    /// Number of (source crop → target global view) pairs per image: 2 + 2·n_local (22).
    pub fn n_pairs(&self) -> u32 {
        2 + 2 * self.n_local
    }

    /// Rejects configs the pipeline cannot run, with a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        // First: every check below divides by it.
        if self.patch_size == 0 {
            return Err("patch_size must be > 0".into());
        }
        let checks: [(bool, &str); 8] = [
            (self.patch_size > 0, "patch_size must be > 0"),
            (
                self.global_size.is_multiple_of(self.patch_size),
                "global_size must be a multiple of patch_size",
            ),
            (
                self.local_size.is_multiple_of(self.patch_size),
                "local_size must be a multiple of patch_size",
            ),
            (
                self.global_grid() >= 2 && self.local_grid() >= 2,
                "crops must be at least 2 patches wide",
            ),
            (
                self.global_window >= 1 && self.global_window <= self.global_grid(),
                "global_window out of range",
            ),
            (
                self.local_window >= 1 && self.local_window <= self.local_grid(),
                "local_window out of range",
            ),
            (
                self.global_scale[0] > 0.0 && self.global_scale[0] <= self.global_scale[1],
                "global_scale must be 0 < lo <= hi",
            ),
            (
                self.local_scale[0] > 0.0 && self.local_scale[0] <= self.local_scale[1],
                "local_scale must be 0 < lo <= hi",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(msg.to_string());
            }
        }
        if self.global_grid() * self.global_grid() > u16::MAX as u32 {
            return Err("global grid too large for u16 indices".into());
        }
        Ok(())
    }
}

/// The version of the crop engine's output bytes for a given config, part of the config
/// fingerprint: raised whenever the same config makes different pixels, so that loaders of two
/// builds never feed one ring. 2: Pillow 13.0.0's resample (bit-exact) replaced an approximation.
pub const PIXELS_VERSION: u64 = 2;

/// The `[data]` and `[augment]` tables of a config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    pub data: DataConfig,
    pub augment: AugmentConfig,
}

impl PipelineConfig {
    /// Parses the `[data]`/`[augment]` tables of a TOML document (other tables are ignored).
    pub fn from_toml_str(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The checks every config passes before a batch is shaped from it (also applied to the
    /// copy stored in a ring segment, which may be damaged).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.augment
            .validate()
            .map_err(|e| anyhow::anyhow!("[augment]: {e}"))?;
        anyhow::ensure!(self.data.batch_size > 0, "[data]: batch_size must be > 0");
        Ok(())
    }

    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Self::from_toml_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// A stable 64-bit fingerprint of everything that shapes a batch's bytes: the config and the
    /// crop engine's [`PIXELS_VERSION`]. Two processes attach to the same ring only if their
    /// fingerprints (and dataset ids) agree.
    pub fn fingerprint(&self) -> u64 {
        let canon = serde_json::to_string(self).expect("config serialises");
        xxhash_rust::xxh3::xxh3_64_with_seed(canon.as_bytes(), PIXELS_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_paper_recipe() {
        let a = AugmentConfig::default();
        assert_eq!((a.global_grid(), a.local_grid()), (14, 6));
        assert_eq!((a.global_samples(), a.local_samples()), (16, 9));
        assert_eq!(a.n_pairs(), 22);
    }

    #[test]
    fn partial_toml_keeps_defaults_and_ignores_other_tables() {
        let cfg = PipelineConfig::from_toml_str(
            "[data]\nbatch_size = 8\n[augment]\nglobal_size = 64\nlocal_size = 32\n[model]\ndim = 3\n",
        )
        .unwrap();
        assert_eq!(cfg.data.batch_size, 8);
        assert_eq!(cfg.augment.global_grid(), 4);
        assert_eq!(cfg.augment.n_local, 10);
    }

    #[test]
    fn typos_and_bad_sizes_are_refused() {
        assert!(PipelineConfig::from_toml_str("[augment]\nglobal_sise = 64\n").is_err());
        let err = PipelineConfig::from_toml_str("[augment]\nglobal_size = 100\n").unwrap_err();
        assert!(err.to_string().contains("global_size"), "{err}");
    }

    #[test]
    fn resize_mode_defaults_to_exact_and_fast_changes_the_fingerprint() {
        let old = PipelineConfig::from_toml_str("[augment]\nhue = 0.1\n").unwrap();
        assert_eq!(old.augment.resize, ResizeMode::Exact);
        // The key is absent from the canonical form when exact: old fingerprints stay valid.
        assert!(!serde_json::to_string(&old).unwrap().contains("resize"));
        let exact = PipelineConfig::from_toml_str("[augment]\nresize = \"exact\"\n").unwrap();
        assert_eq!(exact.fingerprint(), old.fingerprint());
        let fast = PipelineConfig::from_toml_str("[augment]\nresize = \"fast\"\n").unwrap();
        assert_eq!(fast.augment.resize, ResizeMode::Fast);
        assert_ne!(fast.fingerprint(), old.fingerprint());
        // Round trip through the canonical JSON (the ring's config page).
        let back: PipelineConfig =
            serde_json::from_str(&serde_json::to_string(&fast).unwrap()).unwrap();
        assert_eq!(back, fast);
        assert!(PipelineConfig::from_toml_str("[augment]\nresize = \"quick\"\n").is_err());
        // Same for where the photometric pipeline runs.
        assert_eq!(old.augment.photometric, PhotometricAt::Loader);
        assert!(!serde_json::to_string(&old).unwrap().contains("photometric"));
        let dev = PipelineConfig::from_toml_str("[augment]\nphotometric = \"device\"\n").unwrap();
        assert_eq!(dev.augment.photometric, PhotometricAt::Device);
        assert_ne!(dev.fingerprint(), old.fingerprint());
        let back: PipelineConfig =
            serde_json::from_str(&serde_json::to_string(&dev).unwrap()).unwrap();
        assert_eq!(back, dev);
    }

    #[test]
    fn fingerprint_changes_with_any_field() {
        let a = PipelineConfig::default();
        let mut b = a.clone();
        b.augment.hue = 0.2;
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), PipelineConfig::default().fingerprint());
    }

    /// A zero patch size is an error (every other check divides by it), not a panic.
    #[test]
    fn zero_patch_size_is_refused() {
        let text = "[data]\nbatch_size = 4\n[augment]\npatch_size = 0\n";
        let e = PipelineConfig::from_toml_str(text).unwrap_err().to_string();
        assert!(e.contains("patch_size must be > 0"), "{e}");
    }
}
