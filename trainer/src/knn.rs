//! DINO's weighted k-NN classifier (udi-spec §5) and the evaluation transform.
//!
//! * Features are L2-normalised; similarity is the cosine (a dot product).
//! * Each val image takes its k most similar train images; neighbour j votes for its class with
//!   weight exp(sim_j / T); the prediction ranks classes by summed votes; top-1 and top-5.
//! * Val features are classified chunk by chunk against the train matrix, so memory is
//!   train features + one chunk × N similarities.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

/// The mean/std of udi-spec §1.1 on [0, 1] RGB.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Clone, Copy, Debug)]
pub struct KnnParams {
    pub k: usize,
    pub temperature: f32,
}

impl Default for KnnParams {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnnResult {
    /// Percent of val images whose top-ranked class is right.
    pub top1: f64,
    /// Percent whose class is among the 5 top-ranked (among min(5, k) when k < 5).
    pub top5: f64,
    pub k: usize,
    pub temperature: f32,
    pub n_train: usize,
    pub n_val: usize,
}

/// L2-normalises the rows of a `[N, D]` tensor (eps 1e-12 as in F.normalize).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// The train side of the classifier: normalised features and their labels.
pub struct KnnIndex {
    train: Tensor,
    labels: Vec<i32>,
    n_classes: usize,
}

/// Accumulates correct counts over val chunks.
#[derive(Default)]
pub struct KnnTally {
    pub n: usize,
    pub top1: usize,
    pub top5: usize,
}

impl KnnIndex {
    /// `train`: `[N, D]` features (normalised here); `labels` in 0..n_classes.
    pub fn new(train: &Tensor, labels: Vec<i32>, n_classes: usize) -> Result<Self> {
        ensure!(
            train.dim(0)? == labels.len(),
            "k-NN: {} train features but {} labels",
            train.dim(0)?,
            labels.len()
        );
        ensure!(
            labels.iter().all(|&l| l >= 0 && (l as usize) < n_classes),
            "k-NN: train labels must lie in 0..{n_classes} (unlabelled records cannot be used)"
        );
        Ok(Self {
            train: l2_normalize(&train.to_dtype(candle_core::DType::F32)?)?,
            labels,
            n_classes,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Summed class votes for each row of `val` (`[M, D]`, normalised here): `[M][n_classes]`.
    pub fn votes(&self, val: &Tensor, p: KnnParams) -> Result<Vec<Vec<f32>>> {
        let val = l2_normalize(
            &val.to_dtype(candle_core::DType::F32)?
                .to_device(self.train.device())?,
        )?;
        let sim: Vec<Vec<f32>> = val.matmul(&self.train.t()?)?.to_vec2()?;
        let k = p.k.min(self.len());
        let mut out = Vec::with_capacity(sim.len());
        let mut idx: Vec<usize> = Vec::with_capacity(self.len());
        for row in sim {
            idx.clear();
            idx.extend(0..row.len());
            // Descending similarity; ties broken by lower index so results are reproducible.
            let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, cmp);
                idx.truncate(k);
            }
            idx.sort_unstable_by(cmp);
            let mut v = vec![0f32; self.n_classes];
            for &j in &idx {
                v[self.labels[j] as usize] += (row[j] / p.temperature).exp();
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Classifies one chunk of val features and adds to the tally.
    pub fn score_chunk(
        &self,
        val: &Tensor,
        labels: &[i32],
        p: KnnParams,
        tally: &mut KnnTally,
    ) -> Result<()> {
        ensure!(
            val.dim(0)? == labels.len(),
            "k-NN: {} val features but {} labels",
            val.dim(0)?,
            labels.len()
        );
        let top_n = 5.min(p.k.max(1));
        for (v, &y) in self.votes(val, p)?.iter().zip(labels) {
            let ranked = rank_classes(v);
            tally.n += 1;
            tally.top1 += (ranked[0] as i32 == y) as usize;
            tally.top5 += ranked[..top_n.min(ranked.len())]
                .iter()
                .any(|&c| c as i32 == y) as usize;
        }
        Ok(())
    }

    pub fn result(&self, tally: &KnnTally, p: KnnParams) -> KnnResult {
        let pct = |c: usize| {
            if tally.n == 0 {
                0.0
            } else {
                100.0 * c as f64 / tally.n as f64
            }
        };
        KnnResult {
            top1: pct(tally.top1),
            top5: pct(tally.top5),
            k: p.k,
            temperature: p.temperature,
            n_train: self.len(),
            n_val: tally.n,
        }
    }
}

/// Class indices by descending vote (ties: lower class first).
fn rank_classes(votes: &[f32]) -> Vec<usize> {
    let mut c: Vec<usize> = (0..votes.len()).collect();
    c.sort_by(|a, b| votes[*b].total_cmp(&votes[*a]).then(a.cmp(b)));
    c
}

/// The side length the shorter image side is resized to before the centre crop: 256 for a
/// 224 crop (DINO's eval), scaled for small configs: round(crop · 256 / 224).
pub fn eval_resize_for(crop: u32) -> u32 {
    ((crop as f64 * 256.0 / 224.0).round() as u32).max(crop)
}

/// Resize the shorter side to `eval_resize_for(crop)` (bicubic) and take the centre `crop²`,
/// as torchvision's Resize(int) + CenterCrop: RGB8, HWC.
pub fn eval_transform(img: &RgbImage, crop: u32) -> RgbImage {
    let short = eval_resize_for(crop);
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (
            short,
            ((short as u64 * h as u64) / w.max(1) as u64).max(short as u64) as u32,
        )
    } else {
        (
            ((short as u64 * w as u64) / h.max(1) as u64).max(short as u64) as u32,
            short,
        )
    };
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
    let top = ((nh - crop) as f64 / 2.0).round() as u32;
    let left = ((nw - crop) as f64 / 2.0).round() as u32;
    image::imageops::crop_imm(&resized, left, top, crop, crop).to_image()
}

/// RGB8 HWC images (all `size²`) → normalised `[N, 3, size, size]` f32 on `device`.
pub fn to_normalised_tensor(images: &[RgbImage], size: u32, device: &Device) -> Result<Tensor> {
    let s = size as usize;
    let mut bytes = Vec::with_capacity(images.len() * s * s * 3);
    for im in images {
        ensure!(
            im.dimensions() == (size, size),
            "image is {:?}, expected {size}×{size}",
            im.dimensions()
        );
        bytes.extend_from_slice(im.as_raw());
    }
    let n = images.len();
    let x = Tensor::from_vec(bytes, (n, s, s, 3), device)?
        .permute((0, 3, 1, 2))?
        .to_dtype(candle_core::DType::F32)?;
    let mean = Tensor::from_vec(
        MEAN.iter().map(|m| m * 255.0).collect::<Vec<_>>(),
        (1, 3, 1, 1),
        device,
    )?;
    let std = Tensor::from_vec(
        STD.iter().map(|v| v * 255.0).collect::<Vec<_>>(),
        (1, 3, 1, 1),
        device,
    )?;
    Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn randn(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// Independent f64 reference: full sort of every similarity, votes, ranking.
    fn reference(
        train: &[Vec<f64>],
        labels: &[i32],
        val: &[Vec<f64>],
        vl: &[i32],
        k: usize,
        t: f64,
        nc: usize,
    ) -> (usize, usize) {
        let norm = |v: &Vec<f64>| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / n).collect::<Vec<_>>()
        };
        let tr: Vec<Vec<f64>> = train.iter().map(norm).collect();
        let (mut c1, mut c5) = (0, 0);
        for (v, &y) in val.iter().zip(vl) {
            let v = norm(v);
            let mut sims: Vec<(f64, usize)> = tr
                .iter()
                .enumerate()
                .map(|(j, t)| (t.iter().zip(&v).map(|(a, b)| a * b).sum(), j))
                .collect();
            sims.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            let mut votes = vec![0f64; nc];
            for &(s, j) in &sims[..k] {
                votes[labels[j] as usize] += (s / t).exp();
            }
            let mut cls: Vec<usize> = (0..nc).collect();
            cls.sort_by(|a, b| votes[*b].partial_cmp(&votes[*a]).unwrap());
            c1 += (cls[0] as i32 == y) as usize;
            c5 += cls[..5].iter().any(|&c| c as i32 == y) as usize;
        }
        (c1, c5)
    }

    #[test]
    fn matches_an_independent_reference_on_noisy_clusters() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, m, d, nc) = (300, 120, 16, 8);
        let centres: Vec<Vec<f32>> = (0..nc).map(|_| randn(&mut rng, d)).collect();
        let mut gen = |count: usize| {
            let mut x = Vec::new();
            let mut y = Vec::new();
            for i in 0..count {
                let c = (i * 7 + 3) % nc;
                let noise = randn(&mut rng, d);
                x.push(
                    centres[c]
                        .iter()
                        .zip(noise)
                        .map(|(a, b)| a + 0.9 * b)
                        .collect::<Vec<f32>>(),
                );
                y.push(c as i32);
            }
            (x, y)
        };
        let (tx, ty) = gen(n);
        let (vx, vy) = gen(m);
        let to_t =
            |x: &Vec<Vec<f32>>| Tensor::from_vec(x.concat(), (x.len(), d), &Device::Cpu).unwrap();
        let index = KnnIndex::new(&to_t(&tx), ty.clone(), nc).unwrap();
        let p = KnnParams {
            k: 20,
            temperature: 0.07,
        };
        let mut tally = KnnTally::default();
        // Two chunks: chunking must not matter.
        index
            .score_chunk(&to_t(&vx[..50].to_vec()), &vy[..50], p, &mut tally)
            .unwrap();
        index
            .score_chunk(&to_t(&vx[50..].to_vec()), &vy[50..], p, &mut tally)
            .unwrap();
        let f64v = |x: &Vec<Vec<f32>>| {
            x.iter()
                .map(|r| r.iter().map(|&v| v as f64).collect())
                .collect::<Vec<Vec<f64>>>()
        };
        let (c1, c5) = reference(&f64v(&tx), &ty, &f64v(&vx), &vy, 20, 0.07, nc);
        assert_eq!((tally.top1, tally.top5), (c1, c5));
        let r = index.result(&tally, p);
        // Noisy but separable: clearly better than chance (12.5 %), not trivially perfect.
        assert!(r.top1 > 40.0 && r.top1 < 100.0, "{r:?}");
        assert!(r.top5 >= r.top1);
    }

