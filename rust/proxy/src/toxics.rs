//! Toxics: the faults the proxy injects into one direction of a connection,
//! named and parameterised like Toxiproxy's so that scenarios read the same.
//!
//! Two families, because they act at different grains:
//! * chunk toxics (`latency`, `bandwidth`, `slicer`) shape each chunk of data
//!   as it passes; their `toxicity` is the chance per chunk. On the upstream
//!   direction a chunk is usually one request, so `latency` with
//!   `toxicity=0.05` is "5% of requests spike".
//! * connection toxics (`timeout`, `reset_peer`, `slow_close`, `limit_data`)
//!   decide the fate of a whole connection; their `toxicity` is drawn once per
//!   connection, the first time the connection sees the toxic.

use std::time::Duration;

use feedline_core::error::{Error, Result};

/// Which way the data flows through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to upstream server (requests).
    Upstream,
    /// Upstream server to client (responses).
    Downstream,
}

impl Direction {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "upstream" => Ok(Direction::Upstream),
            "downstream" => Ok(Direction::Downstream),
            other => Err(Error::invalid(format!(
                "unknown toxic direction {other:?}: expected \"upstream\" or \"downstream\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Upstream => "upstream",
            Direction::Downstream => "downstream",
        }
    }
}

/// What a toxic does, with its parameters in their working units.
#[derive(Debug, Clone, PartialEq)]
pub enum ToxicKind {
    /// Delay each chunk by `latency ± jitter` (uniform), measured from the
    /// moment the proxy read it: a time shift, not a per-chunk stall, so a
    /// 1 MiB response is late by `latency` once, as on a long link.
    Latency { latency: Duration, jitter: Duration },
    /// Cap the rate of this direction at `bytes_per_s`.
    Bandwidth { bytes_per_s: u64 },
    /// Split each chunk into segments of `segment_bytes ± variation_bytes`,
    /// with `delay` between segments (many small TCP writes).
    Slicer {
        segment_bytes: u64,
        variation_bytes: u64,
        delay: Duration,
    },
    /// Black hole: forward nothing (data is dropped); close the connection
    /// after `timeout`, or never while the toxic is present when `None`.
    Timeout { timeout: Option<Duration> },
    /// Reset the receiving peer's connection (RST via `SO_LINGER` 0) after
    /// `timeout` (zero: at once). Data flows until then.
    ResetPeer { timeout: Duration },
    /// When the sender closes, wait `delay` before passing the close on.
    SlowClose { delay: Duration },
    /// Close the connection once `bytes` have been forwarded this way.
    LimitData { bytes: u64 },
}

impl ToxicKind {
    pub fn name(&self) -> &'static str {
        match self {
            ToxicKind::Latency { .. } => "latency",
            ToxicKind::Bandwidth { .. } => "bandwidth",
            ToxicKind::Slicer { .. } => "slicer",
            ToxicKind::Timeout { .. } => "timeout",
            ToxicKind::ResetPeer { .. } => "reset_peer",
            ToxicKind::SlowClose { .. } => "slow_close",
            ToxicKind::LimitData { .. } => "limit_data",
        }
    }

    /// Whether `toxicity` is drawn once per connection (see the module docs).
    pub fn per_connection(&self) -> bool {
        !matches!(
            self,
            ToxicKind::Latency { .. } | ToxicKind::Bandwidth { .. } | ToxicKind::Slicer { .. }
        )
    }
}

/// The kinds the proxy knows, for error messages and `--help`.
pub const KINDS: &[&str] = &[
    "latency",
    "bandwidth",
    "slicer",
    "timeout",
    "reset_peer",
    "slow_close",
    "limit_data",
];

/// One named toxic on one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Toxic {
    pub name: String,
    pub direction: Direction,
    /// Chance in [0, 1] that the toxic applies (per chunk or per connection).
    pub toxicity: f64,
    pub kind: ToxicKind,
}

