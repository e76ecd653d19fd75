"""One rank of ``feedline bench --nproc N``: ``python -m feedline.bench.rank SPEC``
under torchrun (gloo, CPU).

The rank reads its shard of the scenario's batch plan through a real
``DataLoader`` with ``workers`` worker processes: global batch ``i`` goes to
rank ``i % world_size`` and, within the rank, the DataLoader deals it to
worker ``(i // world_size) % workers``, so every planned batch is read once
across ranks x workers. Each worker builds the system (``feedline``: a
``feedline.FileSystem``; ``fsspec``...: the single-process bench's reader)
and reads its batch's samples with ``[workload] readers`` threads, checking
each against the manifest. The main process is the training loop: it waits
for the batch (stall), then computes for the scenario's compute time.

All ranks start measuring after a barrier. Each writes its row to
``out/rank-N.json``; the figures are gathered over the process group and
rank 0 writes the job's (:func:`feedline.distributed.job_figures`) to
``out/job.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from feedline.bench.dataset import Materialized
from feedline.bench.metrics import Recorder, StepTiming
from feedline.bench.scenario import Scenario
from feedline.bench.systems import System, fault_plan, make_system
from feedline.bench.workload import Sample, compute_draw, manifest_verifier, sleep_until
from feedline.distributed import RankFigures, gather_figures, job_figures

#: Name of the file rank 0 writes when every rank is ready to measure.
STARTED = "started"
#: How long ranks wait for each other in collectives.
GROUP_TIMEOUT_S = 120
#: A DataLoader batch that takes longer than this is a hung worker.
BATCH_TIMEOUT_S = 300

# A read as a worker ships it: (key, start, end (perf_counter), bytes, verified, error);
# the bytes themselves travel in the batch's one tensor.
ReadRecord = tuple[str, float, float, int, bool | None, str | None]


@dataclass
class RankSpec:
    """What the launcher hands every rank (pickled into a file)."""

    scenario: Scenario
    data: Materialized
    roots: list[str]
    system: str
    workers: int
    out: str


def shard(batches: list[list[Sample]], rank: int, world_size: int) -> list[list[Sample]]:
    """This rank's batches: global batch ``i`` belongs to rank ``i % world_size``."""
    return batches[rank::world_size]


