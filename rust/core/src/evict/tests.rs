use std::collections::HashMap;

use super::trace::{compare, replay, replay_min, Simulated, TraceSpec};
use super::*;
use crate::rng::SplitMix64 as Rng;

#[test]
fn parse_names_the_policies_and_the_bad_value() {
    assert!(matches!(
        Policy::parse("s3fifo").unwrap(),
        Policy::S3Fifo(_)
    ));
    assert!(matches!(Policy::parse("lru").unwrap(), Policy::Lru(_)));
    for bad in ["LRU", "", "s3-fifo", "arc"] {
        let err = Policy::parse(bad).unwrap_err().to_string();
        assert!(err.contains(&format!("{bad:?}")), "{err}");
        assert!(err.contains("s3fifo") && err.contains("lru"), "{err}");
    }
}

#[test]
fn lru_evicts_the_least_recently_used() {
    let mut p = Policy::parse("lru").unwrap();
    for id in 1..=3 {
        p.admit(id, 10 * id);
    }
    p.hit(1);
    assert_eq!(p.evict(), Some((2, 20)));
    assert_eq!(p.evict(), Some((3, 30)));
    assert_eq!(p.evict(), Some((1, 10)));
    assert_eq!(p.evict(), None);
}

#[test]
fn s3fifo_drops_one_hit_wonders_and_keeps_reread_blocks() {
    let mut p = S3Fifo::default();
    // A block read while in the small queue moves to main; unread ones
    // leave first, in FIFO order, and become ghosts.
    for id in 0..10 {
        p.admit(id, 1);
    }
    p.hit(0);
    assert_eq!(p.evict(), Some((1, 1)));
    assert!(p.is_ghost(1));
    // A ghost coming back goes to main, not to probation.
    p.admit(1, 1);
    for _ in 0..8 {
        let (victim, _) = p.evict().unwrap();
        assert!(victim != 0 && victim != 1, "evicted {victim}");
    }
}

#[test]
fn s3fifo_resists_a_scan_that_flushes_lru() {
    // A hot set read twice, then a one-pass scan as large as the cache:
    // S3-FIFO keeps the hot set in main, LRU loses all of it.
    let capacity = 100u64;
    let hot: Vec<BlockId> = (0..50).collect();
    let scan: Vec<BlockId> = (1000..1100).collect();
    for name in Policy::NAMES {
        let mut p = Policy::parse(name).unwrap();
        let mut resident: HashMap<BlockId, u64> = HashMap::new();
        let mut read = |p: &mut Policy, id: BlockId| {
            if resident.contains_key(&id) {
                p.hit(id);
                return;
            }
            while resident.len() as u64 >= capacity {
                let (v, _) = p.evict().unwrap();
                resident.remove(&v);
            }
            p.admit(id, 1);
            resident.insert(id, 1);
        };
        for _ in 0..2 {
            hot.iter().for_each(|&id| read(&mut p, id));
        }
        scan.iter().for_each(|&id| read(&mut p, id));
        let kept = hot.iter().filter(|&&id| p.contains(id)).count();
        match name {
            "lru" => assert_eq!(kept, 0),
            _ => assert_eq!(kept, hot.len(), "{name}"),
        }
    }
}

