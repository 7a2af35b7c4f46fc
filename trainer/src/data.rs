//! From the shared BATCH LAYOUT to device tensors the model and loss consume.
//!
//! [`TrainBatch`] (B images, L local crops, global grid G_g, local grid G_l, n_g / n_l SRS
//! samples per global / local pair; "view-major" = index v·B + b):
//!
//! | field | shape | meaning |
//! |---|---|---|
//! | `globals` | [2B, 3, S_g, S_g] | normalised global views, view-major |
//! | `locals` | [L·B, 3, S_l, S_l] | normalised local crops, crop-major (k·B + b); `None` if L = 0 |
//! | `student_rows` | [2B, n_g, G_g²] | one-hot S-rows of pair v (g_v → g_v̄) for student view v |
//! | `teacher_rows` | [2B, n_g + L·n_l, G_g²] | bilinear T-rows read on teacher view u: first the n_g rows of pair ū (g_ū → g_u), then for k = 0..L the n_l rows of pair (l_k → g_u) |
//! | `valid_g` | [2, B, n_g] | 1 for valid rows of pair v (indexed by the *student* view v) |
//! | `valid_l` | [2, B, L, n_l] | 1 for valid rows of pair (l_k → g_t), indexed [t, b, k, r] |
//!
//! Invalid rows are all-zero in both row tensors. The local pairs' S-rows are never used by any
//! loss (udi-spec §2.4) and are not materialised.

use crate::config::TrainConfig;
use crate::staging::{HostStage, StageLayout, Staged, Upload};
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use shared::batch::{BatchLayout, BatchView, BatchWriter, OwnedBatch};
use shared::config::AugmentConfig;
use shared::geometry::{CropMeta, PhotoRecord, Sample, SrsRow};
use std::collections::HashMap;

pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One batch on the device (see module docs for shapes).
#[derive(Clone)]
pub struct TrainBatch {
    pub batch_size: usize,
    pub n_local: usize,
    pub globals: Tensor,
    pub locals: Option<Tensor>,
    pub student_rows: Tensor,
    pub teacher_rows: Tensor,
    pub valid_g: Tensor,
    pub valid_l: Tensor,
    pub labels: Vec<i32>,
}

/// Row data of a batch in the loader's compact layout, on the host.
pub struct HostRows<'a> {
    pub batch_size: usize,
    pub n_local: usize,
    /// `[B][2+2L]`.
    pub n_valid: &'a [u32],
    /// Rows of (sample b, pair p).
    pub rows: &'a dyn Fn(usize, usize) -> &'a [SrsRow],
}

