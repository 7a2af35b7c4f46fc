//! UDI pre-training in candle: model (ViT with [cls] and [cls+], SRS, shared DINO head), loss,
//! optimiser and schedules (udi-spec §2–§4).
//!
//! * [`config`]: the whole TOML run config ([`config::TrainConfig`]).
//! * [`params`]: named parameter store, init, shapes/counts without allocating.
//! * [`nn`], [`vit`], [`srs`], [`head`], [`model`]: the networks.
//! * [`data`]: shared BATCH LAYOUT → [`data::TrainBatch`] device tensors.
//! * [`photometric`]: the loader's photometric decisions (`[augment] photometric = "device"`)
//!   applied to the crops on the device, bit-exact vs the loader's CPU reference.
//! * [`loss`], [`schedule`], [`optim`], [`step`]: one training iteration ([`step::Trainer`]).
//! * [`engine`]: the explicit training step (hand-written forward and backward over flat
//!   buffers), `--engine explicit`; [`step::Trainer`] is the autograd reference.
//! * [`debug`]: `init-weights`, `make-batch`, `debug-step`, `bench` behind the CLI.
//! * [`knn_eval`], [`eval`]: k-NN, linear probe, features and attention maps (udi-spec §5).
//! * [`device`]: `--device auto|cpu|cuda` → a candle `Device`, with CPU fallback (README "GPU").

pub mod bad_records;
pub mod checkpoint;
pub mod config;
pub mod crash_point;
pub mod data;
pub mod debug;
pub mod device;
pub mod dist;
pub mod engine;
pub mod eval;
pub mod export;
pub mod head;
pub mod kernels;
pub mod knn;
pub mod knn_eval;
pub mod loaders;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod optim;
pub mod params;
pub mod photometric;
pub mod plot;
pub mod prefetch;
pub mod prof;
pub mod run_dir;
pub mod schedule;
pub mod srs;
pub mod staging;
pub mod step;
pub mod train;
pub mod train_cli;
pub mod train_feed;
pub mod vit;
