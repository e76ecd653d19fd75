"""Metrics cost: P2 (100,000 random 4 KiB ranges, ``cat_ranges``) and P7
(4 KiB chunk iteration) with metrics on and off, interleaved in one run so
machine noise hits both; goal: on within 3% of off.

"On" is what a job with metrics pays: the Prometheus endpoint up and scraped
every second (15 times the usual 15 s interval), and this process writing
its file for workers' merge every second (the default). "Off" has neither.
Each measurement repeats the work for at least 2 s so that it spans
scrapes and flushes (one costs ~4 ms of Python under the GIL). The
core's counting itself (per-chunk stream totals, per-read router counters)
always runs; its cost against a build without it is measured separately
(docs/benchmarks.md).

Run: ``pytest benches/test_metrics_cost_bench.py --benchmark-only -o testpaths=benches -s``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import feedline
import feedline.metrics as fm
import numpy as np
import pytest
from conftest import ROUNDS, Dataset, setting

pytest.importorskip("prometheus_client")

RANGE_BYTES = 4096
CHUNK_BYTES = 4096
DEPTH = 16
SCRAPE_S = 1.0
MEASURE_S = 2.0


@contextmanager
def metrics_on(directory: Path) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in (fm.DIR_ENV, fm.FLUSH_ENV)}
    os.environ[fm.DIR_ENV] = str(directory)
    os.environ[fm.FLUSH_ENV] = "1"
    fm._FLUSHER.stop.set()
    fm._FLUSHER.thread = None
    stop = threading.Event()
    with fm.serve(port=0) as server:

        def scrape() -> None:
            while not stop.wait(SCRAPE_S):
                urllib.request.urlopen(server.url, timeout=10).read()

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        try:
            yield
        finally:
            stop.set()
            scraper.join(timeout=10)
            fm._FLUSHER.stop.set()
            fm._FLUSHER.thread = None
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def rate(work: Callable[[], int]) -> float:
    """Items per second of `work` repeated for at least MEASURE_S."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < MEASURE_S:
        n += work()
    return n / (time.perf_counter() - t0)


def interleaved(work: Callable[[], int], directory: Path, rounds: int) -> dict[str, Any]:
    """Items per second off and on, alternating which goes first."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    work()  # warm-up
    for i in range(rounds):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            if mode == "on":
                with metrics_on(directory):
                    rates["on"].append(rate(work))
            else:
                rates["off"].append(rate(work))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {
        "off_per_s": round(off),
        "on_per_s": round(on),
        "on_over_off": round(on / off, 4),
        "per_round_on_over_off": [
            round(a / b, 3) for a, b in zip(rates["on"], rates["off"], strict=True)
        ],
    }


def test_p2_cat_ranges_metrics_on_vs_off(benchmark: Any, dataset: Dataset, tmp_path: Path) -> None:
    n = setting("FEEDLINE_BENCH_P2_RANGES", 100_000)
    rng = np.random.default_rng(2)
    starts = rng.integers(0, dataset.big_bytes - RANGE_BYTES, size=n).tolist()
    ends = [s + RANGE_BYTES for s in starts]
    paths = [dataset.big_file] * n
    fs = feedline.FileSystem()

    def work() -> int:
        out = fs.cat_ranges(paths, starts, ends)
        assert len(out) == n
        return n

    info = interleaved(work, tmp_path, max(ROUNDS, 5))
    benchmark.extra_info.update(info)
    benchmark.group = "metrics cost"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("\nP2 metrics on/off", info)
    assert info["off_per_s"] > 0 and info["on_per_s"] > 0


def test_p7_chunk_iteration_metrics_on_vs_off(
    benchmark: Any, dataset: Dataset, tmp_path: Path
) -> None:
    n = setting("FEEDLINE_BENCH_P7_CHUNKS", 200_000)
    span = max(1, dataset.big_bytes // CHUNK_BYTES)
    plan = [(dataset.big_file, (i % span) * CHUNK_BYTES, CHUNK_BYTES) for i in range(n)]
    fs = feedline.FileSystem()

    def work() -> int:
        count = 0
        with fs.stream(plan, chunk_bytes=CHUNK_BYTES, depth=DEPTH) as stream:
            for _ in stream:
                count += 1
        assert count == n
        return count

    info = interleaved(work, tmp_path, max(ROUNDS, 5))
    benchmark.extra_info.update(info)
    benchmark.group = "metrics cost"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("\nP7 metrics on/off", info)
    assert info["off_per_s"] > 0 and info["on_per_s"] > 0
