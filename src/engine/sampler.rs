//! Seeded shuffling sampler: every epoch is a fresh permutation of all training
//! rows, so batches follow the data's own (long-tailed) class distribution.
//!
//! The batch of a step is a pure function of (seed, step): resuming from a
//! checkpoint at step k draws exactly the batches an uninterrupted run draws.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Stream id of the sampler's RNG, so it never shares draws with model init.
const SAMPLER_STREAM: u64 = 0x5a4d_504c;

/// Instance-balanced shuffling sampler over `n` rows in batches of `batch`.
#[derive(Clone, Debug)]
pub struct Sampler {
    n: usize,
    batch: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl Sampler {
    /// A sampler over `n > 0` rows with batch size `batch > 0` (the last batch
    /// of an epoch may be smaller).
    pub fn new(n: usize, batch: usize, seed: u64) -> Self {
        Self { n, batch: batch.max(1), seed, cached: None }
    }

    /// Batches per epoch, ceil(n / batch).
    pub fn steps_per_epoch(&self) -> u64 {
        self.n.div_ceil(self.batch) as u64
    }

    /// The permutation of epoch `epoch`.
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(SAMPLER_STREAM.wrapping_add(epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let mut p: Vec<usize> = (0..self.n).collect();
        p.shuffle(&mut rng);
        p
    }

    /// Row indices of global step `step`.
    pub fn batch(&mut self, step: u64) -> Vec<usize> {
        let spe = self.steps_per_epoch().max(1);
        let (epoch, pos) = (step / spe, (step % spe) as usize);
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            self.cached = Some((epoch, self.permutation(epoch)));
        }
        let Some((_, perm)) = &self.cached else { return Vec::new() };
        let start = pos * self.batch;
        perm[start..(start + self.batch).min(self.n)].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cover_every_row_once() {
        let mut s = Sampler::new(10, 3, 7);
        assert_eq!(s.steps_per_epoch(), 4);
        let mut all: Vec<usize> = (0..4).flat_map(|i| s.batch(i)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_ne!(s.batch(0), s.batch(4), "a new epoch reshuffles");
        assert_eq!(Sampler::new(10, 3, 7).batch(5), s.batch(5));
    }
}
