"""Example for the feedline pytest plugin: micro-benchmark a data-path
function against 3 local replicas, one of them spiky, and record the read
latency percentiles next to pytest-benchmark's timings.

Run: ``pytest benches/test_bench_plugin_example.py --benchmark-only``.
"""

from __future__ import annotations

from typing import Any


def test_read_all_objects_under_a_spiky_replica(
    benchmark: Any, feedline_replicas: Any, feedline_latency: Any
) -> None:
    replicas = feedline_replicas(
        n=3, chaos={1: {"spike_probability": 0.05, "spike_ms": 20}}, objects=64, size_bytes=65536
    )
    fs = replicas.filesystem()

    def read_all() -> int:
        total = 0
        for key in replicas.keys:
            with feedline_latency.measure():
                total += len(fs.cat_file(key))
        return total

    assert benchmark.pedantic(read_all, rounds=3, iterations=1) == 64 * 65536
    # p50/p99/p99.9 of single reads land in benchmark.extra_info at teardown.
