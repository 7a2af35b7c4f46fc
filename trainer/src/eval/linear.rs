//! The linear probe (udi-spec §5): a frozen backbone's probe features ([`super::features`])
//! → one Linear layer (weights N(0, 0.01), bias 0), cross-entropy, SGD with momentum 0.9 and no
//! weight decay, lr = `lr` × batch / 256 annealed per epoch by a cosine to 0, top-1 / top-5 on
//! the val set after every epoch; the best and the last are reported.
//!
//! Two modes:
//! * augmented (the protocol): each epoch re-augments every train image with
//!   [`super::augment::TrainTransform`] and runs the backbone on it;
//! * cached (a quick look, labelled as such): train features are computed once with the val
//!   transform, so there is no train augmentation, and an epoch costs one pass of a matmul.

use super::augment::TrainTransform;
use super::features::FeatureSpec;
use crate::knn_eval::{class_count, features, load_items, threads, Extractor, LabelledImages};
use crate::params::{init_values, Init, ParamSpec};
use crate::vit::Vit;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

/// Linear(F, C) with SGD momentum buffers.
pub struct LinearClassifier {
    /// `[C, F]`.
    pub weight: Tensor,
    /// `[C]`.
    pub bias: Tensor,
    buf_w: Tensor,
    buf_b: Tensor,
}

impl LinearClassifier {
    /// Weights N(0, 0.01) from the seed (Box–Muller, as the backbone's init), bias 0.
    pub fn new(in_dim: usize, n_classes: usize, seed: u64, device: &Device) -> Result<Self> {
        let spec = ParamSpec {
            name: "linear.weight".into(),
            shape: vec![n_classes, in_dim],
            init: Init::Normal(0.01),
        };
        let w: Vec<f32> = init_values(&spec, seed, 0)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let weight = Tensor::from_vec(w, (n_classes, in_dim), device)?;
        let bias = Tensor::zeros(n_classes, DType::F32, device)?;
        Ok(Self {
            buf_w: weight.zeros_like()?,
            buf_b: bias.zeros_like()?,
            weight,
            bias,
        })
    }

    pub fn n_classes(&self) -> usize {
        self.bias.dims()[0]
    }

    /// `[B, C]` logits of features `[B, F]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// One SGD step (PyTorch semantics, dampening 0, no weight decay:
    /// buf ← μ·buf + g, p ← p − lr·buf) on the mean cross-entropy of a batch; returns that
    /// loss before the step. The gradient is written out: ∂L/∂logits = (softmax − onehot)/B.
    pub fn sgd_step(&mut self, x: &Tensor, labels: &[i32], lr: f64, momentum: f64) -> Result<f64> {
        let (b, _) = x.dims2()?;
        ensure!(
            b == labels.len(),
            "{b} features but {} labels",
            labels.len()
        );
        let logits = self.logits(x)?;
        let p = crate::nn::softmax(&logits)?;
        let onehot = one_hot(labels, self.n_classes(), x.device())?;
        let loss = -(crate::nn::log_softmax(&logits)? * &onehot)?
            .sum_all()?
            .to_scalar::<f32>()? as f64
            / b as f64;
        let g = ((p - onehot)? / b as f64)?;
        let gw = g.t()?.matmul(x)?;
        let gb = g.sum(0)?;
        self.buf_w = ((&self.buf_w * momentum)? + gw)?;
        self.buf_b = ((&self.buf_b * momentum)? + gb)?;
        self.weight = (&self.weight - (&self.buf_w * lr)?)?;
        self.bias = (&self.bias - (&self.buf_b * lr)?)?;
        Ok(loss)
    }

    /// Counts of (top-1, top-5) correct predictions (top-min(5, C)).
    pub fn correct(&self, x: &Tensor, labels: &[i32]) -> Result<(usize, usize)> {
        let logits: Vec<Vec<f32>> = self.logits(x)?.to_device(&Device::Cpu)?.to_vec2()?;
        let (mut c1, mut c5) = (0, 0);
        for (row, &y) in logits.iter().zip(labels) {
            // Classes above the true one's score (ties: lower class first, as the k-NN).
            let s = row[y as usize];
            let above = row
                .iter()
                .enumerate()
                .filter(|&(c, &v)| v > s || (v == s && c < y as usize))
                .count();
            c1 += (above == 0) as usize;
            c5 += (above < 5) as usize;
        }
        Ok((c1, c5))
    }
}

fn one_hot(labels: &[i32], n: usize, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * n];
    for (i, &l) in labels.iter().enumerate() {
        v[i * n + l as usize] = 1.0;
    }
    Ok(Tensor::from_vec(v, (labels.len(), n), device)?)
}

/// The lr of `epoch` (0-based): `base` annealed by torch's CosineAnnealingLR(T_max = epochs,
/// eta_min = 0), stepped once per epoch.
pub fn cosine_lr(base: f64, epoch: usize, epochs: usize) -> f64 {
    0.5 * base * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos())
}

#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    pub epochs: usize,
    pub batch_size: usize,
    /// Per 256 images: the lr used is `lr × batch_size / 256`.
    pub lr: f64,
    pub momentum: f64,
    pub seed: u64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 256,
            lr: 0.02,
            momentum: 0.9,
            seed: 0,
        }
    }
}

