//! Least recently used, byte-weighted.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{needs_sweep, BlockId, Eviction};

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    stamp: u64,
}

/// LRU: the victim is the block read or admitted longest ago.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Lru {
    entries: HashMap<BlockId, Entry>,
    /// Oldest first; see [`super::needs_sweep`] for the stale entries.
    order: VecDeque<(BlockId, u64)>,
    next_stamp: u64,
    bytes: u64,
}

impl Lru {
    pub fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: BlockId) -> bool {
        self.entries.contains_key(&id)
    }

    fn touch(&mut self, id: BlockId) -> u64 {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.order.push_back((id, stamp));
        stamp
    }

    fn sweep(&mut self) {
        if needs_sweep(self.order.len(), self.entries.len()) {
            let entries = &self.entries;
            self.order
                .retain(|(id, s)| entries.get(id).is_some_and(|e| e.stamp == *s));
        }
    }
}

impl Eviction for Lru {
    fn hit(&mut self, id: BlockId) {
        if !self.entries.contains_key(&id) {
            return;
        }
        let stamp = self.touch(id);
        if let Some(e) = self.entries.get_mut(&id) {
            e.stamp = stamp;
        }
        self.sweep();
    }

    fn admit(&mut self, id: BlockId, bytes: u64) {
        let stamp = self.touch(id);
        if let Some(old) = self.entries.insert(id, Entry { bytes, stamp }) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        self.sweep();
    }

    fn evict(&mut self) -> Option<(BlockId, u64)> {
        while let Some((id, stamp)) = self.order.pop_front() {
            if self.entries.get(&id).is_some_and(|e| e.stamp == stamp) {
                let e = self.entries.remove(&id)?;
                self.bytes -= e.bytes;
                return Some((id, e.bytes));
            }
        }
        None
    }

    fn remove(&mut self, id: BlockId) {
        if let Some(e) = self.entries.remove(&id) {
            self.bytes -= e.bytes;
            self.sweep();
        }
    }
}
