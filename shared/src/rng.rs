//! Counter-based randomness: every random decision is keyed by (seed, domain, epoch, index),
//! never by which thread or process did the work. ChaCha8 with the key derived from
//! (seed, domain, epoch) and the 64-bit stream id = sample index.

use rand::seq::SliceRandom;
use rand::SeedableRng;
pub use rand_chacha::ChaCha8Rng;

/// Independent random streams; a new use gets a new domain, so adding one never shifts another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Domain {
    /// Crop geometry, photometric augmentation and SRS masks of one sample.
    Crops = 1,
    /// The per-epoch permutation of sample indices.
    Permutation = 2,
    /// Model initialisation.
    Init = 3,
    /// Stochastic depth and other per-step trainer randomness (index = global step).
    Step = 4,
}

/// The generator for (seed, domain, epoch, index).
pub fn rng_for(seed: u64, domain: Domain, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(domain as u64).to_le_bytes());
    key[16..24].copy_from_slice(&epoch.to_le_bytes());
    key[24..32].copy_from_slice(b"UDI-rng1");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(index);
    rng
}

/// The crop generator of one sample.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    rng_for(seed, Domain::Crops, epoch, index)
}

/// A permutation of `0..n` for `epoch` (Fisher–Yates on the epoch's stream).
pub fn epoch_permutation(seed: u64, epoch: u64, n: u64) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..n).collect();
    perm.shuffle(&mut rng_for(seed, Domain::Permutation, epoch, 0));
    perm
}

/// Batches per epoch with drop_last.
pub fn batches_per_epoch(n_samples: u64, batch_size: u32) -> u64 {
    n_samples / batch_size as u64
}

/// The sample indices of batch `batch` of `epoch`: permutation entries [bB, (b+1)B).
pub fn batch_samples(perm: &[u64], batch: u64, batch_size: u32) -> &[u64] {
    let b = batch_size as usize;
    let start = batch as usize * b;
    &perm[start..start + b]
}

/// One data-parallel rank's share of the sample order.
///
/// The global batch of a step is `world · accumulate` consecutive batches of the one-process
/// order ([`batch_samples`] with the per-rank batch size), so the samples of step `s` depend on
/// (seed, epoch, s) and the global batch alone, never on how it is split. Rank `r` takes the
/// `accumulate` consecutive batches `r·accumulate ..` of each step, one per accumulation
/// micro-step: its `i`-th batch of an epoch is the one-process batch
/// `(i / accumulate) · world · accumulate + r · accumulate + i % accumulate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slice {
    pub world: u32,
    pub rank: u32,
    pub accumulate: u32,
}

impl Default for Slice {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Slice {
    /// One process, no accumulation: the one-process order itself.
    pub const WHOLE: Slice = Slice {
        world: 1,
        rank: 0,
        accumulate: 1,
    };

    pub fn new(world: u32, rank: u32, accumulate: u32) -> Result<Self, String> {
        if world == 0 || accumulate == 0 || rank >= world {
            return Err(format!(
                "invalid data split: rank {rank} of world size {world}, accumulation {accumulate}"
            ));
        }
        Ok(Self {
            world,
            rank,
            accumulate,
        })
    }

    /// Per-rank batches in one global batch (all ranks: `world · accumulate`).
    pub fn group(&self) -> u64 {
        self.world as u64 * self.accumulate as u64
    }

    /// The place of this rank's first batch among the `group()` batches of a step.
    pub fn first_group(&self) -> u64 {
        self.rank as u64 * self.accumulate as u64
    }

    /// The one-process batch number of this rank's batch `i` of an epoch.
    pub fn batch_of(&self, i: u64) -> u64 {
        let k = self.accumulate as u64;
        (i / k) * self.group() + self.rank as u64 * k + i % k
    }

    /// Optimiser steps per epoch (drop_last on the global batch).
    pub fn steps_per_epoch(&self, n_samples: u64, batch_size: u32) -> u64 {
        batches_per_epoch(n_samples, batch_size) / self.group()
    }

    /// This rank's batches per epoch.
    pub fn batches_per_epoch(&self, n_samples: u64, batch_size: u32) -> u64 {
        self.steps_per_epoch(n_samples, batch_size) * self.accumulate as u64
    }

    /// The sample indices of this rank's batch `i` of the epoch whose permutation is `perm`.
    pub fn samples<'a>(&self, perm: &'a [u64], i: u64, batch_size: u32) -> &'a [u64] {
        batch_samples(perm, self.batch_of(i), batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: u64 = sample_rng(0, 1, 7).random();
        assert_eq!(a, sample_rng(0, 1, 7).random::<u64>());
        assert_ne!(a, sample_rng(0, 1, 8).random::<u64>());
        assert_ne!(a, sample_rng(0, 2, 7).random::<u64>());
        assert_ne!(a, sample_rng(1, 1, 7).random::<u64>());
        assert_ne!(a, rng_for(0, Domain::Init, 1, 7).random::<u64>());
    }

    #[test]
    fn permutation_is_a_permutation_and_reshuffles() {
        let p0 = epoch_permutation(3, 0, 1000);
        let mut sorted = p0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(p0, epoch_permutation(3, 1, 1000));
        assert_eq!(p0, epoch_permutation(3, 0, 1000));
        assert_eq!(batches_per_epoch(1000, 64), 15);
        assert_eq!(batch_samples(&p0, 2, 64), &p0[128..192]);
    }

    #[test]
    fn slices_partition_each_global_batch_in_order() {
        let perm = epoch_permutation(5, 0, 1000);
        let b = 8;
        // Global batch 32 = 4 ranks x 8, 2 ranks x 8 x accumulate 2, 1 x 8 x accumulate 4.
        for (w, k) in [(4, 1), (2, 2), (1, 4)] {
            assert_eq!(
                Slice::new(w, 0, k).unwrap().steps_per_epoch(1000, b),
                1000 / 32
            );
            for step in 0..1000 / 32 {
                let mut got = Vec::new();
                for r in 0..w {
                    let s = Slice::new(w, r, k).unwrap();
                    assert_eq!(s.batches_per_epoch(1000, b), (1000 / 32) * k as u64);
                    for m in 0..k as u64 {
                        got.extend_from_slice(s.samples(&perm, step * k as u64 + m, b));
                    }
                }
                assert_eq!(got, &perm[step as usize * 32..(step as usize + 1) * 32]);
            }
        }
        assert_eq!(
            Slice::WHOLE.samples(&perm, 3, b),
            batch_samples(&perm, 3, b)
        );
        assert!(Slice::new(2, 2, 1).is_err() && Slice::new(0, 0, 1).is_err());
        assert!(Slice::new(1, 0, 0).is_err());
        assert_eq!(Slice::new(4, 3, 2).unwrap().first_group(), 6);
        assert_eq!(Slice::new(4, 3, 2).unwrap().batch_of(0), 6);
    }
}
