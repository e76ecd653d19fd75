//! The ledger: which blocks the cache holds, their bytes, and the eviction
//! policy's state, shared by every process on the node under the
//! cache-wide lock ([`DirLock`]). Admission happens here: a filled block is
//! accounted, room is made by evicting, and only then is it renamed into
//! place, so the blocks in the directory never exceed the bound (files
//! still being written are outside it: at most one block per fill in
//! flight).
//!
//! On disk the ledger is a snapshot (`ledger.json`, carrying a generation
//! number) and a journal (`ledger.journal`, headed by the generation it
//! extends) of what happened since: admissions, evictions, hits, removals.
//! Each process keeps its own copy of the ledger ([`Mirror`]) and, under
//! the lock, replays only the journal records it has not seen, then appends
//! its own as one checksummed batch. So an admission costs the same with
//! 1 000 blocks held as with 25 000; the snapshot is rewritten (and the
//! journal restarted under a new generation) only once the journal has
//! grown as large as the snapshot, which keeps the cost amortised O(1). A
//! batch torn by a crash fails its checksum and is cut off by the next
//! process; a snapshot is written aside and renamed, so a crash leaves the
//! old one or the new. The policies are deterministic, so replaying the
//! same records rebuilds the same state in every process.
//!
//! Hits are not written on every read: each process keeps them and hands
//! them to the policy at its next admission (or when it drops the cache),
//! so the policy sees a process's hits late, never wrongly.

use crate::fork::ForkMutex;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::flight::{mark_alive, DirLock};
use super::Layout;
use crate::evict::{BlockId, Eviction, Policy};

