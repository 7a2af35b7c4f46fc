//! The photometric pipeline per batch of crops (`cargo bench -p trainer --bench
//! photometric_device -- [--b224 N] [--b96 N] [--iters N]`): the loader's fused CPU path
//! (`PhotoParams::apply`, one thread) against `trainer::photometric::apply` on candle's CPU
//! backend and, built with `--features cuda` on a machine with a GPU, on CUDA; records drawn by
//! `PhotoParams::draw` with the paper recipe (`AugmentConfig::default()`). Every device result is
//! checked byte for byte against the CPU path before it is timed. Candle's CPU backend runs on
//! one thread unless `RAYON_NUM_THREADS` says otherwise. Not a test: it prints a table.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loader::photometric::{PhotoParams, PhotoScratch};
use shared::config::AugmentConfig;
use shared::geometry::PhotoRecord;
use shared::rng::sample_rng;

/// `B` crops of `size`², smooth gradients with a little noise (content barely matters: every
/// path does the same work per pixel).
fn crops(b: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(b * size * size * 3);
    for k in 0..b {
        for y in 0..size {
            for x in 0..size {
                let n = ((k * 7919 + y * 131 + x) as u32).wrapping_mul(2654435761) >> 28;
                out.push(((x * 255 / size) as u32 + n).min(255) as u8);
                out.push(((y * 255 / size) as u32 + n).min(255) as u8);
                out.push((((x + y) * 127 / size) as u32 + n).min(255) as u8);
            }
        }
    }
    out
}

struct Case {
    size: usize,
    params: Vec<PhotoParams>,
    records: Vec<PhotoRecord>,
    input: Vec<u8>,
}

impl Case {
    fn new(size: usize, b: usize, seed: u64) -> Self {
        let aug = AugmentConfig::default();
        let params: Vec<PhotoParams> = (0..b as u64)
            .map(|i| PhotoParams::draw(&aug, &mut sample_rng(seed, 0, i)))
            .collect();
        let records = params.iter().map(PhotoParams::record).collect();
        Self {
            size,
            params,
            records,
            input: crops(b, size),
        }
    }

    /// The loader path over the batch: ms per batch (mean of `iters` after a warm-up round) and
    /// its output.
    fn loader(&self, iters: usize) -> (f64, Vec<u8>) {
        let px = self.size * self.size * 3;
        let mut scratch = PhotoScratch::default();
        let mut work = self.input.clone();
        let mut total = 0.0;
        // Round 0 warms the lookup tables and the scratch buffers and is not timed.
        for round in 0..=iters {
            work.copy_from_slice(&self.input);
            let t = Instant::now();
            for (p, img) in self.params.iter().zip(work.chunks_mut(px)) {
                p.apply(img, self.size, self.size, &mut scratch);
            }
            if round > 0 {
                total += t.elapsed().as_secs_f64();
            }
        }
        (1e3 * total / iters as f64, work)
    }

    /// `photometric::apply` on `dev`; ms per batch (mean of `iters` after one warm-up round),
    /// after checking its bytes against `want`.
    fn device(&self, dev: &Device, iters: usize, want: &[u8]) -> candle_core::Result<f64> {
        let b = self.params.len();
        let x = Tensor::from_vec(self.input.clone(), (b, self.size, self.size, 3), dev)?
            .to_dtype(DType::F32)?;
        let y = trainer::photometric::apply(&x, &self.records)?;
        let got: Vec<u8> = y.to_dtype(DType::U8)?.flatten_all()?.to_vec1()?;
        let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{dev:?}: {diff} bytes differ from the CPU path");
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(trainer::photometric::apply(&x, &self.records)?);
        }
        dev.synchronize()?;
        Ok(1e3 * t.elapsed().as_secs_f64() / iters as f64)
    }
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> candle_core::Result<()> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().collect();
    let iters = arg(&args, "--iters", 3);
    let sizes = [
        (224, arg(&args, "--b224", 32)),
        (96, arg(&args, "--b96", 128)),
    ];
    let cuda = Device::cuda_if_available(0)?;
    let cuda = cuda.is_cuda().then_some(cuda);
    println!(
        "photometric pipeline, paper recipe; candle CPU threads: {}; CUDA: {}",
        candle_core::utils::get_num_threads(),
        if cuda.is_some() { "yes" } else { "no" }
    );
    println!(
        "{:>5} {:>5} {:>14} {:>14} {:>10} {:>12} {:>10}  (ms per batch; ratio = loader / device)",
        "size", "B", "loader 1 thr", "candle CPU", "ratio", "CUDA", "ratio"
    );
    for (size, b) in sizes {
        let case = Case::new(size, b, 7);
        let (loader_ms, want) = case.loader(iters.max(5));
        let cpu_ms = case.device(&Device::Cpu, iters, &want)?;
        let (cuda_col, cuda_ratio) = match &cuda {
            Some(dev) => {
                let ms = case.device(dev, iters.max(20), &want)?;
                (format!("{ms:12.3}"), format!("{:10.2}", loader_ms / ms))
            }
            None => (format!("{:>12}", "-"), format!("{:>10}", "-")),
        };
        println!(
            "{size:>5} {b:>5} {loader_ms:>14.3} {cpu_ms:>14.3} {:>10.3} {cuda_col} {cuda_ratio}",
            loader_ms / cpu_ms
        );
    }
    Ok(())
}
