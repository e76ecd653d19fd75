"""feedline.testing.FaultProxy and `feedline proxy` over real loopback sockets.

Timing checks are lower bounds (a delaying toxic delays at least that much)
or orderings with a wide margin; nothing asserts an upper bound on time.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from feedline.testing import FaultProxy

IO_TIMEOUT_S = 10.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(IO_TIMEOUT_S)
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class _Blob(socketserver.BaseRequestHandler):
    """Sends the server's payload, then closes."""

    def handle(self) -> None:
        self.request.sendall(self.server.payload)  # type: ignore[attr-defined]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    payload = b""


@pytest.fixture
def echo() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(IO_TIMEOUT_S)


@pytest.fixture
def blob() -> Iterator[tuple[str, bytes]]:
    server = _Server(("127.0.0.1", 0), _Blob)
    server.payload = bytes(range(256)) * 400  # 100 KiB
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", server.payload
    server.shutdown()
    server.server_close()
    thread.join(IO_TIMEOUT_S)


def connect(proxy: FaultProxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    for _ in range(100_000):  # bounded; each recv is bounded by the timeout
        data = s.recv(65536)
        if not data:
            return bytes(out)
        out += data
    raise AssertionError("peer never closed")


def round_trip(s: socket.socket, msg: bytes) -> bytes:
    s.sendall(msg)
    return recv_exact(s, len(msg))


def test_forwards_and_reports_its_address(echo: str) -> None:
    with FaultProxy(echo) as proxy:
        assert proxy.address == f"127.0.0.1:{proxy.port}"
        assert proxy.url == f"http://127.0.0.1:{proxy.port}"
        assert proxy.upstream == echo
        with connect(proxy) as s:
            payload = os.urandom(200_000)
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            assert recv_exact(s, len(payload)) == payload
            sender.join(IO_TIMEOUT_S)
        # The counters move just after the bytes do: poll, bounded.
        for _ in range(500):
            stats = proxy.stats()
            if stats["bytes_downstream"] == len(payload):
                break
            time.sleep(0.01)
        assert stats["connections_accepted"] == 1
        assert stats["bytes_upstream"] == stats["bytes_downstream"] == len(payload)
    assert proxy.closed
    assert "closed" in repr(proxy)


def test_latency_orders_requests_and_applies_mid_connection(echo: str) -> None:
    with FaultProxy(echo) as slow, FaultProxy(echo) as fast:
        slow_conn, fast_conn = connect(slow), connect(fast)
        # Established before the toxic exists: it still applies.
        assert round_trip(slow_conn, b"warm") == b"warm"
        slow.add_toxic("lag", "latency", "upstream", latency_ms=400)
        finished: list[str] = []

        def ask(name: str, s: socket.socket) -> None:
            assert round_trip(s, name.encode()) == name.encode()
            finished.append(name)

        started = time.monotonic()
        first = threading.Thread(target=ask, args=("slow", slow_conn))
        first.start()
        time.sleep(0.05)
        ask("fast", fast_conn)
        first.join(IO_TIMEOUT_S)
        assert finished == ["fast", "slow"]
        assert time.monotonic() - started >= 0.4
        assert [t["name"] for t in slow.toxics()] == ["lag"]
        slow.remove_toxic("lag")
        assert slow.toxics() == []
        assert round_trip(slow_conn, b"after") == b"after"
        slow_conn.close()
        fast_conn.close()


def test_jitter_and_toxicity_are_listed_with_units(echo: str) -> None:
    with FaultProxy(echo, seed=7) as proxy:
        proxy.add_toxic(
            "spike", "latency", "upstream", latency_ms=100, jitter_ms=2.5, toxicity=0.05
        )
        (t,) = proxy.toxics()
        assert t == {
            "name": "spike",
            "kind": "latency",
            "direction": "upstream",
            "latency_ms": 100.0,
            "jitter_ms": 2.5,
            "toxicity": 0.05,
        }


def test_limit_data_closes_after_n_bytes(blob: tuple[str, bytes]) -> None:
    upstream, payload = blob
    with FaultProxy(upstream) as proxy:
        proxy.add_toxic("cut", "limit_data", bytes=1000)
        with connect(proxy) as s:
            assert recv_all(s) == payload[:1000]


def test_reset_peer_gives_connection_reset(echo: str) -> None:
    with FaultProxy(echo) as proxy, connect(proxy) as s:
        assert round_trip(s, b"hi") == b"hi"
        proxy.add_toxic("rst", "reset_peer", timeout_ms=20)
        with pytest.raises(ConnectionResetError):
            for _ in range(1000):  # bounded; the reset lands after 20 ms
                if not s.recv(16):
                    pytest.fail("clean EOF instead of a reset")


def test_black_hole_then_removed(echo: str) -> None:
    with FaultProxy(echo) as proxy, connect(proxy) as s:
        proxy.add_toxic("hole", "timeout", "upstream")
        s.sendall(b"lost")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(16)
        proxy.remove_toxic("hole")
        s.settimeout(IO_TIMEOUT_S)
        assert round_trip(s, b"back") == b"back"


def test_bandwidth_and_slicer_keep_every_byte(blob: tuple[str, bytes]) -> None:
    upstream, payload = blob
    with FaultProxy(upstream) as proxy:
        proxy.add_toxic("bw", "bandwidth", bytes_per_s=1_000_000)
        proxy.add_toxic("slices", "slicer", segment_bytes=1000, variation_bytes=100, delay_ms=1)
        started = time.monotonic()
        with connect(proxy) as s:
            assert recv_all(s) == payload
        # 102,400 bytes at 1 MB/s.
        assert time.monotonic() - started >= 0.1


def test_in_front_of_an_http_server(tmp_path: Path) -> None:
    (tmp_path / "obj.bin").write_bytes(os.urandom(300_000))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"127.0.0.1:{server.server_address[1]}") as proxy:
            proxy.add_toxic("lag", "latency", latency_ms=5, jitter_ms=2)
            with urllib.request.urlopen(f"{proxy.url}/obj.bin", timeout=IO_TIMEOUT_S) as r:
                assert r.read() == (tmp_path / "obj.bin").read_bytes()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(IO_TIMEOUT_S)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"kind": "lag"}, "'lag'"),
        ({"kind": "latency", "direction": "sideways"}, "sideways"),
        ({"kind": "latency", "latency_ms": -5}, "latency_ms"),
        ({"kind": "latency", "delay_ms": 5}, "delay_ms"),
        ({"kind": "latency", "latency_ms": "5"}, "latency_ms"),
        ({"kind": "latency", "toxicity": 2}, "toxicity"),
        ({"kind": "bandwidth"}, "bytes_per_s"),
        ({"kind": "limit_data", "bytes": 1.5}, "bytes"),
    ],
)
def test_bad_toxics_raise_value_error_naming_them(
    echo: str, kwargs: dict[str, object], named: str
) -> None:
    kind = kwargs.pop("kind")
    with FaultProxy(echo) as proxy:
        with pytest.raises(ValueError, match=named.replace("'", '"')):
            proxy.add_toxic("x", kind, **kwargs)  # type: ignore[arg-type]
        assert proxy.toxics() == []


