//! The slot ring: a bounded arena of `slots × slot_bytes` page-aligned bytes,
//! allocated once, through which fetched ranges travel from producers (fetch
//! tasks) to a consumer in plan order.
//!
//! # Protocol
//!
//! Every read in a plan has a sequence number `seq` (its index in the plan).
//! `seq` lives in slot `seq % slots`. Each slot has one atomic `stamp`:
//!
//! ```text
//! stamp = seq * 4 + state        state ∈ {FREE, FILLING, PUBLISHED, CONSUMING}
//!
//!   FREE(seq) --claim--> FILLING(seq) --publish--> PUBLISHED(seq)
//!      ^                                              |
//!      |                                           consume
//!   release: FREE(seq + slots) <---- CONSUMING(seq) <-+
//! ```
//!
//! * A producer may fill `seq` only after a successful CAS
//!   `FREE(seq) → FILLING(seq)`; that CAS is the claim, so each `seq` is
//!   filled by exactly one producer and only once the consumer has released
//!   `seq - slots` (back-pressure: memory never grows past the arena).
//! * Fetches finish in any order; the consumer asks for `seq` in plan order
//!   and waits for `PUBLISHED(seq)`, so delivery order is the plan's.
//! * Releases may come in any order (Python may hold chunk 5 after dropping
//!   chunk 6); each release frees exactly its own slot for `seq + slots`.
//!
//! Indices and states are lock-free atomics. Only *waiting* takes a lock: a
//! thread that must wait parks on a condition variable with a timeout rather
//! than spinning a core (see [`Parking`]).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Cell, Condvar, Mutex, Ordering};

const FREE: u64 = 0;
const FILLING: u64 = 1;
const PUBLISHED: u64 = 2;
const CONSUMING: u64 = 3;

/// Slot memory is aligned to this so `O_DIRECT`-style reads and SIMD
/// consumers get what they expect.
pub const PAGE_BYTES: usize = 4096;

const fn stamp(seq: u64, state: u64) -> u64 {
    seq * 4 + state
}

/// What a producer left in a slot for the consumer: the filled length, or
/// the error that replaced the bytes.
#[derive(Debug, Default)]
struct SlotMeta {
    len: usize,
    error: Option<Error>,
}

struct Slot {
    stamp: AtomicU64,
    /// Written only in FILLING (by the producer that claimed it), read only
    /// in CONSUMING (by the consumer that consumed it); the stamp's
    /// release/acquire pair hands it over.
    meta: Cell<SlotMeta>,
}

/// One allocation, made once, freed when the ring drops.
struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the arena is plain bytes; which thread may touch which slot's bytes
// is decided by the slot stamps, never by the arena itself.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    fn new(total_bytes: usize) -> Result<Self> {
        let layout = Layout::from_size_align(total_bytes, PAGE_BYTES)
            .map_err(|_| Error::invalid(format!("arena of {total_bytes} bytes is too large")))?;
        // SAFETY: layout has non-zero size (checked by Ring::new).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::invalid(format!(
                "could not allocate an arena of {total_bytes} bytes"
            ))
        })?;
        Ok(Arena { ptr, layout })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `Arena::new` with the same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Parking for waiters: the fast path never touches the lock.
///
/// Lost-wakeup freedom is a Dekker pattern: a waiter announces itself
/// (`waiters += 1`, SeqCst) *then* re-reads the stamp; a waker stores the
/// stamp (SeqCst) *then* reads `waiters` (SeqCst). In the single total order
/// of SeqCst operations one of the two sees the other, so either the waiter
/// sees the new stamp or the waker sees the waiter and notifies under the
/// lock, which the waiter holds from its re-check until it sleeps.
struct Parking {
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Parking {
    fn new() -> Self {
        Parking {
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cond: Condvar::new(),
        }
    }

    fn wake_all(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cond.notify_all();
        }
    }

