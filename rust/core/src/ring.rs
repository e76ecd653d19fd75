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
//! stamp = seq << 3 | WAITING? << 2 | state      state ∈ {FREE, FILLING, PUBLISHED, CONSUMING}
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
//! * Stamps only grow, so a claim or consume for a `seq` whose slot has
//!   already moved past it fails at once instead of waiting forever.
//! * [`Ring::close`] makes every waiter return [`Error::Closed`] and refuses
//!   new claims. Slots already published can still be consumed (a consumer
//!   may drain what arrived), and slots handed out stay readable.
//!
//! Indices and states are lock-free atomics. Only *waiting* takes a lock: a
//! thread that must wait spins briefly, then parks on a condition variable
//! (with a timeout when asked) rather than spinning a core. The `WAITING` bit
//! in the stamp tells the thread that moves the stamp next that someone is
//! parked; see [`Parking`] for why no wake-up is lost.
//!
//! The protocol is model-checked with loom: `make loom` runs
//! `rust/core/tests/loom.rs` (every interleaving up to a preemption bound).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::{AtomicBool, AtomicU64, Cell, Condvar, Mutex, Ordering};

const FREE: u64 = 0;
const FILLING: u64 = 1;
const PUBLISHED: u64 = 2;
const CONSUMING: u64 = 3;
/// Set by a thread that is about to park until this stamp moves; cleared
/// (and acted on) by the `swap` of the publish or release that moves it.
const WAITING: u64 = 4;
const SEQ_SHIFT: u32 = 3;

/// Slot memory is aligned to this so `O_DIRECT`-style reads and SIMD
/// consumers get what they expect.
pub const PAGE_BYTES: usize = 4096;

const fn stamp(seq: u64, state: u64) -> u64 {
    (seq << SEQ_SHIFT) | state
}

/// Where a slot stands relative to the stamp a caller waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The stamp is the one wanted.
    Ready,
    /// The stamp is earlier: wait for the slot to move on.
    NotYet,
    /// The stamp is later: it will never be the one wanted (stamps only grow).
    Passed,
}

fn progress(current: u64, want: u64) -> Progress {
    let current = current & !WAITING;
    match current.cmp(&want) {
        std::cmp::Ordering::Equal => Progress::Ready,
        std::cmp::Ordering::Less => Progress::NotYet,
        std::cmp::Ordering::Greater => Progress::Passed,
    }
}

/// What a producer left in a slot for the consumer: the filled length, or
/// the error that replaced the bytes (boxed: errors are rare, and a small
/// meta keeps the whole slot in one cache line).
#[derive(Debug, Default)]
struct SlotMeta {
    len: usize,
    error: Option<Box<Error>>,
}

/// Stamp and meta share one cache line, and the alignment to two lines keeps
/// a producer moving slot `i + 1` off the line of the consumer on slot `i`
/// (false sharing; x86 prefetches adjacent lines in pairs).
#[repr(align(128))]
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

/// Parking for waiters: the hand-off never touches the lock unless a thread
/// is parked on the slot it moves.
///
/// Lost-wakeup freedom rests on read-modify-writes of the *same* stamp, which
/// are totally ordered (its modification order), so no SeqCst is needed:
///
/// * A waiter, holding `lock`, reads the stamp; if it is not the one wanted it
///   sets `WAITING` with a CAS that expects exactly what it read, and only
///   then sleeps on `cond` (which releases `lock` atomically).
/// * A waker moves the stamp with a `swap` and, if the old value had
///   `WAITING`, takes `lock` and notifies.
///
/// If the waiter's CAS comes first in the stamp's modification order, the
/// waker's swap reads `WAITING` (claim and consume CASes keep the bit; only a
/// swap clears it, and every swap that clears it wakes). The waker can take
/// `lock` only after the waiter sleeps, because the waiter held `lock` when it
/// set the bit, so the notification reaches it. If the swap comes first, the
/// waiter's CAS fails (stamps only grow, so the expected value is gone) and
/// it re-reads the stamp instead of sleeping. `close` stores `closed` and then
/// notifies under `lock`, and waiters check `closed` under `lock`, so close
/// cannot slip between a waiter's check and its sleep either.
///
/// Every thread parks on one condition variable: waking is rare (only when
/// the ring is full or empty), so a shared `notify_all` costs little and
/// keeps the structure small.
struct Parking {
    lock: Mutex<()>,
    cond: Condvar,
}

