//! State that belongs to one process and is rebuilt, never waited for,
//! after `fork`.
//!
//! A forked child (a PyTorch DataLoader worker with the default `fork`
//! context) inherits the parent's memory but only the forking thread. A
//! mutex that any other parent thread held at that instant (a tokio worker
//! cloning a client, a Python thread entering the runtime) stays locked for
//! ever in the child. Keying such state by pid *inside* a mutex is therefore
//! not enough: the child hangs on the lock before it can see the pid. Found
//! by forking 300 times while two threads read (`gdb` on the hung child:
//! `RemoteStore::client` and `runtime::runtime` in `lock_contended`).
//!
//! [`PerProcess`] holds the value in an atomic pointer instead: no lock, so
//! nothing a vanished thread held can block the child.

use std::convert::Infallible;
use std::ptr;
use std::sync::atomic::{AtomicBool as StdAtomicBool, AtomicU32};
use std::sync::{
    Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
};

use crate::sync::{AtomicPtr, Ordering};

/// The `pthread_atfork` handlers hold the metrics registry across every
/// `fork` (see [`crate::telemetry::before_fork`]) and keep [`PID`] current.
///
/// This process's id, kept current by a `pthread_atfork` child handler so
/// that asking costs one atomic load (not a `getpid` system call) on paths
/// that run for every request. Relaxed suffices: the handler runs in the
/// child's only thread before `fork` returns, and threads the child starts
/// later see it through their spawn.
static PID: AtomicU32 = AtomicU32::new(0);

/// Registers the handler when the library is loaded, before any thread of
/// ours exists (the fallback in [`process_id`] covers a load that skipped
/// it).
#[used]
#[link_section = ".init_array"]
static REGISTER_AT_LOAD: extern "C" fn() = at_load;

extern "C" fn at_load() {
    register();
}

extern "C" fn before_fork() {
    crate::telemetry::before_fork();
}

extern "C" fn in_parent() {
    crate::telemetry::after_fork_in_parent();
}

extern "C" fn in_forked_child() {
    // SAFETY: getpid is async-signal-safe, as a handler after fork needs.
    let pid = unsafe { libc::getpid() } as u32;
    PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    crate::telemetry::after_fork_in_child();
}

fn register() -> u32 {
    static REGISTERED: StdAtomicBool = StdAtomicBool::new(false);
    if !REGISTERED.swap(true, std::sync::atomic::Ordering::AcqRel) {
        // SAFETY: registers handlers that keep our own state consistent
        // across fork (the pid, the metrics registry) and call nothing else.
        unsafe { libc::pthread_atfork(Some(before_fork), Some(in_parent), Some(in_forked_child)) };
    }
    let pid = std::process::id();
    PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    pid
}

/// This process's id (cheap: see [`PID`]).
pub fn process_id() -> u32 {
    match PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => register(),
        pid => pid,
    }
}

/// One value per process, built on first use in each process.
///
/// Invariant: a slot is only ever replaced when the value in it was built
/// by *another* process (a `fork` ancestor, whose threads do not exist here)
/// or when it is empty. So a value published by this process is never
/// replaced or freed while `self` lives, which is what makes handing out
/// `&T` sound; inherited values are leaked, not dropped (a tokio runtime's
/// drop would wait for worker threads that are not here; a client's would
/// close connections the parent still uses).
pub struct PerProcess<T> {
    slot: AtomicPtr<Owned<T>>,
}

struct Owned<T> {
    pid: u32,
    value: T,
}

