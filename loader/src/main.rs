//! `loader`: the data-loading daemon and its tools.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loader", about = "UDI data loader: multi-crop augmentation and its tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One PNG with the source image, the crop boxes, and every crop with its SRS samples.
    Preview(loader::preview::PreviewArgs),
    /// Images/s for decode only, decode + geometry + resize, and the full recipe.
    Bench(loader::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Preview(a) => loader::preview::cli(&a),
        Cmd::Bench(a) => loader::bench::cli(&a),
    }
}
