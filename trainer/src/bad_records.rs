//! Records the loaders replaced (a payload that failed its CRC32C, or did not decode), counted
//! by the trainer from the batches themselves: batch b of epoch e asks for the permutation
//! entries [bB, (b+1)B) (PROTOCOL's batch order), and a loader that meets a bad record i serves
//! the next good one, i+1, i+2, … (mod n), with that index in the batch's `indices` section. So
//! an index that differs from the one asked for names every record from the asked one up to
//! (not including) the served one as bad. The count is thus the same whatever the number of
//! loader processes, and needs nothing beyond the batch layout.

use anyhow::{bail, Result};
use shared::rng::{epoch_permutation, Slice};
use std::collections::BTreeSet;

/// Names a record for messages (shard file, record, path), by dataset index.
pub type RecordNames = Box<dyn Fn(u64) -> String + Send>;

/// The distinct bad records met so far in a run, and the limit that stops it.
pub struct BadRecords {
    seed: u64,
    n: u64,
    batch_size: u32,
    /// The data-parallel rank's share of the sample order (its batches are counted here).
    slice: Slice,
    /// Bad records tolerated; one more stops the run.
    pub limit: u64,
    perm: Option<(u64, Vec<u64>)>,
    seen: BTreeSet<u64>,
}

impl BadRecords {
    /// `limit`: `[run] max_bad_records`, default 0.1 % of the `n` records of an epoch.
    pub fn new(seed: u64, n: u64, batch_size: u32, limit: Option<u64>) -> Self {
        Self {
            seed,
            n,
            batch_size,
            slice: Slice::WHOLE,
            limit: limit.unwrap_or(n / 1000),
            perm: None,
            seen: BTreeSet::new(),
        }
    }

    /// Batches are this rank's batches ([`Slice::samples`]).
    pub fn with_slice(mut self, slice: Slice) -> Self {
        self.slice = slice;
        self
    }

    /// Counts bad records found before (e.g. those saved in the checkpoint a run resumes from).
    pub fn extend(&mut self, known: impl IntoIterator<Item = u64>) {
        self.seen.extend(known);
    }

    /// Distinct bad records met so far.
    pub fn count(&self) -> u64 {
        self.seen.len() as u64
    }

    pub fn all(&self) -> impl Iterator<Item = u64> + '_ {
        self.seen.iter().copied()
    }

    /// Looks at batch `batch` of `epoch`, which holds the samples `indices`; returns the bad
    /// records it reveals that were not met before.
    pub fn observe(&mut self, epoch: u64, batch: u64, indices: &[u64]) -> Vec<u64> {
        if self.perm.as_ref().map(|p| p.0) != Some(epoch) {
            self.perm = Some((epoch, epoch_permutation(self.seed, epoch, self.n)));
        }
        let asked = self
            .slice
            .samples(&self.perm.as_ref().unwrap().1, batch, self.batch_size);
        let mut new = Vec::new();
        for (&want, &got) in asked.iter().zip(indices) {
            // At most n steps: a served index outside 0..n cannot loop forever.
            let mut i = want;
            for _ in 0..self.n {
                if i == got {
                    break;
                }
                if self.seen.insert(i) {
                    new.push(i);
                }
                i = (i + 1) % self.n;
            }
        }
        new
    }

    /// An error, naming the records, once more than `limit` were met.
    pub fn check(&self, names: &dyn Fn(u64) -> String) -> Result<()> {
        if self.count() <= self.limit {
            return Ok(());
        }
        const SHOWN: usize = 20;
        let mut list: Vec<String> = self.seen.iter().take(SHOWN).map(|&i| names(i)).collect();
        if self.seen.len() > SHOWN {
            list.push(format!("… and {} more", self.seen.len() - SHOWN));
        }
        bail!(
            "{} bad records (failed CRC32C or undecodable), more than [run] max_bad_records = {} \
             ({} records per epoch); check the shards with `shard-tool verify`:\n  {}",
            self.count(),
            self.limit,
            self.n,
            list.join("\n  ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::rng::batch_samples;

    /// What a loader serves for `asked` when the records in `bad` are bad (the next good one).
    fn served(asked: u64, n: u64, bad: &[u64]) -> u64 {
        let mut i = asked;
        while bad.contains(&i) {
            i = (i + 1) % n;
        }
        i
    }

    #[test]
    fn replaced_samples_name_every_skipped_record_once() {
        let (seed, n, b) = (4, 40, 8);
        let bad = [3, 4, 17, 39];
        let mut t = BadRecords::new(seed, n, b, Some(10));
        let mut found = Vec::new();
        for epoch in 0..2 {
            let perm = epoch_permutation(seed, epoch, n);
            for batch in 0..n / b as u64 {
                let out: Vec<u64> = batch_samples(&perm, batch, b)
                    .iter()
                    .map(|&i| served(i, n, &bad))
                    .collect();
                found.extend(t.observe(epoch, batch, &out));
            }
        }
        // Every bad record once (the second epoch adds nothing), in any order.
        found.sort();
        assert_eq!(found, bad);
        assert_eq!(t.count(), 4);
        t.check(&|i| format!("#{i}")).unwrap();
        t.limit = 3;
        let e = t.check(&|i| format!("rec-{i}")).unwrap_err().to_string();
        assert!(
            e.contains("4 bad records") && e.contains("rec-3") && e.contains("rec-39"),
            "{e}"
        );
    }

    #[test]
    fn the_default_limit_is_a_thousandth_of_an_epoch() {
        assert_eq!(BadRecords::new(0, 1_281_167, 128, None).limit, 1281);
        assert_eq!(BadRecords::new(0, 999, 1, None).limit, 0);
        assert_eq!(BadRecords::new(0, 999, 1, Some(5)).limit, 5);
    }
}
