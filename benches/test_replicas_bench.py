"""P5, spiky replica: 3 local replicas, one of which delays 5% of its reads
by 200 ms (in-process chaos); 10,000 random 64 KiB reads, one at a time.
Hedging at the adaptive p95 against no hedging, each next to the same run
without faults. Reported per configuration (median of the rounds): read
latency p50/p99/p99.9 and extra requests (hedges + retries per read).

Two storage speeds: bare page-cache reads (tens of microseconds; a hedge
cannot fire sooner than tokio's 1 ms timer tick, so hedged spikes cost about
1 ms against a tens-of-microseconds baseline) and replicas with a 1 ms
log-normal base latency (a fast network store, where the tick is noise).

Run: ``pytest benches/test_replicas_bench.py --benchmark-only -o testpaths=benches -s``
(``FEEDLINE_P5_READS`` and ``FEEDLINE_P5_ROUNDS`` scale it down).
"""

from __future__ import annotations

import os
import random
import statistics
from typing import Any

import feedline
import pytest
from feedline.chaos import Chaos, LogNormal
from trace_report import dump, tail_causes

READS = int(os.environ.get("FEEDLINE_P5_READS", "10000"))
ROUNDS = int(os.environ.get("FEEDLINE_P5_ROUNDS", "3"))
OBJECTS = 256
OBJ_BYTES = 64 * 1024
SPIKY = 1


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    base = tmp_path_factory.mktemp("p5")
    keys = [f"shard/obj-{i:04}.bin" for i in range(OBJECTS)]
    roots = []
    for r in range(3):
        root = base / f"replica-{r}"
        (root / "shard").mkdir(parents=True)
        for i, key in enumerate(keys):
            (root / key).write_bytes(bytes([i % 251]) * OBJ_BYTES)
        roots.append(str(root))
    return roots, keys


def run_once(
    roots: list[str], keys: list[str], *, spiky: bool, hedge: bool, base_ms: float | None, seed: int
) -> dict[str, float]:
    chaos: dict[int | str | os.PathLike[str], Chaos] = {}
    for i in range(3):
        latency = LogNormal(median_ms=base_ms, sigma=0.3) if base_ms else None
        spikes = {"spike_probability": 0.05, "spike_ms": 200.0} if spiky and i == SPIKY else {}
        if latency is not None or spikes:
            chaos[i] = Chaos(latency=latency, seed=seed + i, **spikes)  # type: ignore[arg-type]
    fs = feedline.FileSystem(
        replicas=roots, hedge_after_ms="p95" if hedge else None, chaos=chaos or None
    )
    fs.trace_reads(2 * READS)
    rng = random.Random(seed)
    for _ in range(READS):
        key = keys[rng.randrange(len(keys))]
        assert len(fs.cat_file(key)) == OBJ_BYTES
    stats = fs.stats()
    assert stats["read_errors"] == 0
    latency = stats["latency"]
    trace = fs.take_trace()
    name = f"p5-{'spiky' if spiky else 'clean'}-{'hedge' if hedge else 'off'}-{base_ms}-{seed}"
    dump(name, trace)
    print(f"\n{name}: slowest 0.2%: {tail_causes(trace)}")
    return {
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "p99.9_ms": latency["p99.9_ms"],
        "max_ms": latency["max_ms"],
        "extra_request_pct": 100 * stats["extra_request_ratio"],
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("base_ms", [None, 1.0], ids=["page-cache", "1ms-base"])
@pytest.mark.parametrize("hedge", [True, False], ids=["hedge-p95", "no-hedge"])
def test_p5_spiky_replica(
    benchmark: Any, replicas: tuple[list[str], list[str]], hedge: bool, base_ms: float | None
) -> None:
    roots, keys = replicas
    results: dict[str, list[dict[str, float]]] = {"no_faults": [], "spiky": []}

    def one_round() -> None:
        seed = len(results["spiky"])
        results["no_faults"].append(
            run_once(roots, keys, spiky=False, hedge=hedge, base_ms=base_ms, seed=seed)
        )
        results["spiky"].append(
            run_once(roots, keys, spiky=True, hedge=hedge, base_ms=base_ms, seed=seed)
        )

    benchmark.group = "P5 spiky replica"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    clean, spiky = median_of(results["no_faults"]), median_of(results["spiky"])
    ratio = spiky["p99.9_ms"] / clean["p99.9_ms"] if clean["p99.9_ms"] else float("nan")
    per_round = [
        {
            "p99.9_no_faults_ms": c["p99.9_ms"],
            "p99.9_spiky_ms": s["p99.9_ms"],
            "ratio": round(s["p99.9_ms"] / c["p99.9_ms"], 2) if c["p99.9_ms"] else float("nan"),
            "extra_request_pct": round(s["extra_request_pct"], 2),
        }
        for c, s in zip(results["no_faults"], results["spiky"], strict=True)
    ]
    info = {
        "reads": READS,
        "rounds": ROUNDS,
        "per_round": per_round,
        "no_faults": clean,
        "spiky": spiky,
        "p99.9_ratio": round(ratio, 2),
    }
    benchmark.extra_info.update(info)
    print(f"\nP5 hedge={hedge} base_ms={base_ms}: {info}")
