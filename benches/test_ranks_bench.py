"""P12, ranks: the job's AU with 2 ranks x 2 DataLoader workers against
1 rank x 4 workers at the same total load, and the bytes the replicas send
when 2 ranks on one node share the node cache.

AU: both layouts run the same global batches (1 rank: batch B; 2 ranks:
batch B/2 each, twice the steps, so every step of the job consumes B samples
and computes for the same time) over 3 local replicas under the default
scenario's faults (a spiky replica, one dying halfway), as torchrun jobs
(``feedline.bench.ranks``), alternating per round. Reported: the median job
AU of each layout and their ratio (goal: within 2%).

Remote bytes: 2 ranks x 2 workers read 3 shuffled epochs from 3 nginx
replicas on loopback; the replicas' access logs count the body bytes they
sent (hedging off: a hedge reads an object twice by design). Without a
cache that is 3x the dataset; with the node cache
(``[feedline] cache_dir``: every worker process of both ranks shares it) the
goal is 1.00x. The cached run needs the ``cache_dir`` option and is skipped,
saying so, on a build without it.

Run: ``pytest benches/test_ranks_bench.py --benchmark-only -o testpaths=benches -s``
(``FEEDLINE_P12_STEPS``, ``FEEDLINE_P12_ROUNDS`` or ``FEEDLINE_BENCH_QUICK=1`` scale it down).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from feedline import _core
from feedline.bench import ranks
from feedline.bench import scenario as _scenario
from feedline.bench.dataset import Materialized
from feedline.bench.replicas import ReplicaSet

pytest.importorskip("torch")

QUICK = os.environ.get("FEEDLINE_BENCH_QUICK", "") not in ("", "0")
STEPS = int(os.environ.get("FEEDLINE_P12_STEPS", "50" if QUICK else "200"))
ROUNDS = int(os.environ.get("FEEDLINE_P12_ROUNDS", "3"))
GLOBAL_BATCH = 16
EPOCHS = 3


def layout_scenario(nproc: int) -> _scenario.Scenario:
    """The default scenario, feedline only, split over ``nproc`` ranks at
    the same global batch."""
    sc = _scenario.default()
    w = replace(sc.workload, batch_size=GLOBAL_BATCH // nproc, steps=STEPS * nproc)
    return replace(sc, systems=("feedline",), workload=w, sla={})


def job_au(nproc: int, workers: int) -> tuple[float, dict[str, Any]]:
    report = ranks.run(layout_scenario(nproc), nproc=nproc, workers=workers)
    (system,) = report["systems"]
    assert system["status"] == "ok", system.get("notes")
    assert system["mismatches"] == 0 and system["errors"] == 0
    assert system["delivery"]["duplicates"] == 0 and system["delivery"]["missing"] == 0
    return float(system["au"]), system


def test_p12_two_ranks_match_one_rank(benchmark: Any) -> None:
    au: dict[str, list[float]] = {"1x4": [], "2x2": []}

    def one_round() -> None:
        au["1x4"].append(job_au(1, 4)[0])
        au["2x2"].append(job_au(2, 2)[0])

    benchmark.group = "P12 ranks"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    one, two = statistics.median(au["1x4"]), statistics.median(au["2x2"])
    info = {
        "rounds": ROUNDS,
        "global_steps": STEPS,
        "global_batch": GLOBAL_BATCH,
        "au_1_rank_x_4_workers": au["1x4"],
        "au_2_ranks_x_2_workers": au["2x2"],
        "median_au_ratio_2x2_over_1x4": round(two / one, 4),
    }
    benchmark.extra_info.update(info)
    print(f"\nP12 AU: {info}")


# -- remote bytes with the node cache --------------------------------------------


def has_cache_option() -> bool:
    try:
        _core.check_options({"cache_dir": tempfile.gettempdir(), "cache_bytes": 1 << 30})
    except (ValueError, TypeError):
        return False
    return True


class LoggedNginx:
    """One node, replicas as nginx on loopback whose access logs count the
    body bytes sent (the "remote" bytes)."""

    nnodes = 1

    def __init__(self, sc: _scenario.Scenario, data: Materialized, log: Path) -> None:
        from feedline.testing import NginxReplicas

        self.servers = NginxReplicas(
            data.replica_dirs[0], n=sc.replicas.count, extra_config=f"access_log {log};"
        )
        self.servers.start_all()
        self.replicas = ReplicaSet(list(self.servers.urls))

    def commands(self, nproc: int, program: list[str]) -> list[tuple[list[str], dict[str, str]]]:
        return [(ranks.torchrun_argv(nproc, program), {})]

    def figures(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.servers.close()


def body_bytes(log: Path) -> int:
    """Sum of ``$body_bytes_sent`` over nginx's combined-format lines."""
    total = 0
    for line in log.read_text().splitlines():
        fields = line.split('"')
        if len(fields) > 2:
            status_bytes = fields[2].split()
            if len(status_bytes) == 2 and status_bytes[1].isdigit():
                total += int(status_bytes[1])
    return total


