"""Local read benchmarks (ids P1, P2, P3 and P7 in docs/benchmarks.md): one
large file, small random reads, many small files, and the zero-copy hand-off
of a slot (Python side). Every group
measures feedline and its baselines in the same run, on the same page-cached
data; `report.py` (and the terminal summary) turns medians into ratios."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import feedline
import fsspec
import numpy as np
import pytest
from conftest import ROUNDS, Dataset, GiB, MiB, setting
from fsspec.implementations.local import LocalFileSystem

Benchmark = Any


def run(
    benchmark: Benchmark,
    fn: Callable[[], object],
    nbytes: int | None = None,
    items: int | None = None,
) -> object:
    result = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if nbytes is not None:
        benchmark.extra_info["rate"] = f"{nbytes / median / GiB:.2f} GiB/s"
    if items is not None:
        benchmark.extra_info["rate"] = f"{items / median / 1e3:.0f}k/s"
    return result


# ---------------------------------------------------------------- P1


@pytest.fixture(scope="module")
def p1_buffer(dataset: Dataset) -> np.ndarray:
    buf = np.ones(dataset.big_bytes, dtype=np.uint8)  # pages faulted in once
    return buf


@pytest.mark.benchmark(group="P1")
def test_p1_feedline_readinto(
    benchmark: Benchmark, dataset: Dataset, p1_buffer: np.ndarray
) -> None:
    def read() -> int:
        with feedline.open(dataset.big_file) as f:
            return int(f.readinto(p1_buffer))

    assert run(benchmark, read, nbytes=dataset.big_bytes) == dataset.big_bytes


@pytest.mark.benchmark(group="P1")
def test_p1_builtin_readinto(benchmark: Benchmark, dataset: Dataset, p1_buffer: np.ndarray) -> None:
    def read() -> int:
        with open(dataset.big_file, "rb", buffering=0) as f:
            return int(f.readinto(p1_buffer))

    assert run(benchmark, read, nbytes=dataset.big_bytes) == dataset.big_bytes


@pytest.mark.benchmark(group="P1")
def test_p1_fsspec_read(benchmark: Benchmark, dataset: Dataset) -> None:
    # fsspec's own idiom for a whole file (its OpenFile has no fast readinto).
    def read() -> int:
        with fsspec.open(dataset.big_file, "rb") as f:
            return len(f.read())

    assert run(benchmark, read, nbytes=dataset.big_bytes) == dataset.big_bytes


# ---------------------------------------------------------------- P2

RANGE_BYTES = 4096


@pytest.fixture(scope="module")
def p2_ranges(dataset: Dataset) -> tuple[list[str], list[int], list[int]]:
    n = setting("FEEDLINE_BENCH_P2_RANGES", 100_000)
    rng = np.random.default_rng(2)
    starts = rng.integers(0, dataset.big_bytes - RANGE_BYTES, size=n).tolist()
    ends = [s + RANGE_BYTES for s in starts]
    return [dataset.big_file] * n, starts, ends


@pytest.mark.benchmark(group="P2")
def test_p2_feedline_cat_ranges(benchmark: Benchmark, p2_ranges: Any) -> None:
    paths, starts, ends = p2_ranges
    fs = feedline.FileSystem()
    out = run(benchmark, lambda: fs.cat_ranges(paths, starts, ends), items=len(paths))
    assert isinstance(out, list) and all(len(b) == RANGE_BYTES for b in out)


@pytest.mark.benchmark(group="P2")
def test_p2_pread_loop(benchmark: Benchmark, p2_ranges: Any) -> None:
    paths, starts, _ = p2_ranges
    fd = os.open(paths[0], os.O_RDONLY)
    try:
        pread = os.pread
        out = run(benchmark, lambda: [pread(fd, RANGE_BYTES, s) for s in starts], items=len(paths))
    finally:
        os.close(fd)
    assert isinstance(out, list) and all(len(b) == RANGE_BYTES for b in out)


@pytest.mark.benchmark(group="P2")
def test_p2_fsspec_cat_ranges(benchmark: Benchmark, p2_ranges: Any) -> None:
    paths, starts, ends = p2_ranges
    fs = LocalFileSystem()
    out = run(benchmark, lambda: fs.cat_ranges(paths, starts, ends), items=len(paths))
    assert isinstance(out, list) and all(len(b) == RANGE_BYTES for b in out)


# ---------------------------------------------------------------- P3


def _touch(view: Any) -> int:
    # uint64 lanes: numpy reads every byte of every page at memory speed.
    return int(np.frombuffer(view, dtype=np.uint64).sum())


@pytest.mark.benchmark(group="P3")
def test_p3_feedline_stream_numpy(benchmark: Benchmark, dataset: Dataset) -> None:
    fs = feedline.FileSystem()

    def consume() -> int:
        total = 0
        # depth=2: a ring of 4 x 1 MiB stays in the CPU cache between the
        # read and the sum; a deeper ring only helps when storage is slow.
        with fs.stream(dataset.small_files, chunk_bytes=dataset.small_bytes, depth=2) as stream:
            for chunk in stream:
                total += _touch(chunk)
        return total

    # Both sides must see the same bytes (checked here: a test without the
    # benchmark fixture would be skipped by --benchmark-only).
    files = dataset.small_files[:8]
    with fs.stream(files, chunk_bytes=MiB) as stream:
        got = [_touch(c) for c in stream]
    want = []
    for p in files:
        with open(p, "rb") as f:
            want.append(_touch(f.read()))
    assert got == want
    nbytes = len(dataset.small_files) * dataset.small_bytes
    run(benchmark, consume, nbytes=nbytes)


@pytest.mark.benchmark(group="P3")
def test_p3_builtin_readinto_numpy(benchmark: Benchmark, dataset: Dataset) -> None:
    buf = bytearray(dataset.small_bytes)

    def consume() -> int:
        total = 0
        for path in dataset.small_files:
            with open(path, "rb", buffering=0) as f:
                n = f.readinto(buf)
            total += _touch(memoryview(buf)[:n])
        return total

    nbytes = len(dataset.small_files) * dataset.small_bytes
    run(benchmark, consume, nbytes=nbytes)


# ---------------------------------------------------------------- P7

P7_CHUNK_BYTES = 4096
P7_DEPTH = 16


@pytest.fixture(scope="module")
def p7_plan(dataset: Dataset) -> list[tuple[str, int, int]]:
    n = setting("FEEDLINE_BENCH_P7_CHUNKS", 200_000)
    span = max(1, dataset.big_bytes // P7_CHUNK_BYTES)
    return [(dataset.big_file, (i % span) * P7_CHUNK_BYTES, P7_CHUNK_BYTES) for i in range(n)]


@pytest.mark.benchmark(group="P7")
def test_p7_feedline_chunk_iteration(benchmark: Benchmark, p7_plan: list[Any]) -> None:
    fs = feedline.FileSystem()

    def iterate() -> int:
        n = 0
        with fs.stream(p7_plan, chunk_bytes=P7_CHUNK_BYTES, depth=P7_DEPTH) as stream:
            for _ in stream:
                n += 1
        return n

    assert run(benchmark, iterate, items=len(p7_plan)) == len(p7_plan)


@pytest.mark.benchmark(group="P7")
def test_p7_queue_handoff(benchmark: Benchmark, p7_plan: list[Any]) -> None:
    # The same number of ready-made objects through a bounded queue.Queue
    # from a producer thread: the hand-off alone, with no I/O at all.
    items = [bytes(8) for _ in range(len(p7_plan))]
    end = object()

    def handoff() -> int:
        q: queue.Queue[object] = queue.Queue(maxsize=2 * P7_DEPTH)

        def produce() -> None:
            for item in items:
                q.put(item)
            q.put(end)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        n = 0
        get = q.get
        while get() is not end:
            n += 1
        producer.join(timeout=60)
        return n

    assert run(benchmark, handoff, items=len(items)) == len(items)