    /// Waits until `ready()` returns `Some`, the deadline passes (`None`), or
    /// `closed()` is true (`None`).
    fn wait_until<T>(
        &self,
        deadline: Option<Instant>,
        mut ready: impl FnMut() -> Option<T>,
        closed: impl Fn() -> bool,
    ) -> Option<T> {
        if let Some(v) = ready() {
            return Some(v);
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = loop {
            if let Some(v) = ready() {
                break Some(v);
            }
            if closed() {
                break None;
            }
            match deadline {
                None => {
                    guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break None;
                    }
                    guard = wait_timeout(&self.cond, guard, deadline - now);
                }
            }
        };
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

fn into_result((reader, error): (SlotReader, Option<Error>)) -> Result<SlotReader> {
    match error {
        None => Ok(reader),
        // Dropping the reader releases the slot: the error carries no bytes.
        Some(err) => Err(err),
    }
}

#[cfg(not(loom))]
fn wait_timeout<'a>(
    cond: &Condvar,
    guard: std::sync::MutexGuard<'a, ()>,
    timeout: Duration,
) -> std::sync::MutexGuard<'a, ()> {
    cond.wait_timeout(guard, timeout)
        .map(|(g, _)| g)
        .unwrap_or_else(|e| e.into_inner().0)
}

#[cfg(loom)]
fn wait_timeout<'a>(
    cond: &Condvar,
    guard: loom::sync::MutexGuard<'a, ()>,
    _timeout: Duration,
) -> loom::sync::MutexGuard<'a, ()> {
    // loom has no clock; a timed wait is modelled as an untimed one, which is
    // the stricter case for lost wake-ups.
    cond.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// The bounded, ordered slot ring. Shared by `Arc` between the stream's
/// driver, its fetch tasks and every chunk handed to Python.
pub struct Ring {
    slots: Box<[Slot]>,
    slot_bytes: usize,
    /// Distance between slots: `slot_bytes` rounded up to a page.
    stride_bytes: usize,
    arena: Arena,
    closed: AtomicBool,
    parking: Parking,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("slots", &self.slots.len())
            .field("slot_bytes", &self.slot_bytes)
            .finish()
    }
}

