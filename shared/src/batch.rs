//! BATCH LAYOUT: the bytes of one finished batch, as written into a ring slot (and as built by
//! the in-process pipeline). Everything is little-endian, native `repr(C)`, each section starts on
//! a 64-byte boundary, in this order:
//!
//! | section | type | shape |
//! |---|---|---|
//! | header | [`BatchHeader`] | 1 |
//! | globals | u8 | [2][B][S_g][S_g][3] (view-major: view v of all samples is contiguous) |
//! | locals | u8 | [L][B][S_l][S_l][3] |
//! | labels | i32 | [B] |
//! | indices | u64 | [B] (global sample index) |
//! | crops | [`CropMeta`] | [B][2+L] |
//! | global_mask | u16 | [B][n_g] |
//! | local_mask | u16 | [B][n_l] |
//! | n_valid | u32 | [B][2+2L] |
//! | global_rows | [`SrsRow`] | [B][2][n_g] (pairs 0, 1) |
//! | local_rows | [`SrsRow`] | [B][2L][n_l] (pairs 2..2+2L) |
//! | photo | [`PhotoRecord`] | [B][2+L] (crop order g0, g1, l0..) |
//!
//! Crops are uint8 RGB, HWC: the trainer normalises (mean/std of udi-spec §1.1) on its device.
//! When the header's flags hold [`BatchHeader::PHOTOMETRIC_PENDING`] the crops are only
//! geometric (cropped, resized, flipped) and the trainer applies the `photo` records first.

use crate::config::AugmentConfig;
use crate::geometry::{CropMeta, PhotoRecord, Sample, SrsRow};
use bytemuck::{Pod, Zeroable};
use std::ops::Range;

pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"UDIb");

/// First bytes of every batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BatchHeader {
    pub magic: u32,
    pub batch_size: u32,
    pub epoch: u64,
    /// Batch number within the epoch.
    pub batch: u64,
    pub n_local: u32,
    pub global_size: u32,
    pub local_size: u32,
    pub n_global_samples: u32,
    pub n_local_samples: u32,
    /// [`Self::PHOTOMETRIC_PENDING`] or 0.
    pub flags: u32,
}

impl BatchHeader {
    /// The crops still need the photometric pipeline of their `photo` records
    /// (`[augment] photometric = "device"`).
    pub const PHOTOMETRIC_PENDING: u32 = 1;
}

/// Section offsets of a batch for one (augment config, batch size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    pub batch_size: usize,
    pub n_local: usize,
    pub global_size: usize,
    pub local_size: usize,
    pub n_g: usize,
    pub n_l: usize,
    pub globals: Range<usize>,
    pub locals: Range<usize>,
    pub labels: Range<usize>,
    pub indices: Range<usize>,
    pub crops: Range<usize>,
    pub global_mask: Range<usize>,
    pub local_mask: Range<usize>,
    pub n_valid: Range<usize>,
    pub global_rows: Range<usize>,
    pub local_rows: Range<usize>,
    pub photo: Range<usize>,
    /// Total bytes, a multiple of 64.
    pub total: usize,
}

fn align64(x: usize) -> usize {
    (x + 63) & !63
}

impl BatchLayout {
    pub fn new(aug: &AugmentConfig, batch_size: u32) -> Self {
        let b = batch_size as usize;
        let l = aug.n_local as usize;
        let sg = aug.global_size as usize;
        let sl = aug.local_size as usize;
        let n_g = aug.global_samples() as usize;
        let n_l = aug.local_samples() as usize;
        let mut at = align64(std::mem::size_of::<BatchHeader>());
        let mut section = |bytes: usize| {
            let r = at..at + bytes;
            at = align64(at + bytes);
            r
        };
        let globals = section(2 * b * sg * sg * 3);
        let locals = section(l * b * sl * sl * 3);
        let labels = section(4 * b);
        let indices = section(8 * b);
        let crops = section(std::mem::size_of::<CropMeta>() * b * (2 + l));
        let global_mask = section(2 * b * n_g);
        let local_mask = section(2 * b * n_l);
        let n_valid = section(4 * b * (2 + 2 * l));
        let global_rows = section(std::mem::size_of::<SrsRow>() * b * 2 * n_g);
        let local_rows = section(std::mem::size_of::<SrsRow>() * b * 2 * l * n_l);
        let photo = section(std::mem::size_of::<PhotoRecord>() * b * (2 + l));
        Self {
            batch_size: b,
            n_local: l,
            global_size: sg,
            local_size: sl,
            n_g,
            n_l,
            globals,
            locals,
            labels,
            indices,
            crops,
            global_mask,
            local_mask,
            n_valid,
            global_rows,
            local_rows,
            photo,
            total: at,
        }
    }