/// Why a park ended.
enum Parked {
    /// The stamp moved to or past the one wanted: try the transition again.
    Moved,
    Closed,
    TimedOut,
}

impl Parking {
    fn new() -> Self {
        Parking {
            lock: Mutex::new(()),
            cond: Condvar::new(),
        }
    }

    fn wake_all(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }

    /// Sleeps until `stamp` is no longer earlier than `want`, the ring is
    /// closed, or `deadline` passes.
    fn park(
        &self,
        stamp: &AtomicU64,
        want: u64,
        closed: &AtomicBool,
        deadline: Option<Instant>,
    ) -> Parked {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Relaxed: this read only decides whether to sleep; the caller's
        // Acquire CAS does the hand-over. The `WAITING` CAS below is what
        // makes the decision race-free (see the type's docs).
        let mut current = stamp.load(Ordering::Relaxed);
        loop {
            if progress(current, want) != Progress::NotYet {
                return Parked::Moved;
            }
            // Acquire pairs with the Release store in `close`; `lock` alone
            // would do, this keeps the check meaningful without it.
            if closed.load(Ordering::Acquire) {
                return Parked::Closed;
            }
            if current & WAITING == 0 {
                // Relaxed: only the atomicity of this RMW matters (it is
                // ordered against the waker's swap in the stamp's
                // modification order). As an RMW it also continues the
                // release sequence of the store it overwrote, so the next
                // Acquire CAS still synchronizes with that store.
                if let Err(actual) = stamp.compare_exchange(
                    current,
                    current | WAITING,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    current = actual;
                    continue;
                }
            }
            match deadline {
                None => guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        // `WAITING` may stay set: the next mover then takes
                        // the lock once for nothing, which is harmless.
                        return Parked::TimedOut;
                    }
                    guard = wait_timeout(&self.cond, guard, deadline - now);
                }
            }
            current = stamp.load(Ordering::Relaxed);
        }
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

/// Spins and yields for a few microseconds before a waiter parks: a hand-off
/// between two running threads usually completes within that window, and a
/// park/unpark pair costs two system calls. Loom explores the park path only
/// (spinning would only multiply its interleavings).
#[cfg(not(loom))]
struct Backoff(u32);

#[cfg(not(loom))]
impl Backoff {
    const SPIN_STEPS: u32 = 6;
    const YIELD_STEPS: u32 = 10;

    fn new() -> Self {
        Backoff(0)
    }

    /// Waits a little; `false` once it is time to park.
    fn snooze(&mut self) -> bool {
        if self.0 > Self::YIELD_STEPS {
            return false;
        }
        if self.0 <= Self::SPIN_STEPS {
            for _ in 0..1u32 << self.0 {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
        }
        self.0 += 1;
        true
    }
}

#[cfg(loom)]
struct Backoff;

#[cfg(loom)]
impl Backoff {
    fn new() -> Self {
        Backoff
    }

    fn snooze(&mut self) -> bool {
        false
    }
}

/// The bounded, ordered slot ring. Shared by `Arc` between the stream's
/// driver, its fetch tasks and every chunk handed to Python.
///
/// Every slot handle must keep the ring alive, but one reference count for
/// all of them would be a cache line that producer and consumer both write
/// on every hand-off (measured: about half the cost of a cross-core
/// hand-off). So writers count on one [`Side`] and readers on another, each
/// on its own cache lines, and both sides keep the shared state alive.
pub struct Ring {
    state: Arc<RingState>,
    producers: Arc<Side>,
    consumers: Arc<Side>,
}

/// A reference count for one side's slot handles (see [`Ring`]). The
/// alignment keeps the count, which lives just before it in the `Arc`'s
/// allocation, off the other side's lines.
#[repr(align(128))]
struct Side(Arc<RingState>);

/// Everything the slots need, owned jointly by the ring and both sides.
struct RingState {
    slots: Box<[Slot]>,
    slot_bytes: usize,
    /// Distance between slots: `slot_bytes` rounded up to a page.
    stride_bytes: usize,
    /// `slots - 1` when `slots` is a power of two.
    index_mask: Option<u64>,
    arena: Arena,
    closed: AtomicBool,
    parking: Parking,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("slots", &self.state.slots.len())
            .field("slot_bytes", &self.state.slot_bytes)
            .finish()
    }
}

