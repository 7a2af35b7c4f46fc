//! Formats and protocols that the `shard-tool`, `loader` and `trainer` processes agree on.
//!
//! * [`config`]: the data/augmentation part of a run's TOML config (shared by loader and trainer).
//! * [`rng`]: counter-based randomness keyed by (seed, epoch, sample index): crops and batch order
//!   never depend on thread or process scheduling.
//! * [`geometry`]: per-crop metadata and the compact SRS row format (see `geometry` docs).
//! * [`batch`]: the byte layout of one finished batch (BATCH LAYOUT section), used both by the
//!   in-process pipeline and by ring slots.
//! * [`shard`]: the on-disk shard format (FORMAT section) and its reader.
//! * [`ring`]: the shared-memory ring protocol (PROTOCOL section).

pub mod batch;
pub mod config;
pub mod geometry;
pub mod ring;
pub mod rng;
pub mod shard;
