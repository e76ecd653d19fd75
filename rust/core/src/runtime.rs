//! The core's tokio runtime: one per process, rebuilt after `fork`.
//!
//! A forked child (a PyTorch DataLoader worker, by default on Linux) inherits
//! the parent's memory but none of its threads, so a runtime built before
//! the fork is a shell whose workers do not exist. Every entry point asks
//! [`handle`], which notices the pid change and builds a fresh runtime. The
//! parent's runtime is leaked in the child on purpose: dropping it would wait
//! for worker threads that are not there.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};

use crate::{Error, Result};

use crate::fork::PerProcess;

#[cfg(not(loom))]
static RUNTIME: PerProcess<Arc<Runtime>> = PerProcess::new();
// loom's atomics are not const-constructible; nothing runs the runtime
// under loom, it only has to compile.
#[cfg(loom)]
static RUNTIME: std::sync::LazyLock<PerProcess<Arc<Runtime>>> =
    std::sync::LazyLock::new(PerProcess::new);

/// Worker threads: `FEEDLINE_WORKER_THREADS`, else the number of cores
/// (at least 2, so one slow read never serialises the rest).
fn worker_threads() -> usize {
    std::env::var("FEEDLINE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(2)
        })
}

/// The runtime for this process, built on first use and after each fork.
pub fn runtime() -> Arc<Runtime> {
    let built = RUNTIME.get(|_inherited| {
        Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("feedline-io")
            .enable_all()
            .build()
            .map(Arc::new)
    });
    Arc::clone(built.expect("building the tokio runtime"))
}

/// A handle to [`runtime`].
pub fn handle() -> Handle {
    runtime().handle().clone()
}

/// How often a blocking call asks its caller's interrupt check: often
/// enough that Ctrl-C feels immediate, rarely enough to cost nothing.
const INTERRUPT_POLL: Duration = Duration::from_millis(20);

/// The message of the error a blocking call ends with when interrupted.
pub const INTERRUPTED: &str = "interrupted by the caller";

/// A caller's interrupt check (the Python bindings: "has a signal handler
/// raised, e.g. on Ctrl-C?") and whether it has fired.
struct Interrupt {
    check: Rc<dyn Fn() -> bool>,
    fired: Cell<bool>,
}

thread_local! {
    /// The check installed by [`with_interrupt`] on this thread, if any.
    static INTERRUPT: RefCell<Option<Rc<Interrupt>>> = const { RefCell::new(None) };
}

/// Runs `work` on this thread with `check` asked every [`INTERRUPT_POLL`]
/// while it blocks: in [`block_on`] (the future is dropped, which cancels
/// its requests) and wherever the core waits in a loop (see
/// [`check_interrupt`]). Once `check` returns true, every blocking call of
/// `work` returns at once with an `Error::Cancelled`, so the caller must
/// discard what `work` returns then.
pub fn with_interrupt<R>(check: Rc<dyn Fn() -> bool>, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<Rc<Interrupt>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            INTERRUPT.with(|slot| *slot.borrow_mut() = previous);
        }
    }
    let interrupt = Rc::new(Interrupt {
        check,
        fired: Cell::new(false),
    });
    let _restore = Restore(INTERRUPT.with(|slot| slot.borrow_mut().replace(interrupt)));
    work()
}

/// The check installed on this thread, if any.
fn installed() -> Option<Rc<Interrupt>> {
    INTERRUPT.with(|slot| slot.borrow().clone())
}

impl Interrupt {
    /// Asks the check, once it has fired always true.
    fn fired(&self) -> bool {
        if !self.fired.get() && (self.check)() {
            self.fired.set(true);
        }
        self.fired.get()
    }
}

/// `Err(Cancelled)` when the caller's interrupt check (see
/// [`with_interrupt`]) fires; for loops that wait in steps.
pub fn check_interrupt() -> Result<()> {
    match installed() {
        Some(interrupt) if interrupt.fired() => Err(Error::Cancelled(INTERRUPTED.into())),
        _ => Ok(()),
    }
}

/// What a blocking call returns in place of its future's output when the
/// caller's interrupt check fires.
pub trait Interruptible {
    fn interrupted() -> Self;
}

impl<T> Interruptible for Result<T> {
    fn interrupted() -> Self {
        Err(Error::Cancelled(INTERRUPTED.into()))
    }
}

/// Fewer results than asked for (none): only the caller that installed the
/// check sees this, and it discards the output.
impl<T> Interruptible for Vec<T> {
    fn interrupted() -> Self {
        Vec::new()
    }
}

impl Interruptible for () {
    fn interrupted() -> Self {}
}

/// Runs a future to completion from a thread outside the runtime. Where
/// the caller installed an interrupt check (see [`with_interrupt`]), the
/// future is dropped when it fires.
pub fn block_on<F>(future: F) -> F::Output
where
    F: std::future::Future,
    F::Output: Interruptible,
{
    let Some(interrupt) = installed() else {
        return runtime().block_on(future);
    };
    if interrupt.fired.get() {
        return F::Output::interrupted();
    }
    runtime().block_on(async {
        tokio::pin!(future);
        loop {
            tokio::select! {
                biased;
                out = &mut future => return out,
                () = tokio::time::sleep(INTERRUPT_POLL) => {
                    if interrupt.fired() {
                        return F::Output::interrupted();
                    }
                }
            }
        }
    })
}

/// Threads worth using for `n` requests: the cores, but no more than the
/// work can keep busy.
pub fn threads_for(n: usize, min_per_thread: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    cores.min(n / min_per_thread.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Sets its flag when dropped: shows the future was cancelled.
    struct DropFlag(Arc<AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_interrupt_drops_the_blocked_future_and_stays_fired() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(Arc::clone(&dropped));
        let asked = Rc::new(Cell::new(0));
        let counter = Rc::clone(&asked);
        // Fires on the third question, as a signal arriving mid-read would.
        let check: Rc<dyn Fn() -> bool> = Rc::new(move || {
            counter.set(counter.get() + 1);
            counter.get() >= 3
        });
        let (first, second, loop_check, many) = with_interrupt(check, || {
            let first: Result<()> = block_on(async move {
                let _flag = flag;
                std::future::pending::<()>().await;
                Ok(())
            });
            let second: Result<u8> = block_on(async { Ok(1) });
            let many: Vec<u8> = block_on(async { vec![1, 2] });
            (first, second, check_interrupt(), many)
        });
        assert!(matches!(first, Err(Error::Cancelled(_))));
        assert!(dropped.load(Ordering::SeqCst));
        assert!(matches!(second, Err(Error::Cancelled(_))));
        assert!(matches!(loop_check, Err(Error::Cancelled(_))));
        assert!(many.is_empty());
        assert_eq!(asked.get(), 3);
        // Outside the scope nothing is checked any more.
        assert!(check_interrupt().is_ok());
        assert_eq!(block_on(async { Ok::<u8, Error>(2) }).unwrap(), 2);
    }

    #[test]
    fn without_a_check_block_on_runs_to_completion() {
        let out: Result<u8> = block_on(async {
            tokio::time::sleep(INTERRUPT_POLL * 2).await;
            Ok(7)
        });
        assert_eq!(out.unwrap(), 7);
    }
}
