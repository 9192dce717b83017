//! The one random generator of the benchmarks: SplitMix64, seeded, so that two runs generate
//! the same shapes of data (ids stay fresh UUIDs, as a producer's would be).
//!
//! Rule kept: nothing in `bench/` draws numbers any other way; a generator is a stream
//! ([`SplitMix64::next_u64`]) or, where many tasks need the same value for an index without
//! sharing state, one step from that index ([`SplitMix64::at`]).

use stripe_standin::state::Rng;

/// SplitMix64 (Steele, Lea, Flood 2014): enough spread for benchmark data. The stream is the
/// Stripe stand-in's (`stripe_standin::state::Rng`), so bench carries no copy of the
/// algorithm; this type adds what the benchmarks draw, and the test below pins the stream.
#[derive(Debug, Clone)]
pub struct SplitMix64(Rng);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(Rng::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..bound` (`bound` > 0; the modulo's bias is far below what matters here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// The value a generator seeded with `index` gives first: the same for the same index in
    /// any task, with no shared state.
    pub fn at(index: u64) -> u64 {
        Self::new(index).next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_splitmix64() {
        // The reference implementation's first outputs from seed 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(SplitMix64::at(0), 0xe220_a839_7b1d_cdaf);
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}