impl RingState {
    fn new(slots: usize, slot_bytes: usize) -> Result<Self> {
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
        let slots: Box<[Slot]> = (0..slots as u64)
            .map(|seq| Slot {
                stamp: AtomicU64::new(stamp(seq, FREE)),
                meta: Cell::new(SlotMeta::default()),
            })
            .collect();
        Ok(RingState {
            index_mask: slots
                .len()
                .is_power_of_two()
                .then(|| slots.len() as u64 - 1),
            slots,
            slot_bytes,
            stride_bytes,
            arena,
            closed: AtomicBool::new(false),
            parking: Parking::new(),
        })
    }

    /// The slot index of `seq`. Computed once per claim or consume and then
    /// carried along: a 64-bit division costs as much as an atomic, so a
    /// power-of-two slot count (the usual case) takes a mask instead.
    #[inline]
    fn index(&self, seq: u64) -> usize {
        match self.index_mask {
            Some(mask) => (seq & mask) as usize,
            None => (seq % self.slots.len() as u64) as usize,
        }
    }

    fn slot_ptr(&self, idx: usize) -> *mut u8 {
        // SAFETY: idx < slots, so the offset stays inside the arena.
        unsafe { self.arena.ptr.as_ptr().add(idx * self.stride_bytes) }
    }

    fn close(&self) {
        // Release pairs with the Acquire loads in `is_closed` and `park`; the
        // notification under the lock is what guarantees parked threads see
        // it (see `Parking`).
        self.closed.store(true, Ordering::Release);
        self.parking.wake_all();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Moves the slot of `seq` from `from` to `to` (keeping `WAITING`).
    #[inline]
    fn try_transition(&self, idx: usize, seq: u64, from: u64, to: u64) -> Progress {
        let slot = &self.slots[idx];
        let want = stamp(seq, from);
        // Relaxed: only a guess for the CAS below, which re-checks it.
        let mut current = slot.stamp.load(Ordering::Relaxed);
        loop {
            match progress(current, want) {
                Progress::Ready => {}
                other => return other,
            }
            // Acquire on success: a claimer must see the consumer's last
            // reads of the slot finished (paired with the Release swap in
            // `release`); a consumer must see the producer's bytes and meta
            // (paired with the Release swap in `publish`). Failure needs no
            // ordering: we only look at the value again.
            match slot.stamp.compare_exchange_weak(
                current,
                stamp(seq, to) | (current & WAITING),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Progress::Ready,
                Err(actual) => current = actual,
            }
        }
    }

    /// Moves `seq`'s slot from `from` to `to`, spinning briefly and then
    /// parking while it is not there yet.
    #[inline(never)]
    fn transition(
        &self,
        idx: usize,
        seq: u64,
        from: u64,
        to: u64,
        timeout: Option<Duration>,
        what: &str,
    ) -> Result<()> {
        let mut backoff = Backoff::new();
        // The clock is read only once the slot turns out not to be ready.
        let mut deadline: Option<Option<Instant>> = None;
        loop {
            // A claim must not start after close; a consume may still drain
            // what was published.
            if to == FILLING && self.is_closed() {
                return Err(self.closed_error(what, seq));
            }
            match self.try_transition(idx, seq, from, to) {
                Progress::Ready => return Ok(()),
                Progress::Passed => {
                    return Err(Error::invalid(format!(
                        "cannot {what} the slot for read #{seq}: it was already taken"
                    )))
                }
                Progress::NotYet => {}
            }
            if self.is_closed() {
                return Err(self.closed_error(what, seq));
            }
            let deadline = *deadline.get_or_insert_with(|| timeout.map(|t| Instant::now() + t));
            if backoff.snooze() {
                continue;
            }
            match self.parking.park(
                &self.slots[idx].stamp,
                stamp(seq, from),
                &self.closed,
                deadline,
            ) {
                Parked::Moved => {}
                Parked::Closed => return Err(self.closed_error(what, seq)),
                Parked::TimedOut => {
                    return Err(Error::Timeout {
                        what: format!("waiting to {what} slot for read #{seq}"),
                        elapsed_ms: timeout.map_or(0, |t| t.as_millis() as u64),
                    })
                }
            }
        }
    }

    fn closed_error(&self, what: &str, seq: u64) -> Error {
        Error::Closed(format!(
            "ring closed while waiting to {what} slot for read #{seq}"
        ))
    }

    /// Moves the stamp on with a swap (see `Parking`) and wakes parked
    /// threads if one marked it.
    fn advance(&self, idx: usize, to: u64) {
        let slot = &self.slots[idx];
        // Release: for `publish`, the consumer's Acquire CAS must see the
        // bytes and meta written before; for `release`, the next claimer's
        // Acquire CAS must see every read of the slot finished before it
        // overwrites the bytes. A swap rather than a store so that the old
        // value's `WAITING` bit is read in the same atomic step (a plain
        // store followed by a load could miss a waiter that marked the
        // stamp in between).
        let old = slot.stamp.swap(to, Ordering::Release);
        if old & WAITING != 0 {
            self.parking.wake_all();
        }
    }

    fn publish(&self, idx: usize, seq: u64, meta: SlotMeta) {
        // SAFETY: FILLING(seq) is held by the writer calling this.
        unsafe { self.slots[idx].meta.with_mut(|m| *m = meta) };
        self.advance(idx, stamp(seq, PUBLISHED));
    }

    fn release(&self, idx: usize, seq: u64) {
        self.advance(idx, stamp(seq + self.slots.len() as u64, FREE));
    }
}

impl Ring {
    /// Allocates `slots × slot_bytes` bytes once.
    pub fn new(slots: usize, slot_bytes: usize) -> Result<Arc<Self>> {
        let state = Arc::new(RingState::new(slots, slot_bytes)?);
        Ok(Arc::new(Ring {
            producers: Arc::new(Side(Arc::clone(&state))),
            consumers: Arc::new(Side(Arc::clone(&state))),
            state,
        }))
    }

