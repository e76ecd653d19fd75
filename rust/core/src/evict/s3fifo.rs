//! S3-FIFO (Yang, Zhang, Qiu, Yue, Rashmi, SOSP'23), byte-weighted.
//!
//! New blocks enter a small FIFO that holds about a tenth of the resident
//! bytes. A block that reaches the small queue's head unread leaves the
//! cache (its id goes to the ghost queue); one that was read moves to the
//! main FIFO. A block admitted while its id is a ghost goes straight to
//! main. Main evicts from its head, but a block read since it was last
//! passed over is reinserted at the tail with its frequency lowered
//! (lazy promotion, a CLOCK in FIFO clothes). Frequencies are 2 bits.
//!
//! Byte weighting: the small queue's share and the ghost's size are in
//! bytes of the resident set, since the policy does not know the cache's
//! capacity (when the cache is full the two are the same).

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{needs_sweep, BlockId, Eviction};

/// Most a frequency counts to (2 bits).
const MAX_FREQUENCY: u8 = 3;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    frequency: u8,
    queue: Queue,
    stamp: u64,
}

/// See the module docs.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct S3Fifo {
    /// Share of the resident bytes the small queue keeps (paper: 0.1).
    small_ratio: f64,
    /// Reads while in the small queue that earn a move to main.
    promote_after_reads: u8,
    entries: HashMap<BlockId, Entry>,
    small: VecDeque<(BlockId, u64)>,
    main: VecDeque<(BlockId, u64)>,
    /// Evicted ids, oldest first: `(id, bytes, stamp)`.
    ghost: VecDeque<(BlockId, u64, u64)>,
    /// Live ghosts: id → (bytes, stamp).
    ghost_index: HashMap<BlockId, (u64, u64)>,
    small_bytes: u64,
    main_bytes: u64,
    /// Blocks in the small queue (bytes alone miss empty blocks).
    small_blocks: usize,
    ghost_bytes: u64,
    next_stamp: u64,
}

impl Default for S3Fifo {
    fn default() -> Self {
        S3Fifo::new(0.1, 1)
    }
}

impl S3Fifo {
    /// `small_ratio` in (0, 1) of the resident bytes for the small queue;
    /// `promote_after_reads` ≥ 1 reads in it move a block to main.
    pub fn new(small_ratio: f64, promote_after_reads: u8) -> Self {
        S3Fifo {
            small_ratio: small_ratio.clamp(0.01, 0.99),
            promote_after_reads: promote_after_reads.clamp(1, MAX_FREQUENCY),
            entries: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_index: HashMap::new(),
            small_bytes: 0,
            main_bytes: 0,
            small_blocks: 0,
            ghost_bytes: 0,
            next_stamp: 0,
        }
    }

