"""One endpoint, default settings: a request that stalls is hedged within
the replica, on a connection of its own, and the answer comes while the
stalled request is still held. A real HTTP/1.1 server on loopback counts
the connections and requests; every byte is compared."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import feedline
import pytest

#: How long the stalled request is held at most (the test releases it
#: sooner); far beyond any hedge delay, far below the default deadline.
STALL_S = 20.0


@dataclass(frozen=True)
class Request:
    port: int
    """The client's port: one per connection."""
    path: str
    range: str


class StallingServer:
    """Serves ``objects`` with Range support over keep-alive HTTP/1.1,
    records every request, and holds the first request after `stall_next`
    until `release` (or STALL_S)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.requests: list[Request] = []
        self.stalled: Request | None = None
        self.answered_stalled = False
        self._armed = False
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                data = objects.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_GET(self) -> None:
                data = objects.get(self.path.lstrip("/"))
                ask = Request(self.client_address[1], self.path, self.headers.get("Range", ""))
                with server._lock:
                    server.requests.append(ask)
                    stall, server._armed = server._armed, False
                    if stall:
                        server.stalled = ask
                if stall:
                    server._release.wait(STALL_S)
                if data is None:
                    self.send_error(404)
                    return
                start, end = 0, len(data) - 1
                if ask.range.startswith("bytes="):
                    first, _, last = ask.range[6:].partition("-")
                    start, end = int(first), min(int(last or end), end)
                body = data[start : end + 1]
                self.send_response(206 if ask.range else 200)
                if ask.range:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)
                if stall:
                    server.answered_stalled = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def stall_next(self) -> None:
        with self._lock:
            self._armed = True

    def __enter__(self) -> StallingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[StallingServer]:
    with StallingServer({"obj.bin": os.urandom(256 << 10)}) as s:
        yield s


def test_a_lone_endpoint_hedges_a_stalled_request_on_a_fresh_connection(
    server: StallingServer,
) -> None:
    data = b""
    fs = feedline.FileSystem([server.url], skip_instance_cache=True)
    assert fs.config["routing"]["hedge_after_ms"] == "auto"
    # Enough reads for the adaptive delay to trust its percentile.
    for i in range(40):
        data = fs.cat_file("obj.bin", i, i + 4096)
        assert len(data) == 4096
    full = fs.cat_file("obj.bin")
    assert len(full) == 256 << 10 and full[39 : 39 + 4096] == data
    server.stall_next()
    assert fs.cat_file("obj.bin", 5000, 9000) == full[5000:9000]
    stalled = server.stalled
    assert stalled is not None, server.requests[-3:]
    # The answer came while the stalled request was still held: a hedge.
    assert not server.answered_stalled
    later = server.requests[server.requests.index(stalled) + 1 :]
    hedges = [r for r in later if r.range == stalled.range]
    assert hedges, f"no second request for {stalled.range}: {later}"
    assert hedges[0].port != stalled.port, "the hedge went on the stalled connection"
    replica = fs.stats()["replicas"][0]
    assert replica["hedges_won"] >= 1 and replica["cancelled"] >= 1, replica
    assert fs.stats()["read_errors"] == 0