    pub fn slot_count(&self) -> usize {
        self.state.slots.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.state.slot_bytes
    }

    /// Slots not free: being filled, published and waiting, or held by the
    /// consumer. A gauge read by metrics; racy by nature, never used to
    /// decide anything.
    pub fn occupied_slots(&self) -> usize {
        self.state
            .slots
            .iter()
            .filter(|s| s.stamp.load(Ordering::Relaxed) & 3 != FREE)
            .count()
    }

    /// Closes the ring: every waiter returns `Closed`, and no new claim
    /// succeeds. Published slots can still be consumed; chunks already handed
    /// out stay readable.
    pub fn close(&self) {
        self.state.close();
    }

    pub fn is_closed(&self) -> bool {
        self.state.is_closed()
    }

    fn writer(&self, idx: usize, seq: u64) -> SlotWriter {
        SlotWriter {
            side: Arc::clone(&self.producers),
            seq,
            idx,
            done: false,
        }
    }

    /// Claims the slot for `seq` without waiting.
    pub fn try_claim(&self, seq: u64) -> Option<SlotWriter> {
        let idx = self.state.index(seq);
        if self.state.is_closed()
            || self.state.try_transition(idx, seq, FREE, FILLING) != Progress::Ready
        {
            return None;
        }
        Some(self.writer(idx, seq))
    }

    /// Claims the slot for `seq`, waiting while the consumer still holds
    /// `seq - slots` (back-pressure). `None` timeout waits until closed.
    pub fn claim(&self, seq: u64, timeout: Option<Duration>) -> Result<SlotWriter> {
        let idx = self.state.index(seq);
        // Fast path inline; the waiting loop stays out of line.
        if !self.state.is_closed()
            && self.state.try_transition(idx, seq, FREE, FILLING) == Progress::Ready
        {
            return Ok(self.writer(idx, seq));
        }
        self.state
            .transition(idx, seq, FREE, FILLING, timeout, "claim")?;
        Ok(self.writer(idx, seq))
    }

