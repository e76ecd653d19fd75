//! A shuffled multi-epoch training trace, replayed against the eviction
//! policies and against Belady's offline optimum.
//!
//! The access pattern of training: every epoch reads every object once, in
//! a fresh seeded permutation; objects are cut into blocks (one block, or
//! several with a short last block); DataLoader workers take the epoch's
//! objects round-robin and their reads interleave block by block. Hit
//! ratios are byte-weighted.
//!
//! What to expect: a uniform shuffled re-read has no recency or frequency
//! signal. Every block is read exactly once per epoch, so LRU and a FIFO
//! keep whatever the end of the last epoch left and lose it at the same
//! rate; neither can tell a block about to be read from one read a moment
//! ago. Only knowledge of the order (the plan) helps.

use std::collections::{BTreeSet, HashMap};

use super::{BlockId, Eviction, PlanAware, Policy};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// The shape of a trace.
#[derive(Debug, Clone)]
pub struct TraceSpec {
    pub objects: usize,
    pub block_bytes: u64,
    /// Largest object, in blocks: half the objects are one block, the
    /// others 2..=`max_blocks` blocks.
    pub max_blocks: u32,
    /// Objects end in a short block (real files); false: whole blocks
    /// only, where Belady's rule is exactly optimal.
    pub ragged: bool,
    pub epochs: u32,
    pub workers: u32,
    pub seed: u64,
}

/// One block read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRead {
    pub id: BlockId,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub reads: Vec<BlockRead>,
    /// Index in `reads` where each epoch begins.
    pub epoch_starts: Vec<usize>,
    pub dataset_bytes: u64,
    pub blocks: usize,
}

impl Trace {
    /// The reads of epoch `e`.
    pub fn epoch(&self, e: usize) -> &[BlockRead] {
        let end = self
            .epoch_starts
            .get(e + 1)
            .copied()
            .unwrap_or(self.reads.len());
        &self.reads[self.epoch_starts[e]..end]
    }

    fn epoch_of(&self, index: usize) -> usize {
        self.epoch_starts.partition_point(|&s| s <= index) - 1
    }
}

/// Block ids: the object index in the high bits, the block in the low 20.
const BLOCK_BITS: u32 = 20;

impl TraceSpec {
    pub fn trace(&self) -> Result<Trace> {
        if self.objects == 0 || self.block_bytes == 0 || self.epochs == 0 || self.workers == 0 {
            return Err(Error::invalid(format!(
                "a trace needs objects, block_bytes, epochs and workers above 0, got {self:?}"
            )));
        }
        if self.max_blocks == 0 || self.max_blocks >= 1 << BLOCK_BITS {
            return Err(Error::invalid(format!(
                "max_blocks must be in 1..{}, got {}",
                1u32 << BLOCK_BITS,
                self.max_blocks
            )));
        }
        let mut rng = SplitMix64(self.seed);
        let objects: Vec<Vec<BlockRead>> = (0..self.objects as u64)
            .map(|o| self.object_blocks(o, &mut rng))
            .collect();
        let dataset_bytes = objects.iter().flatten().map(|b| b.bytes).sum();
        let blocks = objects.iter().map(Vec::len).sum();
        let mut reads = Vec::with_capacity(blocks * self.epochs as usize);
        let mut epoch_starts = Vec::new();
        for epoch in 0..self.epochs {
            epoch_starts.push(reads.len());
            let mut order: Vec<usize> = (0..objects.len()).collect();
            let mut rng = SplitMix64::for_stream(self.seed, epoch as u64 + 1);
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            self.interleave(&order, &objects, &mut reads);
        }
        Ok(Trace {
            reads,
            epoch_starts,
            dataset_bytes,
            blocks,
        })
    }

    fn object_blocks(&self, object: u64, rng: &mut SplitMix64) -> Vec<BlockRead> {
        let count = if self.max_blocks == 1 || rng.below(2) == 0 {
            1
        } else {
            2 + rng.below(self.max_blocks as u64 - 1)
        };
        (0..count)
            .map(|b| {
                let bytes = if self.ragged && b == count - 1 {
                    // The last block holds 1..=block_bytes bytes.
                    1 + rng.below(self.block_bytes)
                } else {
                    self.block_bytes
                };
                BlockRead {
                    id: (object << BLOCK_BITS) | b,
                    bytes,
                }
            })
            .collect()
    }