/// Writes the dense row tensors of `h` (f32, the [`TrainBatch`] layout) into `out`: student rows,
/// teacher rows, valid_g, valid_l, one after the other ([`StageLayout`]).
pub(crate) fn dense_rows(aug: &AugmentConfig, h: &HostRows, out: &mut [f32]) -> Result<()> {
    let (b_sz, l) = (h.batch_size, h.n_local);
    let n_g = aug.global_samples() as usize;
    let n_l = aug.local_samples() as usize;
    let ng2 = (aug.global_grid() * aug.global_grid()) as usize;
    let nl2 = (aug.local_grid() * aug.local_grid()) as usize;
    let n_pairs = 2 + 2 * l;
    ensure!(
        h.n_valid.len() == b_sz * n_pairs,
        "n_valid has {} entries, expected {}",
        h.n_valid.len(),
        b_sz * n_pairs
    );
    ensure!(
        l == aug.n_local as usize,
        "batch has {l} local crops, [augment] n_local = {}",
        aug.n_local
    );
    let rt = n_g + l * n_l;
    let parts = StageLayout::new(aug, b_sz).row_parts;
    ensure!(
        out.len() == parts[3].0.end,
        "row buffer of {} values",
        out.len()
    );
    out.fill(0.0);
    let (student, rest) = out.split_at_mut(parts[1].0.start);
    let (teacher, rest) = rest.split_at_mut(parts[2].0.start - parts[1].0.start);
    let (valid_g, valid_l) = rest.split_at_mut(parts[3].0.start - parts[2].0.start);
    for b in 0..b_sz {
        for p in 0..n_pairs {
            let rows = (h.rows)(b, p);
            let n_rows = if p < 2 { n_g } else { n_l };
            let src_cells = if p < 2 { ng2 } else { nl2 };
            ensure!(
                rows.len() == n_rows,
                "sample {b} pair {p}: {} rows, expected {n_rows}",
                rows.len()
            );
            let nv = h.n_valid[b * n_pairs + p] as usize;
            ensure!(
                nv <= n_rows,
                "sample {b} pair {p}: n_valid {nv} > {n_rows} rows"
            );
            for (r, row) in rows.iter().take(nv).enumerate() {
                ensure!(
                    (row.src as usize) < src_cells,
                    "sample {b} pair {p} row {r}: src {} out of range",
                    row.src
                );
                let wsum: f32 = row.w.iter().sum();
                ensure!(
                    wsum > 0.0 && row.w.iter().all(|w| w.is_finite()),
                    "sample {b} pair {p} row {r}: bad weights {:?}",
                    row.w
                );
                for &c in &row.tgt {
                    ensure!(
                        (c as usize) < ng2,
                        "sample {b} pair {p} row {r}: target cell {c} out of range"
                    );
                }
                // Target view and row slot in `teacher_rows`.
                let (u, slot) = if p < 2 {
                    (1 - p, r)
                } else {
                    ((p - 2) % 2, n_g + ((p - 2) / 2) * n_l + r)
                };
                let t_off = ((u * b_sz + b) * rt + slot) * ng2;
                row.dense_t(&mut teacher[t_off..t_off + ng2]);
                if p < 2 {
                    student[((p * b_sz + b) * n_g + r) * ng2 + row.src as usize] = 1.0;
                    valid_g[(p * b_sz + b) * n_g + r] = 1.0;
                } else {
                    let (k, t) = ((p - 2) / 2, (p - 2) % 2);
                    valid_l[((t * b_sz + b) * l + k) * n_l + r] = 1.0;
                }
            }
        }
    }
    Ok(())
}

/// Normalises uint8 HWC crops `[N, S, S, 3]` (on their device) to NCHW `[N, 3, S, S]` of
/// `dtype` (`(x/255 − mean)/std` in f32, as torchvision's ToTensor + Normalize). With `photo`
/// (one record per crop, `[augment] photometric = "device"`), the photometric pipeline runs
/// first, on the same device. Without it, one kernel on CUDA (`kernels::normalise_crops`, the
/// same bits as the composed ops).
pub fn normalise(pixels: &Tensor, photo: Option<&[PhotoRecord]>, dtype: DType) -> Result<Tensor> {
    let n = pixels.dim(0)?;
    let t = match photo {
        Some(records) => {
            ensure!(
                records.len() == n,
                "{} photometric records for {n} crops",
                records.len()
            );
            crate::photometric::apply(&pixels.to_dtype(DType::F32)?, records)?
        }
        None => pixels.clone(),
    };
    let fused = photo.is_none() && pixels.device().is_cuda();
    Ok(crate::kernels::normalise_crops(&t, MEAN, STD, fused)?.to_dtype(dtype)?)
}

impl TrainBatch {
    /// Builds a batch from the shared layout; images are normalised on `device` in `dtype`.
    pub fn from_view_dtype(
        view: &BatchView,
        aug: &AugmentConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut buf = HostStage::default();
        let staged = Staged::from_view(view, aug, &mut buf)?;
        Self::from_staged(&staged, &buf.upload(device), aug, dtype)
    }

    /// Makes the batch's tensors from a staged batch: crops and rows through `up`, crops
    /// normalised on the device they land on.
    pub fn from_staged(
        s: &Staged,
        up: &dyn Upload,
        aug: &AugmentConfig,
        dtype: DType,
    ) -> Result<Self> {
        let sl = StageLayout::new(aug, s.batch_size);
        let l = aug.n_local as usize;
        let (g_photo, l_photo) = match &s.photo {
            Some((g, l)) => (Some(&g[..]), Some(&l[..])),
            None => (None, None),
        };
        let globals = normalise(
            &up.pixels(sl.globals.0.clone(), &sl.globals.1)?,
            g_photo,
            dtype,
        )?;
        let locals = match l {
            0 => None,
            _ => Some(normalise(
                &up.pixels(sl.locals.0.clone(), &sl.locals.1)?,
                l_photo,
                dtype,
            )?),
        };
        let rows = row_tensors(sl, up, dtype)?;
        Ok(Self::with_rows(
            s.batch_size,
            l,
            globals,
            locals,
            rows,
            s.labels.clone(),
        ))
    }

