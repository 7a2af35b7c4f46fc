//! `trainer` CLI: thin wrappers over the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
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
    Train(TrainArgs),
    /// Weighted k-NN (DINO's) on teacher features: top-1 / top-5.
    Knn(KnnArgs),
    /// Export the teacher backbone (timm key names, safetensors).
    Export(ExportArgs),
    /// Plot a run's metrics.jsonl as a PNG.
    Plot(PlotArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train(a) => train_cli::train_main(&a),
        Cmd::Knn(a) => train_cli::knn_main(&a),
        Cmd::Export(a) => train_cli::export_main(&a),
        Cmd::Plot(a) => train_cli::plot_main(&a),
    }
}
