"""Helpers for the feedline tests: generated files and a count of live
prefetch threads (read from /proc, the kernel's own view)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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
