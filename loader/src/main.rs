//! `loader`: the data-loading daemon and its tools.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loader",
    about = "UDI data loader: multi-crop augmentation into a shared-memory ring"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Produce batches into ring NAME until stopped (SIGINT/SIGTERM) or the consumer leaves.
    Run(loader::daemon::RunArgs),
    /// Print a ring's producers, fill level and batches/s.
    Status(loader::daemon::StatusArgs),
    /// Consume and print batches (epoch, batch, sample indices, hash).
    Tap(loader::ring_tools::TapArgs),
    /// Ring hand-over bandwidth vs memcpy; images/s via loader processes vs in-process.
    BenchRing(loader::ring_tools::BenchArgs),
    /// One PNG with the source image, the crop boxes, and every crop with its SRS samples.
    Preview(loader::preview::PreviewArgs),
    /// Images/s for decode only, decode + geometry + resize, and the full recipe.
    Bench(loader::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => loader::daemon::run(&a),
        Cmd::Status(a) => loader::daemon::status(&a),
        Cmd::Tap(a) => loader::ring_tools::tap(&a),
        Cmd::BenchRing(a) => loader::ring_tools::bench(&a),
        Cmd::Preview(a) => loader::preview::cli(&a),
        Cmd::Bench(a) => loader::bench::cli(&a),
    }
}