def test_bad_construction_and_use_after_close(echo: str) -> None:
    with pytest.raises(ValueError, match=r"0\.0\.0\.0:0.*allow_non_loopback"):
        FaultProxy(echo, "0.0.0.0:0")
    with pytest.raises(ValueError, match="not-an-address"):
        FaultProxy(echo, "not-an-address")
    with pytest.raises(ValueError, match="nohost"):
        FaultProxy("nohost")
    with pytest.raises(ValueError, match=r"seed.*-1"):
        FaultProxy(echo, seed=-1)
    proxy = FaultProxy(echo)
    proxy.add_toxic("a", "latency")
    with pytest.raises(ValueError, match='"a"'):
        proxy.add_toxic("a", "latency")
    with pytest.raises(ValueError, match='"b"'):
        proxy.remove_toxic("b")
    proxy.close()
    proxy.close()
    with pytest.raises(ValueError, match="closed"):
        proxy.add_toxic("c", "latency")


def test_close_ends_open_connections(echo: str) -> None:
    proxy = FaultProxy(echo)
    with connect(proxy) as s:
        assert round_trip(s, b"x") == b"x"
        proxy.close()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(16) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT_S).close()


def _feedline_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from feedline.cli import main; sys.exit(main())"]


def test_cli_proxy_runs_until_signalled(echo: str) -> None:
    cmd = [
        *_feedline_cli(), "proxy", "--upstream", echo, "--latency-ms", "200",
        "--jitter-ms", "1", "--toxic", "limit_data:name=cap,bytes=1000000",
        "--duration-s", "60",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line
        assert "cap (limit_data, downstream)" in line
        port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as s:
            started = time.monotonic()
            s.sendall(b"ping")
            assert recv_exact(s, 4) == b"ping"
            assert time.monotonic() - started >= 0.199
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=IO_TIMEOUT_S)
        assert proc.returncode == 0, err
        assert "stopped after 1 connections" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=IO_TIMEOUT_S)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--listen", "0.0.0.0:0"], "0.0.0.0:0"),
        (["--toxic", "warp"], "warp"),
        (["--toxic", "latency:latency_ms=fast"], "latency_ms"),
        (["--latency-ms", "-1"], "latency_ms"),
    ],
)
def test_cli_bad_input_exits_2_naming_it(echo: str, args: list[str], named: str) -> None:
    done = subprocess.run(
        [*_feedline_cli(), "proxy", "--upstream", echo, "--duration-s", "0", *args],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT_S * 3,
        check=False,
    )
    assert done.returncode == 2, done
    assert named in done.stderr


def test_proxy_processes_forward_with_toxics_and_stop_on_exit(blob: tuple[str, bytes]) -> None:
    from feedline.testing.proxy_cli import proxy_processes

    upstream, payload = blob
    toxics = [[], ["limit_data:bytes=1000"]]
    with proxy_processes([upstream, upstream], toxics, duration_s=60) as procs:
        got = []
        for _, url in procs:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT_S) as s:
                got.append(recv_all(s))
        pids = [pid for pid, _ in procs]
    assert got == [payload, payload[:1000]]
    for pid in pids:  # reaped on exit: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
