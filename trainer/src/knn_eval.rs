//! `trainer knn`: teacher features of labelled images, then the weighted k-NN of [`crate::knn`].
//!
//! Image sets ([`open_images`]): a packed shard directory (`manifest.json`, labels from the
//! packer; pack train/ and val/ separately, with the same class folders) or a plain ImageFolder
//! (`DIR/<class>/<image>`, classes in sorted order). Images are decoded, resized and cropped by
//! [`crate::knn::eval_transform`] on worker threads, `chunk` at a time, so memory holds the
//! train features plus one chunk.

use crate::config::TrainConfig;
use crate::dist::{Collective, Single};
use crate::eval::features::FeatureSpec;
use crate::knn::{eval_transform, to_normalised_tensor, KnnIndex, KnnParams, KnnResult, KnnTally};
use crate::params::ParamStore;
use crate::vit::{ClassToken, Vit};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A labelled image set with random access.
pub trait LabelledImages: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn class_names(&self) -> Vec<String>;
    /// Label and decoded RGB8 image of item `i` (errors name the file or record).
    fn get(&self, i: usize) -> Result<(i32, RgbImage)>;
    /// Where item `i` comes from: the file, or the record's original path in the shards.
    fn source(&self, i: usize) -> String;
}

fn to_image(img: loader::decode::RgbImage) -> Result<RgbImage> {
    RgbImage::from_raw(img.width, img.height, img.data).context("decoded image buffer size")
}

/// A packed shard directory.
pub struct ShardImages {
    ds: shared::shard::Dataset,
}

impl LabelledImages for ShardImages {
    fn len(&self) -> usize {
        self.ds.len() as usize
    }
    fn class_names(&self) -> Vec<String> {
        self.ds.class_names().to_vec()
    }
    fn get(&self, i: usize) -> Result<(i32, RgbImage)> {
        let rec = self
            .ds
            .record_checked(i as u64)
            .with_context(|| format!("{}: record {i}", self.ds.dir().display()))?;
        let img =
            loader::decode::decode(&rec).with_context(|| format!("{}", self.ds.dir().display()))?;
        Ok((rec.label, to_image(img)?))
    }
    fn source(&self, i: usize) -> String {
        match self.ds.record(i as u64) {
            Ok(r) => r.path.to_string(),
            Err(_) => format!("{}: record {i}", self.ds.dir().display()),
        }
    }
}

/// `DIR/<class>/<file>`; classes sorted by name (torchvision's ImageFolder convention).
pub struct FolderImages {
    classes: Vec<String>,
    items: Vec<(PathBuf, i32)>,
}

impl FolderImages {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut classes: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        classes.sort();
        let mut items = Vec::new();
        for (c, name) in classes.iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(name))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            items.extend(files.into_iter().map(|p| (p, c as i32)));
        }
        ensure!(
            !items.is_empty(),
            "{}: no images (expected DIR/<class>/<image> or a packed shard dir)",
            dir.display()
        );
        Ok(Self { classes, items })
    }
}

impl LabelledImages for FolderImages {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn get(&self, i: usize) -> Result<(i32, RgbImage)> {
        let (p, l) = &self.items[i];
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let img = loader::decode::decode_bytes(&bytes)
            .with_context(|| format!("decoding {}", p.display()))?;
        Ok((*l, to_image(img)?))
    }
    fn source(&self, i: usize) -> String {
        self.items[i].0.display().to_string()
    }
}

/// A shard dir if it has a `manifest.json`, else an ImageFolder.
pub fn open_images(dir: &Path) -> Result<Box<dyn LabelledImages>> {
    if dir.join("manifest.json").is_file() {
        let ds = shared::shard::Dataset::open(dir)
            .with_context(|| format!("opening shards {}", dir.display()))?;
        ensure!(!ds.is_empty(), "{}: empty dataset", dir.display());
        Ok(Box::new(ShardImages { ds }))
    } else if dir.is_dir() {
        Ok(Box::new(FolderImages::open(dir)?))
    } else {
        bail!("{}: not a directory", dir.display())
    }
}

