//! An embedded TCP fault proxy, in the spirit of Toxiproxy: it listens
//! (loopback by default), forwards each connection to one upstream
//! `host:port`, and shapes the bytes in each direction with [`toxics`].
//!
//! The kernel on these machines has no `netem`, so delay, jitter, slow links
//! and misbehaving peers come from here. Toxics live in one shared list
//! (a `watch` channel holding an `Arc` snapshot): every connection reads the
//! snapshot per chunk and wakes when it changes, so adding or removing a
//! toxic takes effect on open connections too.
//!
//! Each direction of a connection is a reader (stamps chunks with their
//! arrival time, into a bounded queue) and a writer (applies the toxics,
//! writes on). Reading on while the writer waits is what makes latency a
//! time shift rather than a per-chunk stall.

pub mod toxics;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use toxics::{connection_seed, SplitMix64};
pub use toxics::{Direction, Toxic, ToxicKind, KINDS};

use feedline_core::error::{Error, Result};
use feedline_core::runtime;

/// Bytes read per chunk; the grain at which per-chunk toxics act.
const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks queued per direction between reader and writer: bounds memory per
/// connection (4 MiB each way) while latency holds data back.
const QUEUED_CHUNKS: usize = 64;
/// How long `stop` waits for connections to finish before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the proxy listens and what it forwards to.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `ip:port` to listen on; port 0 picks a free one.
    pub listen: String,
    /// `host:port` of the upstream server, resolved per connection.
    pub upstream: String,
    /// Seeds jitter and toxicity draws (replayable per connection).
    pub seed: u64,
    /// Listening beyond loopback exposes the proxy; it must be asked for.
    pub allow_non_loopback: bool,
}

impl ProxyConfig {
    pub fn new(upstream: impl Into<String>) -> Self {
        ProxyConfig {
            listen: "127.0.0.1:0".into(),
            upstream: upstream.into(),
            seed: 0,
            allow_non_loopback: false,
        }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub connections_accepted: u64,
    pub connections_open: u64,
    /// Connections dropped because the upstream refused or was unreachable.
    pub upstream_connect_failures: u64,
    /// Bytes forwarded client → upstream.
    pub bytes_upstream: u64,
    /// Bytes forwarded upstream → client.
    pub bytes_downstream: u64,
    /// Connections reset by a `reset_peer` toxic.
    pub resets: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    connect_failures: AtomicU64,
    bytes_upstream: AtomicU64,
    bytes_downstream: AtomicU64,
    resets: AtomicU64,
}

impl Counters {
    fn bytes(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::Upstream => &self.bytes_upstream,
            Direction::Downstream => &self.bytes_downstream,
        }
    }
}

type ToxicList = Arc<Vec<Toxic>>;

/// A running proxy. Dropping it stops it.
pub struct FaultProxy {
    local_addr: SocketAddr,
    upstream: String,
    toxics: watch::Sender<ToxicList>,
    shutdown: watch::Sender<bool>,
    counters: Arc<Counters>,
    accept_task: Option<JoinHandle<()>>,
    /// The process that started the proxy; a forked child has none of its
    /// tasks and must not wait for them.
    pid: u32,
}

/// Checks `host:port` without resolving it (resolution happens per
/// connection, so a name that resolves later still works).
fn check_upstream(upstream: &str) -> Result<()> {
    let bad = || {
        Error::invalid(format!(
            "upstream {upstream:?} is not host:port (for example \"127.0.0.1:8080\")"
        ))
    };
    let (host, port) = upstream.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

fn parse_listen(config: &ProxyConfig) -> Result<SocketAddr> {
    let addr: SocketAddr = config.listen.parse().map_err(|_| {
        Error::invalid(format!(
            "listen address {:?} is not ip:port (for example \"127.0.0.1:0\")",
            config.listen
        ))
    })?;
    let loopback = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    };
    if !loopback && !config.allow_non_loopback {
        return Err(Error::invalid(format!(
            "listen address {:?} is not loopback; pass allow_non_loopback to expose the proxy",
            config.listen
        )));
    }
    Ok(addr)
}

