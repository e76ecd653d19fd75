"""Ctrl-C and hangs: a read blocked on a replica that never answers ends
with KeyboardInterrupt as soon as SIGINT arrives (a real signal to a real
process), not at the read's deadline."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from feedline_helpers import wait_for

# Long enough that a read which ignores Ctrl-C is caught: the child must be
# gone well before its reads could have given up on their own.
DEADLINE_MS = 60_000
EXIT_WAIT_S = 20.0
SIZE = 4096


class StallingReplica:
    """An HTTP replica that accepts connections and never answers a GET
    (nor, with ``answer_head=False``, a HEAD): a gray failure. Connections
    are held open until close(); at most ``max_connections`` are taken."""

    def __init__(self, answer_head: bool, max_connections: int = 64) -> None:
        self.answer_head = answer_head
        self.max_connections = max_connections
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stalled = threading.Event()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and len(self._conns) < self.max_connections:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            conn.settimeout(0.1)
            # One connection may carry a HEAD and then the GET (keep-alive).
            while not self._stop.is_set():
                head = self._request(conn)
                if head is None:
                    break
                if head.startswith(b"HEAD") and self.answer_head:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                        b"Accept-Ranges: bytes\r\n\r\n" % SIZE
                    )
                    continue
                self.stalled.set()
                break

    def _request(self, conn: socket.socket) -> bytes | None:
        raw = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in raw and time.monotonic() < deadline and not self._stop.is_set():
            try:
                piece = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not piece:
                return None
            raw += piece
        return raw if b"\r\n\r\n" in raw else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
        self.sock.close()


@contextlib.contextmanager
def stalling_replicas(answer_head: bool, count: int = 1) -> Iterator[list[StallingReplica]]:
    with contextlib.ExitStack() as stack:
        replicas = []
        for _ in range(count):
            replica = StallingReplica(answer_head)
            stack.callback(replica.close)
            replicas.append(replica)
        yield replicas


CALLS = {
    "cat_file_whole": "fs.cat_file('k')",
    "cat_file_range": "fs.cat_file('k', 0, 10)",
    "cat_ranges": "fs.cat_ranges(['k', 'k'], [0, 100], [10, 200])",
    "open_read": "fs.open('k').read()",
    "open_readinto": "fs.open('k').readinto(bytearray(100))",
    "size": "fs.size('k')",
    "stream": "list(fs.stream(['k']))",
}

CHILD = textwrap.dedent(
    """
    import sys, time
    import feedline
    fs = feedline.FileSystem(sys.argv[1:], deadline_ms={deadline}, timeout_ms={deadline})
    print("calling", flush=True)
    started = time.monotonic()
    try:
        {call}
    except KeyboardInterrupt:
        print("KeyboardInterrupt after %.2f s" % (time.monotonic() - started), flush=True)
        sys.exit(0)
    print("returned without an interrupt", flush=True)
    sys.exit(3)
    """
)


@pytest.mark.parametrize("replica_count", [1, 2], ids=["one_replica", "routed"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_ctrl_c_ends_a_read_blocked_on_silent_replicas(name: str, replica_count: int) -> None:
    # `size` needs replicas that answer nothing; the other calls get the
    # size and then stall on the bytes.
    with stalling_replicas(name != "size", replica_count) as replicas:
        code = CHILD.format(deadline=DEADLINE_MS, call=CALLS[name])
        child = subprocess.Popen(
            [sys.executable, "-c", code, *(r.url for r in replicas)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "calling"
            # The child is inside the call once the replica holds its request.
            assert wait_for(lambda: any(r.stalled.is_set() for r in replicas), timeout_s=15), (
                "the call never reached a replica"
            )
            time.sleep(0.2)
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=EXIT_WAIT_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        assert child.returncode == 0, (out, err)
        assert out.startswith("KeyboardInterrupt after"), (out, err)


def test_a_silent_replica_still_times_out_without_a_signal() -> None:
    """The interrupt check must not end reads on its own: with no signal the
    read waits for the replica until its own deadline."""
    import feedline

    with stalling_replicas(answer_head=True) as replicas:
        fs = feedline.FileSystem([replicas[0].url], deadline_ms=600, timeout_ms=300)
        with pytest.raises(OSError) as raised:
            fs.cat_file("k", 0, 10)
        assert not isinstance(raised.value, InterruptedError)
        assert "interrupted" not in str(raised.value)


# -- plans that never end, streams across fork -------------------------------


def test_an_endless_plan_streams_lazily_in_bounded_look_ahead(tmp_path: Path) -> None:
    import feedline

    path = tmp_path / "sample.bin"
    path.write_bytes(bytes(range(256)) * 16)
    fs = feedline.FileSystem()
    pulled = 0

    def plan() -> Iterator[tuple[str, int, int]]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield (str(path), i % 4000, 7)

    want = path.read_bytes()
    with fs.stream(plan()) as stream:
        with pytest.raises(TypeError, match="length is not known"):
            len(stream)
        for i, chunk in zip(range(20_000), stream, strict=False):
            assert bytes(chunk) == want[i % 4000 : i % 4000 + 7]
            chunk.release()
            # Bounded look-ahead: the plan is taken a window at a time.
            assert pulled <= i + 1 + 2 * 4096
    with fs.stream(itertools.repeat(str(path))) as stream:
        for _, chunk in zip(range(100), stream, strict=False):
            assert bytes(chunk) == want


def test_a_generator_plan_reads_what_a_list_plan_reads(tmp_path: Path) -> None:
    import feedline

    paths = []
    for i in range(50):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (1000 + i))
        paths.append(str(p))
    fs = feedline.FileSystem()
    # Several windows, entries of both kinds, and a window of nothing but
    # empty ranges.
    entries = [p for p in paths] * 100 + [(p, 10, 0) for p in paths] * 100 + [(paths[3], 5, 9)]
    listed = [bytes(c) for c in fs.stream(entries, chunk_bytes=512)]
    generated = [bytes(c) for c in fs.stream((e for e in entries), chunk_bytes=512)]
    assert generated == listed
    bad = itertools.chain(entries[:5000], [(paths[0], 1.5, 3)])
    stream = fs.stream(bad)
    with pytest.raises(TypeError, match=r"offset must be an int, got 1\.5"):
        for chunk in stream:
            chunk.release()
    assert stream.closed


FORK_CHILD = textwrap.dedent(
    """
    import gc, os, sys
    import feedline
    path = sys.argv[1]
    fs = feedline.FileSystem()
    stream = fs.stream([path] * 64, chunk_bytes=4096, depth=4)
    bytes(next(stream))
    f = fs.open(path)
    head = f.read(10) + f.read(10)  # sequential: a readahead is running
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            next(stream)
        except RuntimeError as e:
            print("stream:", e, flush=True)
        else:
            code = 4
        rest = f.read(30)
        print("file:", (head + rest) == open(path, "rb").read()[:50], flush=True)
        del stream, f
        gc.collect()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_a_stream_used_in_a_forked_child_raises_and_a_file_keeps_reading(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1 << 20))
    run = subprocess.run(
        [sys.executable, "-c", FORK_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("stream: this stream was started in process"), run.stdout
    assert "a forked child" in lines[0]
    assert lines[1:] == ["file: True", "child exit 0"], run.stdout
