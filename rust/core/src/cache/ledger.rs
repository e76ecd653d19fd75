//! The ledger: which blocks the cache holds, their bytes, and the eviction
//! policy's state, in one file that every process on the node reads and
//! rewrites under the cache-wide lock ([`DirLock`]). Admission happens
//! here: a filled block is accounted, room is made by evicting, and only
//! then is it renamed into place, so the blocks in the directory never
//! exceed the bound (files still being written are outside it: at most one
//! block per fill in flight).
//!
//! Hits are not written on every read: each process keeps them and hands
//! them to the policy at its next admission (or when it drops the cache),
//! so the policy sees a process's hits late, never wrongly.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::flight::{mark_alive, DirLock};
use super::Layout;
use crate::evict::{BlockId, Eviction, Policy};

/// The ledger file's contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ledger {
    /// Bytes of the block files the ledger holds.
    pub used_bytes: u64,
    /// Block id → bytes of its file.
    pub blocks: HashMap<BlockId, u64>,
    pub policy: Policy,
}

/// What an admission did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Whether the block is now in place.
    pub placed: bool,
    pub evicted_blocks: u64,
    pub evicted_bytes: u64,
}

/// What a process tells the ledger at its next admission.
#[derive(Debug, Default)]
pub struct Pending {
    pub hits: Vec<BlockId>,
    /// Blocks this process deleted (corrupt): forgotten if still absent.
    pub removed: Vec<BlockId>,
}

/// Most hits a process keeps between admissions; older ones are dropped
/// (the policy then sees fewer hits, nothing worse).
pub const MAX_PENDING_HITS: usize = 1 << 16;

impl Ledger {
    fn empty(policy_name: &str) -> Ledger {
        Ledger {
            used_bytes: 0,
            blocks: HashMap::new(),
            policy: Policy::parse(policy_name).unwrap_or_else(|_| {
                Policy::parse(super::DEFAULT_POLICY).expect("the default policy parses")
            }),
        }
    }

    /// The ledger on disk; rebuilt from the block files when missing or
    /// unreadable (a crash between writes, a deleted file), so accounting
    /// always covers what is really there. A ledger written with another
    /// policy keeps its blocks under a fresh policy of `policy_name`.
    pub fn load(layout: &Layout, policy_name: &str) -> Ledger {
        let parsed = fs::read(layout.ledger())
            .ok()
            .and_then(|b| serde_json::from_slice::<Ledger>(&b).ok());
        match parsed {
            Some(l) if l.policy.name() == policy_name => l,
            Some(l) => {
                let mut fresh = Ledger::empty(policy_name);
                for (&id, &bytes) in &l.blocks {
                    fresh.insert(id, bytes);
                }
                fresh
            }
            None => Ledger::rebuild(layout, policy_name),
        }
    }

    /// From the block files on disk.
    fn rebuild(layout: &Layout, policy_name: &str) -> Ledger {
        let mut ledger = Ledger::empty(policy_name);
        let Ok(shards) = fs::read_dir(layout.blocks()) else {
            return ledger;
        };
        for shard in shards.flatten() {
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                let id = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok());
                if let (Some(id), Ok(meta)) = (id, f.metadata()) {
                    ledger.insert(id, meta.len());
                }
            }
        }
        ledger
    }

    fn insert(&mut self, id: BlockId, bytes: u64) {
        if let Some(old) = self.blocks.insert(id, bytes) {
            self.used_bytes -= old;
            self.policy.remove(id);
        }
        self.used_bytes += bytes;
        self.policy.admit(id, bytes);
    }

    fn forget(&mut self, id: BlockId) -> u64 {
        let bytes = self.blocks.remove(&id).unwrap_or(0);
        self.used_bytes -= bytes;
        bytes
    }

    /// Written aside and renamed over the old one: a crash leaves the old
    /// ledger or the new, never half of one.
    fn save(&self, layout: &Layout) -> io::Result<()> {
        let tmp = layout.temp_path("ledger");
        let mut file = File::create(&tmp)?;
        mark_alive(&file)?;
        let written = serde_json::to_vec(self)
            .map_err(io::Error::other)
            .and_then(|bytes| file.write_all(&bytes));
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, layout.ledger())) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }

    fn apply(&mut self, layout: &Layout, pending: Pending) {
        for id in pending.removed {
            if !layout.block(id).exists() {
                self.forget(id);
                self.policy.remove(id);
            }
        }
        for id in pending.hits {
            if self.blocks.contains_key(&id) {
                self.policy.hit(id);
            }
        }
    }

    /// Evicts until `incoming` more bytes fit under `capacity`.
    fn make_room(&mut self, layout: &Layout, incoming: u64, capacity: u64) -> Admitted {
        let mut done = Admitted::default();
        while self.used_bytes + incoming > capacity {
            let victim = match self.policy.evict() {
                Some((id, _)) => id,
                // The policy lost track (a ledger from an older format):
                // any block will do.
                None => match self.blocks.keys().next() {
                    Some(&id) => id,
                    None => break,
                },
            };
            let bytes = self.forget(victim);
            if bytes == 0 {
                continue;
            }
            // Readers that opened it keep reading the unlinked file.
            let _ = fs::remove_file(layout.block(victim));
            done.evicted_blocks += 1;
            done.evicted_bytes += bytes;
        }
        done
    }
}

