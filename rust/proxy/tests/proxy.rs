//! The fault proxy over real loopback sockets, against small servers that
//! run on plain threads. Timing checks are lower bounds only (a toxic that
//! delays must delay at least that much); nothing asserts an upper bound.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use feedline_proxy::{FaultProxy, ProxyConfig, Toxic};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Echoes every byte back until the client closes; serves up to `n` clients.
fn echo_server(n: usize) -> (String, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            if conn.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, handle)
}

/// Sends `payload` to each client on connect, then closes.
fn blob_server(payload: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        // Bounded: a handful of clients per test.
        for _ in 0..4 {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let _ = conn.write_all(&payload);
            let _ = conn.shutdown(Shutdown::Write);
            // Hold the socket until the client is done so close is a FIN.
            let mut sink = [0u8; 64];
            let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
            let _ = conn.read(&mut sink);
        }
    });
    addr
}

fn start(upstream: &str) -> FaultProxy {
    let mut config = ProxyConfig::new(upstream);
    config.seed = 42;
    FaultProxy::start(config).unwrap()
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let s = TcpStream::connect(proxy.local_addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn toxic(name: &str, kind: &str, direction: &str, params: &[(&str, f64)]) -> Toxic {
    let params: Vec<(String, f64)> = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    Toxic::from_params(name, kind, direction, &params).unwrap()
}

fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    conn.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    conn.read_exact(&mut got).unwrap();
    got
}

fn read_to_end(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    conn.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
fn forwards_bytes_both_ways_unchanged() {
    let (upstream, _server) = echo_server(1);
    let proxy = start(&upstream);
    let mut conn = connect(&proxy);
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut conn = conn.try_clone().unwrap();
        let payload = payload.clone();
        thread::spawn(move || conn.write_all(&payload).unwrap())
    };
    let mut got = vec![0u8; payload.len()];
    conn.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got, payload);
    // The proxy counts a piece after its write returns, which can be just
    // after the client has read it: wait (bounded) for the counters to settle.
    let want = payload.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stats = proxy.stats();
    while (stats.bytes_upstream, stats.bytes_downstream) != (want, want)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
        stats = proxy.stats();
    }
    assert_eq!(stats.connections_accepted, 1);
    assert_eq!(stats.bytes_upstream, want);
    assert_eq!(stats.bytes_downstream, want);
}

#[test]
fn latency_delays_each_exchange_and_applies_mid_connection() {
    let (upstream, _server) = echo_server(1);
    let proxy = start(&upstream);
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"before"), b"before");
    // Added while the connection is open: the next chunk is delayed.
    proxy
        .add_toxic(toxic(
            "lag",
            "latency",
            "upstream",
            &[("latency_ms", 150.0)],
        ))
        .unwrap();
    let t = Instant::now();
    assert_eq!(round_trip(&mut conn, b"during"), b"during");
    assert!(t.elapsed() >= Duration::from_millis(150));
    proxy
        .add_toxic(toxic(
            "lag-back",
            "latency",
            "downstream",
            &[("latency_ms", 100.0), ("jitter_ms", 20.0)],
        ))
        .unwrap();
    let t = Instant::now();
    assert_eq!(round_trip(&mut conn, b"both"), b"both");
    assert!(t.elapsed() >= Duration::from_millis(150 + 80));
    assert_eq!(proxy.toxics().len(), 2);
    proxy.remove_toxic("lag").unwrap();
    proxy.remove_toxic("lag-back").unwrap();
    assert!(proxy
        .remove_toxic("lag")
        .unwrap_err()
        .to_string()
        .contains("\"lag\""));
    assert_eq!(round_trip(&mut conn, b"after"), b"after");
}

#[test]
fn latency_is_a_time_shift_not_a_per_chunk_stall() {
    // 4 MiB in 64 KiB chunks with 100 ms each: a per-chunk stall would take
    // 6.4 s; a time shift takes ~100 ms. The bound here is generous (3 s)
    // so only the wrong model fails it.
    let payload = vec![7u8; 4 << 20];
    let upstream = blob_server(payload.clone());
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "lag",
            "latency",
            "downstream",
            &[("latency_ms", 100.0)],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    let t = Instant::now();
    let got = read_to_end(&mut conn).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(got, payload);
    assert!(elapsed >= Duration::from_millis(100));
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

#[test]
fn limit_data_closes_after_exactly_n_bytes() {
    let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let upstream = blob_server(payload.clone());
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "cut",
            "limit_data",
            "downstream",
            &[("bytes", 1000.0)],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    let got = read_to_end(&mut conn).unwrap();
    assert_eq!(got, payload[..1000]);
    assert_eq!(proxy.stats().bytes_downstream, 1000);
}

#[test]
fn reset_peer_resets_the_client() {
    let (upstream, _server) = echo_server(1);
    let proxy = start(&upstream);
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"hello"), b"hello");
    proxy
        .add_toxic(toxic(
            "rst",
            "reset_peer",
            "downstream",
            &[("timeout_ms", 50.0)],
        ))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = loop {
        // Bounded: the reset lands after 50 ms, reads time out after 10 s.
        match conn.read(&mut buf) {
            Err(e) => break e,
            Ok(0) => panic!("clean EOF instead of a reset"),
            Ok(_) => {}
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    // Bounded wait for the connection task to count the reset.
    for _ in 0..200 {
        if proxy.stats().resets == 1 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proxy.stats().resets, 1);
}

#[test]
fn timeout_black_holes_then_recovers_when_removed() {
    let (upstream, _server) = echo_server(1);
    let proxy = start(&upstream);
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"a"), b"a");
    proxy
        .add_toxic(toxic("hole", "timeout", "upstream", &[]))
        .unwrap();
    conn.write_all(b"lost").unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = conn.read(&mut buf).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    proxy.remove_toxic("hole").unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(round_trip(&mut conn, b"back"), b"back");
}