    pub fn n_pairs(&self) -> usize {
        2 + 2 * self.n_local
    }
    fn global_crop_bytes(&self) -> usize {
        self.global_size * self.global_size * 3
    }
    fn local_crop_bytes(&self) -> usize {
        self.local_size * self.local_size * 3
    }
}

/// Read access to a batch's bytes.
pub struct BatchView<'a> {
    pub layout: &'a BatchLayout,
    pub bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Wraps `bytes` (at least `layout.total` long, 8-byte aligned) after checking the header.
    pub fn new(layout: &'a BatchLayout, bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.len() < layout.total {
            return Err(format!(
                "batch buffer has {} bytes, layout needs {}",
                bytes.len(),
                layout.total
            ));
        }
        let v = Self {
            layout,
            bytes: &bytes[..layout.total],
        };
        let h = v.header();
        if h.magic != BATCH_MAGIC
            || h.batch_size as usize != layout.batch_size
            || h.n_local as usize != layout.n_local
        {
            return Err(format!("batch header does not match the layout: {h:?}"));
        }
        Ok(v)
    }
    pub fn header(&self) -> BatchHeader {
        bytemuck::pod_read_unaligned(&self.bytes[..std::mem::size_of::<BatchHeader>()])
    }
    /// Global view `v` of all samples: `[B][S_g][S_g][3]`.
    pub fn global_view(&self, v: usize) -> &'a [u8] {
        let n = self.layout.batch_size * self.layout.global_crop_bytes();
        &self.bytes[self.layout.globals.start + v * n..][..n]
    }
    /// Local crop `k` of all samples: `[B][S_l][S_l][3]`.
    pub fn local_view(&self, k: usize) -> &'a [u8] {
        let n = self.layout.batch_size * self.layout.local_crop_bytes();
        &self.bytes[self.layout.locals.start + k * n..][..n]
    }
    pub fn labels(&self) -> &'a [i32] {
        bytemuck::cast_slice(&self.bytes[self.layout.labels.clone()])
    }
    pub fn indices(&self) -> &'a [u64] {
        bytemuck::cast_slice(&self.bytes[self.layout.indices.clone()])
    }
    /// `[B][2+L]`.
    pub fn crops(&self) -> &'a [CropMeta] {
        bytemuck::cast_slice(&self.bytes[self.layout.crops.clone()])
    }
    pub fn global_mask(&self) -> &'a [u16] {
        bytemuck::cast_slice(&self.bytes[self.layout.global_mask.clone()])
    }
    pub fn local_mask(&self) -> &'a [u16] {
        bytemuck::cast_slice(&self.bytes[self.layout.local_mask.clone()])
    }
    /// `[B][2+2L]`.
    pub fn n_valid(&self) -> &'a [u32] {
        bytemuck::cast_slice(&self.bytes[self.layout.n_valid.clone()])
    }
    /// Photometric records `[B][2+L]` (crop order g0, g1, l0..).
    pub fn photo(&self) -> &'a [PhotoRecord] {
        bytemuck::cast_slice(&self.bytes[self.layout.photo.clone()])
    }
    /// The crops still need their photometric pipeline (see [`BatchHeader::PHOTOMETRIC_PENDING`]).
    pub fn photometric_pending(&self) -> bool {
        self.header().flags & BatchHeader::PHOTOMETRIC_PENDING != 0
    }
    /// The rows of pair `p` of sample `b` (16 for p < 2, else 9; valid rows first).
    pub fn pair_rows(&self, b: usize, p: usize) -> &'a [SrsRow] {
        let l = self.layout;
        if p < 2 {
            let all: &[SrsRow] = bytemuck::cast_slice(&self.bytes[l.global_rows.clone()]);
            &all[(b * 2 + p) * l.n_g..][..l.n_g]
        } else {
            let all: &[SrsRow] = bytemuck::cast_slice(&self.bytes[l.local_rows.clone()]);
            &all[(b * 2 * l.n_local + (p - 2)) * l.n_l..][..l.n_l]
        }
    }
    /// xxh3-64 of the whole batch: equal hashes ⇔ (practically) byte-identical batches.
    pub fn hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.bytes)
    }
}

/// Write access: the header once, then each sample into its place.
pub struct BatchWriter<'a> {
    pub layout: &'a BatchLayout,
    pub bytes: &'a mut [u8],
}