/// Admits the block written at `tmp` (`bytes` long) as `id`: under the
/// cache-wide lock, makes room, renames it into place and records it.
/// A block larger than the whole cache is not admitted (`placed: false`,
/// the temporary file removed).
pub fn admit(
    layout: &Layout,
    policy_name: &str,
    capacity: u64,
    id: BlockId,
    tmp: &Path,
    bytes: u64,
    pending: Pending,
) -> io::Result<Admitted> {
    let _lock = DirLock::lock(&layout.ledger_lock())?;
    let mut ledger = Ledger::load(layout, policy_name);
    ledger.apply(layout, pending);
    if bytes > capacity {
        let _ = fs::remove_file(tmp);
        ledger.save(layout)?;
        return Ok(Admitted::default());
    }
    if let Some(old) = ledger.blocks.get(&id).copied() {
        // Filled twice (the directory was recreated under a filler):
        // replaced, counted once.
        ledger.used_bytes -= old;
        ledger.blocks.remove(&id);
        ledger.policy.remove(id);
    }
    let mut done = ledger.make_room(layout, bytes, capacity);
    let target = layout.block(id);
    if let Some(shard) = target.parent() {
        fs::create_dir_all(shard)?;
    }
    // Accounted before it is in place: if the rename fails, the ledger
    // counts a block that is not there (safe: it is evicted like any
    // other); if saving fails (a full disk), the block never lands.
    ledger.insert(id, bytes);
    ledger.save(layout)?;
    fs::rename(tmp, &target)?;
    done.placed = true;
    Ok(done)
}

/// Folds a process's pending hits and removals into the ledger (when it
/// drops the cache with no admission to carry them).
pub fn flush(layout: &Layout, policy_name: &str, pending: Pending) -> io::Result<()> {
    if pending.hits.is_empty() && pending.removed.is_empty() {
        return Ok(());
    }
    let _lock = DirLock::lock(&layout.ledger_lock())?;
    let mut ledger = Ledger::load(layout, policy_name);
    ledger.apply(layout, pending);
    ledger.save(layout)
}

/// Removes every block and the ledger; object versions stay valid.
pub fn clear(layout: &Layout) -> io::Result<()> {
    let _lock = DirLock::lock(&layout.ledger_lock())?;
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    gone(fs::remove_dir_all(layout.blocks()))?;
    gone(fs::remove_file(layout.ledger()))?;
    fs::create_dir_all(layout.blocks())
}

/// The ledger's totals as last written: (blocks, bytes).
pub fn resident(layout: &Layout) -> (u64, u64) {
    #[derive(Deserialize)]
    struct Totals {
        used_bytes: u64,
        blocks: HashMap<BlockId, u64>,
    }
    fs::read(layout.ledger())
        .ok()
        .and_then(|b| serde_json::from_slice::<Totals>(&b).ok())
        .map(|t| (t.blocks.len() as u64, t.used_bytes))
        .unwrap_or((0, 0))
}

/// Every file under `dir`, recursively (for tests and the bound check).
pub fn dir_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path, total: &mut u64) {
        let Ok(entries) = fs::read_dir(p) else { return };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), total),
                Ok(_) => *total += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

/// Temporary files whose writer died (SIGKILL mid-fill): removed. Live
/// writers hold a `flock` on theirs, so only the dead ones go.
pub fn sweep_dead_fills(layout: &Layout) -> u64 {
    let Ok(entries) = fs::read_dir(layout.tmp()) else {
        return 0;
    };
    let dead: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dead.iter()
        .filter(|p| super::flight::try_claim_dead(p))
        .count() as u64
}