    pub fn resident_bytes(&self) -> u64 {
        self.small_bytes + self.main_bytes
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

    /// Whether `id` is remembered as recently evicted.
    pub fn is_ghost(&self, id: BlockId) -> bool {
        self.ghost_index.contains_key(&id)
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    fn push(&mut self, id: BlockId, bytes: u64, queue: Queue, frequency: u8) {
        let stamp = self.stamp();
        match queue {
            Queue::Small => {
                self.small.push_back((id, stamp));
                self.small_bytes += bytes;
                self.small_blocks += 1;
            }
            Queue::Main => {
                self.main.push_back((id, stamp));
                self.main_bytes += bytes;
            }
        }
        self.entries.insert(
            id,
            Entry {
                bytes,
                frequency,
                queue,
                stamp,
            },
        );
    }

    /// Takes `id` out of the resident set and its queue's bytes (its queue
    /// entry goes stale).
    fn take(&mut self, id: BlockId) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        match e.queue {
            Queue::Small => {
                self.small_bytes -= e.bytes;
                self.small_blocks -= 1;
            }
            Queue::Main => self.main_bytes -= e.bytes,
        }
        Some(e)
    }

    fn live(&self, id: BlockId, stamp: u64) -> bool {
        self.entries.get(&id).is_some_and(|e| e.stamp == stamp)
    }

    fn forget_ghost(&mut self, id: BlockId) -> bool {
        match self.ghost_index.remove(&id) {
            Some((bytes, _)) => {
                self.ghost_bytes -= bytes;
                true
            }
            None => false,
        }
    }

    /// The ghost remembers about as many bytes as main holds.
    fn trim_ghost(&mut self) {
        let limit = ((1.0 - self.small_ratio) * self.resident_bytes() as f64) as u64;
        while self.ghost_bytes > limit {
            let Some((id, bytes, stamp)) = self.ghost.pop_front() else {
                break;
            };
            if self.ghost_index.get(&id) == Some(&(bytes, stamp)) {
                self.ghost_index.remove(&id);
                self.ghost_bytes -= bytes;
            }
        }
    }

    fn sweep(&mut self) {
        if needs_sweep(self.small.len() + self.main.len(), self.entries.len()) {
            let entries = &self.entries;
            let live = |(id, s): &(BlockId, u64)| entries.get(id).is_some_and(|e| e.stamp == *s);
            self.small.retain(live);
            self.main.retain(live);
        }
        if needs_sweep(self.ghost.len(), self.ghost_index.len()) {
            let index = &self.ghost_index;
            self.ghost
                .retain(|(id, b, s)| index.get(id) == Some(&(*b, *s)));
        }
    }

    /// The small queue's head: out to the ghost if unread, else on to main.
    /// `None` when the small queue emptied into main without a victim.
    fn evict_small(&mut self) -> Option<(BlockId, u64)> {
        while let Some((id, stamp)) = self.small.pop_front() {
            if !self.live(id, stamp) {
                continue;
            }
            let e = self.take(id)?;
            if e.frequency >= self.promote_after_reads {
                self.push(id, e.bytes, Queue::Main, 0);
                continue;
            }
            let ghost_stamp = self.stamp();
            self.ghost.push_back((id, e.bytes, ghost_stamp));
            self.ghost_index.insert(id, (e.bytes, ghost_stamp));
            self.ghost_bytes += e.bytes;
            self.trim_ghost();
            return Some((id, e.bytes));
        }
        None
    }

    /// Main's head, passing over (and cooling) blocks read since.
    fn evict_main(&mut self) -> Option<(BlockId, u64)> {
        while let Some((id, stamp)) = self.main.pop_front() {
            if !self.live(id, stamp) {
                continue;
            }
            let e = self.take(id)?;
            if e.frequency > 0 {
                self.push(id, e.bytes, Queue::Main, e.frequency - 1);
                continue;
            }
            return Some((id, e.bytes));
        }
        None
    }
}

impl Eviction for S3Fifo {
    fn hit(&mut self, id: BlockId) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.frequency = (e.frequency + 1).min(MAX_FREQUENCY);
        }
    }

    fn admit(&mut self, id: BlockId, bytes: u64) {
        self.take(id);
        let queue = if self.forget_ghost(id) {
            Queue::Main
        } else {
            Queue::Small
        };
        self.push(id, bytes, queue, 0);
        self.sweep();
    }

    fn evict(&mut self) -> Option<(BlockId, u64)> {
        loop {
            if self.entries.is_empty() {
                // Only stale entries can be left: drop them.
                self.small.clear();
                self.main.clear();
                return None;
            }
            let main_blocks = self.entries.len() - self.small_blocks;
            let small_due = self.small_blocks > 0
                && (main_blocks == 0
                    || self.small_bytes as f64 >= self.small_ratio * self.resident_bytes() as f64);
            let victim = if small_due {
                self.evict_small()
            } else {
                self.evict_main()
            };
            if victim.is_some() {
                self.sweep();
                return victim;
            }
        }
    }

    fn remove(&mut self, id: BlockId) {
        self.take(id);
        self.forget_ghost(id);
        self.sweep();
    }
}
