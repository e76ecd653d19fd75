//! Plan-aware eviction: Belady within a look-ahead.
//!
//! A stream knows its plan (the epoch's shuffled block order), so the cache
//! can know which resident blocks are about to be read. [`PlanAware`] keeps
//! those ("protected": read within the next `lookahead` planned reads) out
//! of the base policy's reach, ordered by their next read. A victim is the
//! base policy's choice among the blocks the window does not name; only
//! when every resident block is named is one of them evicted, the one read
//! last (Belady's rule, exact within the window). So no block is evicted
//! while a block needed later (or not at all within the window) stays.
//!
//! Reads consume the plan: each [`Eviction::hit`] or [`Eviction::admit`]
//! of an id consumes its earliest pending read in the window, and a read
//! the cache does not admit is reported with [`PlanAware::bypass`]. Reads
//! may come out of plan order (DataLoader workers interleave); a planned
//! read that never comes holds its place in the window until
//! [`PlanAware::clear_plan`].
//!
//! Protected blocks are ordered in a B-tree: O(log n) per read in the
//! window, where the base policies are O(1).

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{BlockId, Eviction, Policy};

/// See the module docs.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PlanAware {
    /// Resident blocks the window does not name.
    base: Policy,
    lookahead: usize,
    /// Planned reads beyond the window.
    pending: VecDeque<BlockId>,
    /// The window: planned reads from position `cursor` on; `None` once read.
    window: VecDeque<Option<BlockId>>,
    cursor: u64,
    /// Each id's unread positions in the window, ascending.
    reads: HashMap<BlockId, VecDeque<u64>>,
    /// Every resident block and its size.
    resident: HashMap<BlockId, u64>,
    /// Resident blocks the window names, by next read position.
    protected: BTreeMap<u64, BlockId>,
    resident_bytes: u64,
}

impl PlanAware {
    /// `base` orders the blocks the plan does not name; `lookahead` planned
    /// reads are looked at (0: the base policy alone).
    pub fn new(base: Policy, lookahead: usize) -> Self {
        PlanAware {
            base,
            lookahead,
            pending: VecDeque::new(),
            window: VecDeque::new(),
            cursor: 0,
            reads: HashMap::new(),
            resident: HashMap::new(),
            protected: BTreeMap::new(),
            resident_bytes: 0,
        }
    }

    pub fn base(&self) -> &Policy {
        &self.base
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    pub fn len(&self) -> usize {
        self.resident.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resident.is_empty()
    }

    /// Appends upcoming reads, in the order the stream will make them.
    pub fn extend_plan(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        self.pending.extend(ids);
        self.fill_window();
    }

    /// Forgets the plan (a new epoch order, a stream closed): every
    /// resident block goes back to the base policy.
    pub fn clear_plan(&mut self) {
        self.pending.clear();
        self.window.clear();
        self.reads.clear();
        for (_, id) in std::mem::take(&mut self.protected) {
            let bytes = self.resident[&id];
            self.base.admit(id, bytes);
        }
    }

    /// Position of `id`'s next planned read in the window, if it has one.
    pub fn next_read(&self, id: BlockId) -> Option<u64> {
        self.reads.get(&id).and_then(|r| r.front().copied())
    }

    /// Whether admitting `id` (now being read, as planned) is worth the
    /// victim the cache would evict for it: asked only when the cache is
    /// full. False when every resident block is needed in the window before
    /// `id`'s next planned read after this one (Belady's bypass).
    pub fn worth_admitting(&self, id: BlockId) -> bool {
        if !self.base.is_empty() {
            return true;
        }
        let after_this = self.reads.get(&id).and_then(|r| r.get(1)).copied();
        match (after_this, self.protected.last_key_value()) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(next), Some((&latest, _))) => next < latest,
        }
    }

    /// A read of `id` served without caching it: consumes its planned read.
    pub fn bypass(&mut self, id: BlockId) {
        self.consume(id);
    }

    fn fill_window(&mut self) {
        while self.window.len() < self.lookahead {
            let Some(id) = self.pending.pop_front() else {
                break;
            };
            let position = self.cursor + self.window.len() as u64;
            self.window.push_back(Some(id));
            let reads = self.reads.entry(id).or_default();
            reads.push_back(position);
            if reads.len() == 1 && self.resident.contains_key(&id) {
                self.base.remove(id);
                self.protected.insert(position, id);
            }
        }
    }

    /// Consumes `id`'s earliest unread planned read; a resident block moves
    /// to its next read or back to the base policy.
    fn consume(&mut self, id: BlockId) {
        let Some(reads) = self.reads.get_mut(&id) else {
            return;
        };
        let Some(position) = reads.pop_front() else {
            return;
        };
        let next = reads.front().copied();
        if next.is_none() {
            self.reads.remove(&id);
        }
        self.window[(position - self.cursor) as usize] = None;
        if self.protected.remove(&position).is_some() {
            match next {
                Some(n) => {
                    self.protected.insert(n, id);
                }
                None => {
                    let bytes = self.resident[&id];
                    self.base.admit(id, bytes);
                }
            }
        }
        while let Some(None) = self.window.front() {
            self.window.pop_front();
            self.cursor += 1;
        }
        self.fill_window();
    }
}

impl Eviction for PlanAware {
    fn hit(&mut self, id: BlockId) {
        if !self.resident.contains_key(&id) {
            self.consume(id);
            return;
        }
        if self.next_read(id).is_none() {
            self.base.hit(id);
        }
        self.consume(id);
    }

    fn admit(&mut self, id: BlockId, bytes: u64) {
        self.remove(id);
        self.consume(id);
        self.resident.insert(id, bytes);
        self.resident_bytes += bytes;
        match self.next_read(id) {
            Some(position) => {
                self.protected.insert(position, id);
            }
            None => self.base.admit(id, bytes),
        }
    }

    fn evict(&mut self) -> Option<(BlockId, u64)> {
        let victim = match self.base.evict() {
            Some((id, _)) => id,
            None => self.protected.pop_last()?.1,
        };
        let bytes = self.resident.remove(&victim)?;
        self.resident_bytes -= bytes;
        Some((victim, bytes))
    }

    fn remove(&mut self, id: BlockId) {
        let Some(bytes) = self.resident.remove(&id) else {
            return;
        };
        self.resident_bytes -= bytes;
        match self.next_read(id) {
            Some(position) => {
                self.protected.remove(&position);
            }
            None => self.base.remove(id),
        }
    }
}