/// Random admits, hits, removes and evictions against a model of the
/// resident set; the policy's accounting must match it at every step,
/// victims must be resident with the size admitted, and a removed id must
/// never come back as a victim. Half-way the state goes through JSON.
fn check_invariants<P>(mut make: impl FnMut() -> P, resident_bytes: impl Fn(&P) -> u64)
where
    P: Eviction + serde::Serialize + serde::de::DeserializeOwned,
{
    for seed in 0..200u64 {
        let mut rng = Rng(seed);
        let mut p = make();
        let mut model: HashMap<BlockId, u64> = HashMap::new();
        let ids = 1 + rng.below(64);
        let steps = 300;
        for step in 0..steps {
            if step == steps / 2 {
                let json = serde_json::to_string(&p).unwrap();
                p = serde_json::from_str(&json).unwrap();
            }
            let id = rng.below(ids);
            match rng.below(10) {
                0..=3 => {
                    let bytes = rng.below(5) * 1000 + rng.below(1000);
                    p.admit(id, bytes);
                    model.insert(id, bytes);
                }
                4..=6 => p.hit(id),
                7 => {
                    p.remove(id);
                    model.remove(&id);
                }
                _ => match p.evict() {
                    Some((victim, bytes)) => {
                        assert_eq!(
                            model.remove(&victim),
                            Some(bytes),
                            "seed {seed} step {step}: victim {victim} not resident at {bytes} bytes"
                        );
                    }
                    None => assert!(model.is_empty(), "seed {seed}: no victim among {model:?}"),
                },
            }
            assert_eq!(
                resident_bytes(&p),
                model.values().sum::<u64>(),
                "seed {seed} step {step}"
            );
        }
        // Draining returns every resident block exactly once.
        while let Some((victim, bytes)) = p.evict() {
            assert_eq!(model.remove(&victim), Some(bytes), "seed {seed}");
        }
        assert!(model.is_empty(), "seed {seed}: never evicted {model:?}");
        assert_eq!(resident_bytes(&p), 0);
    }
}

#[test]
fn lru_keeps_its_invariants() {
    check_invariants(Lru::default, Lru::resident_bytes);
}

#[test]
fn s3fifo_keeps_its_invariants() {
    check_invariants(S3Fifo::default, S3Fifo::resident_bytes);
    check_invariants(|| S3Fifo::new(0.3, 2), S3Fifo::resident_bytes);
}

#[test]
fn policy_enum_keeps_its_invariants() {
    for name in Policy::NAMES {
        check_invariants(|| Policy::parse(name).unwrap(), Policy::resident_bytes);
    }
}

#[test]
fn plan_aware_keeps_its_invariants() {
    let mut plans = Rng(7);
    for name in Policy::NAMES {
        check_invariants(
            || {
                let mut p = PlanAware::new(Policy::parse(name).unwrap(), 16);
                p.extend_plan((0..200).map(|_| plans.below(64)));
                p
            },
            PlanAware::resident_bytes,
        );
    }
}

#[test]
fn plan_aware_never_evicts_a_block_needed_sooner_than_the_victim() {
    for seed in 0..100u64 {
        let mut rng = Rng(seed);
        let universe = 40;
        let plan: Vec<BlockId> = (0..400).map(|_| rng.below(universe)).collect();
        let lookahead = 1 + rng.below(30) as usize;
        let mut p = PlanAware::new(Policy::parse("s3fifo").unwrap(), lookahead);
        p.extend_plan(plan.iter().copied());
        let capacity = 1 + rng.below(20) as usize;
        let mut resident: Vec<BlockId> = Vec::new();
        for &id in &plan {
            if resident.contains(&id) {
                p.hit(id);
                continue;
            }
            if resident.len() == capacity {
                let (victim, _) = p.evict().unwrap();
                resident.retain(|&r| r != victim);
                if let Some(v) = p.next_read(victim) {
                    // Only when every other resident block is read before it.
                    for &r in &resident {
                        let n = p.next_read(r);
                        assert!(
                            n.is_some_and(|n| n <= v),
                            "seed {seed}: evicted {victim} (read at {v}) over {r} ({n:?})"
                        );
                    }
                }
            }
            p.admit(id, 1);
            resident.push(id);
        }
    }
}

#[test]
fn plan_aware_without_look_ahead_is_its_base_policy() {
    let trace = small_trace(false, 2).trace().unwrap();
    let capacity = trace.dataset_bytes / 2;
    let base = replay(&trace, capacity, &mut Policy::parse("s3fifo").unwrap()).unwrap();
    let wrapped = replay(
        &trace,
        capacity,
        &mut PlanAware::new(Policy::parse("s3fifo").unwrap(), 0),
    )
    .unwrap();
    assert_eq!(base.epochs, wrapped.epochs);
}