    fn with_rows(
        batch_size: usize,
        n_local: usize,
        globals: Tensor,
        locals: Option<Tensor>,
        [student_rows, teacher_rows, valid_g, valid_l]: [Tensor; 4],
        labels: Vec<i32>,
    ) -> Self {
        Self {
            batch_size,
            n_local,
            globals,
            locals,
            student_rows,
            teacher_rows,
            valid_g,
            valid_l,
            labels,
        }
    }

    /// [`Self::from_view_dtype`] in f32 (training).
    pub fn from_view(view: &BatchView, aug: &AugmentConfig, device: &Device) -> Result<Self> {
        Self::from_view_dtype(view, aug, DType::F32, device)
    }

    /// Builds the row tensors from host rows and wraps already-normalised images.
    pub fn assemble(
        aug: &AugmentConfig,
        host: &HostRows,
        globals: Tensor,
        locals: Option<Tensor>,
        labels: Vec<i32>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let sl = StageLayout::new(aug, host.batch_size);
        let mut buf = HostStage {
            pixels: Vec::new(),
            rows: vec![0f32; sl.rows],
        };
        dense_rows(aug, host, &mut buf.rows)?;
        let rows = row_tensors(sl, &buf.upload(device), dtype)?;
        Ok(Self::with_rows(
            host.batch_size,
            host.n_local,
            globals,
            locals,
            rows,
            labels,
        ))
    }
}

/// student_rows, teacher_rows, valid_g, valid_l from the row buffer through `up`, in `dtype`.
/// An empty part (valid_l when L = 0, which nothing reads) is made on the host: the CUDA driver
/// refuses zero-byte allocations.
fn row_tensors(sl: StageLayout, up: &dyn Upload, dtype: DType) -> Result<[Tensor; 4]> {
    let [a, b, c, d] = sl.row_parts.map(|(range, shape)| {
        let t = match range.is_empty() {
            true => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
            false => up.rows(range, &shape)?,
        };
        Ok::<_, anyhow::Error>(t.to_dtype(dtype)?)
    });
    Ok([a?, b?, c?, d?])
}

/// A random but well-formed sample: random pixels, random valid-row counts (including zero for
/// some local pairs), random source cells and bilinear target rows built like the loader's.
pub fn synthetic_sample(aug: &AugmentConfig, rng: &mut impl Rng, index: u64) -> Sample {
    let l = aug.n_local as usize;
    let (n_g, n_l) = (aug.global_samples() as usize, aug.local_samples() as usize);
    let (gg, gl) = (aug.global_grid() as usize, aug.local_grid() as usize);
    let sg = aug.global_size as usize;
    let sl = aug.local_size as usize;
    let mut rows = Vec::new();
    let mut n_valid = Vec::new();
    for p in 0..2 + 2 * l {
        let (n, src_cells) = if p < 2 {
            (n_g, gg * gg)
        } else {
            (n_l, gl * gl)
        };
        // Global pairs keep at least one valid row (as the loader's always do in practice).
        let nv = if p < 2 {
            rng.random_range(1..=n)
        } else {
            rng.random_range(0..=n)
        };
        n_valid.push(nv as u32);
        for r in 0..n {
            if r >= nv {
                rows.push(SrsRow::default());
                continue;
            }
            let u = rng.random::<f64>() * (gg - 1) as f64;
            let v = rng.random::<f64>() * (gg - 1) as f64;
            let (fu, fv) = (u.floor(), v.floor());
            let (cu, cv) = (
                (fu + 1.0).min((gg - 1) as f64),
                (fv + 1.0).min((gg - 1) as f64),
            );
            let (fu_i, fv_i, cu_i, cv_i) = (fu as usize, fv as usize, cu as usize, cv as usize);
            let w = [
                (fu + 1.0 - u) * (fv + 1.0 - v),
                (fu + 1.0 - u) * (v - fv),
                (u - fu) * (fv + 1.0 - v),
                (u - fu) * (v - fv),
            ];
            rows.push(SrsRow {
                src: rng.random_range(0..src_cells) as u16,
                _pad: 0,
                tgt: [
                    (fu_i * gg + fv_i) as u16,
                    (fu_i * gg + cv_i) as u16,
                    (cu_i * gg + fv_i) as u16,
                    (cu_i * gg + cv_i) as u16,
                ],
                w: w.map(|x| x as f32),
            });
        }
    }
    Sample {
        index,
        label: (index % 10) as i32,
        globals: (0..2 * sg * sg * 3).map(|_| rng.random::<u8>()).collect(),
        locals: (0..l * sl * sl * 3).map(|_| rng.random::<u8>()).collect(),
        crops: vec![CropMeta::default(); 2 + l],
        global_mask: vec![0; n_g],
        local_mask: vec![0; n_l],
        n_valid,
        rows,
        photo: vec![shared::geometry::PhotoRecord::default(); 2 + l],
    }
}

