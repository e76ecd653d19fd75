"""P8 from Python: replica lookup with feedline's weighted rendezvous hashing
(``_core.Rendezvous``) against ``uhashring`` (a ketama-style consistent-hash
ring), 16 replicas, in the same run. Both pay one Python call per lookup, so
the ratio is what the Rust side saves; the Rust-only figures are in
``cargo bench -p feedline-core --bench route``.

Run: ``pytest benches/test_route_bench.py --benchmark-only -o testpaths=benches``.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from feedline import _core

uhashring = pytest.importorskip("uhashring")

REPLICAS = [f"/data/replica-{i:02}" for i in range(16)]
KEYS = [f"train/shard-{i:06}.parquet" for i in range(10_000)]


def per_lookup_ns(lookup: Callable[[str], object], rounds: int = 7) -> float:
    """Median over `rounds` of the time per lookup of every key."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for key in KEYS:
            lookup(key)
        times.append((time.perf_counter_ns() - start) / len(KEYS))
    return statistics.median(times)


def peak_over_mean(lookup: Callable[[str], object], keys: int = 200_000) -> float:
    counts = Counter(lookup(f"object-{i}") for i in range(keys))
    return max(counts.values()) / (keys / len(REPLICAS))


@pytest.mark.parametrize("hasher", ["feedline", "uhashring"])
def test_lookup_16_replicas(benchmark: Any, hasher: str) -> None:
    if hasher == "feedline":
        lookup: Callable[[str], object] = _core.Rendezvous(REPLICAS).replica_for
    else:
        lookup = uhashring.HashRing(nodes=REPLICAS).get_node
    benchmark.group = "P8 lookup, 16 replicas, 10k keys"

    def run() -> None:
        for key in KEYS:
            lookup(key)

    benchmark.pedantic(run, rounds=7, iterations=1)
    benchmark.extra_info["peak_over_mean"] = round(peak_over_mean(lookup), 4)


def test_lookup_ratio_in_one_run(benchmark: Any) -> None:
    """Interleaved medians of both hashers in one run, so machine noise hits
    both: the figure in docs/benchmarks.md."""
    rendezvous = _core.Rendezvous(REPLICAS)
    ring = uhashring.HashRing(nodes=REPLICAS)
    feedline_ns, ring_ns, list_ns = [], [], []
    for _ in range(5):
        feedline_ns.append(per_lookup_ns(rendezvous.replica_for, rounds=1))
        ring_ns.append(per_lookup_ns(ring.get_node, rounds=1))
        list_ns.append(per_lookup_ns(rendezvous.preference_list, rounds=1))
    info = {
        "feedline_primary_ns": round(statistics.median(feedline_ns), 1),
        "feedline_preference_list_ns": round(statistics.median(list_ns), 1),
        "uhashring_ns": round(statistics.median(ring_ns), 1),
        "uhashring_over_feedline": round(
            statistics.median(ring_ns) / statistics.median(feedline_ns), 2
        ),
        "feedline_peak_over_mean": round(peak_over_mean(rendezvous.replica_for), 4),
        "uhashring_peak_over_mean": round(peak_over_mean(ring.get_node), 4),
    }
    benchmark.extra_info.update(info)
    benchmark.group = "P8 ratio"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("\nP8", info)
    # Behaviour, not speed: both spread keys over every replica.
    assert info["feedline_peak_over_mean"] < 1.1