/// Decodes items `idx` and maps each through `transform(item, image)` on `threads` threads
/// (order kept): the eval transform here, the linear probe's train augmentation elsewhere.
pub fn load_items<T: Send>(
    set: &dyn LabelledImages,
    idx: &[usize],
    threads: usize,
    transform: &(dyn Fn(usize, &RgbImage) -> T + Sync),
) -> Result<(Vec<T>, Vec<i32>)> {
    let per = idx.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<(i32, T)>>> = std::thread::scope(|s| {
        let hs: Vec<_> = idx
            .chunks(per)
            .map(|c| {
                s.spawn(move || {
                    c.iter()
                        .map(|&i| set.get(i).map(|(l, im)| (l, transform(i, &im))))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("decode thread panicked"))
            .collect()
    });
    let mut out = Vec::with_capacity(idx.len());
    let mut labels = Vec::with_capacity(idx.len());
    for p in parts {
        for (l, x) in p? {
            labels.push(l);
            out.push(x);
        }
    }
    Ok((out, labels))
}

/// Items `range` through the evaluation transform (resize, centre crop).
fn load_chunk(
    set: &dyn LabelledImages,
    range: std::ops::Range<usize>,
    crop: u32,
    threads: usize,
) -> Result<(Vec<RgbImage>, Vec<i32>)> {
    let idx: Vec<usize> = range.collect();
    load_items(set, &idx, threads, &|_, im| eval_transform(im, crop))
}

/// Decode threads: one per core.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What maps a normalised image batch `[N, 3, S, S]` to features `[N, D]`.
#[derive(Clone, Copy)]
pub enum Extractor<'a> {
    /// A backbone's final-norm class token (the k-NN of udi-spec §5).
    Backbone(&'a Vit, ClassToken),
    /// The linear probe's feature: final-norm class tokens of the last blocks, concatenated.
    Probe(&'a Vit, FeatureSpec),
    /// The normalised pixels themselves, flattened: the baseline that checks the evaluation
    /// path (transform, labels, k-NN) independently of any network.
    RawPixels,
}

impl Extractor<'_> {
    pub fn extract(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Extractor::Backbone(vit, token) => vit.features(x, *token)?,
            Extractor::Probe(vit, spec) => spec.extract(vit, x)?,
            Extractor::RawPixels => x.flatten_from(1)?,
        })
    }
}

/// Features (`[N, D]`, on the CPU) of a whole set, `chunk` images at a time.
pub fn features(
    extractor: Extractor,
    set: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    device: &Device,
) -> Result<(Tensor, Vec<i32>)> {
    features_shared(extractor, set, crop, chunk, device, &mut Single::new())
}

/// [`features`] computed by the ranks of `comm` together: rank r extracts chunks r, r + W, …
/// and every rank receives the whole set, in order (the same values as one process computes:
/// a chunk's features depend on that chunk alone).
pub fn features_shared(
    extractor: Extractor,
    set: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    device: &Device,
    comm: &mut dyn Collective,
) -> Result<(Tensor, Vec<i32>)> {
    let threads = threads();
    let (rank, world) = (comm.world().rank as usize, comm.world().size as usize);
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let starts: Vec<usize> = (0..set.len()).step_by(chunk).collect();
    for &at in starts.iter().skip(rank).step_by(world) {
        let end = (at + chunk).min(set.len());
        let (imgs, l) = load_chunk(set, at..end, crop, threads)?;
        let x = to_normalised_tensor(&imgs, crop, device)?;
        feats.push(
            extractor
                .extract(&x)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        );
        labels.push(l);
    }
    if world == 1 {
        return Ok((Tensor::cat(&feats, 0)?, labels.concat()));
    }
    // Each rank's chunks as [dim u64][rows u64, labels i32…, features f32…]…, gathered, then
    // dealt back into chunk order (chunk i came from rank i mod W).
    let dim = feats.first().map(|f| f.dim(1)).transpose()?.unwrap_or(0);
    let mut mine = (dim as u64).to_le_bytes().to_vec();
    for (f, l) in feats.iter().zip(&labels) {
        mine.extend((l.len() as u64).to_le_bytes());
        mine.extend(l.iter().flat_map(|x| x.to_le_bytes()));
        let v = f.flatten_all()?.to_vec1::<f32>()?;
        mine.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    let parts = comm.all_gather_bytes(&mine)?;
    let take = |r: &mut &[u8], n: usize| -> Result<Vec<u8>> {
        anyhow::ensure!(r.len() >= n, "a rank sent fewer features than it owes");
        let (a, b) = r.split_at(n);
        *r = b;
        Ok(a.to_vec())
    };
    let u64_of = |b: Vec<u8>| u64::from_le_bytes(b.try_into().unwrap()) as usize;
    let mut readers: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let mut dim = 0;
    for r in &mut readers {
        dim = dim.max(u64_of(take(r, 8)?));
    }
    let (mut out_f, mut out_l) = (Vec::new(), Vec::new());
    for i in 0..starts.len() {
        let r = &mut readers[i % world];
        let rows = u64_of(take(r, 8)?);
        let l = take(r, 4 * rows)?;
        out_l.extend(
            l.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap())),
        );
        let f = take(r, 4 * rows * dim)?;
        out_f.extend(
            f.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        );
    }
    Ok((
        Tensor::from_vec(out_f, (out_l.len(), dim), &Device::Cpu)?,
        out_l,
    ))
}