/// How a parameter is read: milliseconds (fractions allowed) or a whole count.
#[derive(Clone, Copy)]
enum Unit {
    Millis,
    Count,
}

struct ParamSpec {
    name: &'static str,
    unit: Unit,
    /// `None`: required.
    default: Option<f64>,
}

const fn ms(name: &'static str, default: Option<f64>) -> ParamSpec {
    ParamSpec {
        name,
        unit: Unit::Millis,
        default,
    }
}

const fn count(name: &'static str, default: Option<f64>) -> ParamSpec {
    ParamSpec {
        name,
        unit: Unit::Count,
        default,
    }
}

fn specs(kind: &str) -> Option<&'static [ParamSpec]> {
    const LATENCY: &[ParamSpec] = &[ms("latency_ms", Some(0.0)), ms("jitter_ms", Some(0.0))];
    const BANDWIDTH: &[ParamSpec] = &[count("bytes_per_s", None)];
    const SLICER: &[ParamSpec] = &[
        count("segment_bytes", None),
        count("variation_bytes", Some(0.0)),
        ms("delay_ms", Some(0.0)),
    ];
    const TIMEOUT: &[ParamSpec] = &[ms("timeout_ms", Some(0.0))];
    const RESET_PEER: &[ParamSpec] = &[ms("timeout_ms", Some(0.0))];
    const SLOW_CLOSE: &[ParamSpec] = &[ms("delay_ms", None)];
    const LIMIT_DATA: &[ParamSpec] = &[count("bytes", None)];
    Some(match kind {
        "latency" => LATENCY,
        "bandwidth" => BANDWIDTH,
        "slicer" => SLICER,
        "timeout" => TIMEOUT,
        "reset_peer" => RESET_PEER,
        "slow_close" => SLOW_CLOSE,
        "limit_data" => LIMIT_DATA,
        _ => return None,
    })
}

fn millis(value: f64) -> Duration {
    Duration::from_secs_f64(value / 1000.0)
}

