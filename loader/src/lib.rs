//! The data-loading side: batch assembly ([`produce`]), the `loader run` producer daemon and
//! `loader status` ([`daemon`]), and ring tools: `loader tap`, `loader bench-ring` ([`ring_tools`]).
//!
//! Ring workflow (protocol: `shared::ring`):
//! ```text
//! loader run --ring NAME --config configs/X.toml --shards DIR --threads N   # one or more
//! loader status --ring NAME            # producers, fill level, batches/s
//! loader tap --ring NAME --batches 5 --json   # or the trainer as the consumer
//! loader bench-ring --batch-size 32    # hand-over vs memcpy, images/s vs in-process
//! ```

pub mod daemon;
pub mod produce;
pub mod ring_tools;