impl FaultProxy {
    /// Binds the listener and starts accepting on the core runtime.
    pub fn start(config: ProxyConfig) -> Result<FaultProxy> {
        let addr = parse_listen(&config)?;
        check_upstream(&config.upstream)?;
        let std_listener = std::net::TcpListener::bind(addr).map_err(|source| Error::Io {
            context: format!("binding the proxy to {addr}"),
            source,
        })?;
        let io_err = |source| Error::Io {
            context: format!("setting up the proxy listener on {addr}"),
            source,
        };
        std_listener.set_nonblocking(true).map_err(io_err)?;
        let local_addr = std_listener.local_addr().map_err(io_err)?;
        let handle = runtime::handle();
        let listener = {
            let _guard = handle.enter();
            TcpListener::from_std(std_listener).map_err(io_err)?
        };
        let (toxics, toxics_rx) = watch::channel(ToxicList::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let shared = Shared {
            upstream: config.upstream.clone(),
            seed: config.seed,
            toxics: toxics_rx,
            shutdown: shutdown_rx,
            counters: Arc::clone(&counters),
        };
        let accept_task = handle.spawn(accept_loop(listener, shared));
        Ok(FaultProxy {
            local_addr,
            upstream: config.upstream,
            toxics,
            shutdown,
            counters,
            accept_task: Some(accept_task),
            pid: std::process::id(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Adds a toxic; open connections pick it up at their next chunk (or at
    /// once, for connection toxics waiting on an idle connection).
    pub fn add_toxic(&self, toxic: Toxic) -> Result<()> {
        let mut duplicate = false;
        self.toxics.send_if_modified(|list| {
            if list.iter().any(|t| t.name == toxic.name) {
                duplicate = true;
                return false;
            }
            Arc::make_mut(list).push(toxic.clone());
            true
        });
        if duplicate {
            return Err(Error::invalid(format!(
                "a toxic named {:?} already exists; remove it first",
                toxic.name
            )));
        }
        Ok(())
    }

    /// Removes the toxic named `name`, returning it.
    pub fn remove_toxic(&self, name: &str) -> Result<Toxic> {
        let mut removed = None;
        self.toxics
            .send_if_modified(|list| match list.iter().position(|t| t.name == name) {
                Some(i) => {
                    removed = Some(Arc::make_mut(list).remove(i));
                    true
                }
                None => false,
            });
        removed.ok_or_else(|| Error::invalid(format!("no toxic named {name:?}")))
    }

    /// The toxics in the order they were added.
    pub fn toxics(&self) -> Vec<Toxic> {
        self.toxics.borrow().as_ref().clone()
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_open: c.open.load(Ordering::Relaxed),
            upstream_connect_failures: c.connect_failures.load(Ordering::Relaxed),
            bytes_upstream: c.bytes_upstream.load(Ordering::Relaxed),
            bytes_downstream: c.bytes_downstream.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
        }
    }

    pub fn is_running(&self) -> bool {
        self.accept_task.is_some()
    }

    /// Closes the listener and every connection and waits for their tasks
    /// (bounded). Idempotent.
    pub fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        let Some(task) = self.accept_task.take() else {
            return;
        };
        if self.pid != std::process::id() {
            // A forked child: the tasks ran on the parent's threads.
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside the runtime we cannot block; the tasks end on their own.
            return;
        }
        runtime::block_on(async {
            let _ = tokio::time::timeout(STOP_TIMEOUT, task).await;
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every connection task shares with the proxy.
#[derive(Clone)]
struct Shared {
    upstream: String,
    seed: u64,
    toxics: watch::Receiver<ToxicList>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
}

async fn accept_loop(listener: TcpListener, shared: Shared) {
    let mut shutdown = shared.shutdown.clone();
    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    next_id += 1;
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(serve(client, next_id, shared.clone()));
                }
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Each connection watches `shutdown` too and drops its sockets.
    while connections.join_next().await.is_some() {}
}

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The sender closed; the close was passed on (half-close).
    Eof,
    /// Tear the whole connection down (toxic or error).
    Close,
    /// The receiving peer's socket got `SO_LINGER` 0: tear down with RST.
    Reset,
}

/// Drops the open-connection count when a connection task ends, however.
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(client: TcpStream, id: u64, shared: Shared) {
    shared.counters.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(Arc::clone(&shared.counters));
    let mut shutdown = shared.shutdown.clone();
    if *shutdown.borrow_and_update() {
        return;
    }
    let server = tokio::select! {
        s = TcpStream::connect(shared.upstream.as_str()) => s,
        _ = shutdown.changed() => return,
    };
    let Ok(server) = server else {
        // Like Toxiproxy: the client sees its connection closed.
        shared
            .counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    // Small writes (requests, slicer segments) must not wait for Nagle.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, Direction::Upstream, id, &shared);
    let down = pump(
        server_read,
        client_write,
        Direction::Downstream,
        id,
        &shared,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let outcome = tokio::select! {
            o = &mut up, if !up_done => { up_done = true; o }
            o = &mut down, if !down_done => { down_done = true; o }
            _ = shutdown.changed() => Outcome::Close,
        };
        match outcome {
            Outcome::Eof => {}
            Outcome::Reset => {
                shared.counters.resets.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Outcome::Close => break,
        }
    }
    // Leaving drops all four halves: FIN to both peers, or RST where a
    // `reset_peer` toxic set linger to zero.
}

struct Chunk {
    data: Vec<u8>,
    arrived: Instant,
}

async fn read_chunks(mut from: OwnedReadHalf, queue: mpsc::Sender<Chunk>) -> bool {
    loop {
        let mut data = vec![0u8; CHUNK_BYTES];
        match from.read(&mut data).await {
            Ok(0) => return true,
            Ok(n) => {
                data.truncate(n);
                let chunk = Chunk {
                    data,
                    arrived: Instant::now(),
                };
                if queue.send(chunk).await.is_err() {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Forwards one direction until it ends; see [`Outcome`].
async fn pump(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    direction: Direction,
    id: u64,
    shared: &Shared,
) -> Outcome {
    let (queue, chunks) = mpsc::channel(QUEUED_CHUNKS);
    let reader = read_chunks(from, queue);
    let writer = Writer {
        to,
        direction,
        toxics: shared.toxics.clone(),
        counters: Arc::clone(&shared.counters),
        rng: SplitMix64::new(connection_seed(shared.seed, id, direction)),
        decided: HashMap::new(),
        since: HashMap::new(),
        written: 0,
        bandwidth_next: Instant::now(),
    }
    .run(chunks);
    tokio::pin!(reader, writer);
    let mut reader_done = false;
    loop {
        tokio::select! {
            ok = &mut reader, if !reader_done => {
                reader_done = true;
                if !ok {
                    // The sender reset or failed: nothing more will come, and
                    // what is queued belongs to a broken exchange.
                    return Outcome::Close;
                }
            }
            outcome = &mut writer => return outcome,
        }
    }
}

/// The toxic side of one direction.
struct Writer {
    to: OwnedWriteHalf,
    direction: Direction,
    toxics: watch::Receiver<ToxicList>,
    counters: Arc<Counters>,
    rng: SplitMix64,
    /// Per-connection toxicity draws, by toxic name.
    decided: HashMap<String, bool>,
    /// When each connection toxic was first seen here (timers start then).
    since: HashMap<String, Instant>,
    written: u64,
    bandwidth_next: Instant,
}

impl Writer {
    /// Whether connection toxic `t` applies to this connection.
    fn applies(&mut self, t: &Toxic) -> bool {
        let rng = &mut self.rng;
        *self
            .decided
            .entry(t.name.clone())
            .or_insert_with(|| rng.chance(t.toxicity))
    }

    fn first_seen(&mut self, t: &Toxic, now: Instant) -> Instant {
        *self.since.entry(t.name.clone()).or_insert(now)
    }

    async fn run(mut self, mut chunks: mpsc::Receiver<Chunk>) -> Outcome {
        loop {
            let list = self.toxics.borrow_and_update().clone();
            let mine: Vec<&Toxic> = list
                .iter()
                .filter(|t| t.direction == self.direction)
                .collect();
            // A toxic removed and added again starts its timers afresh.
            self.since
                .retain(|name, _| mine.iter().any(|t| &t.name == name));
            self.decided
                .retain(|name, _| mine.iter().any(|t| &t.name == name));
            let now = Instant::now();
            let mut black_hole = false;
            let mut deadline: Option<(Instant, Outcome)> = None;
            let mut close_delay = Duration::ZERO;
            for t in &mine {
                if !t.kind.per_connection() || !self.applies(t) {
                    continue;
                }
                let at = match &t.kind {
                    ToxicKind::Timeout { timeout } => {
                        black_hole = true;
                        timeout.map(|d| (self.first_seen(t, now) + d, Outcome::Close))
                    }
                    ToxicKind::ResetPeer { timeout } => {
                        Some((self.first_seen(t, now) + *timeout, Outcome::Reset))
                    }
                    ToxicKind::SlowClose { delay } => {
                        close_delay = close_delay.max(*delay);
                        None
                    }
                    _ => None,
                };
                if let Some(at) = at {
                    if deadline.is_none_or(|d| at.0 < d.0) {
                        deadline = Some(at);
                    }
                }
            }
            if let Some((at, outcome)) = deadline {
                if at <= now {
                    if outcome == Outcome::Reset {
                        let _ = self.to.as_ref().set_zero_linger();
                        // Dropping a write half sends FIN first, and the peer
                        // would read a clean EOF before the RST.
                        self.to.forget();
                    }
                    return outcome;
                }
            }
            let timer = async move {
                match deadline {
                    Some((at, _)) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                changed = self.toxics.changed() => {
                    if changed.is_err() {
                        return Outcome::Close;
                    }
                }
                _ = timer => {}
                chunk = chunks.recv() => match chunk {
                    None => {
                        if !close_delay.is_zero() {
                            tokio::time::sleep(close_delay).await;
                        }
                        let _ = self.to.shutdown().await;
                        return Outcome::Eof;
                    }
                    // A black hole swallows data without a word.
                    Some(_) if black_hole => {}
                    Some(chunk) => {
                        if let Some(outcome) = self.deliver(chunk, &mine).await {
                            return outcome;
                        }
                    }
                },
            }
        }
    }

    /// Applies the chunk toxics and `limit_data` to one chunk and writes it.
    async fn deliver(&mut self, chunk: Chunk, mine: &[&Toxic]) -> Option<Outcome> {
        let mut delay = Duration::ZERO;
        let mut rate: Option<u64> = None;
        let mut slicer: Option<(u64, u64, Duration)> = None;
        let mut limit: Option<u64> = None;
        for t in mine {
            match &t.kind {
                ToxicKind::Latency { latency, jitter } if self.rng.chance(t.toxicity) => {
                    delay += self.rng.jittered(*latency, *jitter);
                }
                ToxicKind::Bandwidth { bytes_per_s } if self.rng.chance(t.toxicity) => {
                    rate = Some(rate.map_or(*bytes_per_s, |r| r.min(*bytes_per_s)));
                }
                ToxicKind::Slicer {
                    segment_bytes,
                    variation_bytes,
                    delay,
                } if self.rng.chance(t.toxicity) => {
                    slicer = Some((*segment_bytes, *variation_bytes, *delay));
                }
                ToxicKind::LimitData { bytes } if self.applies(t) => {
                    limit = Some(limit.map_or(*bytes, |l| l.min(*bytes)));
                }
                _ => {}
            }
        }
        if !delay.is_zero() {
            sleep_until(chunk.arrived + delay).await;
        }
        let mut data = &chunk.data[..];
        let mut over_limit = false;
        if let Some(limit) = limit {
            let room = limit.saturating_sub(self.written);
            if (data.len() as u64) >= room {
                data = &data[..room as usize];
                over_limit = true;
            }
        }
        let mut first = true;
        while !data.is_empty() {
            let mut take = data.len();
            if let Some((segment, variation, pause)) = slicer {
                if !first && !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                take = take.min(self.rng.around(segment, variation) as usize);
            }
            if let Some(rate) = rate {
                // Pace in pieces of ~20 ms so a slow link trickles, not bursts.
                take = take.min((rate / 50).max(1) as usize);
                let cost = Duration::from_secs_f64(take as f64 / rate as f64);
                self.bandwidth_next = self.bandwidth_next.max(Instant::now()) + cost;
                sleep_until(self.bandwidth_next).await;
            }
            if self.to.write_all(&data[..take]).await.is_err() {
                return Some(Outcome::Close);
            }
            self.written += take as u64;
            self.counters
                .bytes(self.direction)
                .fetch_add(take as u64, Ordering::Relaxed);
            data = &data[take..];
            first = false;
        }
        over_limit.then_some(Outcome::Close)
    }
}