fn small_trace(ragged: bool, workers: u32) -> TraceSpec {
    TraceSpec {
        objects: 300,
        block_bytes: 1 << 20,
        max_blocks: 6,
        ragged,
        epochs: 4,
        workers,
        seed: 42,
    }
}

#[test]
fn every_epoch_reads_every_block_once_in_a_fresh_order() {
    for workers in [1, 4] {
        let spec = small_trace(true, workers);
        let trace = spec.trace().unwrap();
        assert_eq!(trace.reads, spec.trace().unwrap().reads, "seeded");
        let mut first: Vec<BlockId> = trace.epoch(0).iter().map(|r| r.id).collect();
        for e in 1..spec.epochs as usize {
            let mut ids: Vec<BlockId> = trace.epoch(e).iter().map(|r| r.id).collect();
            assert_ne!(ids, first, "epoch {e} repeats epoch 0's order");
            assert_eq!(ids.len(), trace.blocks);
            let bytes: u64 = trace.epoch(e).iter().map(|r| r.bytes).sum();
            assert_eq!(bytes, trace.dataset_bytes);
            ids.sort_unstable();
            first.sort_unstable();
            assert_eq!(ids, first);
            ids.dedup();
            assert_eq!(ids.len(), trace.blocks, "a block read twice in epoch {e}");
            first = trace.epoch(0).iter().map(|r| r.id).collect();
        }
    }
    let mut bad = small_trace(true, 1);
    bad.workers = 0;
    assert!(bad.trace().unwrap_err().to_string().contains("workers"));
}

#[test]
fn whole_dataset_cache_hits_everything_after_the_first_epoch() {
    let trace = small_trace(true, 4).trace().unwrap();
    let capacity = trace.dataset_bytes;
    let mut policies: Vec<Box<dyn Simulated>> = vec![
        Box::new(Policy::parse("lru").unwrap()),
        Box::new(Policy::parse("s3fifo").unwrap()),
        Box::new(PlanAware::new(Policy::parse("s3fifo").unwrap(), 512)),
    ];
    for p in policies.iter_mut() {
        let r = replay(&trace, capacity, p.as_mut()).unwrap();
        assert_eq!(r.hit_ratio(1), 1.0, "{p:?}");
        assert_eq!(r.epochs[0].hits, 0);
        assert_eq!(r.evictions, 0);
    }
    assert_eq!(replay_min(&trace, capacity).hit_ratio(1), 1.0);
}

#[test]
fn min_bounds_every_online_policy_and_no_cache_overflows() {
    for workers in [1, 4] {
        let trace = small_trace(false, workers).trace().unwrap();
        let rows = compare(&trace, &[0.25, 0.5, 0.75], 256).unwrap();
        for row in &rows {
            for (name, online) in [
                ("lru", row.lru),
                ("s3fifo", row.s3fifo),
                ("plan-aware", row.plan_aware),
                ("plan-aware epoch", row.plan_aware_epoch),
            ] {
                assert!(
                    row.min >= online,
                    "{name} {online} beats MIN {} at {}",
                    row.min,
                    row.cache_share
                );
                assert!((0.0..1.0).contains(&online), "{name} {online}");
            }
        }
        // Hit ratios grow with the cache.
        for pair in rows.windows(2) {
            assert!(pair[1].min >= pair[0].min);
            assert!(pair[1].lru >= pair[0].lru);
        }
        for share in [0.25, 0.5] {
            let capacity = (trace.dataset_bytes as f64 * share) as u64;
            for name in Policy::NAMES {
                let r = replay(&trace, capacity, &mut Policy::parse(name).unwrap()).unwrap();
                assert!(r.peak_bytes <= capacity);
                assert!(r.evictions > 0);
            }
            assert!(replay_min(&trace, capacity).peak_bytes <= capacity);
        }
    }
}