    /// Takes the meta of `seq`, which this thread has just moved to CONSUMING.
    fn reader(&self, idx: usize, seq: u64) -> Result<SlotReader> {
        let slot = &self.state.slots[idx];
        // SAFETY: CONSUMING(seq) gives this thread the slot's meta until
        // `release` (see the state machine in the module docs).
        let meta = unsafe { slot.meta.with_mut(std::mem::take) };
        let reader = SlotReader {
            side: Arc::clone(&self.consumers),
            seq,
            idx,
            len: meta.len,
        };
        match meta.error {
            None => Ok(reader),
            // Dropping the reader releases the slot: the error carries no bytes.
            Some(err) => Err(*err),
        }
    }

    /// Whether the slot `seq` needs is still held by the consumer itself
    /// (it has not released `seq - slots`). A consumer waiting for `seq`
    /// would then wait for itself; the prefetcher reports that instead.
    pub fn held_by_consumer(&self, seq: u64) -> bool {
        let lap = self.state.slots.len() as u64;
        if seq < lap {
            return false;
        }
        let idx = self.state.index(seq);
        // Acquire pairs with the Release swap in `release`: a release that
        // happened before this call is seen. Only the consumer asks, about
        // its own slots, so no later release can race with its answer.
        let current = self.state.slots[idx].stamp.load(Ordering::Acquire) & !WAITING;
        current == stamp(seq - lap, CONSUMING)
    }

    /// Consumes `seq` without waiting.
    pub fn try_consume(&self, seq: u64) -> Option<Result<SlotReader>> {
        let idx = self.state.index(seq);
        if self.state.try_transition(idx, seq, PUBLISHED, CONSUMING) != Progress::Ready {
            return None;
        }
        Some(self.reader(idx, seq))
    }

    /// `consume` that tells a wait that ran out (`Ok(None)`) from a read
    /// that failed with a timeout of its own (`Err(Timeout)`).
    pub fn consume_within(&self, seq: u64, timeout: Duration) -> Result<Option<SlotReader>> {
        let idx = self.state.index(seq);
        if self.state.try_transition(idx, seq, PUBLISHED, CONSUMING) != Progress::Ready {
            match self
                .state
                .transition(idx, seq, PUBLISHED, CONSUMING, Some(timeout), "consume")
            {
                Ok(_) => {}
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        self.reader(idx, seq).map(Some)
    }

    /// Waits for `seq` to be published and takes it. Delivery is in plan
    /// order because the caller asks for `seq` in order.
    pub fn consume(&self, seq: u64, timeout: Option<Duration>) -> Result<SlotReader> {
        let idx = self.state.index(seq);
        if self.state.try_transition(idx, seq, PUBLISHED, CONSUMING) == Progress::Ready {
            return self.reader(idx, seq);
        }
        self.state
            .transition(idx, seq, PUBLISHED, CONSUMING, timeout, "consume")?;
        self.reader(idx, seq)
    }
}

/// The right to fill one slot. Publishing hands it to the consumer; dropping
/// it unpublished publishes a cancellation so the consumer never waits for a
/// fetch that will not come.
pub struct SlotWriter {
    side: Arc<Side>,
    seq: u64,
    idx: usize,
    done: bool,
}

impl std::fmt::Debug for SlotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotWriter")
            .field("seq", &self.seq)
            .finish()
    }
}

impl SlotWriter {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The slot's whole memory, `slot_bytes` long.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        // SAFETY: FILLING(seq) gives this writer exclusive access to the
        // slot's bytes until it publishes.
        unsafe {
            std::slice::from_raw_parts_mut(self.side.0.slot_ptr(self.idx), self.side.0.slot_bytes)
        }
    }

    /// Publishes the first `len` bytes.
    pub fn publish(mut self, len: usize) {
        // A panic here leaves `done` false, so Drop publishes a cancellation.
        assert!(len <= self.side.0.slot_bytes, "publish past the slot");
        self.done = true;
        self.side
            .0
            .publish(self.idx, self.seq, SlotMeta { len, error: None });
    }