impl<'a> BatchWriter<'a> {
    /// `bytes` must be at least `layout.total` long and 8-byte aligned (a ring slot or a
    /// `Vec<u64>`-backed buffer); the header is written immediately.
    pub fn new(
        layout: &'a BatchLayout,
        bytes: &'a mut [u8],
        epoch: u64,
        batch: u64,
        aug: &AugmentConfig,
    ) -> Self {
        assert!(bytes.len() >= layout.total, "batch buffer too small");
        assert_eq!(
            bytes.as_ptr() as usize % 8,
            0,
            "batch buffer must be 8-byte aligned"
        );
        let header = BatchHeader {
            magic: BATCH_MAGIC,
            batch_size: layout.batch_size as u32,
            epoch,
            batch,
            n_local: layout.n_local as u32,
            global_size: aug.global_size,
            local_size: aug.local_size,
            n_global_samples: layout.n_g as u32,
            n_local_samples: layout.n_l as u32,
            flags: if aug.photometric.is_loader() {
                0
            } else {
                BatchHeader::PHOTOMETRIC_PENDING
            },
        };
        let hb = std::mem::size_of::<BatchHeader>();
        bytes[..hb].copy_from_slice(bytemuck::bytes_of(&header));
        // Padding between sections is zeroed so that equal contents hash equally.
        bytes[hb..layout.total].fill(0);
        Self { layout, bytes }
    }

    /// Copies sample `s` into position `b` (panics if its shapes disagree with the layout).
    pub fn write_sample(&mut self, b: usize, s: &Sample) {
        let l = self.layout;
        let gb = l.global_crop_bytes();
        let lb = l.local_crop_bytes();
        assert_eq!(
            s.globals.len(),
            2 * gb,
            "sample {}: global crop bytes",
            s.index
        );
        assert_eq!(
            s.locals.len(),
            l.n_local * lb,
            "sample {}: local crop bytes",
            s.index
        );
        assert_eq!(s.crops.len(), 2 + l.n_local);
        assert_eq!(s.global_mask.len(), l.n_g);
        assert_eq!(s.local_mask.len(), l.n_l);
        assert_eq!(s.n_valid.len(), l.n_pairs());
        assert_eq!(s.rows.len(), 2 * l.n_g + 2 * l.n_local * l.n_l);
        assert_eq!(
            s.photo.len(),
            2 + l.n_local,
            "sample {}: photo records",
            s.index
        );
        let bsz = l.batch_size;
        for v in 0..2 {
            let at = l.globals.start + (v * bsz + b) * gb;
            self.bytes[at..at + gb].copy_from_slice(&s.globals[v * gb..][..gb]);
        }
        for k in 0..l.n_local {
            let at = l.locals.start + (k * bsz + b) * lb;
            self.bytes[at..at + lb].copy_from_slice(&s.locals[k * lb..][..lb]);
        }
        self.put(l.labels.start + 4 * b, bytemuck::bytes_of(&s.label));
        self.put(l.indices.start + 8 * b, bytemuck::bytes_of(&s.index));
        let cm = std::mem::size_of::<CropMeta>() * (2 + l.n_local);
        self.put(l.crops.start + cm * b, bytemuck::cast_slice(&s.crops));
        self.put(
            l.global_mask.start + 2 * l.n_g * b,
            bytemuck::cast_slice(&s.global_mask),
        );
        self.put(
            l.local_mask.start + 2 * l.n_l * b,
            bytemuck::cast_slice(&s.local_mask),
        );
        self.put(
            l.n_valid.start + 4 * l.n_pairs() * b,
            bytemuck::cast_slice(&s.n_valid),
        );
        let row = std::mem::size_of::<SrsRow>();
        let (g_rows, l_rows) = s.rows.split_at(2 * l.n_g);
        self.put(
            l.global_rows.start + row * 2 * l.n_g * b,
            bytemuck::cast_slice(g_rows),
        );
        self.put(
            l.local_rows.start + row * 2 * l.n_local * l.n_l * b,
            bytemuck::cast_slice(l_rows),
        );
        let pr = std::mem::size_of::<PhotoRecord>() * (2 + l.n_local);
        self.put(l.photo.start + pr * b, bytemuck::cast_slice(&s.photo));
    }

    fn put(&mut self, at: usize, src: &[u8]) {
        self.bytes[at..at + src.len()].copy_from_slice(src);
    }
}

/// An owned, 8-byte-aligned batch buffer (for the in-process pipeline and tests).
pub struct OwnedBatch {
    words: Vec<u64>,
    len: usize,
}

