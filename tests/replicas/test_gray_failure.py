"""Gray failures and replicas at fault, on every read path, against real
servers: a socket that accepts connections and never answers, a SIGSTOPped
nginx, and a server that ignores HTTP Range (``python -m http.server``).

With the default routing settings (no hedge or timeout options) a silent
replica must cost each read one hedge delay, never the deadline: every read
here runs under a deadline that a read waiting on the silent replica would
hit, so a path that waits fails the test with ``ReplicasUnavailable``."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
import pytest
from feedline import FileSystem
from feedline_helpers import READ_PATHS, lead_to_first_replica

KEYS = 12
SIZE = 64 * 1024
# Far above one hedge delay (the default's fallback is 100 ms), far below
# the pytest timeout: a read that waits on the silent replica hits it.
DEADLINE_MS = 4000


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, bytes]:
    data = {}
    for i in range(KEYS):
        body = os.urandom(SIZE)
        (tmp_path / f"k{i}.bin").write_bytes(body)
        data[f"k{i}.bin"] = body
    return data


@contextlib.contextmanager
def silent_socket() -> Iterator[str]:
    """A loopback socket that completes TCP handshakes (the kernel does)
    and never reads or answers: ``http://`` URL of it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def range_ignoring_server(root: Path) -> Iterator[str]:
    """``python -m http.server`` on ``root``: answers 200 with the whole
    file to every Range request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("http.server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _fs(replicas: list[str], **options: Any) -> FileSystem:
    return FileSystem(
        replicas=replicas, deadline_ms=DEADLINE_MS, skip_instance_cache=True, **options
    )


def _assert_silent_replica_ejected(fs: FileSystem, silent: int) -> None:
    stats = fs.stats()
    replica = stats["replicas"][silent]
    assert stats["read_errors"] == 0, stats
    # It was asked (it is the primary of about half the keys, and the
    # second opinion on the others' sizes), lost its races (its attempts
    # were dropped when the other replica answered) and was taken out.
    assert replica["ejections"] >= 1, replica
    assert replica["cancelled"] >= 1, replica


@pytest.mark.parametrize("path", list(READ_PATHS))
def test_a_silent_socket_costs_a_hedge_not_the_deadline(
    path: str, dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    healthy = nginx_replicas(tmp_path, 1)
    with silent_socket() as silent:
        lead_to_first_replica(dataset, tmp_path, [silent, healthy.url(0)], SIZE)
        fs = _fs([silent, healthy.url(0)], eject_after_failures=2)
        READ_PATHS[path](fs, dataset)
        _assert_silent_replica_ejected(fs, 0)


@pytest.mark.parametrize("path", list(READ_PATHS))
def test_a_stopped_nginx_costs_a_hedge_not_the_deadline(
    path: str, dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    replicas = nginx_replicas(tmp_path, 2)
    lead_to_first_replica(dataset, tmp_path, replicas.urls, SIZE)
    replicas.pause(0)
    try:
        fs = _fs(replicas.urls, eject_after_failures=2)
        READ_PATHS[path](fs, dataset)
        _assert_silent_replica_ejected(fs, 0)
    finally:
        replicas.resume(0)


def test_with_no_routing_options_a_silent_replica_is_hedged_and_ejected(
    dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    # The defaults alone (no deadline either): reads still succeed, and the
    # whole run takes a few hedge delays, not a 30 s deadline per read.
    healthy = nginx_replicas(tmp_path, 1)
    with silent_socket() as silent:
        # Enough keys first on the silent replica for the default ejection
        # (5 in a row) within the three rounds.
        lead_to_first_replica(dataset, tmp_path, [silent, healthy.url(0)], SIZE, at_least=2)
        fs = FileSystem(replicas=[silent, healthy.url(0)], skip_instance_cache=True)
        for _ in range(3):
            READ_PATHS["ranged"](fs, dataset)
        _assert_silent_replica_ejected(fs, 0)


@pytest.mark.parametrize("path", ["ranged", "cat_ranges", "stream", "open_read"])
def test_a_replica_that_ignores_range_fails_over_and_is_ejected(
    path: str, dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    healthy = nginx_replicas(tmp_path, 1)
    with range_ignoring_server(tmp_path) as ignoring:
        lead_to_first_replica(dataset, tmp_path, [ignoring, healthy.url(0)], SIZE)
        # No hedging: on a loaded machine a hedge could win every race
        # before the wrong answer arrives; this is about failover.
        fs = _fs([ignoring, healthy.url(0)], eject_after_failures=2, hedge_after_ms=None)
        # Ranges smaller than the objects: the whole body is the wrong answer.
        if path == "stream":
            # Three rounds: reads in flight at once fail together, and the
            # keys whose first choice is that replica vary with its port.
            plan = [(k, 1000, 5000) for k in dataset] * 3
            got = [bytes(memoryview(c)) for c in fs.stream(plan, chunk_bytes=8192)]
            assert got == [body[1000:6000] for body in dataset.values()] * 3
        else:
            READ_PATHS[path](fs, dataset)
        replica = fs.stats()["replicas"][0]
        assert fs.stats()["read_errors"] == 0
        # Each refusal is that replica's error, and they took it out.
        assert replica["errors"] >= 1 and replica["ejections"] >= 1, replica


@contextlib.contextmanager
def head_only_server() -> Iterator[str]:
    """An HTTP server that answers HEAD (a 1,000-byte object) and never
    answers GET: sizes work, reads time out."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()

        def do_GET(self) -> None:
            release.wait(30)

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("plan", [["k0.bin"], [("k0.bin", 0, 100)]])
def test_a_stream_whose_read_times_out_raises_an_oserror(plan: list[Any]) -> None:
    with head_only_server() as url:
        fs = FileSystem(replicas=[url], timeout_ms=200, deadline_ms=1000, skip_instance_cache=True)
        # The size is answered; the stream's own read times out, and says
        # so as cat_file would (it was a ValueError about the ring's slot).
        with pytest.raises(OSError) as caught:
            for _ in fs.stream(plan):
                pass
        assert isinstance(caught.value, (TimeoutError, feedline.ReplicasUnavailable)), caught.value
        assert "read of" in str(caught.value) and "k0.bin" in str(caught.value)


def test_hedging_is_auto_by_default_and_none_turns_it_off(
    dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    assert feedline.Routing().hedge_after_ms == "auto"
    healthy = nginx_replicas(tmp_path, 1)
    key, body = next(iter(dataset.items()))
    with silent_socket() as silent:
        # Weighted so the silent replica is every key's first choice.
        replicas = [feedline.Replica(silent, weight=1000), healthy.url(0)]
        auto = FileSystem(replicas, deadline_ms=3000, skip_instance_cache=True)
        assert auto.cat_file(key, 0, 100) == body[:100]
        assert sum(r["hedges_won"] for r in auto.stats()["replicas"]) >= 1
        off = FileSystem(replicas, deadline_ms=300, hedge_after_ms=None, skip_instance_cache=True)
        assert off.config["routing"]["hedge_after_ms"] is None
        with pytest.raises(OSError):
            off.cat_file(key, 0, 100)
        assert sum(r["hedges_sent"] for r in off.stats()["replicas"]) == 0
