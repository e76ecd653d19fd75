"""pytest plugin (entry point ``pytest11: feedline``): micro-benchmark your own
data-path code against a replica set with injected faults.

Fixtures:

* ``feedline_replicas(n=3, chaos={index: Chaos | dict}, objects=..., size_bytes=...)``
  -> :class:`feedline.bench.replicas.ReplicaSet`: ``n`` local replica directories holding the same
  generated objects, ``.filesystem(**options)`` (a ``feedline.FileSystem``
  over them, faults applied) and ``.fsspec(index)`` (plain fsspec on one
  replica, same faults via ``feedline.chaos.ChaosFileSystem``).
* ``feedline_latency`` -> :class:`LatencyRecorder`: ``with rec.measure(): ...``
  per read; p50/p99/p99.9 land in ``benchmark.extra_info`` (pytest-benchmark)
  when the test uses ``benchmark``, or call ``rec.attach(benchmark)``.

The plugin imports nothing heavy until a fixture is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from feedline.bench.replicas import ReplicaSet


class LatencyRecorder:
    """Per-operation latencies into the core's HDR histogram."""

    PERCENTILES = (50.0, 99.0, 99.9)

    def __init__(self) -> None:
        from feedline import _core

        self.histogram = _core.LatencyHistogram()

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record_s(time.perf_counter() - start)

    def record_s(self, seconds: float) -> None:
        self.histogram.record_us(int(seconds * 1e6))

    def timed(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.measure():
            return func(*args, **kwargs)

    def percentiles(self) -> dict[str, float]:
        out = {f"p{p:g}_ms": self.histogram.percentile_ms(p) for p in self.PERCENTILES}
        out["count"] = float(self.histogram.count)
        return out

    def attach(self, benchmark: Any) -> dict[str, float]:
        """Writes p50/p99/p99.9 (ms) and the count into ``benchmark.extra_info``."""
        values = self.percentiles()
        for name, value in values.items():
            benchmark.extra_info[f"latency_{name}" if name != "count" else "latency_count"] = value
        return values


@pytest.fixture
def feedline_replicas() -> Iterator[Callable[..., ReplicaSet]]:
    """Factory: ``feedline_replicas(n=3, chaos={1: {"spike_probability": 0.05,
    "spike_ms": 50}}, objects=32, size_bytes=65536)``. Removed after the test."""
    made: list[str] = []

    def factory(
        n: int = 3,
        chaos: Mapping[int, Any] | None = None,
        objects: int = 0,
        size_bytes: int = 65536,
        seed: int = 0,
    ) -> ReplicaSet:
        from feedline.bench.replicas import ReplicaSet

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        base = tempfile.mkdtemp(prefix="feedline-replicas-")
        made.append(base)
        roots = [os.path.join(base, f"replica-{i}") for i in range(n)]
        for root in roots:
            os.makedirs(root, exist_ok=True)
        rs = ReplicaSet(roots, chaos)
        if objects:
            rs.populate(objects, size_bytes, seed)
        return rs

    try:
        yield factory
    finally:
        for base in made:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def feedline_latency(request: pytest.FixtureRequest) -> Iterator[LatencyRecorder]:
    """A :class:`LatencyRecorder`; its percentiles go to ``benchmark.extra_info``
    at the end of a test that uses pytest-benchmark's ``benchmark``."""
    rec = LatencyRecorder()
    benchmark = (
        request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    )
    yield rec
    if benchmark is not None and rec.histogram.count:
        rec.attach(benchmark)