impl<T> PerProcess<T> {
    /// Empty: the first [`get`](Self::get) builds the value.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        PerProcess {
            slot: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Empty: the first [`get`](Self::get) builds the value.
    #[cfg(loom)]
    pub fn new() -> Self {
        PerProcess {
            slot: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Holding `value`, built by this process.
    pub fn with(value: T) -> Self {
        let this = Self::new();
        let owned = Box::into_raw(Box::new(Owned {
            pid: process_id(),
            value,
        }));
        this.slot.store(owned, Ordering::Release);
        this
    }

    /// This process's value, built if this process has none yet (first
    /// use, or first use after a fork). `build` is handed the value a fork
    /// ancestor left, if any: it may read it only if it can tell no
    /// vanished thread was changing it (see [`ForkMutex`]).
    pub fn get<E>(&self, build: impl FnOnce(Option<&T>) -> Result<T, E>) -> Result<&T, E> {
        self.get_in(process_id(), build)
    }

    /// [`get`](Self::get) as process `pid`: the tests run "after a fork"
    /// by passing another pid than the value's.
    #[doc(hidden)]
    pub fn get_in<E>(
        &self,
        pid: u32,
        build: impl FnOnce(Option<&T>) -> Result<T, E>,
    ) -> Result<&T, E> {
        let mut build = Some(build);
        loop {
            // Acquire pairs with the Release that published the pointer (the
            // compare-exchange below, or `with`): its `Owned` was fully
            // written before it became visible.
            let seen = self.slot.load(Ordering::Acquire);
            // SAFETY: non-null slots point at a live `Owned` (invariant above:
            // this process's are never freed while `self` lives, inherited
            // ones are leaked).
            let inherited = match unsafe { seen.as_ref() } {
                Some(owned) if owned.pid == pid => return Ok(&owned.value),
                other => other.map(|o| &o.value),
            };
            let Some(build) = build.take() else {
                // Lost a race to another thread of this process, whose value
                // is in the slot now: the next turn returns it.
                continue;
            };
            let fresh = Box::into_raw(Box::new(Owned {
                pid,
                value: build(inherited)?,
            }));
            // Release publishes `fresh` (see the load above). Acquire on
            // failure: the next turn reads the winner's `Owned`.
            match self
                .slot
                .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                // SAFETY: just published by us, never freed while `self`
                // lives; the inherited value it replaced is leaked.
                Ok(_) => return Ok(unsafe { &(*fresh).value }),
                // SAFETY: `fresh` was never published.
                Err(_) => drop(unsafe { Box::from_raw(fresh) }),
            }
        }
    }
}

impl<T> Default for PerProcess<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Drop for PerProcess<T> {
    fn drop(&mut self) {
        let owned = self.slot.load(Ordering::Acquire);
        // SAFETY: `&mut self`: no other reference to the slot remains.
        if let Some(o) = unsafe { owned.as_ref() } {
            if o.pid == process_id() {
                // SAFETY: built and published by this process, read by no one
                // now.
                drop(unsafe { Box::from_raw(owned) });
            }
        }
    }
}

impl<T> std::fmt::Debug for PerProcess<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerProcess")
    }
}

// SAFETY: any thread may get `&T` (needs `T: Sync`) and the first one in a
// process builds the value others then share, dropped by whichever thread
// drops `self` (needs `T: Send`).
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
// SAFETY: as above; the owned box moves with `self`.
unsafe impl<T: Send + Sync> Send for PerProcess<T> {}

/// How a process's own copy of a [`ForkMutex`]/[`ForkRwLock`] starts.
enum Start<T> {
    /// From the parent's value when its lock is free, else from `initial`.
    Adopt { initial: T, clone: fn(&T) -> T },
    /// Always afresh: state that belongs to the process that made it (its
    /// in-flight fills, its counters' baseline, its open descriptors).
    Fresh(fn() -> T),
}

impl<T> Start<T> {
    fn initial(&self) -> T {
        match self {
            Start::Adopt { initial, clone } => clone(initial),
            Start::Fresh(make) => make(),
        }
    }
}

/// A mutex that a forked child never waits on because of its parent.
///
/// Each process locks its own [`Mutex`]. Built with [`new`](Self::new),
/// the first lock in a forked child adopts the value from its parent's
/// mutex when that one is free (the usual case: state carries over) and
/// starts from the value it was created with when a parent thread held it
/// at the fork (it stays locked for ever in the child, and the value behind
/// it may be half-written: a histogram mid-push is never read). Built with
/// [`per_process`](Self::per_process), every process starts afresh. For
/// short critical sections on the data path: router health, latency
/// windows, retry budget, trace; the cache's in-flight fills and versions.
pub struct ForkMutex<T> {
    start: Start<T>,
    mutex: PerProcess<Mutex<T>>,
}

impl<T: Clone> ForkMutex<T> {
    pub fn new(value: T) -> Self {
        ForkMutex {
            start: Start::Adopt {
                initial: value.clone(),
                clone: T::clone,
            },
            mutex: PerProcess::with(Mutex::new(value)),
        }
    }
}

