//! The one random generator of the benchmarks: SplitMix64, seeded, so that two runs generate
//! the same shapes of data (ids stay fresh UUIDs, as a producer's would be).
//!
//! Rule kept: nothing in `bench/` draws numbers any other way; a generator is a stream
//! ([`SplitMix64::next_u64`]) or, where many tasks need the same value for an index without
//! sharing state, one step from that index ([`SplitMix64::at`]).

/// SplitMix64 (Steele, Lea, Flood 2014): enough spread for benchmark data, and a few lines.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
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
