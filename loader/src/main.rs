//! `loader`: produces UDI batches into a shared-memory ring (see `shared::ring`).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loader",
    about = "UDI data loader: builds batches into a shared-memory ring"
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => loader::daemon::run(&a),
        Cmd::Status(a) => loader::daemon::status(&a),
        Cmd::Tap(a) => loader::ring_tools::tap(&a),
        Cmd::BenchRing(a) => loader::ring_tools::bench(&a),
    }
}
