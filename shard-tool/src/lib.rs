//! `shard-tool`: pack an image folder into checksummed shards (see `shared::shard` FORMAT),
//! inspect and verify them, benchmark packing and reading, and generate a synthetic dataset.
//!
//! * [`pack`]: listing (ImageFolder / flat / file list), parallel processing, atomic finish.
//! * [`decode`]: the reference decoder (`decode_rgb`) and format sniffing.
//! * [`inspect`], [`verify`]: summaries and integrity checks.
//! * [`synth`]: a generated labelled ImageFolder for demos and tests.
//! * [`bench`]: throughput next to same-run baselines.

pub mod bench;
pub mod decode;
pub mod inspect;
pub mod pack;
pub mod synth;
pub mod verify;