impl OwnedBatch {
    pub fn zeroed(layout: &BatchLayout) -> Self {
        Self {
            words: vec![0u64; layout.total.div_ceil(8)],
            len: layout.total,
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{local_pair, SrsRow};

    fn fake_sample(aug: &AugmentConfig, index: u64) -> Sample {
        let l = aug.n_local as usize;
        let (n_g, n_l) = (aug.global_samples() as usize, aug.local_samples() as usize);
        let gb = (aug.global_size * aug.global_size * 3) as usize;
        let lb = (aug.local_size * aug.local_size * 3) as usize;
        let mut rows = vec![SrsRow::default(); 2 * n_g + 2 * l * n_l];
        for (i, r) in rows.iter_mut().enumerate() {
            r.src = (i as u16).wrapping_add(index as u16);
            r.w = [0.25; 4];
        }
        Sample {
            index,
            label: index as i32 % 3,
            globals: (0..2 * gb).map(|i| (i as u64 + index) as u8).collect(),
            locals: (0..l * lb).map(|i| (i as u64 * 7 + index) as u8).collect(),
            crops: (0..2 + l as u32)
                .map(|c| CropMeta {
                    img_h: 10,
                    img_w: 20,
                    top: c,
                    left: index as u32,
                    h: 5,
                    w: 5,
                    hflip: c % 2,
                })
                .collect(),
            global_mask: (0..n_g as u16).collect(),
            local_mask: (0..n_l as u16).map(|x| x + index as u16).collect(),
            n_valid: (0..2 + 2 * l as u32).map(|p| p + index as u32).collect(),
            rows,
            photo: (0..2 + l as u32)
                .map(|c| PhotoRecord {
                    order: [3, 1, 0, 2],
                    flags: c % 16,
                    brightness: 1.0 + c as f32,
                    blur_sigma: index as f32,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn write_then_read_round_trips_every_field() {
        let aug = AugmentConfig {
            global_size: 32,
            local_size: 16,
            n_local: 3,
            global_window: 1,
            ..Default::default()
        };
        let layout = BatchLayout::new(&aug, 4);
        assert_eq!(layout.total % 64, 0);
        let samples: Vec<Sample> = (0..4).map(|i| fake_sample(&aug, 100 + i)).collect();
        let mut buf = OwnedBatch::zeroed(&layout);
        {
            let mut w = BatchWriter::new(&layout, buf.bytes_mut(), 3, 9, &aug);
            for (b, s) in samples.iter().enumerate() {
                w.write_sample(b, s);
            }
        }
        let v = BatchView::new(&layout, buf.bytes()).unwrap();
        assert_eq!((v.header().epoch, v.header().batch), (3, 9));
        assert_eq!(v.indices(), &[100, 101, 102, 103]);
        let gb = 32 * 32 * 3;
        let lb = 16 * 16 * 3;
        for (b, s) in samples.iter().enumerate() {
            assert_eq!(&v.global_view(1)[b * gb..][..gb], &s.globals[gb..]);
            assert_eq!(&v.local_view(2)[b * lb..][..lb], &s.locals[2 * lb..]);
            assert_eq!(v.labels()[b], s.label);
            assert_eq!(&v.crops()[b * 5..][..5], &s.crops[..]);
            assert_eq!(&v.n_valid()[b * 8..][..8], &s.n_valid[..]);
            assert_eq!(v.pair_rows(b, 1), &s.rows[layout.n_g..2 * layout.n_g]);
            let p = local_pair(1, 0);
            let off = 2 * layout.n_g + (p - 2) * layout.n_l;
            assert_eq!(v.pair_rows(b, p), &s.rows[off..off + layout.n_l]);
            assert_eq!(
                &v.local_mask()[b * layout.n_l..][..layout.n_l],
                &s.local_mask[..]
            );
            assert_eq!(&v.photo()[b * 5..][..5], &s.photo[..]);
        }
        assert!(!v.photometric_pending());
        let h = v.hash();
        buf.bytes_mut()[layout.locals.start + 5] ^= 1;
        assert_ne!(BatchView::new(&layout, buf.bytes()).unwrap().hash(), h);
    }

    #[test]
    fn device_photometric_is_flagged_in_the_header() {
        let aug = AugmentConfig {
            photometric: crate::config::PhotometricAt::Device,
            ..Default::default()
        };
        let layout = BatchLayout::new(&aug, 2);
        let mut buf = OwnedBatch::zeroed(&layout);
        BatchWriter::new(&layout, buf.bytes_mut(), 0, 0, &aug);
        assert!(BatchView::new(&layout, buf.bytes())
            .unwrap()
            .photometric_pending());
    }

    #[test]
    fn layout_of_the_paper_recipe() {
        let layout = BatchLayout::new(&AugmentConfig::default(), 128);
        // 577,536 crop bytes per image (2·224²·3 + 10·96²·3).
        assert_eq!(layout.globals.len() + layout.locals.len(), 128 * 577_536);
    }
}