/// The teacher backbone of a checkpoint's tensors (`teacher.*`), or a fresh random init.
pub fn teacher_backbone(
    cfg: &TrainConfig,
    tensors: Option<&HashMap<String, Tensor>>,
    device: &Device,
) -> Result<(ParamStore, Vit)> {
    backbone_from(cfg, tensors, "teacher.", device)
}

/// The backbone stored under `prefix` (`teacher.` or `student.`), or a fresh random init.
pub fn backbone_from(
    cfg: &TrainConfig,
    tensors: Option<&HashMap<String, Tensor>>,
    prefix: &str,
    device: &Device,
) -> Result<(ParamStore, Vit)> {
    let store = ParamStore::init(cfg, cfg.data.seed, DType::F32, device)?;
    if let Some(t) = tensors {
        for p in store
            .params()
            .iter()
            .filter(|p| p.name.starts_with("backbone."))
        {
            let key = format!("{prefix}{}", p.name);
            let v = t
                .get(&key)
                .with_context(|| format!("checkpoint has no {key}"))?;
            ensure!(
                v.dims() == p.var.dims(),
                "{key} has shape {:?}, the config wants {:?}",
                v.dims(),
                p.var.dims()
            );
            p.var.set(&v.to_dtype(DType::F32)?.to_device(device)?)?;
        }
    }
    // bf16 + fused kernels on CUDA, f32 + composed on the CPU (crate::kernels).
    let compute = crate::kernels::Compute::for_device(device, None, None);
    let vit = Vit::with_compute(cfg, &store, false, compute)?;
    Ok((store, vit))
}

/// k-NN of `val` against `train` with the features of `backbone`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    backbone: &Vit,
    train: &dyn LabelledImages,
    val: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    token: ClassToken,
    p: KnnParams,
    device: &Device,
) -> Result<KnnResult> {
    evaluate_with(
        Extractor::Backbone(backbone, token),
        train,
        val,
        crop,
        chunk,
        p,
        device,
    )
}

/// The number of classes of a train/val pair (a warning when their class lists differ).
pub fn class_count(train: &dyn LabelledImages, val: &dyn LabelledImages) -> Result<usize> {
    let n_classes = train.class_names().len().max(val.class_names().len());
    ensure!(
        n_classes > 0,
        "evaluation needs labelled images (no classes found in the train or val set)"
    );
    if train.class_names() != val.class_names() {
        eprintln!("warning: train and val class lists differ; labels are compared by index");
    }
    Ok(n_classes)
}

/// k-NN of `val` against `train` with the features of `extractor`.
pub fn evaluate_with(
    extractor: Extractor,
    train: &dyn LabelledImages,
    val: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    p: KnnParams,
    device: &Device,
) -> Result<KnnResult> {
    evaluate_shared(
        extractor,
        train,
        val,
        crop,
        chunk,
        p,
        device,
        &mut Single::new(),
    )
}

/// [`evaluate_with`] with the features computed by the ranks of `comm` together
/// ([`features_shared`]); every rank gets the same result.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_shared(
    extractor: Extractor,
    train: &dyn LabelledImages,
    val: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    p: KnnParams,
    device: &Device,
    comm: &mut dyn Collective,
) -> Result<KnnResult> {
    let n_classes = class_count(train, val)?;
    let (tf, tl) = features_shared(extractor, train, crop, chunk, device, comm)?;
    let index = KnnIndex::new(&tf, tl, n_classes)?;
    let (vf, vl) = features_shared(extractor, val, crop, chunk, device, comm)?;
    let mut tally = KnnTally::default();
    for at in (0..vl.len()).step_by(chunk) {
        let n = chunk.min(vl.len() - at);
        index.score_chunk(&vf.narrow(0, at, n)?, &vl[at..at + n], p, &mut tally)?;
    }
    Ok(index.result(&tally, p))
}
