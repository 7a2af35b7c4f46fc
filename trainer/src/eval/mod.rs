//! Evaluating a run as the paper reports it (udi-spec §5), beyond the k-NN of
//! [`crate::knn_eval`]:
//!
//! * [`features`]: the probe feature (final-LN class tokens of the last blocks, concatenated)
//!   and `trainer features`, which writes them with labels and sources to safetensors.
//! * [`linear`]: the linear probe (SGD, cosine per epoch), cached or with train augmentation.
//! * [`augment`] and [`randaugment`]: the linear probe's train transform.
//! * [`cli`]: the subcommands' arguments.
//! * [`attention`]: DINO's attention maps of the last block, drawn as a PNG grid.

pub mod attention;
pub mod augment;
pub mod cli;
pub mod features;
pub mod linear;
pub mod randaugment;
