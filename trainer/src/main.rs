//! `trainer` CLI: thin wrappers over the library (see `trainer::debug`).

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use trainer::config::TrainConfig;
use trainer::train_cli::{self, ExportArgs, KnnArgs, PlotArgs, TrainArgs};

#[derive(Parser)]
#[command(name = "trainer", about = "UDI self-supervised ViT pre-training")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pretrain: create the ring, start and supervise loaders, train, checkpoint, log metrics.
    #[command(
        after_help = "Example: trainer train --config configs/udi_vit_s16_in1k.toml --shards shards/train --out runs/s16"
    )]
    Train(TrainArgs),
    /// Data-parallel training on one host: start N ranks of the command after `--` with the
    /// variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    #[command(
        after_help = "Example: trainer launch --gpus 8 -- train --config configs/udi_vit_s16_in1k.toml --shards shards/train --out runs/s16"
    )]
    Launch(trainer::dist::launch::LaunchArgs),
    /// Weighted k-NN (DINO's) on teacher features: top-1 / top-5.
    #[command(
        after_help = "Example: trainer knn --checkpoint runs/s16 --train shards/train --val shards/val"
    )]
    Knn(KnnArgs),
    /// The linear probe (udi-spec §5) on frozen teacher features: best and last top-1 / top-5.
    #[command(
        after_help = "Example: trainer linear --checkpoint runs/s16 --train shards/train --val shards/val --json"
    )]
    Linear(trainer::eval::cli::LinearArgs),
    /// Probe features, labels and sources of a labelled set, to safetensors.
    #[command(
        after_help = "Example: trainer features --checkpoint runs/s16 --data shards/val --out val-feats.safetensors"
    )]
    Features(trainer::eval::cli::FeaturesArgs),
    /// The last block's class-token attention per head and its 60 % mass masks, as a PNG grid.
    #[command(
        after_help = "Example: trainer attention --checkpoint runs/s16 --image photo.jpg --out attn.png"
    )]
    Attention(trainer::eval::cli::AttentionArgs),
    /// Export the teacher backbone (timm key names, safetensors).
    #[command(
        after_help = "Example: trainer export --checkpoint runs/s16 --format timm --out backbone.safetensors"
    )]
    Export(ExportArgs),
    /// Plot a run's metrics.jsonl as a PNG.
    #[command(after_help = "Example: trainer plot runs/s16")]
    Plot(PlotArgs),
    /// Checkpoint tools.
    Checkpoint {
        #[command(subcommand)]
        cmd: CheckpointCmd,
    },
    /// Write freshly initialised student and teacher weights (safetensors).
    #[command(
        after_help = "Example: trainer init-weights --config configs/tiny.toml --out weights.safetensors"
    )]
    InitWeights {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a batch file for `debug-step` (synthetic images and SRS rows, zero centres).
    #[command(
        after_help = "Example: trainer make-batch --config configs/tiny.toml --synthetic --out batch.safetensors"
    )]
    MakeBatch {
        #[arg(long)]
        config: PathBuf,
        /// Random content (the only source for now).
        #[arg(long, required = true)]
        synthetic: bool,
        /// Batch size (default: the config's).
        #[arg(long)]
        batch_size: Option<u32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// One training step (drop path off) from weights + batch; JSON report + updated tensors.
    #[command(
        after_help = "Example: trainer debug-step --config configs/tiny.toml --weights weights.safetensors --batch batch.safetensors --out step.json"
    )]
    DebugStep {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        batch: PathBuf,
        /// JSON report.
        #[arg(long)]
        out: PathBuf,
        /// Updated tensors (default: the JSON path with extension .safetensors).
        #[arg(long)]
        out_tensors: Option<PathBuf>,
        /// Iterations per epoch for the lr/wd/momentum schedules (ImageNet at 1024: 1251).
        #[arg(long, default_value_t = 1251)]
        iters_per_epoch: u64,
        /// auto, cpu or cuda (needs the `cuda` feature).
        #[arg(long, value_enum, default_value = "cpu")]
        device: trainer::device::DeviceFlag,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Time training steps on a synthetic batch.
    #[command(
        after_help = "Example: trainer bench --config configs/udi_vit_s16_in1k.toml --device cuda --batch-size 128 --steps 10"
    )]
    Bench {
        #[arg(long)]
        config: PathBuf,
        /// auto, cpu or cuda (needs the `cuda` feature).
        #[arg(long, value_enum, default_value = "cpu")]
        device: trainer::device::DeviceFlag,
        #[arg(long)]
        batch_size: Option<u32>,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Then 2 more steps with every forward stage synchronised and timed (a table).
        #[arg(long)]
        profile: bool,
        /// On the CPU: count what each op of the timed steps reads and writes, as the device would
        /// run them (use with the device's --precision bf16 --kernels fused); a table by op.
        #[arg(long)]
        traffic: bool,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Every fused kernel on the device against its CPU reference (forward and backward), and
    /// composed-vs-fused timings.
    #[command(after_help = "Example: trainer kernel-check --device cuda --shapes vits")]
    KernelCheck {
        /// cuda (the point), or cpu (reference against itself: a smoke test).
        #[arg(long, value_enum, default_value = "cuda")]
        device: trainer::device::DeviceFlag,
        /// Shapes: `vits` (ViT-S/16 at batch --batch-size, K = 65 536) or `tiny`.
        #[arg(long, default_value = "vits")]
        shapes: String,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Timed repetitions per op.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Check every checkpoint of a run against the sizes and CRC32Cs its state.json records.
    #[command(after_help = "Example: trainer checkpoint verify runs/s16")]
    Verify {
        /// Run directory (or its checkpoints/).
        run: PathBuf,
    },
}

/// `--precision` / `--kernels` (defaults depend on the device: bf16 + fused on CUDA).
#[derive(clap::Args, Clone, Copy, Debug)]
struct ComputeArgs {
    /// bf16 (bf16 matmuls, f32 masters/statistics) or f32. Default: bf16 on CUDA, f32 on CPU.
    #[arg(long, value_enum)]
    precision: Option<trainer::kernels::Precision>,
    /// fused (our kernels) or candle (composed ops). Default: fused on CUDA, candle on CPU.
    #[arg(long, value_enum)]
    kernels: Option<trainer::kernels::Kernels>,
    /// explicit (hand-written backward over flat buffers) or autograd (candle's). Default:
    /// explicit on CPU, autograd on CUDA.
    #[arg(long, value_enum)]
    engine: Option<trainer::engine::EngineKind>,
    /// Explicit engine: keep the blocks' LayerNorm and GELU outputs for the backward instead of
    /// recomputing them (less memory traffic, more memory).
    #[arg(long)]
    keep_activations: bool,
}

impl ComputeArgs {
    fn resolve(&self, dev: &candle_core::Device) -> trainer::kernels::Compute {
        trainer::kernels::Compute {
            keep_activations: self.keep_activations,
            ..trainer::kernels::Compute::for_device(dev, self.precision, self.kernels)
        }
    }
    fn engine(&self, dev: &candle_core::Device) -> trainer::engine::EngineKind {
        trainer::engine::EngineKind::for_device(dev, self.engine)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train(a) => train_cli::train_main(&a),
        Cmd::Launch(a) => trainer::dist::launch::launch_main(&a),
        Cmd::Knn(a) => train_cli::knn_main(&a),
        Cmd::Linear(a) => trainer::eval::cli::linear_main(&a),
        Cmd::Features(a) => trainer::eval::cli::features_main(&a),
        Cmd::Attention(a) => trainer::eval::cli::attention_main(&a),
        Cmd::Export(a) => train_cli::export_main(&a),
        Cmd::Plot(a) => train_cli::plot_main(&a),
        Cmd::Checkpoint {
            cmd: CheckpointCmd::Verify { run },
        } => train_cli::checkpoint_verify_main(&run),
        Cmd::InitWeights { config, out } => {
            trainer::debug::init_weights(&TrainConfig::from_toml_file(&config)?, &out)
        }
        Cmd::MakeBatch {
            config,
            synthetic: _,
            batch_size,
            seed,
            out,
        } => {
            let cfg = TrainConfig::from_toml_file(&config)?;
            trainer::debug::make_batch(&cfg, batch_size.unwrap_or(cfg.data.batch_size), seed, &out)
        }
        Cmd::DebugStep {
            config,
            weights,
            batch,
            out,
            out_tensors,
            iters_per_epoch,
            device,
            compute,
        } => {
            let cfg = TrainConfig::from_toml_file(&config)?;
            let ot = out_tensors.unwrap_or_else(|| out.with_extension("safetensors"));
            let dev = trainer::device::pick(device)?;
            let c = compute.resolve(&dev);
            let e = compute.engine(&dev);
            trainer::debug::debug_step(
                &cfg,
                &weights,
                &batch,
                &out,
                &ot,
                iters_per_epoch,
                &dev,
                c,
                e,
            )
        }
        Cmd::Bench {
            config,
            device,
            batch_size,
            warmup,
            steps,
            json,
            profile,
            traffic,
            compute,
        } => {
            let cfg = TrainConfig::from_toml_file(&config)?;
            let dev = trainer::device::pick(device)?;
            let b = batch_size.unwrap_or(cfg.data.batch_size);
            let c = compute.resolve(&dev);
            let e = compute.engine(&dev);
            let r = trainer::debug::bench(&cfg, &dev, b, warmup, steps, c, e, profile, traffic)?;
            if let Some(t) = &r.traffic {
                eprintln!(
                    "| op (per step) | calls | read GiB | written GiB | TFLOP |\n|---|---:|---:|---:|---:|"
                );
                for o in &t.by_op {
                    eprintln!(
                        "| {} | {:.0} | {:.3} | {:.3} | {:.3} |",
                        o.op, o.calls, o.read_gib, o.written_gib, o.tflop
                    );
                }
                eprintln!(
                    "| total | {:.0} | {:.3} | {:.3} | {:.3} |",
                    t.ops, t.read_gib, t.written_gib, t.matmul_tflop
                );
            }
            if !r.profile.is_empty() {
                // The table on stderr, so that --json keeps one object on stdout.
                eprintln!("| stage (synchronised) | ms/step | calls/step |\n|---|---:|---:|");
                for p in &r.profile {
                    eprintln!(
                        "| {} | {:.2} | {:.0} |",
                        p.scope, p.ms_per_step, p.calls_per_step
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let stages = match (r.teacher_fwd_s, r.student_fwd_loss_s, r.backward_s, r.optim_ema_s) {
                    (Some(t), Some(s), Some(b), Some(o)) => format!(
                        "teacher fwd {t:.3} s, student fwd+loss {s:.3} s, backward {b:.3} s, optimiser+EMA {o:.3} s"
                    ),
                    _ => "stage times: --profile".to_string(),
                };
                let peak = match r.peak_mem_gib {
                    Some(g) if r.device == "cpu" => format!(", peak tensor memory {g:.2} GiB"),
                    Some(g) => format!(", peak {g:.2} GiB"),
                    None => String::new(),
                };
                println!(
                    "{} {} {} {} batch {}: {:.3} s/step, {:.1} images/s ({stages}){peak}",
                    r.device,
                    r.precision,
                    r.kernels,
                    r.engine,
                    r.batch_size,
                    r.step_s,
                    r.images_per_s
                );
            }
            Ok(())
        }
        Cmd::KernelCheck {
            device,
            shapes,
            batch_size,
            reps,
            json,
        } => {
            let dev = trainer::device::pick(device)?;
            let shapes = trainer::kernels::check::Shapes::named(&shapes, batch_size)?;
            let rep = trainer::kernels::check::run(&dev, &shapes, reps)?;
            // The table always (stderr with --json), the JSON line last on stdout.
            if json {
                eprint!("{}", rep.table());
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print!("{}", rep.table());
            }
            anyhow::ensure!(
                rep.ok,
                "kernel-check: a kernel differs from its CPU reference"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
#[test]
fn help_examples_and_readme_commands_parse() {
    use clap::CommandFactory;
    udi_tests::cli_doc::assert_agree_with_readmes(Cli::command(), env!("CARGO_MANIFEST_DIR"));
}
