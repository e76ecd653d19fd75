//! Locks shared by every process on the node, with nothing to leak: the
//! kernel drops a lock when its holder closes the file or dies.
//!
//! Each lock is also released *explicitly* when dropped, not only by the
//! close: these locks belong to the open file description, which a forked
//! child shares through its copy of the descriptor. A child forked while
//! a parent thread held one keeps that copy open for its whole life (the
//! holder's stack is not in the child, nothing drops it there), so a lock
//! released only by closing stayed held until the child exited, and the
//! child itself, waiting for the ledger's lock, never did: every process on
//! the node hung (tests/remote/test_fork_safety.py, node-cache case).
//!
//! * [`FlightLock`]: one byte of a shared lock file per block (an "open file
//!   description" record lock, `F_OFD_SETLK`): whoever holds a block's byte
//!   fetches it; the others wait for the block file to appear. Each lock
//!   opens its own descriptor, so threads of one process exclude each other
//!   too, and a forked child never shares a parent's lock.
//! * [`DirLock`]: `flock` on the ledger's lock file, held while a block is
//!   admitted (accounting, eviction, rename into place).
//! * [`try_claim_dead`]: a temporary file whose filler died has no `flock`
//!   left on it; the next process to look removes it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A held lock on one block's byte of the flight file; released on drop
/// (the descriptor closes), or by the kernel if this process dies.
#[derive(Debug)]
pub struct FlightLock {
    file: File,
    byte: libc::off_t,
}

/// An OFD lock request on one byte.
fn byte_lock(kind: libc::c_int, byte: libc::off_t) -> libc::flock {
    // SAFETY: a zeroed `flock` is a valid value; the fields that matter are
    // set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    lock
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl FlightLock {
    /// Takes the byte for `id` in `path` without waiting: `None` when
    /// another descriptor (another process, or another read in this one)
    /// holds it.
    pub fn try_lock(path: &Path, id: u64) -> io::Result<Option<FlightLock>> {
        let file = open_rw(path)?;
        // Any byte of a sparse file can be locked: the id picks one.
        let byte = (id >> 1) as libc::off_t;
        let lock = byte_lock(libc::F_WRLCK, byte);
        // SAFETY: a valid descriptor and a pointer to a live `flock`.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if rc == 0 {
            return Ok(Some(FlightLock { file, byte }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(None),
            _ => Err(e),
        }
    }
}

impl Drop for FlightLock {
    fn drop(&mut self) {
        let unlock = byte_lock(libc::F_UNLCK, self.byte);
        // SAFETY: a valid descriptor and a pointer to a live `flock`. A
        // failure leaves the close below to release it.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &unlock) };
    }
}

/// The cache-wide lock, held while the ledger changes.
#[derive(Debug)]
pub struct DirLock {
    file: File,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

impl DirLock {
    /// Waits for the lock. Holders keep it for one admission (a ledger
    /// read and write and a rename), so the wait is short.
    pub fn lock(path: &Path) -> io::Result<DirLock> {
        let file = open_rw(path)?;
        flock(&file, libc::LOCK_EX)?;
        Ok(DirLock { file })
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: a valid descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Marks a temporary file as being written: an exclusive `flock` held
/// until the mark drops (declare it after the file, so it drops first).
pub fn mark_alive(file: &File) -> io::Result<Alive> {
    flock(file, libc::LOCK_EX | libc::LOCK_NB)?;
    Ok(Alive(file.as_raw_fd()))
}

/// A temporary file's mark (see [`mark_alive`]); its descriptor is the
/// file's, which outlives it.
#[derive(Debug)]
#[must_use = "the mark is released when dropped"]
pub struct Alive(std::os::fd::RawFd);

impl Drop for Alive {
    fn drop(&mut self) {
        // SAFETY: the file's descriptor, still open (the mark drops first).
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

/// How old an unlocked temporary file must be to count as dead: a writer
/// takes its `flock` just after creating the file, and a sweep must not
/// remove one in between.
pub const DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes `path` if no live process holds its `flock` (its writer died
/// mid-fill) and it is older than [`DEAD_AFTER`]. Whether it was removed.
pub fn try_claim_dead(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).open(path) else {
        return false;
    };
    let old = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= DEAD_AFTER);
    if !old || flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        return false;
    }
    std::fs::remove_file(path).is_ok()
}

/// Sets `path`'s modification time `by` into the past (tests of the sweep).
#[cfg(test)]
pub fn age(path: &Path, by: std::time::Duration) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() - by)
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_byte_excludes_other_descriptors_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flight.lock");
        let held = FlightLock::try_lock(&path, 42).unwrap().expect("free");
        assert!(FlightLock::try_lock(&path, 42).unwrap().is_none());
        assert!(FlightLock::try_lock(&path, 44).unwrap().is_some());
        drop(held);
        assert!(FlightLock::try_lock(&path, 42).unwrap().is_some());
    }

    /// The child keeps its copies of the descriptors open (as a DataLoader
    /// worker forked mid-fill does): dropping the locks in the parent must
    /// still free them for everyone.
    #[test]
    fn dropped_locks_are_free_while_a_forked_child_shares_their_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let (flight, ledger) = (dir.path().join("flight.lock"), dir.path().join("dir.lock"));
        let block = FlightLock::try_lock(&flight, 42).unwrap().expect("free");
        let admission = DirLock::lock(&ledger).unwrap();
        // SAFETY: the child only sleeps and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain libc calls in the child.
            unsafe {
                libc::sleep(30);
                libc::_exit(0);
            }
        }
        drop(block);
        drop(admission);
        let block_free = FlightLock::try_lock(&flight, 42).unwrap().is_some();
        let ledger_free = flock(&open_rw(&ledger).unwrap(), libc::LOCK_EX | libc::LOCK_NB).is_ok();
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert!(
            block_free,
            "the block's byte stayed locked by the child's copy"
        );
        assert!(
            ledger_free,
            "the ledger lock stayed held by the child's copy"
        );
    }

    #[test]
    fn a_temporary_file_is_claimed_only_once_its_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let writer = File::create(&path).unwrap();
        let alive = mark_alive(&writer).unwrap();
        assert!(!try_claim_dead(&path));
        drop(alive);
        drop(writer);
        // Just created: perhaps its writer is about to lock it.
        assert!(!try_claim_dead(&path));
        age(&path, DEAD_AFTER);
        assert!(try_claim_dead(&path));
        assert!(!path.exists());
    }
}