class BatchReads(Dataset[dict[str, Any]]):
    """Item ``j`` is this rank's batch ``j``, read in the DataLoader worker
    that fetches it through that worker's own system."""

    def __init__(self, spec: RankSpec, batches: list[list[Sample]]) -> None:
        self.spec = spec
        self.batches = batches
        self._system: System | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def _setup(self) -> System:
        # In the worker: its own system and chaos (never shared across a fork).
        sc = self.spec.scenario
        chaos = fault_plan(sc).per_replica
        system = make_system(self.spec.system, sc, self.spec.data, chaos, self.spec.roots)
        self._system = system
        self._pool = ThreadPoolExecutor(max_workers=sc.workload.readers)
        self._verify = manifest_verifier(self.spec.data)
        return system

    def _read(self, sample: Sample) -> tuple[ReadRecord, bytes]:
        assert self._system is not None
        start = time.perf_counter()
        try:
            payload = self._system.read(*sample)
        except Exception as exc:  # errors that reach the consumer are a measured figure
            end = time.perf_counter()
            error = f"{sample[0]}: {type(exc).__name__}: {exc}"[:300]
            return (sample[0], start, end, 0, None, error), b""
        end = time.perf_counter()
        return (sample[0], start, end, len(payload), self._verify(sample, payload), None), payload

    def __getitem__(self, j: int) -> dict[str, Any]:
        system = self._system or self._setup()
        assert self._pool is not None
        done = list(self._pool.map(self._read, self.batches[j]))
        # One tensor per batch, as a collated batch would be: one shared-memory
        # hand-off to the training loop instead of one per sample.
        data = torch.empty(sum(len(p) for _, p in done), dtype=torch.uint8)
        view = data.numpy()
        offset = 0
        for _, payload in done:
            view[offset : offset + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
            offset += len(payload)
        reads = [record for record, _ in done]
        return {"reads": reads, "data": data, "pid": os.getpid(), "stats": system.stats()}


def _keep(batch: Any) -> Any:
    return batch


def _die_with_parent() -> None:
    """SIGKILL this process when its torchrun agent dies (Linux), so a
    killed launcher leaves no rank behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_rank(spec: RankSpec) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        _measure(spec, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _measure(spec: RankSpec, rank: int, world: int) -> None:
    from feedline.bench.workload import plan_batches

    sc = spec.scenario
    out = Path(spec.out)
    mine = shard(plan_batches(sc, spec.data), rank, world)
    workers = spec.workers
    prefetch = sc.workload.prefetch_batches
    loader = DataLoader(
        BatchReads(spec, mine),
        batch_size=None,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=max(1, math.ceil((prefetch + 1) / workers)) if workers else None,
        multiprocessing_context="fork" if workers else None,
        timeout=BATCH_TIMEOUT_S if workers else 0,
    )
    iterator = iter(loader)  # starts the workers before the clock does
    dist.barrier()
    if rank == 0:
        (out / STARTED).write_text(str(time.time()))
    rec = Recorder()
    compute = compute_draw(sc.workload.compute, sc.seed * 1000 + rank)
    delivered: list[str] = []
    stats: dict[int, Any] = {}
    duration_limit = sc.load.duration_s or math.inf
    for _ in range(len(mine)):
        if rec.now_s() >= duration_limit:
            break
        wait_start = rec.now_s()
        batch = next(iterator)
        ready_at = time.perf_counter()
        c = compute()
        for key, start, end, nbytes, verified, error in batch["reads"]:
            rec.record_read(
                latency_s=end - start,
                end_s=end - rec.t0,
                nbytes=nbytes,
                ok=error is None,
                verified=verified,
                error=error,
            )
            if error is None:
                delivered.append(key)
        stats[batch["pid"]] = batch["stats"]
        sleep_until(ready_at + c, threading.Event())
        rec.record_step(StepTiming(wait_start, ready_at - rec.t0, c))
    rec.end_s = rec.now_s()
    del iterator
    row = _row(spec, rank, rec, delivered, stats)
    (out / f"rank-{rank}.json").write_text(json.dumps(row))
    gathered = gather_figures(_figures(rank, rec, stats))
    if rank == 0:
        job = {"job": job_figures(gathered), "figures": [f.to_json() for f in gathered]}
        (out / "job.json").write_text(json.dumps(job))


def _replicas(stats: dict[int, Any]) -> list[dict[str, Any]]:
    """Every worker's per-replica figures (feedline's router counts them)."""
    out: list[dict[str, Any]] = []
    for s in stats.values():
        out.extend((s or {}).get("replicas", {}).values())
    return out


def _totals(stats: dict[int, Any]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for s in stats.values():
        for name, value in (s or {}).get("totals", {}).items():
            if isinstance(value, int | float):
                totals[name] = totals.get(name, 0) + value
    return totals


def _figures(rank: int, rec: Recorder, stats: dict[int, Any]) -> RankFigures:
    """This rank's record for the job figures, with MLPerf's first step left
    out (it carries the pipeline's warm-up) as the single-process AU does."""
    figures = RankFigures.here()
    figures.rank = rank
    figures.host = node_name()
    steps = rec.steps
    for s in steps[1:]:
        figures.record_step(s.stall_s, s.compute_s)
    figures.duration_s = steps[-1].end_s - steps[0].end_s if len(steps) > 1 else 0.0
    figures.histograms["read"] = rec.latency
    figures.counters = _totals(stats) | {
        "samples": rec.samples,
        "bytes": rec.bytes,
        "errors": rec.errors,
        "mismatches": rec.mismatches,
        "verified_bytes": rec.verified_bytes,
    }
    figures.replicas = _replicas(stats)
    return figures


def node_name() -> str:
    """The node this rank runs on: ``FEEDLINE_NODE`` (the two-namespace
    rig sets it; the namespaces share one hostname), else the hostname."""
    return os.environ.get("FEEDLINE_NODE") or socket.gethostname()


def _row(
    spec: RankSpec, rank: int, rec: Recorder, delivered: list[str], stats: dict[int, Any]
) -> dict[str, Any]:
    result = rec.result(spec.scenario.percentiles)
    result.pop("timeline", None)
    return {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "node": node_name(),
        "workers": spec.workers,
        "worker_pids": sorted(stats),
        **result,
        **{k: v for k, v in _totals(stats).items() if k != "errors"},
        "delivered": delivered,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m feedline.bench.rank SPEC", file=sys.stderr)
        return 2
    _die_with_parent()
    with open(argv[1], "rb") as f:
        spec = pickle.load(f)  # written by this rank's launcher (feedline.bench.ranks)
    if not isinstance(spec, RankSpec):
        print(f"error: {argv[1]} holds no RankSpec", file=sys.stderr)
        return 2
    run_rank(spec)
    return 0


if __name__ == "__main__":
    # The spec pickles feedline.bench.rank.RankSpec: run that module's copy.
    from feedline.bench import rank as _rank

    sys.exit(_rank.main(sys.argv))