/// The ledger file's contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ledger {
    /// Which snapshot this is: a journal extends the snapshot whose
    /// generation heads it.
    #[serde(default)]
    pub generation: u64,
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
            generation: 0,
            used_bytes: 0,
            blocks: HashMap::new(),
            policy: Policy::parse(policy_name).unwrap_or_else(|_| {
                Policy::parse(super::DEFAULT_POLICY).expect("the default policy parses")
            }),
        }
    }

    /// The snapshot on disk, and whether it must be rewritten; rebuilt
    /// from the block files when missing or unreadable (a deleted file),
    /// so accounting always covers what is really there. A snapshot
    /// written with another policy keeps its blocks under a fresh policy
    /// of `policy_name`.
    fn load(layout: &Layout, policy_name: &str) -> (Ledger, bool) {
        let parsed = fs::read(layout.ledger())
            .ok()
            .and_then(|b| serde_json::from_slice::<Ledger>(&b).ok());
        match parsed {
            Some(l) if l.policy.name() == policy_name => (l, false),
            Some(l) => {
                let mut fresh = Ledger::empty(policy_name);
                fresh.generation = l.generation;
                for (&id, &bytes) in &l.blocks {
                    fresh.insert(id, bytes);
                }
                (fresh, true)
            }
            None => (Ledger::rebuild(layout, policy_name), true),
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
    /// snapshot or the new, never half of one.
    fn save(&self, layout: &Layout) -> io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(io::Error::other)?;
        write_aside(layout, "ledger", &bytes, &layout.ledger())
    }

    /// One journal record, as first made or as replayed.
    fn play(&mut self, tag: u8, id: BlockId, bytes: u64) {
        match tag {
            ADMIT => self.insert(id, bytes),
            HIT if self.blocks.contains_key(&id) => self.policy.hit(id),
            REMOVE => {
                self.forget(id);
                self.policy.remove(id);
            }
            EVICT => {
                self.forget(id);
                // The policies are deterministic, so the replayed victim
                // is the recorded one; should they ever differ, the
                // recorded one goes and the other stays held.
                match self.policy.evict() {
                    Some((got, _)) if got == id => {}
                    Some((got, got_bytes)) => {
                        self.policy.remove(id);
                        if self.blocks.contains_key(&got) {
                            self.policy.admit(got, got_bytes);
                        }
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }

    fn record(&mut self, batch: &mut Vec<u8>, tag: u8, id: BlockId, bytes: u64) {
        self.play(tag, id, bytes);
        push(batch, tag, id, bytes);
    }

    fn apply(&mut self, layout: &Layout, pending: Pending, batch: &mut Vec<u8>) {
        for id in pending.removed {
            if !layout.block(id).exists() {
                self.record(batch, REMOVE, id, 0);
            }
        }
        for id in pending.hits {
            if self.blocks.contains_key(&id) {
                self.record(batch, HIT, id, 0);
            }
        }
    }

    /// Evicts until `incoming` more bytes fit under `capacity`.
    fn make_room(
        &mut self,
        layout: &Layout,
        incoming: u64,
        capacity: u64,
        batch: &mut Vec<u8>,
    ) -> Admitted {
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
            // Already played (the policy popped it): `play` pops it again
            // the same way in the other processes.
            push(batch, EVICT, victim, 0);
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

/// Journal record tags; a record is the tag, the block id and its bytes
/// (little-endian), 17 bytes.
const ADMIT: u8 = 1;
const EVICT: u8 = 2;
const HIT: u8 = 3;
const REMOVE: u8 = 4;
const RECORD_BYTES: usize = 17;
/// The journal's header: a magic and the generation of the snapshot it
/// extends. Each batch after it: payload length and crc32c (u32 each,
/// little-endian), then its records.
const JOURNAL_MAGIC: &[u8; 8] = b"fljrnl01";
const HEADER_BYTES: u64 = 16;
const BATCH_HEADER_BYTES: usize = 8;

fn push(batch: &mut Vec<u8>, tag: u8, id: BlockId, bytes: u64) {
    batch.push(tag);
    batch.extend_from_slice(&id.to_le_bytes());
    batch.extend_from_slice(&bytes.to_le_bytes());
}

/// Journal bytes beyond which the snapshot is rewritten: about the
/// snapshot's own size, so each rewrite is paid for by as many appends.
fn compact_after(blocks: usize) -> u64 {
    (64 << 10) + 64 * blocks as u64
}

/// A generation no other snapshot of this directory has had (a cleared
/// or recreated directory must not look like the one a process knew).
fn fresh_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 40) ^ n.rotate_left(20)
}

fn write_aside(layout: &Layout, what: &str, bytes: &[u8], target: &Path) -> io::Result<()> {
    let tmp = layout.temp_path(what);
    let written = File::create(&tmp).and_then(|mut file| {
        let _alive = mark_alive(&file)?;
        file.write_all(bytes)
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, target)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The journal's generation, if it has a whole header.
fn journal_generation(file: &mut File) -> Option<u64> {
    let mut header = [0u8; HEADER_BYTES as usize];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut header).ok()?;
    let (magic, generation) = header.split_at(8);
    (magic == JOURNAL_MAGIC).then(|| u64::from_le_bytes(generation.try_into().expect("8 bytes")))
}

/// Plays the whole batches from `from` on; returns where they end. A torn
/// batch (a writer died mid-append) and anything after it is ignored.
fn replay(ledger: &mut Ledger, file: &mut File, from: u64) -> io::Result<u64> {
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(from))?;
    file.read_to_end(&mut tail)?;
    let mut at = 0;
    while at + BATCH_HEADER_BYTES <= tail.len() {
        let word = |i: usize| u32::from_le_bytes(tail[i..i + 4].try_into().expect("4 bytes"));
        let (len, crc) = (word(at) as usize, word(at + 4));
        let start = at + BATCH_HEADER_BYTES;
        let Some(payload) = tail.get(start..start + len) else {
            break;
        };
        if len % RECORD_BYTES != 0 || crc32c::crc32c(payload) != crc {
            break;
        }
        for r in payload.chunks_exact(RECORD_BYTES) {
            let id = u64::from_le_bytes(r[1..9].try_into().expect("8 bytes"));
            let bytes = u64::from_le_bytes(r[9..17].try_into().expect("8 bytes"));
            ledger.play(r[0], id, bytes);
        }
        at = start + len;
    }
    Ok(from + at as u64)
}

/// This process's copy of the ledger and how far into the journal it has
/// read (for [`Mirror`]).
#[derive(Debug)]
struct Synced {
    ledger: Ledger,
    journal_bytes: u64,
    /// The journal does not extend this snapshot (missing, stale, another
    /// policy): the next commit rewrites both.
    snapshot_due: bool,
}

/// A process's copy of the shared ledger, brought up to date under the
/// lock by replaying what other processes appended since.
/// Per process (a forked child reads the ledger afresh, and never waits on
/// a sync its parent was in the middle of).
#[derive(Debug)]
pub struct Mirror(ForkMutex<Option<Synced>>);

impl Default for Mirror {
    fn default() -> Self {
        Mirror(ForkMutex::per_process(|| None))
    }
}

impl Mirror {
    /// Dropped: the next admission reads the ledger afresh.
    pub fn forget(&self) {
        *self.0.lock() = None;
    }
}

/// The ledger as of now (call under the lock): the held copy plus the
/// journal's new batches, or a fresh load when the snapshot changed.
fn sync(layout: &Layout, policy_name: &str, held: Option<Synced>) -> io::Result<Synced> {
    let mut journal = OpenOptions::new()
        .read(true)
        .write(true)
        .open(layout.journal())
        .ok();
    let generation = journal.as_mut().and_then(journal_generation);
    let mut synced = match held {
        Some(s) if Some(s.ledger.generation) == generation && !s.snapshot_due => s,
        _ => {
            let (ledger, due) = Ledger::load(layout, policy_name);
            let extends = Some(ledger.generation) == generation;
            Synced {
                ledger,
                journal_bytes: HEADER_BYTES,
                snapshot_due: due || !extends,
            }
        }
    };
    if let (Some(file), false) = (journal.as_mut(), synced.snapshot_due) {
        let end = replay(&mut synced.ledger, file, synced.journal_bytes)?;
        if file.metadata()?.len() > end {
            file.set_len(end)?;
        }
        synced.journal_bytes = end;
    }
    Ok(synced)
}

/// Appends `batch` (when there is a journal to extend) and rewrites the
/// snapshot when it is due. The batch goes first, so a process that holds
/// the old generation and reads the whole journal has what the new
/// snapshot has.
fn commit(layout: &Layout, synced: &mut Synced, batch: &[u8]) -> io::Result<()> {
    if !batch.is_empty() {
        if let Ok(mut file) = OpenOptions::new().append(true).open(layout.journal()) {
            let mut framed = Vec::with_capacity(BATCH_HEADER_BYTES + batch.len());
            framed.extend_from_slice(&(batch.len() as u32).to_le_bytes());
            framed.extend_from_slice(&crc32c::crc32c(batch).to_le_bytes());
            framed.extend_from_slice(batch);
            file.write_all(&framed)?;
            synced.journal_bytes += framed.len() as u64;
        }
    }
    if synced.snapshot_due || synced.journal_bytes > compact_after(synced.ledger.blocks.len()) {
        synced.ledger.generation = fresh_generation();
        synced.ledger.save(layout)?;
        let mut header = JOURNAL_MAGIC.to_vec();
        header.extend_from_slice(&synced.ledger.generation.to_le_bytes());
        write_aside(layout, "journal", &header, &layout.journal())?;
        synced.journal_bytes = HEADER_BYTES;
        synced.snapshot_due = false;
    }
    Ok(())
}

/// Runs `change` on the up-to-date ledger under the cache-wide lock and
/// commits the records it made. On any error the held copy is dropped,
/// so the next call reads what is on disk.
fn with_ledger<T>(
    layout: &Layout,
    policy_name: &str,
    mirror: &Mirror,
    change: impl FnOnce(&mut Ledger, &mut Vec<u8>) -> io::Result<T>,
) -> io::Result<T> {
    let mut held = mirror.0.lock();
    let _lock = DirLock::lock(&layout.ledger_lock())?;
    let mut synced = sync(layout, policy_name, held.take())?;
    let mut batch = Vec::new();
    let out = change(&mut synced.ledger, &mut batch)?;
    commit(layout, &mut synced, &batch)?;
    *held = Some(synced);
    Ok(out)
}

/// Admits the block written at `tmp` (`bytes` long) as `id`: under the
/// cache-wide lock, makes room, renames it into place and records it.
/// A block larger than the whole cache is not admitted (`placed: false`,
/// the temporary file removed).
#[allow(clippy::too_many_arguments)]
pub fn admit(
    layout: &Layout,
    policy_name: &str,
    mirror: &Mirror,
    capacity: u64,
    id: BlockId,
    tmp: &Path,
    bytes: u64,
    pending: Pending,
) -> io::Result<Admitted> {
    let target = layout.block(id);
    let done = with_ledger(layout, policy_name, mirror, |ledger, batch| {
        ledger.apply(layout, pending, batch);
        if bytes > capacity {
            return Ok(None);
        }
        if ledger.blocks.contains_key(&id) {
            // Filled twice (the directory was recreated under a filler):
            // replaced, counted once.
            ledger.record(batch, REMOVE, id, 0);
        }
        let done = ledger.make_room(layout, bytes, capacity, batch);
        if let Some(shard) = target.parent() {
            fs::create_dir_all(shard)?;
        }
        // Accounted before it is in place: if the rename fails, the ledger
        // counts a block that is not there (safe: it is evicted like any
        // other); if recording fails (a full disk), the block never lands.
        ledger.record(batch, ADMIT, id, bytes);
        Ok(Some(done))
    });
    let Some(mut done) = done? else {
        let _ = fs::remove_file(tmp);
        return Ok(Admitted::default());
    };
    fs::rename(tmp, &target)?;
    done.placed = true;
    Ok(done)
}

/// Folds a process's pending hits and removals into the ledger (when it
/// drops the cache with no admission to carry them).
pub fn flush(
    layout: &Layout,
    policy_name: &str,
    mirror: &Mirror,
    pending: Pending,
) -> io::Result<()> {
    if pending.hits.is_empty() && pending.removed.is_empty() {
        return Ok(());
    }
    with_ledger(layout, policy_name, mirror, |ledger, batch| {
        ledger.apply(layout, pending, batch);
        Ok(())
    })
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
    gone(fs::remove_file(layout.journal()))?;
    fs::create_dir_all(layout.blocks())
}

/// The ledger's totals as last written: (blocks, bytes). Read without the
/// lock: a batch being appended is torn to this reader and left out.
pub fn resident(layout: &Layout) -> (u64, u64) {
    let (mut ledger, _) = Ledger::load(layout, super::DEFAULT_POLICY);
    if let Ok(mut file) = File::open(layout.journal()) {
        if journal_generation(&mut file) == Some(ledger.generation) {
            let _ = replay(&mut ledger, &mut file, HEADER_BYTES);
        }
    }
    (ledger.blocks.len() as u64, ledger.used_bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = super::super::DEFAULT_POLICY;

    fn admit_one(layout: &Layout, mirror: &Mirror, capacity: u64, id: BlockId, hits: &[BlockId]) {
        let tmp = layout.temp_path("test");
        fs::write(&tmp, vec![7u8; (id % 5 + 1) as usize]).unwrap();
        let pending = Pending {
            hits: hits.to_vec(),
            removed: Vec::new(),
        };
        let bytes = id % 5 + 1;
        admit(layout, POLICY, mirror, capacity, id, &tmp, bytes, pending).unwrap();
    }

    // As JSON values: equal whatever order the maps were written in.
    fn fresh(layout: &Layout) -> serde_json::Value {
        let _lock = DirLock::lock(&layout.ledger_lock()).unwrap();
        let synced = sync(layout, POLICY, None).unwrap();
        serde_json::to_value(&synced.ledger.policy).unwrap()
    }

    fn held(mirror: &Mirror) -> serde_json::Value {
        let held = mirror.0.lock();
        serde_json::to_value(&held.as_ref().unwrap().ledger.policy).unwrap()
    }

    /// Two processes' copies, each admitting, hitting and evicting in
    /// turn, replay to the same policy state as a fresh load, and the
    /// blocks on disk stay within the bound.
    #[test]
    fn copies_replaying_the_journal_agree_with_a_fresh_load() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let (a, b) = (Mirror::default(), Mirror::default());
        let capacity = 60;
        for id in 0..400u64 {
            let mirror = if id % 3 == 0 { &a } else { &b };
            admit_one(
                &layout,
                mirror,
                capacity,
                id,
                &[id / 2, id / 3, id - id % 7],
            );
            assert!(dir_bytes(&layout.blocks()) <= capacity);
        }
        flush(&layout, POLICY, &a, Pending::default()).unwrap();
        admit_one(&layout, &a, capacity, 1000, &[399]);
        assert_eq!(held(&a), fresh(&layout));
        admit_one(&layout, &b, capacity, 1001, &[]);
        assert_eq!(held(&b), fresh(&layout));
        let (blocks, bytes) = resident(&layout);
        assert_eq!(bytes, dir_bytes(&layout.blocks()));
        assert_eq!(
            blocks,
            fs::read_dir(layout.blocks())
                .unwrap()
                .flatten()
                .map(|d| fs::read_dir(d.path()).unwrap().count() as u64)
                .sum::<u64>()
        );
    }

    /// A batch torn by a crash mid-append is cut off by the next process
    /// and never played.
    #[test]
    fn a_torn_batch_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let mirror = Mirror::default();
        for id in 0..10 {
            admit_one(&layout, &mirror, 1 << 20, id, &[]);
        }
        let whole = fs::metadata(layout.journal()).unwrap().len();
        let mut torn = Vec::new();
        push(&mut torn, ADMIT, 99, 1 << 30);
        let mut file = OpenOptions::new()
            .append(true)
            .open(layout.journal())
            .unwrap();
        file.write_all(&(torn.len() as u32).to_le_bytes()).unwrap();
        file.write_all(&crc32c::crc32c(&torn).to_le_bytes())
            .unwrap();
        file.write_all(&torn[..5]).unwrap();
        assert_eq!(resident(&layout).1, dir_bytes(&layout.blocks()));
        admit_one(&layout, &Mirror::default(), 1 << 20, 10, &[]);
        let (blocks, bytes) = resident(&layout);
        assert_eq!((blocks, bytes), (11, dir_bytes(&layout.blocks())));
        let now = fs::metadata(layout.journal()).unwrap().len();
        assert_eq!(now, whole + (BATCH_HEADER_BYTES + RECORD_BYTES) as u64);
    }

    /// The journal is folded into a new snapshot once it outgrows it, so
    /// it stays bounded however many blocks pass through.
    #[test]
    fn the_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let (a, b) = (Mirror::default(), Mirror::default());
        let mut generations = std::collections::HashSet::new();
        for id in 0..20_000u64 {
            let mirror = if id % 2 == 0 { &a } else { &b };
            admit_one(&layout, mirror, 100, id, &[]);
            let journal = fs::metadata(layout.journal()).unwrap().len();
            assert!(journal <= compact_after(100) + 64, "{journal}");
            let mut file = File::open(layout.journal()).unwrap();
            generations.insert(journal_generation(&mut file).unwrap());
        }
        assert!(generations.len() > 1, "{generations:?}");
        assert_eq!(held(&b), fresh(&layout));
    }
}
