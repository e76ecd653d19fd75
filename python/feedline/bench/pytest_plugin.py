"""pytest plugin (entry point ``pytest11: feedline``): micro-benchmark your own
data-path code against a replica set with injected faults.

Fixtures:

* ``feedline_replicas(n=3, chaos={index: Chaos | dict}, objects=..., size_bytes=...)``
  -> :class:`ReplicaSet`: ``n`` local replica directories holding the same
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
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest


class ReplicaSet:
    """``n`` local directories holding the same objects under the same keys."""

    def __init__(self, n: int, chaos: Mapping[int, Any] | None, base: str) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        for index in chaos or {}:
            if not isinstance(index, int) or not 0 <= index < n:
                raise ValueError(f"chaos names replica {index!r}; this set has 0..{n - 1}")
        self.base = base
        self.dirs = [os.path.join(base, f"replica-{i}") for i in range(n)]
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
        self.chaos_spec = dict(chaos or {})
        self.keys: list[str] = []

    def write(self, key: str, data: bytes) -> None:
        """Writes ``data`` under ``key`` on every replica."""
        for d in self.dirs:
            path = os.path.join(d, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if key not in self.keys:
            self.keys.append(key)

    def populate(self, objects: int, size_bytes: int, seed: int = 0) -> list[str]:
        rng = random.Random(seed)
        for i in range(objects):
            self.write(f"obj-{i:05d}.bin", rng.randbytes(size_bytes))
        return list(self.keys)

    def chaos(self) -> dict[int, Any]:
        """``{index: feedline.chaos.Chaos}``; skips the test without chaos."""
        if not self.chaos_spec:
            return {}
        from feedline.bench.systems import chaos_module

        mod = chaos_module()
        return {
            i: spec if isinstance(spec, mod.Chaos) else mod.Chaos(**spec)
            for i, spec in self.chaos_spec.items()
        }

    def filesystem(self, **options: Any) -> Any:
        """A ``feedline.FileSystem`` over the replicas, faults applied."""
        import feedline

        chaos = self.chaos()
        if chaos:
            options["chaos"] = chaos
        return feedline.FileSystem(replicas=self.dirs, **options)

    def fsspec(self, index: int = 0) -> Any:
        """Plain fsspec rooted at replica ``index`` (paths are keys), faults applied."""
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem

        fs: Any = LocalFileSystem()
        chaos = self.chaos()
        if index in chaos:
            from feedline.bench.systems import chaos_module

            fs = chaos_module().ChaosFileSystem(fs, chaos[index])
        return DirFileSystem(path=self.dirs[index], fs=fs)


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
        base = tempfile.mkdtemp(prefix="feedline-replicas-")
        made.append(base)
        rs = ReplicaSet(n, chaos, base)
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
