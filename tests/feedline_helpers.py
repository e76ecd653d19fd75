"""Helpers for the feedline tests: generated files and a count of live
prefetch threads (read from /proc, the kernel's own view)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
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