impl Toxic {
    /// Builds a toxic from loosely typed parameters (Python keyword
    /// arguments, CLI flags), naming the offending value on bad input.
    /// `toxicity` is accepted by every kind.
    pub fn from_params(
        name: &str,
        kind: &str,
        direction: &str,
        params: &[(String, f64)],
    ) -> Result<Toxic> {
        if name.is_empty() {
            return Err(Error::invalid("toxic name must not be empty"));
        }
        let direction = Direction::parse(direction)?;
        let Some(specs) = specs(kind) else {
            return Err(Error::invalid(format!(
                "unknown toxic kind {kind:?}: expected one of {}",
                KINDS.join(", ")
            )));
        };
        let mut toxicity = 1.0;
        let mut values: Vec<Option<f64>> = specs.iter().map(|s| s.default).collect();
        for (key, value) in params {
            let value = *value;
            if key == "toxicity" {
                if !(0.0..=1.0).contains(&value) {
                    return Err(Error::invalid(format!(
                        "toxic {name:?}: toxicity must be in [0, 1], got {value}"
                    )));
                }
                toxicity = value;
                continue;
            }
            let Some(i) = specs.iter().position(|s| s.name == key) else {
                let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
                return Err(Error::invalid(format!(
                    "toxic {name:?}: unknown parameter {key:?} for kind {kind:?} \
                     (expected {}, toxicity)",
                    known.join(", ")
                )));
            };
            if !value.is_finite() || value < 0.0 {
                return Err(Error::invalid(format!(
                    "toxic {name:?}: {key} must be a non-negative number, got {value}"
                )));
            }
            if matches!(specs[i].unit, Unit::Count) && value.fract() != 0.0 {
                return Err(Error::invalid(format!(
                    "toxic {name:?}: {key} must be a whole number, got {value}"
                )));
            }
            if matches!(specs[i].unit, Unit::Millis) && value > 86_400_000.0 {
                return Err(Error::invalid(format!(
                    "toxic {name:?}: {key} must be at most one day (86400000), got {value}"
                )));
            }
            values[i] = Some(value);
        }
        let mut got = Vec::with_capacity(specs.len());
        for (spec, value) in specs.iter().zip(values) {
            match value {
                Some(v) => got.push(v),
                None => {
                    return Err(Error::invalid(format!(
                        "toxic {name:?}: kind {kind:?} needs parameter {}",
                        spec.name
                    )))
                }
            }
        }
        let positive = |key: &str, v: f64| -> Result<u64> {
            if v < 1.0 {
                Err(Error::invalid(format!(
                    "toxic {name:?}: {key} must be at least 1, got {v}"
                )))
            } else {
                Ok(v as u64)
            }
        };
        let kind = match kind {
            "latency" => ToxicKind::Latency {
                latency: millis(got[0]),
                jitter: millis(got[1]),
            },
            "bandwidth" => ToxicKind::Bandwidth {
                bytes_per_s: positive("bytes_per_s", got[0])?,
            },
            "slicer" => {
                let segment_bytes = positive("segment_bytes", got[0])?;
                let variation_bytes = got[1] as u64;
                if variation_bytes >= segment_bytes {
                    return Err(Error::invalid(format!(
                        "toxic {name:?}: variation_bytes ({variation_bytes}) must be smaller \
                         than segment_bytes ({segment_bytes})"
                    )));
                }
                ToxicKind::Slicer {
                    segment_bytes,
                    variation_bytes,
                    delay: millis(got[2]),
                }
            }
            "timeout" => ToxicKind::Timeout {
                timeout: (got[0] > 0.0).then(|| millis(got[0])),
            },
            "reset_peer" => ToxicKind::ResetPeer {
                timeout: millis(got[0]),
            },
            "slow_close" => ToxicKind::SlowClose {
                delay: millis(got[0]),
            },
            "limit_data" => ToxicKind::LimitData {
                bytes: got[0] as u64,
            },
            _ => unreachable!("kind checked above"),
        };
        Ok(Toxic {
            name: name.to_owned(),
            direction,
            toxicity,
            kind,
        })
    }

    /// The parameters in the units `from_params` takes, for listings.
    pub fn params(&self) -> Vec<(&'static str, f64)> {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut out = match &self.kind {
            ToxicKind::Latency { latency, jitter } => {
                vec![("latency_ms", ms(*latency)), ("jitter_ms", ms(*jitter))]
            }
            ToxicKind::Bandwidth { bytes_per_s } => vec![("bytes_per_s", *bytes_per_s as f64)],
            ToxicKind::Slicer {
                segment_bytes,
                variation_bytes,
                delay,
            } => vec![
                ("segment_bytes", *segment_bytes as f64),
                ("variation_bytes", *variation_bytes as f64),
                ("delay_ms", ms(*delay)),
            ],
            ToxicKind::Timeout { timeout } => {
                vec![("timeout_ms", timeout.map_or(0.0, ms))]
            }
            ToxicKind::ResetPeer { timeout } => vec![("timeout_ms", ms(*timeout))],
            ToxicKind::SlowClose { delay } => vec![("delay_ms", ms(*delay))],
            ToxicKind::LimitData { bytes } => vec![("bytes", *bytes as f64)],
        };
        out.push(("toxicity", self.toxicity));
        out
    }
}

/// SplitMix64: a tiny, seedable generator, so a seed replays the same
/// jitter and the same toxicity draws (no `rand` dependency for this).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (always for 1, never for 0; no draw then,
    /// so adding a sure toxic does not shift another toxic's sequence).
    pub fn chance(&mut self, p: f64) -> bool {
        if p >= 1.0 {
            true
        } else if p <= 0.0 {
            false
        } else {
            self.next_f64() < p
        }
    }

    /// `base ± spread`, uniform, clamped at zero.
    pub fn jittered(&mut self, base: Duration, spread: Duration) -> Duration {
        if spread.is_zero() {
            return base;
        }
        let offset = (self.next_f64() * 2.0 - 1.0) * spread.as_secs_f64();
        Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.0))
    }

    /// Uniform in `[base - spread, base + spread]` (`spread < base`).
    pub fn around(&mut self, base: u64, spread: u64) -> u64 {
        if spread == 0 {
            return base;
        }
        base - spread + self.next_u64() % (2 * spread + 1)
    }
}

