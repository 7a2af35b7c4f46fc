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
}