    #[test]
    fn weights_follow_exp_sim_over_t() {
        // Val = e0. Train: two of class 0 at cos 0.6, one of class 1 at cos 1.0.
        // Votes: class 0 = 2·e^{0.6/T}, class 1 = e^{1/T}. T = 1 → class 0 wins; T = 0.1 → class 1.
        let tr =
            Tensor::from_vec(vec![0.6f32, 0.8, 0.6, -0.8, 1.0, 0.0], (3, 2), &Device::Cpu).unwrap();
        let idx = KnnIndex::new(&tr, vec![0, 0, 1], 2).unwrap();
        let val = Tensor::from_vec(vec![3.0f32, 0.0], (1, 2), &Device::Cpu).unwrap();
        let v = idx
            .votes(
                &val,
                KnnParams {
                    k: 3,
                    temperature: 1.0,
                },
            )
            .unwrap();
        assert!(
            (v[0][0] - 2.0 * 0.6f32.exp()).abs() < 1e-5 && (v[0][1] - 1f32.exp()).abs() < 1e-5,
            "{v:?}"
        );
        let mut t = KnnTally::default();
        idx.score_chunk(
            &val,
            &[0],
            KnnParams {
                k: 3,
                temperature: 1.0,
            },
            &mut t,
        )
        .unwrap();
        idx.score_chunk(
            &val,
            &[1],
            KnnParams {
                k: 3,
                temperature: 0.1,
            },
            &mut t,
        )
        .unwrap();
        assert_eq!(t.top1, 2);
        // k = 1 keeps only the nearest (class 1).
        let v = idx
            .votes(
                &val,
                KnnParams {
                    k: 1,
                    temperature: 1.0,
                },
            )
            .unwrap();
        assert_eq!(v[0][0], 0.0);
    }

    #[test]
    fn bad_labels_are_refused() {
        let tr = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(KnnIndex::new(&tr, vec![0, -1], 2).is_err());
        assert!(KnnIndex::new(&tr, vec![0], 2).is_err());
    }

    #[test]
    fn eval_transform_resizes_short_side_then_centre_crops() {
        assert_eq!(eval_resize_for(224), 256);
        assert_eq!(eval_resize_for(64), 73);
        // A 40×20 image whose left half is black and right half white; crop 16 → resize to 18
        // short side (36×18), centre crop 16×16 from x = 10..26: the split stays at column 8.
        let img = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let out = eval_transform(&img, 16);
        assert_eq!(out.dimensions(), (16, 16));
        assert!(out.get_pixel(2, 8)[0] < 10 && out.get_pixel(13, 8)[0] > 245);
        let t = to_normalised_tensor(&[out], 16, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 16, 16]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            (v[8 * 16 + 2] - (-0.485 / 0.229)).abs() < 1e-5,
            "{}",
            v[8 * 16 + 2]
        );
    }
}
