//! Weighted rendezvous (highest-random-weight) hashing: every key gets a full
//! preference list of replicas, not just a primary.
//!
//! Each replica scores each key with a hash of (key, replica seed); the key
//! goes to the highest score, then the next, and so on. With weights the
//! score is `-w / ln(u)` for `u` uniform in (0, 1) (Schindelhauer & Schomaker,
//! "Weighted distributed hash tables", 2005; Resch's logarithmic method):
//! replica `i` wins a key with probability `w_i / Σw` exactly. The seed is a
//! hash of the replica's *name*, so a replica's scores do not depend on the
//! others: removing one moves exactly the keys it was primary for, and adding
//! one takes keys only from the others' primaries.
//!
//! Why HRW and not a ring or Maglev: the preference list falls out of the
//! same scores (failover and hedging need the second and third choice), it
//! needs no table to rebuild, and for the replica counts of a storage tier
//! (≤ 64) a full lookup is tens of nanoseconds (see `benches/route.rs`).

use crate::error::{Error, Result};

/// Most replicas one router spreads keys over. Preference lists live inline
/// (no allocation per lookup) up to this size.
pub const MAX_REPLICAS: usize = 64;

/// wyhash's secret: odd 64-bit constants with balanced bits, mixed into
/// every block so that short and structured keys still spread.
const PRIME0: u64 = 0xa076_1d64_78bd_642f;
const PRIME1: u64 = 0xe703_7ed1_a0b4_28db;
const PRIME2: u64 = 0x8ebc_6af0_9c88_c6e3;

/// wyhash's folded 128-bit multiply: the mixing step of a fast, well
/// distributed non-cryptographic hash.
#[inline(always)]
fn mum(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline(always)]
fn read_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A 64-bit hash of `bytes` (wyhash-style: 8-byte words folded through
/// 128-bit multiplies). Stable across runs and platforms, so placement is
/// reproducible.
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed ^ PRIME0 ^ (bytes.len() as u64).wrapping_mul(PRIME1);
    let mut chunks = bytes.chunks_exact(16);
    for c in &mut chunks {
        h = mum(read_u64(c) ^ PRIME1 ^ h, read_u64(&c[8..]) ^ PRIME2);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 16];
        tail[..rest.len()].copy_from_slice(rest);
        h = mum(
            read_u64(&tail) ^ PRIME1 ^ h,
            read_u64(&tail[8..]) ^ PRIME2 ^ rest.len() as u64,
        );
    }
    mum(h ^ PRIME0, h ^ PRIME1)
}

/// Mixes a key hash with a replica seed into the per-(key, replica) draw.
#[inline(always)]
fn draw(key_hash: u64, seed: u64) -> u64 {
    mum(key_hash ^ seed, seed ^ PRIME2) ^ key_hash
}

/// The top 53 bits as a float strictly inside (0, 1).
#[inline(always)]
fn unit(h: u64) -> f64 {
    ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// `ln(x)` for `x` in (0, 1), to about 1e-7 absolute: the exponent from the
/// bits, the mantissa's logarithm from the atanh series. Several times
/// faster than `f64::ln`, and far more precise than weights need (a
/// relative error of 1e-7 shifts a key's share by less than that).
#[inline(always)]
fn fast_ln(x: f64) -> f64 {
    const LN2: f64 = std::f64::consts::LN_2;
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // Mantissa in [1, 2); fold it to [√½, √2) so the series converges fast.
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let mut e = exponent as f64;
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1.0;
    }
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    // ln(m) = 2·atanh(t); |t| ≤ 0.172, so t^11/11 < 4e-10.
    let series =
        t * (2.0 + t2 * (2.0 / 3.0 + t2 * (2.0 / 5.0 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0)))));
    e * LN2 + series
}

/// A key's replicas, best first, held inline.
#[derive(Clone, Copy)]
pub struct PreferenceList {
    len: u8,
    indices: [u8; MAX_REPLICAS],
}

impl PreferenceList {
    pub fn as_slice(&self) -> &[u8] {
        &self.indices[..self.len as usize]
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.as_slice().iter().map(|&i| i as usize)
    }
}

impl std::fmt::Debug for PreferenceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// The replica set's placement function.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    seeds: Vec<u64>,
    weights: Vec<f64>,
    inverse_weights: Vec<f64>,
    /// All weights equal: the score is monotonic in the raw draw, so the
    /// logarithm is skipped.
    uniform: bool,
}