impl Ring {
    /// Allocates `slots × slot_bytes` bytes once.
    pub fn new(slots: usize, slot_bytes: usize) -> Result<Arc<Self>> {
        if slots == 0 {
            return Err(Error::invalid("slots must be at least 1, got 0"));
        }
        if slot_bytes == 0 {
            return Err(Error::invalid("slot_bytes must be at least 1, got 0"));
        }
        let stride_bytes = slot_bytes
            .checked_next_multiple_of(PAGE_BYTES)
            .ok_or_else(|| Error::invalid(format!("slot_bytes {slot_bytes} is too large")))?;
        let total = slots.checked_mul(stride_bytes).ok_or_else(|| {
            Error::invalid(format!("{slots} slots × {slot_bytes} bytes overflows"))
        })?;
        let arena = Arena::new(total)?;
        let slots = (0..slots as u64)
            .map(|seq| Slot {
                stamp: AtomicU64::new(stamp(seq, FREE)),
                meta: Cell::new(SlotMeta::default()),
            })
            .collect();
        Ok(Arc::new(Ring {
            slots,
            slot_bytes,
            stride_bytes,
            arena,
            closed: AtomicBool::new(false),
            parking: Parking::new(),
        }))
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn slot(&self, seq: u64) -> (usize, &Slot) {
        let idx = (seq % self.slots.len() as u64) as usize;
        (idx, &self.slots[idx])
    }

    fn slot_ptr(&self, idx: usize) -> *mut u8 {
        // SAFETY: idx < slots, so the offset stays inside the arena.
        unsafe { self.arena.ptr.as_ptr().add(idx * self.stride_bytes) }
    }

    /// Closes the ring: every waiter returns `Closed`, and no new claim or
    /// consume succeeds. Chunks already handed out stay readable.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.parking.wake_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn try_transition(&self, seq: u64, from: u64, to: u64) -> bool {
        let (_, slot) = self.slot(seq);
        // Acquire on success: a claimer must see the consumer's last reads of
        // the slot finished (paired with the Release in `release`); a
        // consumer must see the producer's bytes and meta (paired with the
        // Release in `publish`). Failure needs no ordering: we only retry.
        slot.stamp
            .compare_exchange(
                stamp(seq, from),
                stamp(seq, to),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Claims the slot for `seq` without waiting.
    pub fn try_claim(self: &Arc<Self>, seq: u64) -> Option<SlotWriter> {
        if self.is_closed() || !self.try_transition(seq, FREE, FILLING) {
            return None;
        }
        Some(SlotWriter {
            ring: Arc::clone(self),
            seq,
            done: false,
        })
    }

    /// Claims the slot for `seq`, parking while the consumer still holds
    /// `seq - slots` (back-pressure). `None` timeout waits until closed.
    pub fn claim(self: &Arc<Self>, seq: u64, timeout: Option<Duration>) -> Result<SlotWriter> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.parking
            .wait_until(deadline, || self.try_claim(seq), || self.is_closed())
            .ok_or_else(|| self.wait_error("claim", seq, timeout))
    }

    /// Consumes `seq` without waiting.
    pub fn try_consume(self: &Arc<Self>, seq: u64) -> Option<Result<SlotReader>> {
        self.take(seq).map(into_result)
    }

    /// Takes slot `seq` if published: its reader and, for a failed read,
    /// the error (the reader then carries no bytes; dropping it releases
    /// the slot).
    fn take(self: &Arc<Self>, seq: u64) -> Option<(SlotReader, Option<Error>)> {
        if !self.try_transition(seq, PUBLISHED, CONSUMING) {
            return None;
        }
        let (idx, slot) = self.slot(seq);
        // SAFETY: CONSUMING(seq) gives this thread the slot's meta until
        // `release` (see the state machine in the module docs).
        let meta = unsafe { slot.meta.with_mut(std::mem::take) };
        let reader = SlotReader {
            ring: Arc::clone(self),
            seq,
            idx,
            len: meta.len,
        };
        Some((reader, meta.error))
    }

    /// Waits for `seq` to be published and takes it. Delivery is in plan
    /// order because the caller asks for `seq` in order.
    pub fn consume(self: &Arc<Self>, seq: u64, timeout: Option<Duration>) -> Result<SlotReader> {
        let deadline = timeout.map(|t| Instant::now() + t);
        // A failed slot's reader is dropped (releasing the slot, which wakes
        // waiters under the parking lock) only after the wait returns: the
        // wait polls `take` while holding that lock, and the lock is not
        // reentrant.
        self.parking
            .wait_until(deadline, || self.take(seq), || self.is_closed())
            .map(into_result)
            .unwrap_or_else(|| Err(self.wait_error("consume", seq, timeout)))
    }

    fn wait_error(&self, what: &str, seq: u64, timeout: Option<Duration>) -> Error {
        if self.is_closed() {
            Error::Closed(format!(
                "ring closed while waiting to {what} slot for read #{seq}"
            ))
        } else {
            Error::Timeout {
                what: format!("waiting to {what} slot for read #{seq}"),
                elapsed_ms: timeout.map_or(0, |t| t.as_millis() as u64),
            }
        }
    }

    fn publish(&self, seq: u64, meta: SlotMeta) {
        let (_, slot) = self.slot(seq);
        // SAFETY: FILLING(seq) is held by the writer calling this.
        unsafe { slot.meta.with_mut(|m| *m = meta) };
        // SeqCst (a Release at least): the consumer's Acquire CAS must see
        // the bytes and meta written above; SeqCst also orders this store
        // before `wake_all`'s read of `waiters` (see `Parking`).
        slot.stamp.store(stamp(seq, PUBLISHED), Ordering::SeqCst);
        self.parking.wake_all();
    }

    fn release(&self, seq: u64) {
        let (_, slot) = self.slot(seq);
        let next = seq + self.slots.len() as u64;
        // SeqCst (a Release at least): the next claimer's Acquire CAS must
        // see that every read of this slot's bytes has finished before it
        // overwrites them; SeqCst for the waker side of `Parking`.
        slot.stamp.store(stamp(next, FREE), Ordering::SeqCst);
        self.parking.wake_all();
    }
}

/// The right to fill one slot. Publishing hands it to the consumer; dropping
/// it unpublished publishes a cancellation so the consumer never waits for a
/// fetch that will not come.
pub struct SlotWriter {
    ring: Arc<Ring>,
    seq: u64,
    done: bool,
}

impl SlotWriter {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The slot's whole memory, `slot_bytes` long.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        let (idx, _) = self.ring.slot(self.seq);
        // SAFETY: FILLING(seq) gives this writer exclusive access to the
        // slot's bytes until it publishes.
        unsafe { std::slice::from_raw_parts_mut(self.ring.slot_ptr(idx), self.ring.slot_bytes) }
    }