def remote_bytes_ratio(tmp: Path, cache: bool) -> tuple[float, dict[str, Any]]:
    """One run in a fresh directory (its own access log and cache)."""
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    sc = _scenario.default()
    # No hedges: a hedge fetches an object twice by design; the figure is
    # what the cache shares between processes.
    options: dict[str, Any] = {"hedge_after_ms": None}
    if cache:
        options |= {"cache_dir": str(tmp / "cache"), "cache_bytes": 1 << 30}
    sc = replace(
        sc,
        systems=("feedline",),
        faults=(),
        events=(),
        sla={},
        feedline=options,
        replicas=replace(sc.replicas, kind="nginx"),
        workload=replace(sc.workload, batch_size=8, steps=None, epochs=EPOCHS),
    )
    log = tmp / f"access-{'cache' if cache else 'none'}.log"
    report = ranks.run(sc, nproc=2, workers=2, agents_factory=lambda s, d: LoggedNginx(s, d, log))
    (system,) = report["systems"]
    assert system["status"] == "ok", system.get("notes")
    assert system["mismatches"] == 0 and system["errors"] == 0
    return body_bytes(log) / report["dataset_bytes"], system


def test_p12_remote_bytes_without_cache(benchmark: Any, tmp_path: Path) -> None:
    from feedline.bench.replicas import nginx_support

    if nginx_support() is not None:
        pytest.skip(f"nginx: {nginx_support()}")
    ratios: list[float] = []
    benchmark.group = "P12 remote bytes"
    benchmark.pedantic(
        lambda: ratios.append(remote_bytes_ratio(tmp_path, cache=False)[0]), rounds=1
    )
    benchmark.extra_info.update({"epochs": EPOCHS, "remote_bytes_over_dataset": ratios})
    print(f"\nP12 remote bytes, no cache, {EPOCHS} epochs: {ratios[0]:.3f}x the dataset")


def test_p12_remote_bytes_with_node_cache(benchmark: Any, tmp_path: Path) -> None:
    from feedline.bench.replicas import nginx_support

    if not has_cache_option():
        pytest.skip("this build of feedline has no cache_dir option (the node cache)")
    if nginx_support() is not None:
        pytest.skip(f"nginx: {nginx_support()}")
    ratios: list[float] = []
    benchmark.group = "P12 remote bytes"
    benchmark.pedantic(
        lambda: ratios.append(remote_bytes_ratio(tmp_path, cache=True)[0]), rounds=ROUNDS
    )
    benchmark.extra_info.update({"epochs": EPOCHS, "remote_bytes_over_dataset": ratios})
    print(
        f"\nP12 remote bytes, 2 ranks sharing the node cache, {EPOCHS} epochs: "
        f"median {statistics.median(ratios):.3f}x the dataset (runs {ratios})"
    )
