//! The prefetcher: runs a plan through a store into the slot ring, keeping
//! `depth` fetches in flight, each writing straight into its own slot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::plan::ReadRange;
use crate::ring::{Ring, SlotReader, SlotWriter};
use crate::runtime;
use crate::store::{ReadSession, Store};
use crate::telemetry::STREAMS;

/// Default cap on one stream's arena. Larger asks are refused with an error
/// naming the sizes rather than letting a typo allocate the machine.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 4 << 30;

/// Ranges up to this size are read by the driver thread itself when the
/// store can read without an executor (page-cache `pread`): spawning a task
/// and waking a worker costs more than such a read.
pub const INLINE_READ_BYTES: usize = 256 << 10;

/// How long the consumer may wait for a slot that it holds itself before
/// the wait is reported as an error instead of going on for ever.
pub const HELD_GRACE: Duration = Duration::from_secs(2);

/// How often a waiting driver looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// A stream's sizes.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Largest chunk; the slot size.
    pub chunk_bytes: usize,
    /// Fetches in flight at once.
    pub depth: usize,
    /// Slots in the ring: `depth` in flight plus room for chunks the
    /// consumer still holds.
    pub slots: usize,
    pub memory_budget_bytes: usize,
}

impl StreamConfig {
    /// `slots = 2 × depth`: half in flight, half held downstream.
    pub fn new(chunk_bytes: usize, depth: usize) -> Self {
        StreamConfig {
            chunk_bytes,
            depth,
            slots: depth.saturating_mul(2),
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.chunk_bytes == 0 {
            return Err(Error::invalid("chunk_bytes must be at least 1, got 0"));
        }
        if self.depth == 0 {
            return Err(Error::invalid("depth must be at least 1, got 0"));
        }
        if self.slots < self.depth {
            return Err(Error::invalid(format!(
                "slots ({}) must be at least depth ({})",
                self.slots, self.depth
            )));
        }
        let arena = (self.slots as u128) * (self.chunk_bytes as u128);
        if arena > self.memory_budget_bytes as u128 {
            return Err(Error::invalid(format!(
                "chunk_bytes={} × slots={} (depth={}) needs {} bytes, over the memory budget of {} bytes (memory_budget_bytes)",
                self.chunk_bytes, self.slots, self.depth, arena, self.memory_budget_bytes
            )));
        }
        Ok(())
    }
}

/// A delivered range: its place in the plan and its bytes, held in a slot
/// until this is dropped.
#[derive(Debug)]
pub struct Chunk {
    pub range: ReadRange,
    slot: SlotReader,
}

impl Chunk {
    pub fn data(&self) -> &[u8] {
        self.slot.data()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.slot.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.slot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot.is_empty()
    }
}

/// What `Stream::next_chunk` found.
#[derive(Debug)]
pub enum Next {
    Chunk(Chunk),
    /// Every range of the plan has been delivered.
    End,
    /// Nothing arrived within the wait; ask again.
    Pending,
}

/// What metrics read of a running stream: its ring and its fetches in
/// flight (see [`crate::telemetry::StreamGauges`]).
struct Gauges {
    ring: Arc<Ring>,
    in_flight: Arc<Semaphore>,
    depth: usize,
}

impl crate::telemetry::StreamGauges for Gauges {
    fn gauges(&self) -> (usize, usize, usize, usize) {
        let free = match self.in_flight.is_closed() {
            true => self.depth,
            false => self.in_flight.available_permits(),
        };
        (
            self.ring.slot_count(),
            self.ring.occupied_slots(),
            self.depth,
            self.depth.saturating_sub(free),
        )
    }
}

/// A running prefetch of one plan. Dropping it stops the driver and joins
/// its thread; chunks already handed out stay valid.
pub struct Stream {
    ring: Arc<Ring>,
    plan: Arc<[ReadRange]>,
    next_seq: u64,
    /// Since when the consumer has waited for `next_seq` (exposed stall):
    /// the clock is read only when the chunk is not ready.
    waiting_since: Option<std::time::Instant>,
    /// Registered with the process metrics while the stream lives.
    _gauges: Arc<Gauges>,
    /// Since when the slot of `next_seq` has been held by the consumer.
    held_since: Option<std::time::Instant>,
    stop: Arc<AtomicBool>,
    /// Closed on `close` so a driver waiting for a permit wakes at once.
    in_flight: Arc<Semaphore>,
    driver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("ring", &self.ring)
            .field("ranges", &self.plan.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl Stream {
    /// Starts the driver thread. Its inline reads go through one
    /// [`ReadSession`]: their bookkeeping is folded in per batch and
    /// whenever the driver is about to wait.
    pub fn start(
        store: Arc<dyn Store>,
        plan: Vec<ReadRange>,
        config: &StreamConfig,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(r) = plan.iter().find(|r| r.len > config.chunk_bytes) {
            return Err(Error::invalid(format!(
                "range of {} bytes at offset {} of {:?} exceeds chunk_bytes={}",
                r.len, r.offset, r.key, config.chunk_bytes
            )));
        }
        // No more slots than ranges: a small plan needs no large arena.
        let slots = config.slots.min(plan.len().max(1));
        let ring = Ring::new(slots, config.chunk_bytes)?;
        let plan: Arc<[ReadRange]> = plan.into();
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(Semaphore::new(config.depth.min(slots)));
        let gauges = Arc::new(Gauges {
            ring: Arc::clone(&ring),
            in_flight: Arc::clone(&in_flight),
            depth: config.depth.min(slots),
        });
        let weak: std::sync::Weak<dyn crate::telemetry::StreamGauges> =
            Arc::downgrade(&(Arc::clone(&gauges) as Arc<dyn crate::telemetry::StreamGauges>));
        crate::telemetry::register_stream(weak);
        let driver = Driver {
            ring: Arc::clone(&ring),
            plan: Arc::clone(&plan),
            store,
            in_flight: Arc::clone(&in_flight),
            stop: Arc::clone(&stop),
        };
        let driver = std::thread::Builder::new()
            .name("feedline-prefetch".into())
            .spawn(move || driver.run())
            .map_err(|e| Error::Io {
                context: "starting the prefetch thread".into(),
                source: e,
            })?;
        Ok(Stream {
            ring,
            plan,
            next_seq: 0,
            waiting_since: None,
            _gauges: gauges,
            held_since: None,
            stop,
            in_flight,
            driver: Some(driver),
        })
    }

    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// Waits up to `timeout` for the next chunk in plan order.
    pub fn next_chunk(&mut self, timeout: Duration) -> Result<Next> {
        let Some(range) = self.plan.get(self.next_seq as usize) else {
            return Ok(Next::End);
        };
        if self.ring.held_by_consumer(self.next_seq) {
            // The slot is still ours. Another thread may be about to drop
            // the chunk (pyarrow releases buffers from its own threads), so
            // this waits as usual; only a slot held for `HELD_GRACE` is
            // reported, rather than waiting for ever. The stream stays
            // usable once a chunk is released.
            let since = *self.held_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= HELD_GRACE {
                self.held_since = None;
                return Err(Error::invalid(format!(
                    "all {} slots of this stream have been held by chunks not yet released \
                     for {} s (the next chunk, #{}, needs the slot of chunk #{}); release \
                     chunks (or drop their views) before taking more, or raise depth",
                    self.ring.slot_count(),
                    HELD_GRACE.as_secs(),
                    self.next_seq,
                    self.next_seq - self.ring.slot_count() as u64
                )));
            }
        } else {
            self.held_since = None;
        }
        // Ready: no clock read. Else the wait is exposed stall, from the
        // first call that found the chunk missing until it arrives.
        let ready = match self.ring.try_consume(self.next_seq) {
            Some(r) => r.map(Some),
            None => {
                self.waiting_since
                    .get_or_insert_with(std::time::Instant::now);
                // A read that timed out is that read's error, not "nothing yet".
                self.ring.consume_within(self.next_seq, timeout)
            }
        };
        if let (Some(since), Ok(Some(_)) | Err(_)) = (self.waiting_since, &ready) {
            self.waiting_since = None;
            STREAMS.stalled(since.elapsed());
        }
        match ready {
            Ok(Some(slot)) => {
                STREAMS.delivered(1, slot.len() as u64);
                self.next_seq += 1;
                Ok(Next::Chunk(Chunk {
                    range: range.clone(),
                    slot,
                }))
            }
            Ok(None) => Ok(Next::Pending),
            Err(e) => {
                // A failed range ends the stream: the consumer must not
                // silently skip bytes. Later ranges are not delivered.
                self.next_seq = self.plan.len() as u64;
                self.close();
                Err(e)
            }
        }
    }

    /// Takes, without waiting, up to `max` chunks that are already published
    /// next in plan order, appending them to `out`. A consumer that crosses
    /// a costly boundary per call (Python's GIL) takes every ready chunk in
    /// one crossing and serves the rest from `out`. Taking a published chunk
    /// early holds no extra memory: its slot is occupied either way until
    /// the chunk is released.
    ///
    /// A failed range ends the stream as in [`Stream::next_chunk`]; its
    /// error is returned after the chunks before it were appended, so the
    /// caller hands those out first.
    pub fn take_ready(&mut self, max: usize, out: &mut VecDeque<Chunk>) -> Result<()> {
        let before = out.len();
        let result = self.take_ready_into(max, out);
        let bytes: usize = out.iter().skip(before).map(Chunk::len).sum();
        STREAMS.delivered((out.len() - before) as u64, bytes as u64);
        result
    }

    fn take_ready_into(&mut self, max: usize, out: &mut VecDeque<Chunk>) -> Result<()> {
        for _ in 0..max {
            let Some(range) = self.plan.get(self.next_seq as usize) else {
                return Ok(());
            };
            match self.ring.try_consume(self.next_seq) {
                None => return Ok(()),
                Some(Ok(slot)) => {
                    self.next_seq += 1;
                    out.push_back(Chunk {
                        range: range.clone(),
                        slot,
                    });
                }
                Some(Err(e)) => {
                    self.next_seq = self.plan.len() as u64;
                    self.close();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Whether every range of the plan has been handed out.
    pub fn is_done(&self) -> bool {
        self.next_seq as usize >= self.plan.len()
    }

    /// Stops fetching and joins the driver. Idempotent.
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.ring.close();
        self.in_flight.close();
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.driver.is_none()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.close();
    }
}

struct Driver {
    ring: Arc<Ring>,
    plan: Arc<[ReadRange]>,
    store: Arc<dyn Store>,
    in_flight: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
}

impl Driver {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn run(self) {
        let handle = runtime::handle();
        let mut tasks = VecDeque::new();
        let store = Arc::clone(&self.store);
        let mut session = ReadSession::new(store.as_ref());
        for seq in 0..self.plan.len() as u64 {
            let Some(mut writer) = self.claim(seq, &mut session) else {
                break;
            };
            let range = &self.plan[seq as usize];
            if range.len <= INLINE_READ_BYTES {
                let buf = &mut writer.buf_mut()[..range.len];
                if let Some(result) = session.read_into_blocking(&range.key, range.offset, buf) {
                    match result {
                        Ok(()) => writer.publish(range.len),
                        Err(e) => writer.fail(e),
                    }
                    continue;
                }
            }
            session.flush();
            let permit = match handle.block_on(Arc::clone(&self.in_flight).acquire_owned()) {
                Ok(p) => p,
                Err(_) => break,
            };
            if self.stopped() {
                break;
            }
            let store = Arc::clone(&self.store);
            let range = self.plan[seq as usize].clone();
            tasks.push_back(handle.spawn(async move {
                let _permit = permit;
                let result = store
                    .read_into(&range.key, range.offset, &mut writer.buf_mut()[..range.len])
                    .await;
                match result {
                    Ok(()) => writer.publish(range.len),
                    Err(e) => writer.fail(e),
                }
            }));
            while tasks
                .front()
                .is_some_and(|t: &tokio::task::JoinHandle<()>| t.is_finished())
            {
                tasks.pop_front();
            }
        }
        if self.stopped() {
            for task in &tasks {
                task.abort();
            }
        }
    }

    /// Claims the slot for `seq`, waking every `STOP_POLL` to honour a stop.
    /// Before waiting, folds in the session's samples: `stats()` must not
    /// lag for as long as the consumer holds the ring full.
    fn claim(&self, seq: u64, session: &mut ReadSession<'_>) -> Option<SlotWriter> {
        if !self.stopped() {
            if let Some(writer) = self.ring.try_claim(seq) {
                return Some(writer);
            }
        }
        session.flush();
        loop {
            if self.stopped() {
                return None;
            }
            match self.ring.claim(seq, Some(STOP_POLL)) {
                Ok(w) => return Some(w),
                Err(Error::Timeout { .. }) => continue,
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{build_plan, PlanItem};
    use crate::store::LocalStore;
    use std::time::Instant;

    fn dataset(files: usize, bytes: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in 0..files {
            let data: Vec<u8> = (0..bytes).map(|i| (i * 31 + f * 7) as u8).collect();
            std::fs::write(dir.path().join(format!("f{f}")), data).unwrap();
        }
        dir
    }

    fn collect(stream: &mut Stream) -> Result<Vec<(ReadRange, Vec<u8>)>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match stream.next_chunk(Duration::from_millis(100))? {
                Next::Chunk(c) => out.push((c.range.clone(), c.data().to_vec())),
                Next::End => return Ok(out),
                Next::Pending => {}
            }
        }
        panic!("stream did not finish in 10 s");
    }

    #[test]
    fn streams_every_byte_in_plan_order() {
        let dir = dataset(5, 10_000);
        let store: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let items: Vec<_> = (0..5)
            .map(|f| PlanItem::Object(format!("f{f}").into()))
            .collect();
        let plan = runtime::block_on(build_plan(store.as_ref(), &items, 4096)).unwrap();
        assert_eq!(plan.len(), 15);
        let mut stream = Stream::start(store, plan.clone(), &StreamConfig::new(4096, 3)).unwrap();
        let got = collect(&mut stream).unwrap();
        let ranges: Vec<_> = got.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, plan);
        for f in 0..5 {
            let want = std::fs::read(dir.path().join(format!("f{f}"))).unwrap();
            let have: Vec<u8> = got
                .iter()
                .filter(|(r, _)| *r.key == format!("f{f}"))
                .flat_map(|(_, d)| d.clone())
                .collect();
            assert_eq!(have, want);
        }
    }

    #[test]
    fn a_failed_range_ends_the_stream_with_its_error() {
        let dir = dataset(1, 100);
        let store: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let plan = vec![
            ReadRange {
                key: "f0".into(),
                offset: 0,
                len: 10,
            },
            ReadRange {
                key: "missing".into(),
                offset: 0,
                len: 10,
            },
        ];
        let mut stream = Stream::start(store, plan, &StreamConfig::new(64, 2)).unwrap();
        let err = collect(&mut stream).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }

    #[test]
    fn close_with_chunks_held_joins_promptly() {
        let dir = dataset(4, 64 * 1024);
        let store: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let items: Vec<_> = (0..4)
            .map(|f| PlanItem::Object(format!("f{f}").into()))
            .collect();
        let plan = runtime::block_on(build_plan(store.as_ref(), &items, 1024)).unwrap();
        let mut stream = Stream::start(store, plan, &StreamConfig::new(1024, 2)).unwrap();
        let mut held = Vec::new();
        while held.len() < 4 {
            if let Next::Chunk(c) = stream.next_chunk(Duration::from_secs(1)).unwrap() {
                held.push(c);
            }
        }
        // The ring is full of held chunks: the driver waits on back-pressure.
        let t = Instant::now();
        stream.close();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "close took {:?}",
            t.elapsed()
        );
        assert_eq!(held[0].data().len(), 1024);
    }

    #[test]
    fn taking_more_chunks_than_slots_is_an_error_not_a_hang() {
        let dir = dataset(1, 8 * 1024);
        let store: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let items = vec![PlanItem::Object("f0".into())];
        let plan = runtime::block_on(build_plan(store.as_ref(), &items, 1024)).unwrap();
        let mut stream = Stream::start(store, plan, &StreamConfig::new(1024, 1)).unwrap();
        let mut held = Vec::new();
        while held.len() < 2 {
            if let Next::Chunk(c) = stream.next_chunk(Duration::from_secs(1)).unwrap() {
                held.push(c);
            }
        }
        let started = Instant::now();
        let err = loop {
            match stream.next_chunk(Duration::from_millis(100)) {
                Ok(Next::Pending) => assert!(started.elapsed() < HELD_GRACE * 3),
                Ok(other) => panic!("got {other:?} with every slot held"),
                Err(e) => break e,
            }
        };
        assert!(started.elapsed() >= HELD_GRACE);
        assert!(err.to_string().contains("all 2 slots"), "{err}");
        // Releasing one lets the stream go on.
        held.remove(0);
        let next = loop {
            if let Next::Chunk(c) = stream.next_chunk(Duration::from_secs(1)).unwrap() {
                break c;
            }
        };
        assert_eq!(next.range.offset, 2048);
    }

    #[test]
    fn take_ready_hands_out_published_chunks_in_order_then_the_error() {
        let dir = dataset(1, 8 * 1024);
        let store: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let mut plan: Vec<ReadRange> = (0..8)
            .map(|i| ReadRange {
                key: "f0".into(),
                offset: i * 1024,
                len: 1024,
            })
            .collect();
        plan.push(ReadRange {
            key: "missing".into(),
            offset: 0,
            len: 10,
        });
        let mut stream = Stream::start(store, plan, &StreamConfig::new(1024, 8)).unwrap();
        let want = std::fs::read(dir.path().join("f0")).unwrap();
        let mut got: Vec<u8> = Vec::new();
        let mut ready = VecDeque::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            assert!(Instant::now() < deadline, "stream did not finish in 10 s");
            match stream.next_chunk(Duration::from_millis(100)) {
                Ok(Next::Chunk(c)) => ready.push_back(c),
                Ok(Next::Pending) => continue,
                Ok(Next::End) => panic!("the failed range must end the stream with its error"),
                Err(e) => break e,
            }
            let taken = stream.take_ready(3, &mut ready);
            assert!(ready.len() <= 4);
            for c in ready.drain(..) {
                got.extend_from_slice(c.data());
            }
            if let Err(e) = taken {
                break e;
            }
        };
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert_eq!(got, want, "every chunk before the failed one, in order");
        assert!(stream.is_done() && stream.is_closed());
    }

    /// Every read fails the way a replica's per-attempt timeout does.
    #[derive(Debug)]
    struct TimingOut;

    impl Store for TimingOut {
        fn name(&self) -> &str {
            "timing-out"
        }
        fn size<'a>(&'a self, _key: &'a str) -> crate::store::BoxFuture<'a, Result<u64>> {
            Box::pin(async { Ok(10) })
        }
        fn read_into<'a>(
            &'a self,
            key: &'a str,
            _offset: u64,
            _buf: &'a mut [u8],
        ) -> crate::store::BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                Err(Error::Timeout {
                    what: format!("read of {key:?}"),
                    elapsed_ms: 5,
                })
            })
        }
    }

    #[test]
    fn a_read_that_timed_out_ends_the_stream_with_its_timeout() {
        let plan = vec![ReadRange {
            key: "k".into(),
            offset: 0,
            len: 10,
        }];
        let mut stream =
            Stream::start(Arc::new(TimingOut), plan, &StreamConfig::new(64, 2)).unwrap();
        // Not mistaken for "nothing arrived yet": the read's own error.
        let err = collect(&mut stream).unwrap_err();
        assert!(
            matches!(&err, Error::Timeout { what, .. } if what.contains("\"k\"")),
            "{err}"
        );
        assert!(stream.is_closed());
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(StreamConfig::new(0, 1).validate().is_err());
        assert!(StreamConfig::new(1, 0).validate().is_err());
        let err = StreamConfig::new(1 << 30, 1 << 20).validate().unwrap_err();
        assert!(err.to_string().contains("memory budget"), "{err}");
    }
}
