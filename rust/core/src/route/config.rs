//! The router's knobs, validated once with errors that name the bad value.

use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::MAX_DURATION_MS;

use crate::error::{Error, Result};

pub const DEFAULT_EJECT_AFTER_FAILURES: u32 = 5;
pub const DEFAULT_BASE_EJECTION_MS: f64 = 1_000.0;
pub const DEFAULT_MAX_EJECTION_MS: f64 = 30_000.0;
pub const DEFAULT_DEADLINE_MS: f64 = 30_000.0;
pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.1;
pub const DEFAULT_RETRY_BUDGET_FLOOR_PER_S: f64 = 10.0;
pub const DEFAULT_BACKOFF_BASE_MS: f64 = 1.0;
pub const DEFAULT_BACKOFF_MAX_MS: f64 = 50.0;
/// Samples a replica's histogram needs before an adaptive hedge delay is
/// trusted; until then the delay is [`HEDGE_FALLBACK_MS`].
pub const MIN_HEDGE_SAMPLES: u64 = 20;
/// Hedging when `hedge_after_ms` is not given: at the replicas' own p95.
/// A fixed delay below the replicas' normal latency hedges most reads and
/// drains the retry budget; the p95 hedges about one read in twenty, and a
/// replica that accepts connections and never answers costs one p95 (or
/// the fallback) per read until it is ejected. Only replicas that wait on
/// the network ([`crate::store::Store::waits_on_network`]: HTTP, object
/// stores, fsspec protocols) are hedged by default; local files are not
/// unless `hedge_after_ms` is given.
pub const DEFAULT_HEDGE_AFTER: HedgeAfter = HedgeAfter::Percentile(95.0);
/// The hedge delay of a percentile with fewer than [`MIN_HEDGE_SAMPLES`]
/// samples: above a healthy object store's usual first-byte latency, far
/// below any deadline.
pub const HEDGE_FALLBACK_MS: f64 = 100.0;
/// The adaptive hedge delay is at most this many times the replica's own
/// median. When spikes are about as common as the percentile's tail (5%
/// of requests spiking against a p95), the percentile lands inside the
/// spikes about as often as below them, and a hedge sent after a spike's
/// worth of waiting cuts nothing off; a few medians is past the normal
/// reads of a network store (a log-normal with p95 at 1.6x the median has
/// p99.9 at 2.5x) and well short of a spike.
pub const HEDGE_MAX_MEDIANS: f64 = 3.0;
/// Share of the retry budget's idle balance (`floor × TTL`) that hedges
/// leave for failover: hedges stop there, retries may go on to zero.
pub const HEDGE_RESERVE_SHARE: f64 = 0.25;

pub fn hedge_fallback() -> Duration {
    Duration::from_secs_f64(HEDGE_FALLBACK_MS / 1000.0)
}

/// How the router picks among the healthy replicas of a preference list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The first healthy replica in the preference list: each object keeps
    /// hitting the same replica, whose cache stays warm.
    #[default]
    Affinity,
    /// Power of two choices: the less loaded (peak-EWMA × (in flight + 1))
    /// of the first two healthy replicas.
    P2c,
}

impl Policy {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "affinity" => Ok(Policy::Affinity),
            "p2c" => Ok(Policy::P2c),
            other => Err(Error::invalid(format!(
                "unknown policy '{other}'; use 'affinity' or 'p2c'"
            ))),
        }
    }
}

/// `hedge_after_ms` as given: a number of milliseconds or `"p95"`-style.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HedgeAfterMs {
    Ms(f64),
    Adaptive(String),
}

impl<'de> Deserialize<'de> for HedgeAfterMs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct HedgeVisitor;
        impl Visitor<'_> for HedgeVisitor {
            type Value = HedgeAfterMs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(HEDGE_EXPECTED)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<HedgeAfterMs, E> {
                Ok(HedgeAfterMs::Ms(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<HedgeAfterMs, E> {
                Ok(HedgeAfterMs::Ms(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<HedgeAfterMs, E> {
                Ok(HedgeAfterMs::Ms(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<HedgeAfterMs, E> {
                Ok(HedgeAfterMs::Adaptive(v.to_owned()))
            }
        }
        d.deserialize_any(HedgeVisitor)
    }
}

/// The default `hedge_after_ms`: hedge reads that wait on the network at
/// the replicas' own p95 ([`DEFAULT_HEDGE_AFTER`]); `None` turns hedging off.
pub const HEDGE_AUTO: &str = "auto";

const HEDGE_EXPECTED: &str = "a number of milliseconds above 0 or a percentile like 'p95'";

/// When to send a hedge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeAfter {
    Fixed(Duration),
    /// The replica's own latency at this percentile.
    Percentile(f64),
}

impl HedgeAfter {
    pub fn parse(value: &HedgeAfterMs) -> Result<Self> {
        match value {
            HedgeAfterMs::Ms(ms) => Ok(HedgeAfter::Fixed(positive_ms("hedge_after_ms", *ms)?)),
            HedgeAfterMs::Adaptive(s) => parse_percentile(s)
                .map(HedgeAfter::Percentile)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "hedge_after_ms must be {HEDGE_EXPECTED}, got {}",
                        crate::config::py_repr(&serde_json::Value::String(s.clone()))
                    ))
                }),
        }
    }
}

/// `"p95"`, `"p99.9"`: a `p`, digits, optionally a point and digits, and a
/// value strictly between 0 and 100. Nothing else `f64::parse` would take
/// (`"p1e1"`, `"pinf"`, `"p+5"`).
fn parse_percentile(s: &str) -> Option<f64> {
    let digits = s.strip_prefix('p')?;
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, "0"));
    let plain = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !plain(whole) || !plain(frac) {
        return None;
    }
    let p: f64 = digits.parse().ok()?;
    (p > 0.0 && p < 100.0).then_some(p)
}

