//! Synchronisation primitives, swapped for loom's model-checked versions
//! under `--cfg loom` so the ring's and [`crate::fork`]'s protocols are
//! explored exhaustively.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex};

/// An `UnsafeCell` with loom's access tracking when model checking.
#[derive(Debug)]
pub(crate) struct Cell<T>(
    #[cfg(loom)] loom::cell::UnsafeCell<T>,
    #[cfg(not(loom))] std::cell::UnsafeCell<T>,
);

impl<T> Cell<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(loom)]
        return Cell(loom::cell::UnsafeCell::new(value));
        #[cfg(not(loom))]
        return Cell(std::cell::UnsafeCell::new(value));
    }

    /// # Safety
    /// The caller holds the exclusive right to this cell (see the ring's
    /// state machine): no other thread reads or writes it concurrently.
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(loom)]
        return self.0.with_mut(|p| f(&mut *p));
        #[cfg(not(loom))]
        return f(&mut *self.0.get());
    }
}

// SAFETY: the ring's state machine gives exactly one thread access to a
// slot's cell at a time, and the stamp's release/acquire pairs order the
// hand-over; the cell is never touched outside that protocol.
unsafe impl<T: Send> Sync for Cell<T> {}