/// A whole synthetic batch in the shared layout (`seed` picks the content).
pub fn synthetic_batch(
    aug: &AugmentConfig,
    batch_size: u32,
    seed: u64,
) -> (BatchLayout, OwnedBatch) {
    let layout = BatchLayout::new(aug, batch_size);
    let mut buf = OwnedBatch::zeroed(&layout);
    {
        let mut w = BatchWriter::new(&layout, buf.bytes_mut(), 0, 0, aug);
        let mut rng = shared::rng::rng_for(seed, shared::rng::Domain::Crops, u64::MAX, 0);
        for b in 0..batch_size as usize {
            w.write_sample(b, &synthetic_sample(aug, &mut rng, b as u64));
        }
    }
    (layout, buf)
}

/// The debug batch file (safetensors) — see the README "debug-step" section:
///
/// | name | dtype | shape |
/// |---|---|---|
/// | `globals` | F32 | [2B, 3, S_g, S_g] normalised, view-major |
/// | `locals` | F32 | [L·B, 3, S_l, S_l] normalised, crop-major (absent when L = 0) |
/// | `n_valid` | U32 | [B, 2+2L] |
/// | `global_rows.src` / `.tgt` / `.w` | U32 / U32 / F32 | [B, 2, n_g] / [B, 2, n_g, 4] / [B, 2, n_g, 4] |
/// | `local_rows.src` / `.tgt` / `.w` | U32 / U32 / F32 | [B, 2L, n_l] / [B, 2L, n_l, 4] / [B, 2L, n_l, 4] |
/// | `center.cls`, `center.udi`, `center.patch` | F32 | [K] |
/// | `epoch`, `step` | I64 | [1] |
///
/// Rows follow the loader's layout exactly (`shared::geometry`): pair p = 0: g0→g1, 1: g1→g0,
/// 2+2k+t: local k → global t; valid rows first; corner order (fu,fv),(fu,cv),(cu,fv),(cu,cv).
pub fn batch_file_tensors(
    view: &BatchView,
    aug: &AugmentConfig,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let lay = view.layout;
    let (b, l) = (lay.batch_size, lay.n_local);
    let tb = TrainBatch::from_view(view, aug, device)?;
    let mut m = HashMap::new();
    m.insert("globals".to_string(), tb.globals);
    if let Some(x) = tb.locals {
        m.insert("locals".to_string(), x);
    }
    m.insert(
        "n_valid".to_string(),
        Tensor::from_slice(view.n_valid(), (b, 2 + 2 * l), device)?,
    );
    for (name, pairs, n, off) in [
        ("global_rows", 2, lay.n_g, 0),
        ("local_rows", 2 * l, lay.n_l, 2),
    ] {
        let (mut src, mut tgt, mut w) = (vec![], vec![], vec![]);
        for bb in 0..b {
            for p in 0..pairs {
                for r in view.pair_rows(bb, p + off) {
                    src.push(r.src as u32);
                    tgt.extend(r.tgt.iter().map(|&c| c as u32));
                    w.extend_from_slice(&r.w);
                }
            }
        }
        if pairs == 0 {
            continue;
        }
        m.insert(
            format!("{name}.src"),
            Tensor::from_vec(src, (b, pairs, n), device)?,
        );
        m.insert(
            format!("{name}.tgt"),
            Tensor::from_vec(tgt, (b, pairs, n, 4), device)?,
        );
        m.insert(
            format!("{name}.w"),
            Tensor::from_vec(w, (b, pairs, n, 4), device)?,
        );
    }
    Ok(m)
}

