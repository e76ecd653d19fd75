"""A forked child never waits on a lock its parent's threads held.

The parent keeps two threads reading through three nginx replicas (tokio
workers recording latencies, health and budget, Python threads entering the
runtime, making and dropping filesystems, taking metrics snapshots) with
metrics exported, and forks children in the middle of that. Each child reads
at once through the same filesystem and through a new one, without and with
the node cache; a child stuck on an inherited lock is killed by its own
alarm and fails the test. Before
`rust/core/src/fork.rs` 1 to 2 forks in 300 hung this way, and the parent
itself could deadlock in `os.fork` (the registry held across Python's hooks).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import feedline
import feedline.metrics as fm
import pytest
from feedline.testing import NginxReplicas

pytestmark = [pytest.mark.nginx, pytest.mark.timeout(180)]

FORKS = 120
#: A child that has not exited by then is stuck (a healthy one takes ms).
CHILD_ALARM_S = 20
#: Exit status of a child whose read returned wrong bytes or raised.
WRONG = 3
#: Exit status of a child whose cache reported its parent's counts as its own.
INHERITED_COUNTS = 4


def _child(fs: feedline.FileSystem, urls: list[str], files: dict[str, bytes], i: int) -> int:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's
    signal.alarm(CHILD_ALARM_S)
    keys = sorted(files)
    key = keys[i % len(keys)]
    if fs.cache is not None:
        counted = fs.cache.stats()
        if counted["hits"] or counted["misses"] or counted["fills"]:
            return INHERITED_COUNTS
    if fs.cat_file(key) != files[key]:
        return WRONG
    if fs.cat_ranges(keys[:6], 0, 100) != [files[k][:100] for k in keys[:6]]:
        return WRONG
    fresh = feedline.FileSystem(urls, skip_instance_cache=True)
    if fresh.cat_file(keys[0]) != files[keys[0]]:
        return WRONG
    fm.snapshot()
    return 0


def _run_child(fs: feedline.FileSystem, urls: list[str], files: dict[str, bytes], i: int) -> None:
    code = 1
    try:
        code = _child(fs, urls, files, i)
    finally:
        os._exit(code)  # no parent handlers, no pytest teardown in the child


def _wait(pid: int) -> int:
    """The child's wait status, killing it once it outlives its alarm."""
    deadline = time.monotonic() + CHILD_ALARM_S + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "node-cache"])
def test_children_forked_mid_read_never_hang(
    cached: bool,
    tmp_path: Path,
    nginx_replicas: Callable[..., NginxReplicas],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(fm.DIR_ENV, str(tmp_path / "metrics"))
    root = tmp_path / "data"
    root.mkdir()
    files = {f"obj{i:02d}": os.urandom(10_000 + 97 * i) for i in range(24)}
    for key, data in files.items():
        (root / key).write_bytes(data)
    r = nginx_replicas(root, 3)
    urls = r.urls
    cache: dict[str, Any] = {}
    if cached:
        cache = {"cache_dir": str(tmp_path / "cache"), "cache_bytes": 128 << 10}
        cache["cache_block_bytes"] = 64 << 10
    # With the cache, 128 KiB for 24 objects of 10-12 KiB: fills, hits and
    # evictions all run while the children fork.
    fs = feedline.FileSystem(urls, skip_instance_cache=True, **cache)
    keys = sorted(files)
    digest = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    stop = threading.Event()
    wrong: list[str] = []

    def read() -> None:
        n = 0
        while not stop.is_set() and n < 100_000:
            n += 1
            got = fs.cat_ranges(keys, None, None)
            wrong.extend(
                k
                for k, b in zip(keys, got, strict=True)
                if hashlib.sha256(b).hexdigest() != digest[k]
            )
            fs.info(keys[n % len(keys)])
            if n % 4 == 0:
                # Made and dropped holding the GIL: both take the metrics
                # registry, which the fork holds (a parent-side deadlock
                # when it was held across Python's fork hooks).
                other = feedline.FileSystem(urls, skip_instance_cache=True, **cache)
                wrong.extend(k for k in keys[:2] if other.cat_file(k) != files[k])
                del other
                fm.snapshot()

    readers = [threading.Thread(target=read, daemon=True) for _ in range(2)]
    for t in readers:
        t.start()
    statuses: list[int] = []
    try:
        for i in range(FORKS):
            pid = os.fork()
            if pid == 0:
                _run_child(fs, urls, files, i)
            statuses.append(_wait(pid))
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    hung = [i for i, s in enumerate(statuses) if os.WIFSIGNALED(s)]
    inherited = [i for i, s in enumerate(statuses) if os.WEXITSTATUS(s) == INHERITED_COUNTS]
    assert not inherited, f"forks {inherited} counted their parent's cache reads as theirs"
    failed = [i for i, s in enumerate(statuses) if os.WIFEXITED(s) and os.WEXITSTATUS(s) != 0]
    assert not hung, f"forks {hung} hung (killed by their alarm) of {FORKS}"
    assert not failed, f"forks {failed} read wrong bytes or raised"
    assert not wrong, f"the parent's readers got wrong bytes for {sorted(set(wrong))}"
    assert not any(t.is_alive() for t in readers)
    if fs.cache is not None:
        counted = fs.cache.stats()
        assert counted["hits"] > 0 and counted["fills"] > 0 and counted["evictions"] > 0, counted
