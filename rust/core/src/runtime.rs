//! The core's tokio runtime: one per process, rebuilt after `fork`.
//!
//! A forked child (a PyTorch DataLoader worker, by default on Linux) inherits
//! the parent's memory but none of its threads, so a runtime built before
//! the fork is a shell whose workers do not exist. Every entry point asks
//! [`handle`], which notices the pid change and builds a fresh runtime. The
//! parent's runtime is leaked in the child on purpose: dropping it would wait
//! for worker threads that are not there.

use std::sync::{Arc, Mutex};

use tokio::runtime::{Builder, Handle, Runtime};

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

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
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    match slot.as_ref() {
        Some((owner, rt)) if *owner == pid => Arc::clone(rt),
        _ => {
            if let Some((_, inherited)) = slot.take() {
                std::mem::forget(inherited);
            }
            let rt = Arc::new(
                Builder::new_multi_thread()
                    .worker_threads(worker_threads())
                    .thread_name("feedline-io")
                    .enable_all()
                    .build()
                    .expect("building the tokio runtime"),
            );
            *slot = Some((pid, Arc::clone(&rt)));
            rt
        }
    }
}

/// A handle to [`runtime`].
pub fn handle() -> Handle {
    runtime().handle().clone()
}

/// Runs a future to completion from a thread outside the runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// Threads worth using for `n` requests: the cores, but no more than the
/// work can keep busy.
pub fn threads_for(n: usize, min_per_thread: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    cores.min(n / min_per_thread.max(1)).max(1)
}
