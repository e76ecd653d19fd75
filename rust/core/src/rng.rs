//! SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, seeded
//! generator. Faults, simulations and property tests draw from it so that a
//! seed replays the same run, with no dependency.

/// The generator's state; `SplitMix64(seed)` starts a sequence.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

/// Mixes a stream number into a seed: neighbouring streams (requests,
/// clients, epochs) of one seed get unrelated sequences.
const STREAM_MIX: u64 = 0xD1B5_4A32_D192_ED03;

impl SplitMix64 {
    /// The sequence for stream `stream` of `seed`.
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        SplitMix64(seed ^ stream.wrapping_mul(STREAM_MIX))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so `ln` and `powf(-x)` stay finite.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_draws_stay_in_range() {
        let (mut a, mut b) = (SplitMix64::for_stream(7, 3), SplitMix64::for_stream(7, 3));
        let mut other = SplitMix64::for_stream(7, 4);
        let draws: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        assert_eq!(draws, (0..100).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(draws[0], other.next_u64());
        for _ in 0..10_000 {
            let u = a.unit();
            assert!(u > 0.0 && u <= 1.0);
            assert!(a.below(13) < 13);
        }
    }
}
