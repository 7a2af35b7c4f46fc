//! Thin CLI over the `shard_tool` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use shard_tool::pack::{Layout, PackConfig, TargetEncoding};
use shared::shard::Dataset;

#[derive(Parser)]
#[command(
    name = "shard-tool",
    version,
    about = "Pack image folders into checksummed shards; inspect, verify, bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pack <input> (ImageFolder root, flat folder, or a text file listing images) into <out-dir>.
    #[command(after_help = "Example: shard-tool pack imagenet/train shards/train")]
    Pack {
        input: PathBuf,
        out_dir: PathBuf,
        /// jpeg: original bytes (PNG stays PNG) unless --max-side re-encodes; raw: zstd RGB8.
        #[arg(long, value_enum, default_value = "jpeg")]
        encoding: TargetEncoding,
        /// Downscale so the longer side is at most N (re-encodes).
        #[arg(long)]
        max_side: Option<u32>,
        /// JPEG quality of a re-encode.
        #[arg(long, default_value_t = 90)]
        quality: u8,
        /// Target shard size in MiB.
        #[arg(long, default_value_t = 1024)]
        shard_mib: u64,
        /// Do not decode images at pack time (faster; truncated files go unnoticed).
        #[arg(long)]
        no_validate: bool,
        /// Fail on the first bad file instead of skipping it.
        #[arg(long)]
        strict: bool,
        /// Skip the fsync before the final rename (faster; not durable against power loss).
        #[arg(long)]
        no_fsync: bool,
        #[arg(long, value_enum, default_value = "auto")]
        layout: Layout,
        /// Replace <out-dir> if it exists.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Summarise a packed directory, or show one record.
    #[command(after_help = "Example: shard-tool inspect shards/train --index 0")]
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        index: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Re-check every checksum (and with --decode, decode every image); non-zero exit if any is bad.
    #[command(after_help = "Example: shard-tool verify shards/train --decode")]
    Verify {
        dir: PathBuf,
        #[arg(long)]
        decode: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pack and read throughput next to same-run baselines.
    #[command(
        after_help = "Example: shard-tool bench photos/ --repeats 3   # a few hundred images: they are copied and packed several times"
    )]
    Bench {
        /// ImageFolder root: a few hundred photos are enough (they are copied and packed several times).
        input: PathBuf,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic labelled ImageFolder: <out-dir>/<class>/<i>.jpg.
    #[command(
        after_help = "Example: shard-tool synth data/synth --classes 10 --per-class 100 --size 64"
    )]
    Synth {
        out_dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        classes: usize,
        #[arg(long, default_value_t = 100)]
        per_class: usize,
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Pack {
            input,
            out_dir,
            encoding,
            max_side,
            quality,
            shard_mib,
            no_validate,
            strict,
            no_fsync,
            layout,
            force,
            threads,
            json,
        } => {
            if let Some(n) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()?;
            }
            let cfg = PackConfig {
                encoding,
                max_side,
                quality,
                shard_bytes: shard_mib.max(1) << 20,
                validate: !no_validate,
                strict,
                layout,
                force,
                progress: !json,
                fsync: !no_fsync,
                ..PackConfig::default()
            };
            let summary = shard_tool::pack::pack(&input, &out_dir, &cfg)?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Cmd::Inspect { dir, index, json } => {
            let ds = Dataset::open(&dir)?;
            match index {
                Some(i) => {
                    let info = shard_tool::inspect::record_info(&ds, i)?;
                    if json {
                        println!("{}", serde_json::to_string(&info)?);
                    } else {
                        println!("{}", serde_json::to_string_pretty(&info)?);
                    }
                }
                None => {
                    let summary = shard_tool::inspect::summarize(&ds)?;
                    if json {
                        println!("{}", serde_json::to_string(&summary)?);
                    } else {
                        print!("{summary}");
                    }
                }
            }
        }
        Cmd::Verify { dir, decode, json } => {
            let report = shard_tool::verify::verify(&dir, decode)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for b in &report.bad {
                    println!("{b}");
                }
                println!(
                    "{} records checked{}: {} ok, {} bad",
                    report.records,
                    if decode { " and decoded" } else { "" },
                    report.ok,
                    report.bad.len()
                );
            }
            if !report.is_ok() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Bench {
            input,
            repeats,
            json,
        } => {
            let report = shard_tool::bench::bench(&input, repeats)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
        }
        Cmd::Synth {
            out_dir,
            classes,
            per_class,
            size,
            seed,
        } => {
            shard_tool::synth::write_imagefolder(&out_dir, classes, per_class, size, seed)?;
            println!(
                "wrote {} images to {}",
                classes * per_class,
                out_dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
#[test]
fn help_examples_and_readme_commands_parse() {
    use clap::CommandFactory;
    udi_tests::cli_doc::assert_agree_with_readmes(Cli::command(), env!("CARGO_MANIFEST_DIR"));
}