impl Rendezvous {
    /// `names` identify replicas (their roots or URLs); `weights` default to
    /// 1. Names must be distinct; weights finite and positive.
    pub fn new(names: &[impl AsRef<str>], weights: Option<&[f64]>) -> Result<Self> {
        if names.is_empty() {
            return Err(Error::invalid(
                "replicas must name at least one replica, got none",
            ));
        }
        if names.len() > MAX_REPLICAS {
            return Err(Error::invalid(format!(
                "at most {MAX_REPLICAS} replicas are supported, got {}",
                names.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for n in names {
            if !seen.insert(n.as_ref()) {
                return Err(Error::invalid(format!(
                    "replica {:?} is listed twice",
                    n.as_ref()
                )));
            }
        }
        let weights = match weights {
            None => vec![1.0; names.len()],
            Some(w) => {
                if w.len() != names.len() {
                    return Err(Error::invalid(format!(
                        "weights must have one entry per replica: {} weights for {} replicas",
                        w.len(),
                        names.len()
                    )));
                }
                if let Some((i, bad)) = w
                    .iter()
                    .enumerate()
                    .find(|(_, w)| !w.is_finite() || **w <= 0.0)
                {
                    return Err(Error::invalid(format!(
                        "weight of replica {:?} must be a finite number above 0, got {bad}",
                        names[i].as_ref()
                    )));
                }
                w.to_vec()
            }
        };
        let uniform = weights.iter().all(|&w| w == weights[0]);
        Ok(Rendezvous {
            seeds: names
                .iter()
                .map(|n| hash64(n.as_ref().as_bytes(), PRIME2))
                .collect(),
            inverse_weights: weights.iter().map(|w| 1.0 / w).collect(),
            weights,
            uniform,
        })
    }

    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The packed (score, index) word that orders replicas for a key:
    /// higher is better.
    #[inline(always)]
    fn packed(&self, key_hash: u64, i: usize) -> u64 {
        let h = draw(key_hash, self.seeds[i]);
        let score = if self.uniform {
            // -w/ln(u) is monotonic in u: the raw draw orders the same way.
            h
        } else {
            // Highest -w/ln(u) = lowest -ln(u)/w (an Exp(1) draw over the
            // weight): a multiply instead of a divide. A positive f64's
            // bits order like the number, so the complement orders inversely.
            !(-fast_ln(unit(h)) * self.inverse_weights[i]).to_bits()
        };
        (score & !0x3f) | i as u64
    }

    /// The replica with the highest score for `key` (the head of its
    /// preference list, by the same comparison).
    pub fn primary(&self, key: &str) -> usize {
        let n = self.seeds.len();
        if n == 1 {
            return 0;
        }
        let kh = hash64(key.as_bytes(), 0);
        let best = (0..n).map(|i| self.packed(kh, i)).max().unwrap_or(0);
        (best & 0x3f) as usize
    }

    /// Every replica, best first, for `key`.
    pub fn preference_list(&self, key: &str) -> PreferenceList {
        let n = self.seeds.len();
        let mut list = PreferenceList {
            len: n as u8,
            indices: [0; MAX_REPLICAS],
        };
        if n == 1 {
            return list;
        }
        let kh = hash64(key.as_bytes(), 0);
        // Each entry packs an order-preserving score in the high bits and
        // the replica index in the low 6, so sorting moves one word.
        let mut packed = [0u64; MAX_REPLICAS];
        for (i, p) in packed[..n].iter_mut().enumerate() {
            *p = self.packed(kh, i);
        }
        let packed = &packed[..n];
        // Rank by counting: each entry's place is the number of entries
        // above it (all distinct: the index is in the low bits). n² compares
        // but no data-dependent branches, which beats a sort's
        // mispredictions for the replica counts a router sees.
        for &p in packed {
            let rank = packed.iter().filter(|&&q| q > p).count();
            list.indices[rank] = (p & 0x3f) as u8;
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("/data/replica-{i}")).collect()
    }

    fn key(i: u64) -> String {
        format!("shard-{i:08}/part.parquet")
    }

    #[test]
    fn fast_ln_matches_ln() {
        let mut worst: f64 = 0.0;
        for i in 1..100_000u64 {
            let x = unit(hash64(&i.to_le_bytes(), 1));
            worst = worst.max((fast_ln(x) - x.ln()).abs());
        }
        for x in [1e-16, 1e-300, 0.5, 0.999_999_999, f64::MIN_POSITIVE] {
            worst = worst.max((fast_ln(x) - x.ln()).abs() / x.ln().abs().max(1.0));
        }
        assert!(worst < 1e-7, "{worst}");
    }

    #[test]
    fn hash_is_stable_and_spreads_bits() {
        assert_eq!(hash64(b"abc", 0), hash64(b"abc", 0));
        assert_ne!(hash64(b"abc", 0), hash64(b"abd", 0));
        assert_ne!(hash64(b"", 0), hash64(b"\0", 0));
        // Each input bit flips about half the output bits.
        let base = hash64(b"0123456789abcdefXYZ", 0);
        let mut total = 0;
        for byte in 0..19 {
            for bit in 0..8 {
                let mut b = *b"0123456789abcdefXYZ";
                b[byte] ^= 1 << bit;
                total += (hash64(&b, 0) ^ base).count_ones();
            }
        }
        let mean = total as f64 / (19.0 * 8.0);
        assert!((28.0..36.0).contains(&mean), "avalanche mean {mean}");
    }

    #[test]
    fn preference_list_is_a_permutation_led_by_the_primary() {
        for weights in [None, Some(vec![1.0, 2.0, 3.0, 0.5, 1.0])] {
            let r = Rendezvous::new(&names(5), weights.as_deref()).unwrap();
            for i in 0..1000 {
                let k = key(i);
                let list = r.preference_list(&k);
                let mut sorted: Vec<u8> = list.as_slice().to_vec();
                sorted.sort();
                assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
                assert_eq!(list.as_slice()[0] as usize, r.primary(&k));
            }
        }
    }

    #[test]
    fn equal_replicas_share_a_million_keys_within_2_percent() {
        let r = Rendezvous::new(&names(8), None).unwrap();
        let mut counts = [0u64; 8];
        let keys = 1_000_000u64;
        for i in 0..keys {
            counts[r.primary(&key(i))] += 1;
        }
        let mean = keys as f64 / 8.0;
        let peak = *counts.iter().max().unwrap() as f64;
        assert!(
            peak / mean <= 1.02,
            "peak/mean {} ({counts:?})",
            peak / mean
        );
    }

    #[test]
    fn weights_are_honoured_within_2_percent() {
        let weights = [1.0, 2.0, 3.0, 4.0, 1.5, 0.5];
        let r = Rendezvous::new(&names(6), Some(&weights)).unwrap();
        let mut counts = [0u64; 6];
        let keys = 1_000_000u64;
        for i in 0..keys {
            counts[r.primary(&key(i))] += 1;
        }
        let total: f64 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let want = keys as f64 * w / total;
            let rel = (counts[i] as f64 - want).abs() / want;
            assert!(
                rel <= 0.02,
                "replica {i}: {} keys, want {want:.0} ({rel:.4})",
                counts[i]
            );
        }
    }

    #[test]
    fn removing_a_replica_moves_exactly_its_keys() {
        for weights in [None, Some(vec![1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0, 1.0])] {
            let all = names(8);
            let full = Rendezvous::new(&all, weights.as_deref()).unwrap();
            let removed = 3;
            let rest: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, n)| n.clone())
                .collect();
            let rest_weights: Option<Vec<f64>> = weights.as_ref().map(|w| {
                w.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != removed)
                    .map(|(_, w)| *w)
                    .collect()
            });
            let less = Rendezvous::new(&rest, rest_weights.as_deref()).unwrap();
            let mut moved = 0;
            for i in 0..200_000 {
                let k = key(i);
                let before = &all[full.primary(&k)];
                let after = &rest[less.primary(&k)];
                if before == &all[removed] {
                    moved += 1;
                    // Its keys go to their second choice, by name.
                    let second = full.preference_list(&k).as_slice()[1] as usize;
                    assert_eq!(after, &all[second]);
                } else {
                    assert_eq!(before, after, "key {k} moved without cause");
                }
            }
            assert!(moved > 0);
        }
    }

    #[test]
    fn rejects_bad_replica_sets() {
        let none: Vec<String> = vec![];
        assert!(Rendezvous::new(&none, None).is_err());
        let dup = vec!["a".to_string(), "a".to_string()];
        assert!(Rendezvous::new(&dup, None)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let two = names(2);
        for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
            let err = Rendezvous::new(&two, Some(&[1.0, bad])).unwrap_err();
            assert!(err.to_string().contains("weight"), "{err}");
        }
        assert!(Rendezvous::new(&two, Some(&[1.0])).is_err());
        assert!(Rendezvous::new(&names(MAX_REPLICAS + 1), None).is_err());
    }
}