    /// Publishes an error in place of bytes.
    pub fn fail(mut self, error: Error) {
        self.done = true;
        self.side.0.publish(
            self.idx,
            self.seq,
            SlotMeta {
                len: 0,
                error: Some(Box::new(error)),
            },
        );
    }
}

impl Drop for SlotWriter {
    fn drop(&mut self) {
        if !self.done {
            let error = Error::Cancelled(format!("read #{} was abandoned", self.seq));
            self.side.0.publish(
                self.idx,
                self.seq,
                SlotMeta {
                    len: 0,
                    error: Some(Box::new(error)),
                },
            );
        }
    }
}

/// A consumed slot: read-only bytes that stay valid until it is dropped,
/// which releases the slot back to the ring.
pub struct SlotReader {
    side: Arc<Side>,
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
        self.side.0.slot_ptr(self.idx)
    }

    pub fn data(&self) -> &[u8] {
        // SAFETY: CONSUMING(seq) keeps producers off this slot until drop.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl Drop for SlotReader {
    fn drop(&mut self) {
        self.side.0.release(self.idx, self.seq);
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
    fn parked_consumer_gets_the_cancellation_of_a_dropped_writer() {
        // Regression: the consumer used to take the cancelled slot while
        // holding the parking lock, and releasing it re-took that lock.
        let ring = Ring::new(1, 8).unwrap();
        let writer = ring.try_claim(0).unwrap();
        let ring2 = Arc::clone(&ring);
        let t = thread::spawn(move || {
            ring2
                .consume(0, Some(Duration::from_secs(5)))
                .map(|r| r.len())
        });
        thread::sleep(Duration::from_millis(20));
        drop(writer);
        assert!(matches!(t.join().unwrap(), Err(Error::Cancelled(_))));
        assert!(
            ring.try_claim(1).is_some(),
            "the cancelled slot was released"
        );
    }

    #[test]
    fn a_seq_already_taken_fails_at_once_instead_of_waiting() {
        let ring = Ring::new(2, 8).unwrap();
        let w = ring.claim(0, None).unwrap();
        let err = ring.claim(0, None).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("read #0"), "{err}");
        w.publish(3);
        drop(ring.consume(0, None).unwrap());
        let err = ring.consume(0, None).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(ring.try_consume(0).is_none());
    }

    #[test]
    fn close_refuses_claims_but_lets_published_slots_drain() {
        let ring = Ring::new(2, 8).unwrap();
        let mut w = ring.try_claim(0).unwrap();
        w.buf_mut()[0] = 7;
        w.publish(1);
        ring.close();
        assert!(ring.try_claim(1).is_none());
        assert!(matches!(ring.claim(1, None), Err(Error::Closed(_))));
        assert_eq!(ring.consume(0, None).unwrap().data(), &[7]);
        assert!(matches!(ring.consume(1, None), Err(Error::Closed(_))));
    }

    #[test]
    fn many_hand_offs_between_threads_keep_order_and_bytes() {
        let ring = Ring::new(3, 16).unwrap();
        const ITEMS: u64 = 20_000;
        let producers: Vec<_> = (0..2u64)
            .map(|p| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || {
                    for seq in (p..ITEMS).step_by(2) {
                        let mut w = ring.claim(seq, Some(Duration::from_secs(10))).unwrap();
                        w.buf_mut()[..8].copy_from_slice(&seq.to_le_bytes());
                        w.publish(8);
                    }
                })
            })
            .collect();
        for seq in 0..ITEMS {
            let r = ring.consume(seq, Some(Duration::from_secs(10))).unwrap();
            assert_eq!(r.data(), &seq.to_le_bytes());
        }
        for p in producers {
            p.join().unwrap();
        }
    }

    #[test]
    fn handles_keep_the_slots_alive_after_the_ring_is_dropped() {
        let ring = Ring::new(2, 8).unwrap();
        let mut w = ring.try_claim(0).unwrap();
        w.buf_mut()[0] = 9;
        w.publish(1);
        let reader = ring.consume(0, None).unwrap();
        let mut writer = ring.try_claim(1).unwrap();
        drop(ring);
        writer.buf_mut()[0] = 10;
        writer.publish(1);
        assert_eq!(reader.data(), &[9]);
        drop(reader);
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
