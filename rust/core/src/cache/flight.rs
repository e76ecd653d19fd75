//! Locks shared by every process on the node, with nothing to leak: the
//! kernel drops a lock when its holder closes the file or dies.
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
    _file: File,
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
        // SAFETY: a zeroed `flock` is a valid value; the fields that matter
        // are set below.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // Any byte of a sparse file can be locked: the id picks one.
        lock.l_start = (id >> 1) as libc::off_t;
        lock.l_len = 1;
        // SAFETY: a valid descriptor and a pointer to a live `flock`.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if rc == 0 {
            return Ok(Some(FlightLock { _file: file }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(None),
            _ => Err(e),
        }
    }
}

/// The cache-wide lock, held while the ledger changes.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Waits for the lock. Holders keep it for one admission (a ledger
    /// read and write and a rename), so the wait is short.
    pub fn lock(path: &Path) -> io::Result<DirLock> {
        let file = open_rw(path)?;
        flock(&file, libc::LOCK_EX)?;
        Ok(DirLock { _file: file })
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

/// Marks a temporary file as being written: an exclusive `flock` held as
/// long as `file` is open.
pub fn mark_alive(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_EX | libc::LOCK_NB)
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

    #[test]
    fn a_temporary_file_is_claimed_only_once_its_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let writer = File::create(&path).unwrap();
        mark_alive(&writer).unwrap();
        assert!(!try_claim_dead(&path));
        drop(writer);
        // Just created: perhaps its writer is about to lock it.
        assert!(!try_claim_dead(&path));
        age(&path, DEAD_AFTER);
        assert!(try_claim_dead(&path));
        assert!(!path.exists());
    }
}
