//! Eviction policies for the node cache: which block leaves when a new one
//! needs the room.
//!
//! * [`S3Fifo`]: Yang et al., "FIFO queues are all you need for cache
//!   eviction" (SOSP'23): a small probationary FIFO (~10% of the bytes), a
//!   main FIFO with lazy promotion, a ghost queue of recently evicted ids,
//!   and a 2-bit access frequency.
//! * [`Lru`]: least recently used, the baseline every cache is measured by.
//! * [`PlanAware`]: a wrapper that knows the upcoming reads (the epoch's
//!   shuffled plan within a look-ahead) and never evicts a block needed
//!   sooner than the victim (Belady within the look-ahead).
//! * [`trace`]: a shuffled multi-epoch training trace and a replay of it
//!   against the policies and against Belady's offline optimum (MIN).
//!
//! All are byte-weighted (blocks differ in size: an object's last block is
//! short), serde-serialisable (the cache keeps the state in a ledger file
//! shared by the processes of a node) and pure: no clock, no I/O. The policy
//! does not know the cache's capacity; the cache calls [`Eviction::evict`]
//! until the incoming block fits, and the policy answers from its own
//! accounting of what is resident.

pub mod lru;
pub mod plan;
pub mod s3fifo;
pub mod trace;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use lru::Lru;
pub use plan::PlanAware;
pub use s3fifo::S3Fifo;

/// A cache block's identity, as the cache numbers it.
pub type BlockId = u64;

/// What the cache tells a policy, and what it asks of it.
///
/// The cache owns the bytes; the policy only orders the ids. Each call is
/// O(1) or amortised O(1) for [`Lru`] and [`S3Fifo`].
pub trait Eviction: Send + std::fmt::Debug {
    /// A block was read from the cache. An id the policy does not hold is
    /// ignored.
    fn hit(&mut self, id: BlockId);
    /// A block entered the cache. Admitting an id already held replaces its
    /// size and counts as a fresh entry.
    fn admit(&mut self, id: BlockId, bytes: u64);
    /// The next victim, removed from the policy's state; `None` when the
    /// policy holds nothing.
    fn evict(&mut self) -> Option<(BlockId, u64)>;
    /// A block left the cache for another reason (corrupt, stale): the
    /// policy forgets it (and its ghost, so a stale id is not promoted).
    fn remove(&mut self, id: BlockId);
}

/// The policies by name, as configuration and the ledger file hold them.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Policy {
    S3Fifo(S3Fifo),
    Lru(Lru),
}

impl Policy {
    /// The names configuration accepts.
    pub const NAMES: [&'static str; 2] = ["s3fifo", "lru"];

    /// An empty policy by name: `"s3fifo"` or `"lru"`.
    pub fn parse(name: &str) -> Result<Policy> {
        match name {
            "s3fifo" => Ok(Policy::S3Fifo(S3Fifo::default())),
            "lru" => Ok(Policy::Lru(Lru::default())),
            other => Err(Error::invalid(format!(
                "eviction policy must be \"s3fifo\" or \"lru\", got {other:?}"
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Policy::S3Fifo(_) => "s3fifo",
            Policy::Lru(_) => "lru",
        }
    }

    fn inner(&self) -> &dyn Resident {
        match self {
            Policy::S3Fifo(p) => p,
            Policy::Lru(p) => p,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Eviction {
        match self {
            Policy::S3Fifo(p) => p,
            Policy::Lru(p) => p,
        }
    }

    /// Bytes of the blocks the policy holds (its own accounting).
    pub fn resident_bytes(&self) -> u64 {
        self.inner().resident_bytes()
    }

    /// Blocks the policy holds.
    pub fn len(&self) -> usize {
        self.inner().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: BlockId) -> bool {
        self.inner().contains(id)
    }
}

impl Eviction for Policy {
    fn hit(&mut self, id: BlockId) {
        self.inner_mut().hit(id)
    }

    fn admit(&mut self, id: BlockId, bytes: u64) {
        self.inner_mut().admit(id, bytes)
    }

    fn evict(&mut self) -> Option<(BlockId, u64)> {
        self.inner_mut().evict()
    }

    fn remove(&mut self, id: BlockId) {
        self.inner_mut().remove(id)
    }
}

/// What a policy knows of its resident set (for [`Policy`]'s accessors).
trait Resident {
    fn resident_bytes(&self) -> u64;
    fn len(&self) -> usize;
    fn contains(&self, id: BlockId) -> bool;
}

impl Resident for Lru {
    fn resident_bytes(&self) -> u64 {
        Lru::resident_bytes(self)
    }
    fn len(&self) -> usize {
        Lru::len(self)
    }
    fn contains(&self, id: BlockId) -> bool {
        Lru::contains(self, id)
    }
}

impl Resident for S3Fifo {
    fn resident_bytes(&self) -> u64 {
        S3Fifo::resident_bytes(self)
    }
    fn len(&self) -> usize {
        S3Fifo::len(self)
    }
    fn contains(&self, id: BlockId) -> bool {
        S3Fifo::contains(self, id)
    }
}

/// Queues hold `(id, stamp)`; an entry is live while the id's current
/// stamp equals it. Stale entries (hit, removed, moved) are skipped when
/// popped and swept when they outnumber the live ones, so every operation
/// is amortised O(1) without a linked list.
fn needs_sweep(queued: usize, live: usize) -> bool {
    queued > 2 * live + 64
}