impl ProbeOptions {
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / 256.0
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub lr: f64,
    /// Mean of the batch losses.
    pub train_loss: f64,
    pub top1: f64,
    pub top5: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeResult {
    /// "augmented" or "cached (no train augmentation)".
    pub mode: String,
    pub best_top1: f64,
    /// 0-based epoch of the best top-1 (the first such).
    pub best_epoch: usize,
    /// Top-5 of that epoch.
    pub best_top5: f64,
    pub last_top1: f64,
    pub last_top5: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub feature_dim: usize,
    pub n_classes: usize,
    pub n_train: usize,
    pub n_val: usize,
    pub history: Vec<EpochStats>,
}

/// Features `[B, F]` and their labels.
pub type LabelledBatch = (Tensor, Vec<i32>);

/// Trains a classifier on `n_train` items whose batches `train_batch(epoch, items)` returns as
/// (features `[B, F]`, labels), and scores `val` after every epoch. Items are visited in
/// `shared::rng::epoch_permutation(seed, epoch)` order; the last batch may be short (as
/// PyTorch's loader without drop_last).
pub fn train_probe(
    opts: &ProbeOptions,
    n_train: usize,
    n_classes: usize,
    train_batch: &mut dyn FnMut(usize, &[usize]) -> Result<LabelledBatch>,
    val: (&Tensor, &[i32]),
    mode: &str,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<ProbeResult> {
    ensure!(
        opts.epochs > 0 && opts.batch_size > 0,
        "epochs and batch size must be positive"
    );
    ensure!(n_train > 0, "the linear probe needs train images");
    let (vx, vy) = val;
    check_labels(vy, n_classes, "val")?;
    let feature_dim = vx.dim(1)?;
    let mut clf = LinearClassifier::new(feature_dim, n_classes, opts.seed, vx.device())?;
    let mut history = Vec::with_capacity(opts.epochs);
    for epoch in 0..opts.epochs {
        let lr = cosine_lr(opts.scaled_lr(), epoch, opts.epochs);
        let perm: Vec<usize> =
            shared::rng::epoch_permutation(opts.seed, epoch as u64, n_train as u64)
                .into_iter()
                .map(|i| i as usize)
                .collect();
        let (mut loss_sum, mut batches) = (0.0, 0);
        for items in perm.chunks(opts.batch_size) {
            let (x, y) = train_batch(epoch, items)?;
            check_labels(&y, n_classes, "train")?;
            loss_sum += clf.sgd_step(&x, &y, lr, opts.momentum)?;
            batches += 1;
        }
        let (c1, c5) = clf.correct(vx, vy)?;
        let pct = |c: usize| 100.0 * c as f64 / vy.len().max(1) as f64;
        let s = EpochStats {
            epoch,
            lr,
            train_loss: loss_sum / batches as f64,
            top1: pct(c1),
            top5: pct(c5),
        };
        on_epoch(&s);
        history.push(s);
    }
    let best = history
        .iter()
        .fold(&history[0], |b, s| if s.top1 > b.top1 { s } else { b });
    let last = history.last().expect("epochs > 0");
    Ok(ProbeResult {
        mode: mode.to_string(),
        best_top1: best.top1,
        best_epoch: best.epoch,
        best_top5: best.top5,
        last_top1: last.top1,
        last_top5: last.top5,
        epochs: opts.epochs,
        batch_size: opts.batch_size,
        lr: opts.lr,
        feature_dim,
        n_classes,
        n_train,
        n_val: vy.len(),
        history,
    })
}

fn check_labels(labels: &[i32], n_classes: usize, what: &str) -> Result<()> {
    if let Some(i) = labels
        .iter()
        .position(|&l| l < 0 || l as usize >= n_classes)
    {
        anyhow::bail!(
            "linear probe: {what} item {i} has label {} (labels must lie in 0..{n_classes}; \
             unlabelled records cannot be used)",
            labels[i]
        );
    }
    Ok(())
}

/// Gathers rows `items` of cached features `[N, F]`.
pub fn gather(feats: &Tensor, labels: &[i32], items: &[usize]) -> Result<LabelledBatch> {
    let idx: Vec<u32> = items.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, items.len(), feats.device())?;
    Ok((
        feats.index_select(&idx, 0)?,
        items.iter().map(|&i| labels[i]).collect(),
    ))
}

pub const CACHED: &str = "cached (no train augmentation)";
pub const AUGMENTED: &str = "augmented";

/// The linear probe of `vit` from `train` to `val`: features of the val set once (resize,
/// centre crop), the train set either cached the same way or re-augmented every epoch.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    vit: &Vit,
    spec: FeatureSpec,
    train: &dyn LabelledImages,
    val: &dyn LabelledImages,
    crop: u32,
    chunk: usize,
    cached: bool,
    opts: &ProbeOptions,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<ProbeResult> {
    spec.check(vit)?;
    let n_classes = class_count(train, val)?;
    let extractor = Extractor::Probe(vit, spec);
    let (vx, vy) = features(extractor, val, crop, chunk, device)?;
    let vx = vx.to_device(device)?;
    let cache = match cached {
        true => {
            let (tx, ty) = features(extractor, train, crop, chunk, device)?;
            Some((tx.to_device(device)?, ty))
        }
        false => None,
    };
    let t = TrainTransform::new(crop);
    let n = threads();
    let seed = opts.seed;
    let mut batch = |epoch: usize, items: &[usize]| -> Result<LabelledBatch> {
        if let Some((tx, ty)) = &cache {
            return gather(tx, ty, items);
        }
        let aug = |i: usize, im: &image::RgbImage| t.apply(im, seed, epoch as u64, i as u64);
        let (pixels, labels) = load_items(train, items, n, &aug)?;
        let c = crop as usize;
        let x = Tensor::from_vec(pixels.concat(), (items.len(), 3, c, c), device)?;
        Ok((extractor.extract(&x)?.to_dtype(DType::F32)?, labels))
    };
    let mode = if cached { CACHED } else { AUGMENTED };
    let val = (&vx, vy.as_slice());
    train_probe(
        opts,
        train.len(),
        n_classes,
        &mut batch,
        val,
        mode,
        on_epoch,
    )
}