    /// Publishes the first `len` bytes.
    pub fn publish(mut self, len: usize) {
        assert!(len <= self.ring.slot_bytes, "publish past the slot");
        self.done = true;
        self.ring.publish(self.seq, SlotMeta { len, error: None });
    }

    /// Publishes an error in place of bytes.
    pub fn fail(mut self, error: Error) {
        self.done = true;
        self.ring.publish(
            self.seq,
            SlotMeta {
                len: 0,
                error: Some(error),
            },
        );
    }
}

impl Drop for SlotWriter {
    fn drop(&mut self) {
        if !self.done {
            let error = Error::Cancelled(format!("read #{} was abandoned", self.seq));
            self.ring.publish(
                self.seq,
                SlotMeta {
                    len: 0,
                    error: Some(error),
                },
            );
        }
    }
}

/// A consumed slot: read-only bytes that stay valid until it is dropped,
/// which releases the slot back to the ring.
pub struct SlotReader {
    ring: Arc<Ring>,
    seq: u64,
    idx: usize,
    len: usize,
}

impl std::fmt::Debug for SlotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotReader")
            .field("seq", &self.seq)
            .field("len", &self.len)
            .finish()
    }
}

impl SlotReader {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ring.slot_ptr(self.idx)
    }

    pub fn data(&self) -> &[u8] {
        // SAFETY: CONSUMING(seq) keeps producers off this slot until drop.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl Drop for SlotReader {
    fn drop(&mut self) {
        self.ring.release(self.seq);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn delivers_in_plan_order_when_filled_out_of_order() {
        let ring = Ring::new(4, 8).unwrap();
        let writers: Vec<_> = (0..4).map(|s| ring.try_claim(s).unwrap()).collect();
        for mut w in writers.into_iter().rev() {
            let seq = w.seq();
            w.buf_mut()[0] = seq as u8;
            w.publish(1);
        }
        for seq in 0..4 {
            let r = ring.consume(seq, Some(Duration::from_secs(1))).unwrap();
            assert_eq!(r.data(), &[seq as u8]);
        }
    }

    #[test]
    fn claim_waits_for_release_of_the_previous_lap() {
        let ring = Ring::new(2, 8).unwrap();
        ring.try_claim(0).unwrap().publish(0);
        ring.try_claim(1).unwrap().publish(0);
        assert!(ring.try_claim(2).is_none(), "slot 0 still holds seq 0");
        let r0 = ring.consume(0, None).unwrap();
        assert!(ring.try_claim(2).is_none(), "seq 0 is held by the consumer");
        let ring2 = Arc::clone(&ring);
        let t = thread::spawn(move || {
            ring2
                .claim(2, Some(Duration::from_secs(5)))
                .map(|w| w.seq())
        });
        thread::sleep(Duration::from_millis(20));
        drop(r0);
        assert_eq!(t.join().unwrap().unwrap(), 2);
    }

    #[test]
    fn consume_times_out_and_close_wakes_waiters() {
        let ring = Ring::new(2, 8).unwrap();
        let err = ring
            .consume(0, Some(Duration::from_millis(10)))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let ring2 = Arc::clone(&ring);
        let t = thread::spawn(move || ring2.consume(0, None));
        thread::sleep(Duration::from_millis(20));
        ring.close();
        assert!(matches!(t.join().unwrap(), Err(Error::Closed(_))));
    }

    #[test]
    fn dropped_writer_publishes_a_cancellation() {
        let ring = Ring::new(1, 8).unwrap();
        drop(ring.try_claim(0).unwrap());
        assert!(matches!(ring.consume(0, None), Err(Error::Cancelled(_))));
        // The failed slot was released: seq 1 can be claimed.
        assert!(ring.try_claim(1).is_some());
    }

    #[test]
    fn slots_are_page_aligned_and_rejects_zero_sizes() {
        let ring = Ring::new(3, 5000).unwrap();
        for seq in 0..3 {
            let mut w = ring.try_claim(seq).unwrap();
            assert_eq!(w.buf_mut().as_ptr() as usize % PAGE_BYTES, 0);
        }
        assert!(Ring::new(0, 8).is_err());
        assert!(Ring::new(8, 0).is_err());
        assert!(Ring::new(usize::MAX, 2).is_err());
    }
}
