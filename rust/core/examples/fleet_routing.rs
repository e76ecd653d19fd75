//! 1,000 clients × 16 replicas through feedline's router on a virtual
//! clock, two replicas dying and coming back; prints a Markdown table and
//! optionally writes every run's windows as JSON (for the plot).
//!
//! cargo run --release -p feedline-core --example fleet_routing -- \
//!     [--clients N] [--in-flight N] [--objects N] [--popularity shuffled|zipf:S]
//!     [--ketama FILE] [--json FILE] [--describe] [--shared]
//!
//! `--shared`: one router carries every client's reads in flight (a
//! node-level router or a proxy), instead of one router per client.
//!
//! `--ketama FILE`: one line per object, "home degraded" replica indices
//! (a ring built elsewhere, e.g. `benches/fleet_routing.py` with uhashring);
//! `--describe` prints the replica names and object keys it needs, as JSON.

use feedline_core::route::fleet::{simulate, FleetRun, FleetSpec, Outage, Popularity, Routing};
use feedline_core::route::RoutingOptions;
use feedline_core::{Error, Result};

fn options(policy: &str, load_factor: Option<f64>) -> Routing {
    Routing::Router(RoutingOptions {
        policy: policy.into(),
        load_factor,
        ..RoutingOptions::default()
    })
}

fn ketama(path: &str, objects: usize) -> Result<Routing> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid(format!("--ketama {path:?}: {e}")))?;
    let (mut home, mut degraded) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace().map(str::parse::<usize>);
        match (fields.next(), fields.next()) {
            (Some(Ok(h)), Some(Ok(d))) => {
                home.push(h);
                degraded.push(d);
            }
            _ => {
                return Err(Error::invalid(format!(
                    "--ketama {path:?} line {}: want two replica indices, got {line:?}",
                    n + 1
                )))
            }
        }
    }
    if home.len() != objects {
        return Err(Error::invalid(format!(
            "--ketama {path:?} places {} objects, the fleet reads {objects}",
            home.len()
        )));
    }
    Ok(Routing::Static { home, degraded })
}

fn main() -> Result<()> {
    let mut spec = FleetSpec {
        clients: 1000,
        replicas: 16,
        in_flight: 16,
        objects: 10_000,
        popularity: Popularity::Shuffled,
        mean_read_ms: 100.0,
        refused_ms: 1.0,
        duration_ms: 60_000,
        window_ms: 250,
        outage: Some(Outage {
            replicas: vec![3, 11],
            down_ms: 15_000,
            up_ms: 35_000,
        }),
        seed: 2026,
    };
    let (mut ketama_file, mut json, mut describe, mut shared) = (None, None, false, false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--describe" | "--shared" => {
                describe |= flag == "--describe";
                shared |= flag == "--shared";
                continue;
            }
            _ => {}
        }
        let value = args
            .next()
            .ok_or_else(|| Error::invalid(format!("{flag} needs a value")))?;
        let number = || {
            value.parse::<usize>().map_err(|_| {
                Error::invalid(format!("{flag} must be a whole number, got {value:?}"))
            })
        };
        match flag.as_str() {
            "--clients" => spec.clients = number()?,
            "--in-flight" => spec.in_flight = number()?,
            "--objects" => spec.objects = number()?,
            "--popularity" => {
                spec.popularity = match value.split_once(':') {
                    None if value == "shuffled" => Popularity::Shuffled,
                    Some(("zipf", s)) => Popularity::Zipf(s.parse().map_err(|_| {
                        Error::invalid(format!("--popularity zipf:S needs a number, got {value:?}"))
                    })?),
                    _ => {
                        return Err(Error::invalid(format!(
                            "--popularity must be shuffled or zipf:S, got {value:?}"
                        )))
                    }
                }
            }
            "--ketama" => ketama_file = Some(value),
            "--json" => json = Some(value),
            other => return Err(Error::invalid(format!("unknown flag {other:?}"))),
        }
    }
    if shared {
        // One router sees every client's reads (a node-level router or a
        // proxy): the same reads in flight, one view of the load.
        spec.in_flight *= spec.clients;
        spec.clients = 1;
    }
    if describe {
        // What a ring built elsewhere needs: replica names and object keys.
        let keys: Vec<String> = (0..spec.objects).map(FleetSpec::key).collect();
        let doc = serde_json::json!({ "spec": spec, "names": spec.replica_names(), "keys": keys });
        println!("{doc}");
        return Ok(());
    }
    let mut variants = vec![
        ("HRW, no load bound", options("affinity", None)),
        ("HRW, load_factor 1.25", options("affinity", Some(1.25))),
        ("HRW, load_factor 2", options("affinity", Some(2.0))),
        ("p2c, no load bound", options("p2c", None)),
        ("p2c, load_factor 1.25", options("p2c", Some(1.25))),
    ];
    if let Some(path) = &ketama_file {
        variants.push(("ketama (uhashring)", ketama(path, spec.objects)?));
    }
    let o = spec.outage.clone().expect("an outage is set");
    println!(
        "{} clients × {} in flight, {} replicas, {} objects ({:?}), reads ~Exp({} ms); \
         replicas {:?} down {}-{} s of {} s\n",
        spec.clients,
        spec.in_flight,
        spec.replicas,
        spec.objects,
        spec.popularity,
        spec.mean_read_ms,
        o.replicas,
        o.down_ms / 1000,
        o.up_ms / 1000,
        spec.duration_ms / 1000
    );
    println!(
        "| routing | steady peak/mean | steady affinity | outage peak/mean | outage peak / steady mean | worst 1 s in outage | outage affinity | refused attempts | worst 1 s after return | affinity, 5 s after return | rebalance after return |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let all: Vec<usize> = (0..spec.replicas).collect();
    let live = spec.live_during(o.down_ms);
    let mut runs: Vec<FleetRun> = Vec::new();
    for (name, routing) in &variants {
        let run = simulate(&spec, routing, name)?;
        let steady = run.phase(&spec, 2_000, o.down_ms, &all);
        let outage = run.phase(&spec, o.down_ms, o.up_ms, &live);
        let after = run.phase(&spec, o.up_ms, o.up_ms + 5_000, &all);
        let rebalance = match run.rebalance_ms(&spec) {
            Some(ms) => format!("{:.2} s", ms as f64 / 1000.0),
            None => "not in the run".into(),
        };
        println!(
            "| {name} | {:.3} | {:.1}% | {:.3} | {:.3} | {:.3} | {:.1}% | {} | {:.3} | {:.1}% | {rebalance} |",
            steady.peak_to_mean,
            steady.affinity * 100.0,
            outage.peak_to_mean,
            outage.peak_in_flight / steady.mean_in_flight,
            run.worst(&spec, o.down_ms, o.up_ms, 1000),
            outage.affinity * 100.0,
            outage.refused,
            run.worst(&spec, o.up_ms, o.up_ms + 5_000, 1000),
            after.affinity * 100.0,
        );
        runs.push(run);
    }
    if let Some(path) = json {
        let doc = serde_json::json!({ "spec": spec, "runs": runs });
        std::fs::write(&path, doc.to_string())
            .map_err(|e| Error::invalid(format!("--json {path:?}: {e}")))?;
    }
    Ok(())
}