/// Reads a debug batch file's images and rows back into a [`TrainBatch`].
pub fn batch_from_file_tensors(
    m: &HashMap<String, Tensor>,
    aug: &AugmentConfig,
    dtype: DType,
    device: &Device,
    what: &str,
) -> Result<TrainBatch> {
    let get = |k: &str| {
        m.get(k)
            .ok_or_else(|| anyhow::anyhow!("{what}: missing tensor {k}"))
    };
    let globals = get("globals")?.to_dtype(dtype)?.to_device(device)?;
    let (b2, _, sg, _) = globals.dims4()?;
    ensure!(
        b2 % 2 == 0 && sg == aug.global_size as usize,
        "{what}: globals shape {:?} does not match the config",
        globals.dims()
    );
    let b = b2 / 2;
    let l = aug.n_local as usize;
    let locals = if l > 0 {
        Some(get("locals")?.to_dtype(dtype)?.to_device(device)?)
    } else {
        None
    };
    let n_valid: Vec<u32> = get("n_valid")?.flatten_all()?.to_vec1()?;
    let mut rows_all: Vec<Vec<SrsRow>> = vec![Vec::new(); b * (2 + 2 * l)];
    for (name, pairs, off) in [("global_rows", 2, 0), ("local_rows", 2 * l, 2)] {
        if pairs == 0 {
            continue;
        }
        let src: Vec<u32> = get(&format!("{name}.src"))?.flatten_all()?.to_vec1()?;
        let tgt: Vec<u32> = get(&format!("{name}.tgt"))?.flatten_all()?.to_vec1()?;
        let w: Vec<f32> = get(&format!("{name}.w"))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        ensure!(
            src.len().is_multiple_of(b * pairs),
            "{what}: {name}.src has a bad size"
        );
        let n = src.len() / (b * pairs);
        ensure!(
            tgt.len() == 4 * src.len() && w.len() == 4 * src.len(),
            "{what}: {name} tensors disagree in size"
        );
        for i in 0..src.len() {
            let (bb, p) = (i / (pairs * n), (i / n) % pairs);
            if src[i] > u16::MAX as u32
                || tgt[4 * i..4 * i + 4].iter().any(|&c| c > u16::MAX as u32)
            {
                bail!("{what}: {name} row {i} has an index over u16");
            }
            rows_all[bb * (2 + 2 * l) + p + off].push(SrsRow {
                src: src[i] as u16,
                _pad: 0,
                tgt: [
                    tgt[4 * i] as u16,
                    tgt[4 * i + 1] as u16,
                    tgt[4 * i + 2] as u16,
                    tgt[4 * i + 3] as u16,
                ],
                w: [w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]],
            });
        }
    }
    let rows_fn = |bb: usize, p: usize| rows_all[bb * (2 + 2 * l) + p].as_slice();
    let host = HostRows {
        batch_size: b,
        n_local: l,
        n_valid: &n_valid,
        rows: &rows_fn,
    };
    TrainBatch::assemble(aug, &host, globals, locals, vec![-1; b], dtype, device)
        .map_err(|e| anyhow::anyhow!("{what}: {e:#}"))
}

/// The batch layout of a config (its `[augment]` table and `[data] batch_size`).
pub fn layout_for(cfg: &TrainConfig) -> BatchLayout {
    BatchLayout::new(&cfg.augment, cfg.data.batch_size)
}
