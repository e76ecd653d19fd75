"""Three nginx replicas behind the router: failover, refused and lying
replicas, error mapping, fork/spawn/forkserver workers; every byte checked."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import feedline
import fsspec
import pytest
from feedline.testing import NginxReplicas
from test_remote import LyingServer

pytestmark = pytest.mark.nginx

N_FILES = 40
#: A dead replica at start-up meets a burst of parallel first reads before it
#: is ejected. The default budget starts at its idle balance (100 tokens), but
#: these tests are about failover, not the budget, so they lift it entirely.
FAILOVER = {"retry_budget_floor_per_s": 10_000.0}


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "data"
    (root / "d").mkdir(parents=True)
    files: dict[str, bytes] = {}
    for i in range(N_FILES):
        key = f"d/obj{i:03d}" if i % 3 else f"obj{i:03d}"
        data = os.urandom(1 + (i * 37_171) % 300_000)
        (root / key).write_bytes(data)
        files[key] = data
    return root, files


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_three_replicas_every_byte(
    dataset: tuple[Path, dict[str, bytes]], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    root, files = dataset
    r = nginx_replicas(root, 3)
    fs = feedline.FileSystem(r.urls, chunk_bytes=64 << 10)
    keys = list(files)
    assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]
    assert all(fs.cat_file(k, 5, 50) == files[k][5:50] for k in keys)
    assert b"".join(bytes(c) for c in fs.stream(keys)) == b"".join(files[k] for k in keys)
    with fs.open(keys[-1], "rb") as f:
        assert f.read() == files[keys[-1]]
    stats = fs.stats()
    served = [rep["requests"] for rep in stats["replicas"]]
    assert sum(1 for n in served if n > 0) >= 2, stats["replicas"]
    assert stats["read_errors"] == 0
    assert [rep["name"] for rep in stats["replicas"]] == r.urls


def test_killed_replica_fails_over_and_all_refused_is_replicas_unavailable(
    dataset: tuple[Path, dict[str, bytes]], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    root, files = dataset
    r = nginx_replicas(root, 3)
    fs = feedline.FileSystem(r.urls, **FAILOVER)
    keys = list(files)
    r.kill(1)
    assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]
    assert all(fs.cat_file(k) == files[k] for k in keys)
    r.kill(0)
    r.kill(2)
    fresh = feedline.FileSystem(r.urls)
    with pytest.raises(feedline.ReplicasUnavailable) as e:
        fresh.cat_file(keys[0])
    for url in r.urls:
        assert url in str(e.value)


def test_unreachable_replica_next_to_live_ones(
    dataset: tuple[Path, dict[str, bytes]], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    root, files = dataset
    r = nginx_replicas(root, 2)
    fs = feedline.FileSystem([f"http://127.0.0.1:{_closed_port()}", *r.urls], **FAILOVER)
    keys = list(files)
    assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]


def test_errors_agree_across_replicas(
    dataset: tuple[Path, dict[str, bytes]], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    root, _ = dataset
    r = nginx_replicas(root, 3)
    fs = feedline.FileSystem(r.urls)
    with pytest.raises(FileNotFoundError, match="no/such"):
        fs.cat_file("no/such")
    with pytest.raises(PermissionError):
        fs.cat_file("__feedline_forbidden/x")
    with pytest.raises(feedline.ReplicasUnavailable, match="500"):
        fs.cat_file("__feedline_500")
    out = fs.cat_ranges(["no/such", "obj000"], None, None)
    assert isinstance(out[0], FileNotFoundError) and isinstance(out[1], bytes)


@pytest.mark.parametrize("mode", ["short", "wrong-range"])
def test_lying_replica_next_to_nginx_is_retried_never_short(
    mode: str, tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    data = os.urandom(400_000)
    keys = [f"obj{i}" for i in range(12)]
    for key in keys:  # the liar serves (and lies about) `data` for any key
        (tmp_path / key).write_bytes(data)
    real = nginx_replicas(tmp_path, 1)
    liar = LyingServer(data, mode, max_requests=5000)
    try:
        fs = feedline.FileSystem(
            [liar.url, real.urls[0]], retry_budget_ratio=1.0, retry_budget_floor_per_s=1000.0
        )
        spans = [(i * 9_000, i * 9_000 + 8_000 + i) for i in range(40)]
        for key in keys:
            for s, e in spans[:5]:
                assert fs.cat_file(key, s, e) == data[s:e]
            assert fs.cat_file(key) == data  # whole: one GET, same checks
            got = fs.cat_ranges([key] * len(spans), [s for s, _ in spans], [e for _, e in spans])
            assert got == [data[s:e] for s, e in spans]
        assert fs.cat_ranges(keys, None, None) == [data] * len(keys)
        joined = b"".join(bytes(c) for c in fs.stream(keys, chunk_bytes=50_000))
        assert joined == data * len(keys)
        stats = fs.stats()
        assert stats["read_errors"] == 0
        assert liar.requests > 0
    finally:
        liar.close()


def test_fsspec_fallback_under_the_router(tmp_path: Path) -> None:
    mem = fsspec.filesystem("memory")
    a, b = f"/fl-{os.getpid()}-a", f"/fl-{os.getpid()}-b"
    data = {f"k{i}": os.urandom(10_000 + i) for i in range(20)}
    try:
        for k, v in data.items():
            mem.pipe_file(f"{a}/{k}", v)
            if k != "k3":  # replica b lags behind: k3 only on a
                mem.pipe_file(f"{b}/{k}", v)
        fs = feedline.FileSystem([f"memory://{a}", f"memory://{b}"])
        keys = list(data)
        assert fs.cat_ranges(keys, None, None) == [data[k] for k in keys]
        assert fs.cat_file("k3") == data["k3"]
    finally:
        mem.rm(a, recursive=True)
        mem.rm(b, recursive=True)
    del tmp_path


# -- worker processes ----------------------------------------------------------


def _child_read(fs: feedline.FileSystem, keys: list[str], out: Any) -> None:
    try:
        digests = {k: hashlib.sha256(fs.cat_file(k)).hexdigest() for k in keys}
        ranges = fs.cat_ranges(keys, 3, 3000)
        joined = hashlib.sha256(b"".join(bytes(c) for c in fs.stream(keys))).hexdigest()
        out.put(("ok", digests, [hashlib.sha256(r).hexdigest() for r in ranges], joined))
    except BaseException as e:  # reported to the parent, which fails the test
        out.put(("error", repr(e), [], ""))


def _run_children(
    method: str, fs: feedline.FileSystem, keys: list[str], files: dict[str, bytes], n: int = 2
) -> None:
    ctx = mp.get_context(method)
    out = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(fs, keys, out)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            status, digests, ranges, joined = out.get(timeout=60)
            assert status == "ok", digests
            assert digests == {k: hashlib.sha256(files[k]).hexdigest() for k in keys}
            assert ranges == [hashlib.sha256(files[k][3:3000]).hexdigest() for k in keys]
            assert joined == hashlib.sha256(b"".join(files[k] for k in keys)).hexdigest()
    except queue.Empty:
        pytest.fail(f"a {method} worker gave no answer within 60 s (hang?)")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert [p.exitcode for p in procs] == [0] * n


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_after_parent_used_the_filesystem(
    method: str,
    dataset: tuple[Path, dict[str, bytes]],
    nginx_replicas: Callable[..., NginxReplicas],
) -> None:
    root, files = dataset
    r = nginx_replicas(root, 3)
    secret = "WorkerS3cret"
    fs = feedline.FileSystem(r.urls, storage_options={"headers": {"Authorization": secret}})
    keys = list(files)[:12]
    # The parent uses it first: runtime threads, pooled connections, stats.
    assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]
    _run_children(method, fs, keys, files)
    # ... and the parent still works after its children did.
    assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]


def test_fork_with_fsspec_fallback_state(tmp_path: Path) -> None:
    mem = fsspec.filesystem("memory")
    base = f"/fl-fork-{os.getpid()}"
    files = {f"k{i}": os.urandom(5000 + i) for i in range(8)}
    try:
        for k, v in files.items():
            mem.pipe_file(f"{base}/{k}", v)
        fs = feedline.FileSystem([f"memory://{base}"])
        keys = list(files)
        assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]
        _run_children("fork", fs, keys, files)
    finally:
        mem.rm(base, recursive=True)
    del tmp_path


def test_chaos_on_remote_and_fallback_replicas_every_byte(
    dataset: tuple[Path, dict[str, bytes]], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    from feedline.chaos import Chaos

    root, files = dataset
    r = nginx_replicas(root, 2)
    mem = fsspec.filesystem("memory")
    base = f"/fl-chaos-{os.getpid()}"
    try:
        for k, v in files.items():
            mem.pipe_file(f"{base}/{k}", v)
        fs = feedline.FileSystem(
            [*r.urls, f"memory://{base}"],
            chaos={0: Chaos(error_rate=0.3, seed=7), 2: Chaos(error_rate=0.3, seed=8)},
            timeout_ms=5_000,
            **FAILOVER,
        )
        keys = list(files)
        for _ in range(2):
            assert fs.cat_ranges(keys, None, None) == [files[k] for k in keys]
            assert b"".join(bytes(c) for c in fs.stream(keys)) == b"".join(files[k] for k in keys)
        injected = fs.fault_stats()
        assert injected[0]["injected"] and injected[2]["injected"], injected
    finally:
        mem.rm(base, recursive=True)