impl<T> ForkMutex<T> {
    /// Each process (this one first) starts from `make()`.
    pub fn per_process(make: fn() -> T) -> Self {
        ForkMutex {
            mutex: PerProcess::with(Mutex::new(make())),
            start: Start::Fresh(make),
        }
    }

    /// Locks this process's mutex; a panic that poisoned it leaves a value
    /// still worth using (figures and caches, not invariants).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let Ok(mutex) = self
            .mutex
            .get(|inherited| Ok::<_, Infallible>(Mutex::new(self.adopt(inherited))));
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn adopt(&self, inherited: Option<&Mutex<T>>) -> T {
        let Start::Adopt { clone, .. } = &self.start else {
            return self.start.initial();
        };
        match inherited.map(Mutex::try_lock) {
            Some(Ok(value)) => clone(&value),
            Some(Err(TryLockError::Poisoned(p))) => clone(&p.into_inner()),
            // Held by a thread that is not in this process, or never built.
            Some(Err(TryLockError::WouldBlock)) | None => self.start.initial(),
        }
    }
}

impl<T> std::fmt::Debug for ForkMutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not locked: Debug may run where the caller holds it.
        f.debug_struct("ForkMutex").finish_non_exhaustive()
    }
}

impl<T: Clone + Default> Default for ForkMutex<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

/// A read-mostly lock that each process has its own of, every process
/// starting afresh (see [`ForkMutex::per_process`]): the local store's
/// open descriptors, looked up by parallel readers at once.
pub struct ForkRwLock<T> {
    make: fn() -> T,
    lock: PerProcess<RwLock<T>>,
}

impl<T> ForkRwLock<T> {
    pub fn per_process(make: fn() -> T) -> Self {
        ForkRwLock {
            make,
            lock: PerProcess::with(RwLock::new(make())),
        }
    }

    fn own(&self) -> &RwLock<T> {
        let Ok(lock) = self
            .lock
            .get(|_inherited| Ok::<_, Infallible>(RwLock::new((self.make)())));
        lock
    }

    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.own().read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.own().write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> std::fmt::Debug for ForkRwLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkRwLock").finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn built_once_per_process_and_rebuilt_after_a_fork_seeing_the_inherited() {
        let builds = AtomicUsize::new(0);
        let slot: PerProcess<u32> = PerProcess::new();
        let build = |inherited: Option<&u32>, v: u32| {
            builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, ()>(v + inherited.copied().unwrap_or(0))
        };
        assert_eq!(slot.get_in(10, |i| build(i, 1)), Ok(&1));
        assert_eq!(slot.get_in(10, |i| build(i, 2)), Ok(&1));
        // "forked": pid 11 sees its parent's value as inherited, not its own.
        assert_eq!(slot.get_in(11, |i| build(i, 3)), Ok(&4));
        assert_eq!(slot.get_in(11, |i| build(i, 5)), Ok(&4));
        assert_eq!(builds.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn a_failed_build_leaves_the_slot_to_the_next_caller() {
        let slot: PerProcess<String> = PerProcess::new();
        assert_eq!(slot.get(|_| Err("no")), Err("no"));
        assert_eq!(slot.get(|_| Ok::<_, &str>("yes".into())).unwrap(), "yes");
    }

    #[test]
    fn the_process_id_is_current_and_cheap() {
        assert_eq!(process_id(), std::process::id());
    }

    /// Forks while another thread holds the mutex, as a tokio worker
    /// recording a latency may: the child must not wait for it.
    #[test]
    fn a_forked_child_never_waits_for_a_mutex_its_parent_held() {
        let shared = Arc::new((ForkMutex::new(vec![1u64]), ForkMutex::new(7u64)));
        shared.0.lock().push(2);
        *shared.1.lock() = 8;
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                let _held = shared.0.lock();
                held_tx.send(()).unwrap();
                done_rx.recv().unwrap();
            })
        };
        held_rx.recv().unwrap();
        // SAFETY: the child only locks, checks and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: a watchdog: a hang becomes a failed exit status.
            unsafe { libc::alarm(10) };
            let held_at_fork = shared.0.lock().clone(); // the initial value
            let free_at_fork = *shared.1.lock(); // the parent's value
            let ok =
                held_at_fork == vec![1] && free_at_fork == 8 && process_id() == std::process::id();
            // SAFETY: leaves the child without running the parent's handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status}"
        );
        assert_eq!(*shared.0.lock(), vec![1, 2], "the parent keeps its own");
    }
}