#[test]
fn timeout_with_a_deadline_closes_the_connection() {
    let (upstream, _server) = echo_server(1);
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "hole",
            "timeout",
            "downstream",
            &[("timeout_ms", 200.0)],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    let t = Instant::now();
    conn.write_all(b"anyone there?").unwrap();
    let got = read_to_end(&mut conn).unwrap();
    assert!(got.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[test]
fn bandwidth_paces_the_transfer() {
    let payload = vec![1u8; 100_000];
    let upstream = blob_server(payload.clone());
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "slow",
            "bandwidth",
            "downstream",
            &[("bytes_per_s", 250_000.0)],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    let t = Instant::now();
    let got = read_to_end(&mut conn).unwrap();
    assert_eq!(got, payload);
    // 100 kB at 250 kB/s: 400 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(390),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn slicer_splits_writes_with_delays_and_keeps_the_bytes() {
    let payload: Vec<u8> = (0..2_000u32).map(|i| (i % 256) as u8).collect();
    let upstream = blob_server(payload.clone());
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "slices",
            "slicer",
            "downstream",
            &[
                ("segment_bytes", 100.0),
                ("variation_bytes", 10.0),
                ("delay_ms", 10.0),
            ],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut largest_read = 0;
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        largest_read = largest_read.max(n);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, payload);
    // At least 2000 / 110 segments with 10 ms between them.
    assert!(
        t.elapsed() >= Duration::from_millis(170),
        "{:?}",
        t.elapsed()
    );
    assert!(largest_read < payload.len());
}

#[test]
fn slow_close_delays_the_fin() {
    let upstream = blob_server(b"bye".to_vec());
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "linger",
            "slow_close",
            "downstream",
            &[("delay_ms", 200.0)],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    let t = Instant::now();
    let mut got = [0u8; 3];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"bye");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[test]
fn toxicity_zero_never_applies() {
    let payload = vec![3u8; 5000];
    let upstream = blob_server(payload.clone());
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic(
            "never",
            "limit_data",
            "downstream",
            &[("bytes", 10.0), ("toxicity", 0.0)],
        ))
        .unwrap();
    let mut conn = connect(&proxy);
    assert_eq!(read_to_end(&mut conn).unwrap(), payload);
}

#[test]
fn refused_upstream_closes_the_client() {
    // A port that was just free: nothing listens there.
    let upstream = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let proxy = start(&upstream);
    let mut conn = connect(&proxy);
    let got = read_to_end(&mut conn).unwrap_or_default();
    assert!(got.is_empty());
    for _ in 0..200 {
        if proxy.stats().upstream_connect_failures == 1 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proxy.stats().upstream_connect_failures, 1);
}

#[test]
fn stop_closes_the_listener_and_open_connections() {
    let (upstream, _server) = echo_server(1);
    let mut proxy = start(&upstream);
    let addr = proxy.local_addr();
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"x"), b"x");
    proxy.stop();
    assert!(!proxy.is_running());
    assert_eq!(proxy.stats().connections_open, 0);
    // The open connection sees EOF (or a reset), never a hang.
    let mut buf = [0u8; 8];
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
    assert!(TcpStream::connect(addr).is_err());
    proxy.stop();
}

#[test]
fn bad_configuration_is_refused_by_name() {
    let err = |listen: &str, upstream: &str| {
        let mut c = ProxyConfig::new(upstream);
        c.listen = listen.into();
        FaultProxy::start(c).err().unwrap().to_string()
    };
    assert!(err("0.0.0.0:0", "127.0.0.1:80").contains("0.0.0.0:0"));
    assert!(err("localhost", "127.0.0.1:80").contains("\"localhost\""));
    assert!(err("127.0.0.1:0", "no-port").contains("\"no-port\""));
    assert!(err("127.0.0.1:0", "host:0").contains("\"host:0\""));
    assert!(err("127.0.0.1:0", "http://h:80").contains("http://h:80"));
    let (upstream, _server) = echo_server(0);
    let proxy = start(&upstream);
    proxy
        .add_toxic(toxic("a", "latency", "upstream", &[]))
        .unwrap();
    let dup = proxy
        .add_toxic(toxic("a", "latency", "downstream", &[]))
        .unwrap_err()
        .to_string();
    assert!(dup.contains("\"a\""), "{dup}");
}