/// The per-connection seed of one direction, so that connections do not
/// share a jitter sequence yet a proxy seed replays all of them.
pub fn connection_seed(proxy_seed: u64, connection: u64, direction: Direction) -> u64 {
    let mut mix = SplitMix64::new(
        proxy_seed
            ^ connection.wrapping_mul(0xA24B_AED4_963E_E407)
            ^ match direction {
                Direction::Upstream => 0x5555,
                Direction::Downstream => 0xAAAA,
            },
    );
    mix.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(items: &[(&str, f64)]) -> Vec<(String, f64)> {
        items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn parses_every_kind_with_defaults() {
        for kind in KINDS {
            let params = match *kind {
                "bandwidth" => p(&[("bytes_per_s", 1000.0)]),
                "slicer" => p(&[("segment_bytes", 10.0)]),
                "slow_close" => p(&[("delay_ms", 5.0)]),
                "limit_data" => p(&[("bytes", 5.0)]),
                _ => vec![],
            };
            let t = Toxic::from_params("t", kind, "downstream", &params).unwrap();
            assert_eq!(t.kind.name(), *kind);
            assert_eq!(t.toxicity, 1.0);
            let round = Toxic::from_params(
                "t",
                kind,
                "downstream",
                &t.params()
                    .iter()
                    .filter(|(k, _)| *kind != "timeout" || *k != "timeout_ms")
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            assert_eq!(round, t);
        }
    }

    #[test]
    fn bad_input_names_the_offending_value() {
        let err = |kind: &str, dir: &str, params: &[(&str, f64)]| {
            Toxic::from_params("x", kind, dir, &p(params))
                .unwrap_err()
                .to_string()
        };
        assert!(err("lag", "upstream", &[]).contains("\"lag\""));
        assert!(err("latency", "sideways", &[]).contains("\"sideways\""));
        assert!(err("latency", "upstream", &[("latency_ms", -1.0)]).contains("latency_ms"));
        assert!(err("latency", "upstream", &[("delay", 1.0)]).contains("\"delay\""));
        assert!(err("latency", "upstream", &[("toxicity", 1.5)]).contains("toxicity"));
        assert!(err("bandwidth", "upstream", &[]).contains("bytes_per_s"));
        assert!(err("bandwidth", "upstream", &[("bytes_per_s", 0.0)]).contains("bytes_per_s"));
        assert!(err("limit_data", "upstream", &[("bytes", 1.5)]).contains("bytes"));
        assert!(err("latency", "upstream", &[("jitter_ms", f64::NAN)]).contains("jitter_ms"));
        assert!(err(
            "slicer",
            "upstream",
            &[("segment_bytes", 4.0), ("variation_bytes", 4.0)]
        )
        .contains("variation_bytes"));
        assert!(Toxic::from_params("", "latency", "upstream", &[]).is_err());
    }

    #[test]
    fn a_seed_replays_the_same_jitter() {
        let draw = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..100)
                .map(|_| rng.jittered(Duration::from_millis(5), Duration::from_millis(2)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        for d in draw(7) {
            assert!(d >= Duration::from_millis(3) && d <= Duration::from_millis(7));
        }
        let mut rng = SplitMix64::new(1);
        let hits = (0..10_000).filter(|_| rng.chance(0.05)).count();
        assert!((300..700).contains(&hits), "5% of 10000 draws gave {hits}");
        for _ in 0..1000 {
            let v = rng.around(10, 3);
            assert!((7..=13).contains(&v));
        }
    }
}
