//! Per-crop metadata and the compact SRS row format (udi-spec §1.2, §1.5).
//!
//! ## Crops
//! Every image yields `2 + n_local` crops, in this order: global view 0, global view 1, local 0..L.
//! [`CropMeta`] stores the integer crop rectangle in source pixels and the flip; the signed
//! normalised box of the official code is derived by [`CropMeta::signed_box`].
//!
//! ## Pairs
//! A pair is (source crop → target global view). Pair index `p` (the order used everywhere here;
//! the official code's list order differs and only matters for bit-compatible batching):
//!
//! | p | source | target |
//! |---|---|---|
//! | 0 | global 0 | global 1 |
//! | 1 | global 1 | global 0 |
//! | 2 + 2k + t | local k | global t (t ∈ {0, 1}) |
//!
//! ## Rows
//! A pair of a global source has `global_samples` (16) rows, of a local source `local_samples` (9).
//! The rows list the **valid** samples first, in row-major order of the source grid, followed by
//! invalid rows (all fields zero). `n_valid` counts the valid rows. Row r of a valid pair says:
//! the student reads source patch `src` (a row-major index in the source grid, 0..G_src²) — this
//! is the one-hot S-row — and the teacher reads the target 14×14 grid at the four corners `tgt`
//! (row-major indices, order: (fu,fv), (fu,cv), (cu,fv), (cu,cv)) with bilinear weights `w`
//! summing to 1 — the T-row. Dense S/T matrices are recovered by [`SrsRow::dense_t`] etc.

use bytemuck::{Pod, Zeroable};

/// Integer crop rectangle in source-image pixels plus the horizontal flip flag.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CropMeta {
    pub img_h: u32,
    pub img_w: u32,
    pub top: u32,
    pub left: u32,
    pub h: u32,
    pub w: u32,
    /// 1 if the crop was flipped horizontally, else 0.
    pub hflip: u32,
}

impl CropMeta {
    /// The official signed normalised box `(row0, col0, row1, col1)`: first/last pixel rows and
    /// columns over (H−1) and (W−1); columns swapped when flipped (udi-spec §1.2).
    /// Computed in f64 (the official code uses f32; differences are < 1e-7 relative).
    pub fn signed_box(&self) -> [f64; 4] {
        let hd = (self.img_h.max(2) - 1) as f64;
        let wd = (self.img_w.max(2) - 1) as f64;
        let r0 = self.top as f64 / hd;
        let c0 = self.left as f64 / wd;
        let r1 = (self.top + self.h - 1) as f64 / hd;
        let c1 = (self.left + self.w - 1) as f64 / wd;
        if self.hflip != 0 {
            [r0, c1, r1, c0]
        } else {
            [r0, c0, r1, c1]
        }
    }
}

/// One SRS sample of one pair (see module docs). 28 bytes, no padding surprises.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct SrsRow {
    /// Source patch index (row-major in the source crop's grid).
    pub src: u16,
    /// Padding, always 0.
    pub _pad: u16,
    /// Target-grid corner indices (row-major in the target global grid).
    pub tgt: [u16; 4],
    /// Bilinear weights of the four corners (sum to 1 for a valid row).
    pub w: [f32; 4],
}

impl SrsRow {
    /// Adds this row's bilinear weights into a dense T-row of `n_target` cells.
    pub fn dense_t(&self, out: &mut [f32]) {
        for (c, w) in self.tgt.iter().zip(self.w) {
            out[*c as usize] += w;
        }
    }
}

/// One crop's photometric decisions (udi-spec §1.4), as the loader drew them: written for every
/// crop into the batch, applied by the loader or by the trainer
/// ([`crate::config::PhotometricAt`]). 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct PhotoRecord {
    /// Colour-jitter ops in application order, torchvision's `fn_idx` numbering
    /// ([`Self::BRIGHTNESS`] ..); meaningful only with [`Self::JITTER`].
    pub order: [u8; 4],
    /// [`Self::JITTER`] | [`Self::GRAYSCALE`] | [`Self::BLUR`] | [`Self::SOLARIZE`].
    pub flags: u32,
    /// Jitter factors (ImageEnhance factors; `hue` is torchvision's hue factor in [−0.5, 0.5]).
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    /// Gaussian blur σ, with [`Self::BLUR`].
    pub blur_sigma: f32,
    /// Padding, always 0.
    pub _pad: u32,
}

impl PhotoRecord {
    pub const BRIGHTNESS: u8 = 0;
    pub const CONTRAST: u8 = 1;
    pub const SATURATION: u8 = 2;
    pub const HUE: u8 = 3;
    pub const JITTER: u32 = 1;
    pub const GRAYSCALE: u32 = 2;
    pub const BLUR: u32 = 4;
    pub const SOLARIZE: u32 = 8;

    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// Pair index of (global view `v` → global view `1 - v`).
pub const fn global_pair(v: usize) -> usize {
    v
}

/// Pair index of (local crop `k` → global view `t`).
pub const fn local_pair(k: usize, t: usize) -> usize {
    2 + 2 * k + t
}

/// Everything the crop engine produces for one sample; the batch writer packs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Global dataset index of the sample.
    pub index: u64,
    /// Class label (-1 when unlabelled).
    pub label: i32,
    /// The two global crops, uint8 RGB interleaved, `[2][S_g][S_g][3]`.
    pub globals: Vec<u8>,
    /// The local crops, `[L][S_l][S_l][3]`.
    pub locals: Vec<u8>,
    /// Crop rectangles, `2 + L` entries (g0, g1, l0..).
    pub crops: Vec<CropMeta>,
    /// The shared global SRS mask: `global_samples` cell indices, row-major order, ascending.
    pub global_mask: Vec<u16>,
    /// The shared local SRS mask: `local_samples` cell indices.
    pub local_mask: Vec<u16>,
    /// Valid-row counts per pair, `2 + 2L` entries.
    pub n_valid: Vec<u32>,
    /// Rows of every pair, concatenated in pair order: 2 global pairs × `global_samples`, then
    /// 2L local pairs × `local_samples`.
    pub rows: Vec<SrsRow>,
    /// Photometric decisions per crop, `2 + L` entries (g0, g1, l0..).
    pub photo: Vec<PhotoRecord>,
}

/// Anything that turns (epoch, sample index) into a finished [`Sample`]: the crop engine over a
/// dataset in the loader, synthetic sources in tests. Must be deterministic in its arguments.
pub trait SampleSource: Send + Sync {
    /// Number of samples in the dataset.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Builds sample `index` of `epoch`. A record that cannot be decoded is replaced by the next
    /// decodable index (deterministically), and `Sample::index` names the record actually used.
    fn produce(&self, epoch: u64, index: u64) -> anyhow::Result<Sample>;
}
