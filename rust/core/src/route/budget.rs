//! The retry budget shared by retries and hedges, and backoff with jitter.
//!
//! The budget is Finagle's: every request deposits `ratio` of a token, a
//! floor of `floor_per_s` tokens accrues each second (so a quiet client can
//! still retry), and each retry or hedge withdraws one token. Deposits decay
//! with a time constant of `TTL` instead of expiring one by one, which bounds
//! the balance at about `(ratio × request rate + floor) × TTL` without a
//! window of timestamps. When the cluster is sick, extra requests stay near
//! `ratio` of the traffic instead of multiplying it (no retry storm).

use crate::fork::ForkMutex;
use std::cell::Cell;
use std::time::{Duration, Instant};

use super::config::HEDGE_RESERVE_SHARE;
use crate::counter::StripedCounter;

/// How long a deposit counts (the decay time constant of the balance).
pub const TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct State {
    balance: f64,
    stamp: Instant,
}

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_s: f64,
    /// Requests not yet folded into the balance: a deposit is one atomic
    /// add on the read path (striped, so reader threads do not share its
    /// line); withdrawals (rare) settle under the lock.
    pending: StripedCounter,
    state: ForkMutex<State>,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_s: f64) -> Self {
        RetryBudget {
            ratio,
            floor_per_s,
            pending: StripedCounter::new(),
            // Start at the balance an idle client converges to (floor × TTL),
            // not at zero: a fresh client whose replica is already dead sends
            // a burst of first reads (a whole prefetch depth, a cat_ranges
            // batch) that must all fail over before ejection kicks in.
            state: ForkMutex::new(State {
                balance: floor_per_s * TTL.as_secs_f64(),
                stamp: Instant::now(),
            }),
        }
    }

    fn settle(&self, state: &mut State, now: Instant) {
        let requests = self.pending.take();
        state.balance += requests as f64 * self.ratio;
        let dt = now.saturating_duration_since(state.stamp).as_secs_f64();
        if dt > 0.0 {
            let ttl = TTL.as_secs_f64();
            let decay = (-dt / ttl).exp();
            // Floor accrual with the same decay: the balance tends to
            // floor × TTL when idle.
            state.balance = state.balance * decay + self.floor_per_s * ttl * (1.0 - decay);
            state.stamp = now;
        }
    }

    /// A new request: deposits `ratio` of a token.
    pub fn deposit(&self) {
        self.pending.add(1);
    }

    /// Takes one token for a retry, if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.withdraw_above(0.0)
    }

    /// Takes one token for a hedge, if one is left above the failover
    /// reserve ([`HEDGE_RESERVE_SHARE`] of the idle balance, at least one
    /// token): hedges are optional, failover is not, so a run of hedges
    /// must never leave a failing read without the token it needs.
    pub fn try_withdraw_hedge(&self) -> bool {
        let reserve = (self.floor_per_s * TTL.as_secs_f64() * HEDGE_RESERVE_SHARE).max(1.0);
        self.withdraw_above(reserve)
    }

    fn withdraw_above(&self, reserve: f64) -> bool {
        let now = Instant::now();
        let mut s = self.state.lock();
        self.settle(&mut s, now);
        if s.balance >= 1.0 + reserve {
            s.balance -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn balance(&self) -> f64 {
        let mut s = self.state.lock();
        self.settle(&mut s, Instant::now());
        s.balance
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        t ^ (&local as *const u8 as u64).rotate_left(32) | 1
    });
}

/// A uniform draw in [0, 1) from a per-thread splitmix64 (jitter needs
/// spread, not cryptography).
pub fn random_unit() -> f64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    })
}

/// "Full jitter" exponential backoff (AWS architecture blog): a uniform
/// wait in `[0, min(cap, base × 2^(retry-1))]`, which spreads retries of
/// many clients instead of synchronising them.
pub fn backoff(retry: u32, base: Duration, cap: Duration) -> Duration {
    if retry == 0 || base.is_zero() {
        return Duration::ZERO;
    }
    let ceiling = base.saturating_mul(1u32 << (retry - 1).min(20)).min(cap);
    ceiling.mul_f64(random_unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_ratio_of_requests_plus_floor() {
        let b = RetryBudget::new(0.1, 0.0);
        assert!(!b.try_withdraw(), "nothing deposited yet");
        for _ in 0..100 {
            b.deposit();
        }
        let mut granted = 0;
        for _ in 0..100 {
            granted += b.try_withdraw() as u32;
        }
        // 100 requests × 10% = 10 tokens (a little decay allowed).
        assert!((9..=10).contains(&granted), "{granted}");
        let floor = RetryBudget::new(0.1, 5.0);
        let mut granted = 0;
        for _ in 0..100 {
            granted += floor.try_withdraw() as u32;
        }
        assert_eq!(granted, 50, "the idle balance (floor × TTL) up front");
    }

    #[test]
    fn hedges_leave_the_failover_reserve_alone() {
        // Idle balance 100 tokens (10/s × 10 s): hedges may take it down to
        // the reserve (a quarter), retries the rest.
        let b = RetryBudget::new(0.1, 10.0);
        let mut hedges = 0;
        while b.try_withdraw_hedge() {
            hedges += 1;
            assert!(hedges <= 100, "hedges never stop");
        }
        assert!((74..=76).contains(&hedges), "{hedges}");
        let mut retries = 0;
        while b.try_withdraw() {
            retries += 1;
            assert!(retries <= 100, "retries never stop");
        }
        assert!((24..=26).contains(&retries), "{retries}");
        // With no floor the reserve is one token: a hedge never takes the
        // last one.
        let lean = RetryBudget::new(0.9, 0.0);
        lean.deposit();
        lean.deposit();
        // 1.8 tokens: enough for a retry, not for a hedge (which would
        // leave less than the one-token reserve).
        assert!(!lean.try_withdraw_hedge());
        assert!(lean.try_withdraw());
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let base = Duration::from_millis(10);
        let cap = Duration::from_millis(50);
        assert_eq!(backoff(0, base, cap), Duration::ZERO);
        let mut distinct = std::collections::HashSet::new();
        for retry in 1..30 {
            let b = backoff(retry, base, cap);
            assert!(b <= cap);
            distinct.insert(b);
        }
        assert!(distinct.len() > 10);
        let u: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = u.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }
}
