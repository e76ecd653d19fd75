"""Helpers for the feedline tests: generated files and a count of live
prefetch threads (read from /proc, the kernel's own view)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feedline import FileSystem

# Linux keeps 15 characters of a thread name: "feedline-prefetch" -> "feedline-prefet".
PREFETCH_THREAD_PREFIX = "feedline-prefet"


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes where every 4 KiB page differs, so a misplaced chunk shows."""
    block = bytes((i * 31 + seed * 7) % 251 for i in range(4093))
    reps = size // len(block) + 1
    return (block * reps)[:size]


def prefetch_threads() -> int:
    """Live threads of this process named by the prefetcher."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if comm.startswith(PREFETCH_THREAD_PREFIX):
            count += 1
    return count


def wait_for(predicate: Callable[[], bool], timeout_s: float = 1.0) -> bool:
    """Polls `predicate` until true or `timeout_s` passes (bounded loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def interrupt_bench(scenario: Path, out: Path, system: str, after_s: float) -> tuple[int, str, str]:
    """Runs `feedline bench scenario --json out` for `system`, sends SIGINT
    `after_s` after its header line, and returns (exit code, stdout,
    stderr). The process is killed if it outlives the test."""
    argv = ["bench", str(scenario), "--json", str(out), "--no-progress", "--systems", system]
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedline.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The system lines come at the end: the header says the run started.
        assert proc.stderr is not None
        header = proc.stderr.readline()
        assert "feedline bench" in header, header
        threading.Event().wait(after_s)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return proc.returncode, stdout, stderr


def lead_to_first_replica(
    data: dict[str, bytes], root: Path, replicas: list[str], size: int, at_least: int = 3
) -> None:
    """Adds objects of ``size`` bytes to ``data`` (and ``root``) until
    replica 0 is the first choice for ``at_least`` keys: placement hashes
    the replica URLs, whose ports vary from run to run, and a test of what
    replica 0 does must not depend on luck."""
    from feedline._core import Rendezvous

    placement = Rendezvous(replicas)
    j = 0
    while sum(placement.preference_list(k)[0] == 0 for k in data) < at_least:
        assert j < 200, "no key placed on replica 0 in 200 tries"
        key = f"x{j}.bin"
        body = os.urandom(size)
        (root / key).write_bytes(body)
        data[key] = body
        j += 1


# Every read path, each reading every key of ``data`` and checking the bytes.
def _read_whole(fs: FileSystem, data: dict[str, bytes]) -> None:
    for k, body in data.items():
        assert fs.cat_file(k) == body


def _read_ranged(fs: FileSystem, data: dict[str, bytes]) -> None:
    for k, body in data.items():
        assert fs.cat_file(k, 100, 1100) == body[100:1100]


def _read_to_the_end(fs: FileSystem, data: dict[str, bytes]) -> None:
    # The end comes from the size: a wrong one is short or padded data.
    for k, body in data.items():
        assert fs.cat_file(k, 500) == body[500:]
        assert fs.cat_file(k, -300) == body[-300:]


def _read_size(fs: FileSystem, data: dict[str, bytes]) -> None:
    for k, body in data.items():
        assert fs.size(k) == len(body)


def _read_info(fs: FileSystem, data: dict[str, bytes]) -> None:
    for k, body in data.items():
        assert fs.info(k)["size"] == len(body)


def _read_cat_ranges(fs: FileSystem, data: dict[str, bytes]) -> None:
    keys = list(data)
    n = len(keys)
    starts: list[int | None] = [*([0] * n), *([500] * n)]
    ends: list[int | None] = [*([10] * n), *([None] * n)]
    got = fs.cat_ranges(keys + keys, starts, ends)
    assert got == [data[k][:10] for k in keys] + [data[k][500:] for k in keys]


def _read_stream(fs: FileSystem, data: dict[str, bytes]) -> None:
    got: dict[str, bytearray] = {k: bytearray() for k in data}
    with fs.stream(list(data), chunk_bytes=16 * 1024, depth=4) as chunks:
        for chunk in chunks:
            got[chunk.path].extend(memoryview(chunk))
    assert {k: bytes(v) for k, v in got.items()} == data


def _read_open(fs: FileSystem, data: dict[str, bytes]) -> None:
    for k, body in data.items():
        with fs.open(k) as f:
            assert f.read() == body
        with fs.open(k) as f:
            f.seek(-200, os.SEEK_END)
            assert f.read() == body[-200:]


READ_PATHS: dict[str, Callable[[FileSystem, dict[str, bytes]], None]] = {
    "whole": _read_whole,
    "ranged": _read_ranged,
    "to_the_end": _read_to_the_end,
    "size": _read_size,
    "info": _read_info,
    "cat_ranges": _read_cat_ranges,
    "stream": _read_stream,
    "open_read": _read_open,
}
