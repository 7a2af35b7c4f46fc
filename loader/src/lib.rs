//! The UDI data loader: decode, multi-crop augmentation, SRS rows (udi-spec §1), batch assembly
//! into the shared-memory ring, and the CLI tools around them.
//!
//! * [`decode`]: JPEG (libjpeg-turbo), PNG and raw-zstd records to RGB8.
//! * [`crops`]: crop geometry (random-resized-crop, overlap-constrained crop, reference box).
//! * [`photometric`]: colour jitter, grayscale, blur, solarise with PIL semantics, in uint8;
//!   [`fused`] runs them in few passes, [`hue_simd`] / [`hue_avx512`] hold the AVX2 / AVX-512
//!   hue kernels, [`planes_avx512`] the AVX-512 plane shuffles and tables of the passes.
//! * [`srs`]: SRS masks and the cross-view projection rows.
//! * [`resample`]: Pillow's antialiased bicubic resize, bit for bit (AVX-512, AVX2 and scalar);
//!   [`pillow`] runs real Pillow (pinned, in a venv) for the bench baseline and the tests.
//! * [`engine`]: [`engine::CropEngine`] ties them together into a [`shared::geometry::Sample`];
//!   [`fast_resize`] is the opt-in `resize = "fast"` path.
//! * [`source`]: [`source::DatasetSource`], the [`shared::geometry::SampleSource`] over records.
//! * [`folder`]: an in-memory record set from a folder of image files (tests, bench, preview).
//! * [`simd`]: the CPU's SIMD level, as the kernels with several variants dispatch on it.
//! * [`bench`], [`preview`]: the `loader bench` / `loader preview` subcommands.
//! * [`produce`]: batch assembly; [`daemon`]: `loader run` / `loader status`;
//!   [`ring_tools`]: `loader tap`, `loader bench-ring`.
//!
//! Ring workflow (protocol: `shared::ring`):
//! ```text
//! loader run --ring NAME --config configs/X.toml --shards DIR --threads N   # one or more
//! loader status --ring NAME            # producers, fill level, batches/s
//! loader tap --ring NAME --batches 5 --json   # or the trainer as the consumer
//! loader bench-ring --batch-size 32    # hand-over vs memcpy, images/s vs in-process
//! ```

pub mod bench;
pub mod crops;
pub mod daemon;
pub mod decode;
pub mod engine;
pub mod fast_resize;
pub mod folder;
pub mod fused;
#[cfg(target_arch = "x86_64")]
pub mod hue_avx512;
#[cfg(target_arch = "x86_64")]
pub mod hue_simd;
pub mod photometric;
pub mod pillow;
#[cfg(target_arch = "x86_64")]
pub mod planes_avx512;
pub mod preview;
pub mod produce;
pub mod resample;
pub mod ring_tools;
pub mod simd;
pub mod source;
pub mod srs;