fn positive_ms(name: &str, ms: f64) -> Result<Duration> {
    if !ms.is_finite() || ms <= 0.0 || ms > MAX_DURATION_MS {
        return Err(Error::invalid(format!(
            "{name} must be a number of milliseconds above 0 and at most {MAX_DURATION_MS:e}, got {ms}"
        )));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn non_negative_ms(name: &str, ms: f64) -> Result<Duration> {
    if !ms.is_finite() || !(0.0..=MAX_DURATION_MS).contains(&ms) {
        return Err(Error::invalid(format!(
            "{name} must be a number of milliseconds from 0 to {MAX_DURATION_MS:e}, got {ms}"
        )));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn non_negative(name: &str, v: f64) -> Result<f64> {
    if !v.is_finite() || v < 0.0 {
        return Err(Error::invalid(format!(
            "{name} must be a finite number of at least 0, got {v}"
        )));
    }
    Ok(v)
}

/// The routing section as users write it (`FileSystem(hedge_after_ms=...)`,
/// `feedline.Routing(...)`, a scenario's `[feedline]` table). `Default` holds
/// every default; unset options without one mean "off".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingOptions {
    /// Relative share of keys per replica (default: equal).
    pub weights: Option<Vec<f64>>,
    /// How to pick among a key's healthy replicas: "affinity" or "p2c".
    pub policy: String,
    /// Bounded-load factor (> 1); unset: off.
    pub load_factor: Option<f64>,
    /// Milliseconds, or "p95"-style: the replica's own latency percentile.
    pub hedge_after_ms: Option<HedgeAfterMs>,
    /// Limit on one attempt; unset: only the deadline applies.
    pub timeout_ms: Option<f64>,
    /// Limit on a whole read, retries and hedges included.
    pub deadline_ms: f64,
    /// Failures in a row that eject a replica.
    #[serde(deserialize_with = "crate::config::at_least_one")]
    pub eject_after_failures: u32,
    pub base_ejection_ms: f64,
    /// Longest ejection; unset: the larger of 30 s and `base_ejection_ms`.
    pub max_ejection_ms: Option<f64>,
    pub retry_budget_ratio: f64,
    pub retry_budget_floor_per_s: f64,
    pub backoff_base_ms: f64,
    pub backoff_max_ms: f64,
}

impl Default for RoutingOptions {
    fn default() -> Self {
        RoutingOptions {
            weights: None,
            policy: "affinity".into(),
            load_factor: None,
            hedge_after_ms: Some(HedgeAfterMs::Adaptive(HEDGE_AUTO.into())),
            timeout_ms: None,
            deadline_ms: DEFAULT_DEADLINE_MS,
            eject_after_failures: DEFAULT_EJECT_AFTER_FAILURES,
            base_ejection_ms: DEFAULT_BASE_EJECTION_MS,
            max_ejection_ms: None,
            retry_budget_ratio: DEFAULT_RETRY_BUDGET_RATIO,
            retry_budget_floor_per_s: DEFAULT_RETRY_BUDGET_FLOOR_PER_S,
            backoff_base_ms: DEFAULT_BACKOFF_BASE_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
        }
    }
}

/// Validated router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub weights: Option<Vec<f64>>,
    pub policy: Policy,
    /// Bounded-load factor (> 1); `None` turns bounded load off.
    pub load_factor: Option<f64>,
    /// The hedge delay given by the user; `None`: see `hedge_auto`.
    pub hedge_after: Option<HedgeAfter>,
    /// `hedge_after_ms="auto"` (the default): reads that wait on the
    /// network are hedged at [`DEFAULT_HEDGE_AFTER`]. False with `None`:
    /// no hedging at all.
    pub hedge_auto: bool,
    /// Limit on one attempt; `None`: only the deadline applies.
    pub timeout: Option<Duration>,
    /// Limit on a whole read, retries and hedges included.
    pub deadline: Duration,
    pub eject_after_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub retry_budget_ratio: f64,
    pub retry_budget_floor_per_s: f64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig::from_options(&RoutingOptions::default()).expect("defaults are valid")
    }
}

impl RouterConfig {
    pub fn from_options(o: &RoutingOptions) -> Result<Self> {
        let policy = Policy::parse(&o.policy)?;
        let load_factor = match o.load_factor {
            None => None,
            Some(f) if f.is_finite() && f > 1.0 => Some(f),
            Some(f) => {
                return Err(Error::invalid(format!(
                    "load_factor must be a number above 1 (e.g. 1.25), got {f}"
                )))
            }
        };
        if let Some(w) = o
            .weights
            .iter()
            .flatten()
            .find(|w| !(w.is_finite() && **w > 0.0))
        {
            return Err(Error::invalid(format!(
                "weights must be finite numbers above 0, got {w}"
            )));
        }
        let hedge_auto =
            matches!(&o.hedge_after_ms, Some(HedgeAfterMs::Adaptive(s)) if s == HEDGE_AUTO);
        let hedge_after = match &o.hedge_after_ms {
            Some(h) if !hedge_auto => Some(HedgeAfter::parse(h)?),
            _ => None,
        };
        let timeout = o
            .timeout_ms
            .map(|ms| positive_ms("timeout_ms", ms))
            .transpose()?;
        let deadline = positive_ms("deadline_ms", o.deadline_ms)?;
        if o.eject_after_failures == 0 {
            return Err(Error::invalid(
                "eject_after_failures must be at least 1, got 0",
            ));
        }
        let base_ejection = positive_ms("base_ejection_ms", o.base_ejection_ms)?;
        let max_ejection = positive_ms(
            "max_ejection_ms",
            o.max_ejection_ms
                .unwrap_or(DEFAULT_MAX_EJECTION_MS.max(o.base_ejection_ms)),
        )?;
        if max_ejection < base_ejection {
            return Err(Error::invalid(format!(
                "max_ejection_ms ({}) must be at least base_ejection_ms ({})",
                max_ejection.as_secs_f64() * 1000.0,
                base_ejection.as_secs_f64() * 1000.0
            )));
        }
        Ok(RouterConfig {
            weights: o.weights.clone(),
            policy,
            load_factor,
            hedge_after,
            hedge_auto,
            timeout,
            deadline,
            eject_after_failures: o.eject_after_failures,
            base_ejection,
            max_ejection,
            retry_budget_ratio: non_negative("retry_budget_ratio", o.retry_budget_ratio)?,
            retry_budget_floor_per_s: non_negative(
                "retry_budget_floor_per_s",
                o.retry_budget_floor_per_s,
            )?,
            backoff_base: non_negative_ms("backoff_base_ms", o.backoff_base_ms)?,
            backoff_max: non_negative_ms("backoff_max_ms", o.backoff_max_ms)?,
        })
    }
}

impl TryFrom<&RoutingOptions> for RouterConfig {
    type Error = Error;
    fn try_from(o: &RoutingOptions) -> Result<Self> {
        RouterConfig::from_options(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_with_the_value_named() {
        let ok = RouterConfig::from_options(&RoutingOptions {
            policy: "p2c".into(),
            hedge_after_ms: Some(HedgeAfterMs::Adaptive("p99.9".into())),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.policy, Policy::P2c);
        assert_eq!(ok.hedge_after, Some(HedgeAfter::Percentile(99.9)));
        let bad = |o: RoutingOptions, needle: &str| {
            let err = RouterConfig::from_options(&o).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        bad(
            RoutingOptions {
                policy: "random".into(),
                ..Default::default()
            },
            "'random'",
        );
        for ms in [0.0, -1.0, f64::NAN] {
            bad(
                RoutingOptions {
                    hedge_after_ms: Some(HedgeAfterMs::Ms(ms)),
                    ..Default::default()
                },
                "hedge_after_ms",
            );
        }
        bad(
            RoutingOptions {
                hedge_after_ms: Some(HedgeAfterMs::Adaptive("fast".into())),
                ..Default::default()
            },
            "'fast'",
        );
        bad(
            RoutingOptions {
                load_factor: Some(0.5),
                ..Default::default()
            },
            "load_factor",
        );
        bad(
            RoutingOptions {
                eject_after_failures: 0,
                ..Default::default()
            },
            "eject_after_failures",
        );
        bad(
            RoutingOptions {
                deadline_ms: -5.0,
                ..Default::default()
            },
            "deadline_ms",
        );
    }
}