    /// Worker `w` takes the epoch's objects `w, w + W, ...` and reads them
    /// block by block; the workers take turns, one block each.
    fn interleave(&self, order: &[usize], objects: &[Vec<BlockRead>], reads: &mut Vec<BlockRead>) {
        let workers = self.workers as usize;
        let mut queues: Vec<std::iter::Peekable<_>> = (0..workers)
            .map(|w| {
                order
                    .iter()
                    .skip(w)
                    .step_by(workers)
                    .flat_map(|&o| objects[o].iter().copied())
                    .peekable()
            })
            .collect();
        loop {
            let mut any = false;
            for q in queues.iter_mut() {
                if let Some(r) = q.next() {
                    reads.push(r);
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
    }
}

/// Reads and hits of one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochCounts {
    pub reads: u64,
    pub hits: u64,
    pub read_bytes: u64,
    pub hit_bytes: u64,
}

/// What a replay measured.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    pub epochs: Vec<EpochCounts>,
    pub evictions: u64,
    /// Most bytes resident at once (never above the capacity).
    pub peak_bytes: u64,
}

impl Replay {
    /// Byte hit ratio over epochs `from..` (0-based: `1` skips the cold
    /// first epoch).
    pub fn hit_ratio(&self, from: usize) -> f64 {
        let (hit, read) = self.epochs[from.min(self.epochs.len())..]
            .iter()
            .fold((0, 0), |(h, r), e| (h + e.hit_bytes, r + e.read_bytes));
        if read == 0 {
            0.0
        } else {
            hit as f64 / read as f64
        }
    }
}

/// A policy the replay can drive: [`Eviction`] plus what a plan-aware
/// cache does (hear each epoch's plan, decline to admit, report a bypass).
pub trait Simulated: Eviction {
    fn resident_bytes(&self) -> u64;
    fn epoch_plan(&mut self, _plan: &[BlockId]) {}
    fn worth_admitting(&self, _id: BlockId) -> bool {
        true
    }
    fn bypass(&mut self, _id: BlockId) {}
}

impl Simulated for Policy {
    fn resident_bytes(&self) -> u64 {
        Policy::resident_bytes(self)
    }
}

impl Simulated for PlanAware {
    fn resident_bytes(&self) -> u64 {
        PlanAware::resident_bytes(self)
    }
    /// The plan is known an epoch at a time (`set_epoch` reveals the next
    /// permutation only when the epoch starts).
    fn epoch_plan(&mut self, plan: &[BlockId]) {
        self.extend_plan(plan.iter().copied());
    }
    fn worth_admitting(&self, id: BlockId) -> bool {
        PlanAware::worth_admitting(self, id)
    }
    fn bypass(&mut self, id: BlockId) {
        PlanAware::bypass(self, id)
    }
}

/// Replays `trace` through a cache of `capacity_bytes` evicting by
/// `policy`, checking on every read that the policy's accounting matches
/// the cache's and that every victim is a resident block of the size it
/// was admitted with. A broken invariant is an error naming it.
pub fn replay(trace: &Trace, capacity_bytes: u64, policy: &mut dyn Simulated) -> Result<Replay> {
    let mut out = Replay {
        epochs: vec![EpochCounts::default(); trace.epoch_starts.len()],
        ..Replay::default()
    };
    let mut resident: HashMap<BlockId, u64> = HashMap::new();
    let mut used = 0u64;
    for e in 0..trace.epoch_starts.len() {
        let reads = trace.epoch(e);
        let plan: Vec<BlockId> = reads.iter().map(|r| r.id).collect();
        policy.epoch_plan(&plan);
        let counts = &mut out.epochs[e];
        for r in reads {
            counts.reads += 1;
            counts.read_bytes += r.bytes;
            if resident.contains_key(&r.id) {
                counts.hits += 1;
                counts.hit_bytes += r.bytes;
                policy.hit(r.id);
                continue;
            }
            let fits = r.bytes <= capacity_bytes;
            if !fits || (used + r.bytes > capacity_bytes && !policy.worth_admitting(r.id)) {
                policy.bypass(r.id);
                continue;
            }
            while used + r.bytes > capacity_bytes {
                let (victim, bytes) = policy.evict().ok_or_else(|| {
                    violation(format!(
                        "{used} bytes resident but the policy has no victim"
                    ))
                })?;
                if resident.remove(&victim) != Some(bytes) {
                    return Err(violation(format!(
                        "victim {victim} ({bytes} bytes) is not a resident block of that size"
                    )));
                }
                used -= bytes;
                out.evictions += 1;
            }
            policy.admit(r.id, r.bytes);
            resident.insert(r.id, r.bytes);
            used += r.bytes;
            out.peak_bytes = out.peak_bytes.max(used);
            if policy.resident_bytes() != used {
                return Err(violation(format!(
                    "the policy accounts {} bytes, the cache holds {used}",
                    policy.resident_bytes()
                )));
            }
        }
    }
    Ok(out)
}

fn violation(what: String) -> Error {
    Error::invalid(format!("eviction invariant broken: {what}"))
}

/// Belady's MIN with bypass, offline: on a miss, evict the resident block
/// read furthest in the future, or do not admit the incoming one if it is
/// read later still (or never). Optimal for equal-sized blocks; for mixed
/// sizes (ragged last blocks) a close heuristic of the NP-hard optimum.
pub fn replay_min(trace: &Trace, capacity_bytes: u64) -> Replay {
    let n = trace.reads.len();
    let mut next = vec![usize::MAX; n];
    let mut last: HashMap<BlockId, usize> = HashMap::new();
    for i in (0..n).rev() {
        let id = trace.reads[i].id;
        if let Some(&j) = last.get(&id) {
            next[i] = j;
        }
        last.insert(id, i);
    }
    let mut out = Replay {
        epochs: vec![EpochCounts::default(); trace.epoch_starts.len()],
        ..Replay::default()
    };
    // Resident blocks: id → (bytes, next read); ordered by next read.
    let mut resident: HashMap<BlockId, (u64, usize)> = HashMap::new();
    let mut by_next: BTreeSet<(usize, BlockId)> = BTreeSet::new();
    let mut used = 0u64;
    for (i, r) in trace.reads.iter().enumerate() {
        let counts = &mut out.epochs[trace.epoch_of(i)];
        counts.reads += 1;
        counts.read_bytes += r.bytes;
        if let Some(entry) = resident.get_mut(&r.id) {
            counts.hits += 1;
            counts.hit_bytes += r.bytes;
            by_next.remove(&(entry.1, r.id));
            entry.1 = next[i];
            by_next.insert((next[i], r.id));
            continue;
        }
        if next[i] == usize::MAX || r.bytes > capacity_bytes {
            continue;
        }
        while used + r.bytes > capacity_bytes {
            let Some(&(latest, victim)) = by_next.last() else {
                break;
            };
            if latest <= next[i] {
                break;
            }
            by_next.pop_last();
            used -= resident.remove(&victim).map_or(0, |(b, _)| b);
            out.evictions += 1;
        }
        if used + r.bytes <= capacity_bytes {
            resident.insert(r.id, (r.bytes, next[i]));
            by_next.insert((next[i], r.id));
            used += r.bytes;
            out.peak_bytes = out.peak_bytes.max(used);
        }
    }
    out
}

/// One row of the comparison: byte hit ratios over epochs 2.. at one
/// cache size.
#[derive(Debug, Clone)]
pub struct Row {
    /// Cache size as a share of the dataset's bytes.
    pub cache_share: f64,
    pub capacity_bytes: u64,
    pub lru: f64,
    pub s3fifo: f64,
    /// S3-FIFO under [`PlanAware`] with the given look-ahead.
    pub plan_aware: f64,
    /// The same with the whole epoch's plan as look-ahead.
    pub plan_aware_epoch: f64,
    pub min: f64,
}

/// Replays `trace` against every policy at each cache share of the
/// dataset, checking every replay's invariants.
pub fn compare(trace: &Trace, cache_shares: &[f64], lookahead: usize) -> Result<Vec<Row>> {
    let epoch_reads = trace.epoch(0).len();
    cache_shares
        .iter()
        .map(|&share| {
            let capacity_bytes = (trace.dataset_bytes as f64 * share).round() as u64;
            let run = |policy: &mut dyn Simulated| -> Result<f64> {
                Ok(replay(trace, capacity_bytes, policy)?.hit_ratio(1))
            };
            Ok(Row {
                cache_share: share,
                capacity_bytes,
                lru: run(&mut Policy::parse("lru")?)?,
                s3fifo: run(&mut Policy::parse("s3fifo")?)?,
                plan_aware: run(&mut PlanAware::new(Policy::parse("s3fifo")?, lookahead))?,
                plan_aware_epoch: run(&mut PlanAware::new(Policy::parse("s3fifo")?, epoch_reads))?,
                min: replay_min(trace, capacity_bytes).hit_ratio(1),
            })
        })
        .collect()
}
