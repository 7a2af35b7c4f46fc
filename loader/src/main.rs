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
    #[command(
        after_help = "Example: loader run --shards shards/train --ring s16 --config configs/udi_vit_s16_in1k.toml --threads 8 --slots 8"
    )]
    Run(loader::daemon::RunArgs),
    /// Print a ring's producers, fill level and batches/s.
    #[command(after_help = "Example: loader status --ring s16")]
    Status(loader::daemon::StatusArgs),
    /// Consume and print batches (epoch, batch, sample indices, hash).
    #[command(after_help = "Example: loader tap --ring s16 --batches 4 --detach")]
    Tap(loader::ring_tools::TapArgs),
    /// Ring hand-over bandwidth vs memcpy; images/s via loader processes vs in-process.
    #[command(
        after_help = "Example: loader bench-ring --shards shards/train --threads 4 --procs 1,2"
    )]
    BenchRing(loader::ring_tools::BenchArgs),
    /// One PNG with the source image, the crop boxes, and every crop with its SRS samples.
    #[command(
        after_help = "Example: loader preview --shards shards/train --index 0 --out crops.png"
    )]
    Preview(loader::preview::PreviewArgs),
    /// Images/s for decode only, decode + geometry + resize, and the full recipe.
    #[command(
        after_help = "Example: loader bench --shards shards/train --threads 1 --limit 500 --resize both"
    )]
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

#[cfg(test)]
#[test]
fn help_examples_and_readme_commands_parse() {
    use clap::CommandFactory;
    udi_tests::cli_doc::assert_agree_with_readmes(Cli::command(), env!("CARGO_MANIFEST_DIR"));
}
