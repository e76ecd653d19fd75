"""Ranks: which one this process is, and job-wide figures merged across them.

:func:`find_rank` reads ``torch.distributed`` when a process group is
initialised, else torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.

:class:`RankFigures` is one rank's record: an HDR histogram of the time each
step waited for its batch, compute and stall seconds, counters, and per
replica figures from ``FileSystem.stats()``. :func:`gather_figures` brings
every rank's record to every rank (``all_gather_object`` over the process
group, or through files in a shared directory when there is none) and
:func:`job_figures` merges them: the histograms exactly (HDR buckets, so the
job's p99.9 is the p99.9 of all samples pooled), counters summed, and the
job's AU as MLPerf Storage defines it: compute time over the job's duration,
which is the slowest rank's, averaged over ranks.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedline._core import LatencyHistogram

if TYPE_CHECKING:
    from feedline.fs import FileSystem

#: Percentiles reported job-wide, as (name, percentile).
PERCENTILES = (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("p99.9_ms", 99.9))


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not an integer") from exc


def find_rank() -> Rank | None:
    """This process's rank, or ``None`` outside a distributed job."""
    dist = sys.modules.get("torch.distributed")
    local = _env_int("LOCAL_RANK")
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, world = int(dist.get_rank()), int(dist.get_world_size())
        return Rank(rank, world, rank if local is None else local)
    env_rank, env_world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if env_rank is None or env_world is None:
        return None
    if not 0 <= env_rank < env_world:
        raise ValueError(f"RANK={env_rank} is outside WORLD_SIZE={env_world}")
    return Rank(env_rank, env_world, env_rank if local is None else local)


@dataclass
class RankFigures:
    """One rank's figures. Record each step with :meth:`record_step`; set
    ``duration_s`` (the rank's wall time) and, optionally, ``replicas``
    (``fs.stats()["replicas"]``) and ``counters`` before gathering."""

    rank: int = 0
    local_rank: int = 0
    host: str = field(default_factory=socket.gethostname)
    duration_s: float = 0.0
    compute_s: float = 0.0
    stall_s: float = 0.0
    steps: int = 0
    #: Per step: how long it waited for its batch.
    wait: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: More latencies by name (a bench Recorder's ``latency`` of reads, ...).
    histograms: dict[str, LatencyHistogram] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    replicas: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def here(cls) -> RankFigures:
        found = find_rank() or Rank(0, 1, 0)
        return cls(rank=found.rank, local_rank=found.local_rank)

    def record_step(self, wait_s: float, compute_s: float) -> None:
        if wait_s < 0 or compute_s < 0:
            raise ValueError(f"step times must be >= 0, got {wait_s=} {compute_s=}")
        self.wait.record_us(round(wait_s * 1e6))
        self.stall_s += wait_s
        self.compute_s += compute_s
        self.steps += 1

    def record_storage(self, fs: FileSystem) -> None:
        """Adds ``fs``'s end-to-end read latencies (the core's own HDR
        histogram, so they merge exactly) as ``histograms["read"]``, and its
        per-replica figures as ``replicas``. Call it in the process that
        read: a DataLoader worker's reads stay in that worker."""
        hist = fs._storage.latency_histogram()
        if hist is not None:
            self.histograms.setdefault("read", LatencyHistogram()).merge(hist)
        self.replicas = [dict(r) for r in fs.stats()["replicas"]]

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("wait", "histograms")}
        out["wait"] = _encode(self.wait)
        out["histograms"] = {name: _encode(h) for name, h in self.histograms.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankFigures:
        fields = dict(data)
        wait = _decode(fields.pop("wait"))
        histograms = {name: _decode(h) for name, h in fields.pop("histograms", {}).items()}
        return cls(wait=wait, histograms=histograms, **fields)


def _encode(hist: LatencyHistogram) -> str:
    return base64.b64encode(hist.to_bytes()).decode("ascii")


def _decode(text: str) -> LatencyHistogram:
    return LatencyHistogram.from_bytes(base64.b64decode(text))


def _percentiles(hist: LatencyHistogram) -> dict[str, float]:
    return {"count": hist.count} | {name: hist.percentile_ms(p) for name, p in PERCENTILES}


def gather_figures(
    mine: RankFigures, directory: str | os.PathLike[str] | None = None, timeout_s: float = 60.0
) -> list[RankFigures]:
    """Every rank's figures, in rank order, on every rank. Over the process
    group when one is initialised (a collective: every rank must call it);
    else each rank writes ``rank-N.json`` into ``directory`` and waits (at
    most ``timeout_s``) for the others'."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine.to_json())
        return [RankFigures.from_json(g) for g in gathered]
    if directory is None:
        found = find_rank()
        if found is not None and found.world_size > 1:
            raise ValueError(
                f"rank {found.rank} of {found.world_size} has no process group: "
                "pass a directory every rank can reach"
            )
        return [mine]
    world = (find_rank() or Rank(0, 1, 0)).world_size
    return _gather_files(mine, Path(directory), world, timeout_s)


def _gather_files(
    mine: RankFigures, directory: Path, world: int, timeout_s: float
) -> list[RankFigures]:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".rank-{mine.rank}.json.tmp"
    tmp.write_text(json.dumps(mine.to_json()))
    tmp.replace(directory / f"rank-{mine.rank}.json")  # readers never see half a file
    deadline = time.monotonic() + timeout_s
    paths = [directory / f"rank-{r}.json" for r in range(world)]
    while True:
        missing = [r for r, p in enumerate(paths) if not p.exists()]
        if not missing:
            return [RankFigures.from_json(json.loads(p.read_text())) for p in paths]
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"ranks {missing} wrote no figures into {str(directory)!r} within {timeout_s} s"
            )
        time.sleep(0.05)


def job_figures(ranks: list[RankFigures]) -> dict[str, Any]:
    """The job's figures from every rank's (see the module doc)."""
    if not ranks:
        raise ValueError("job_figures needs the figures of at least one rank")
    wait = LatencyHistogram()
    histograms: dict[str, LatencyHistogram] = {}
    counters: dict[str, float] = {}
    for r in ranks:
        wait.merge(r.wait)
        for name, hist in r.histograms.items():
            histograms.setdefault(name, LatencyHistogram()).merge(hist)
        for name, value in r.counters.items():
            counters[name] = counters.get(name, 0) + value
    slowest = max(ranks, key=lambda r: r.duration_s)
    duration_s = slowest.duration_s
    au = sum(r.compute_s for r in ranks) / (len(ranks) * duration_s) if duration_s > 0 else 0.0
    return {
        "ranks": len(ranks),
        "duration_s": duration_s,
        "au": au,
        "steps": sum(r.steps for r in ranks),
        "compute_s": sum(r.compute_s for r in ranks),
        "stall_s": sum(r.stall_s for r in ranks),
        "stall_s_max": max(r.stall_s for r in ranks),
        "wait": _percentiles(wait),
        "latency": {name: _percentiles(h) for name, h in sorted(histograms.items())},
        "counters": counters,
        "slowest_rank": {"rank": slowest.rank, "host": slowest.host, "duration_s": duration_s},
        "slowest_replica": _slowest_replica(ranks),
    }


def _slowest_replica(ranks: list[RankFigures]) -> dict[str, Any] | None:
    """The replica with the highest p99.9 any rank saw (each rank's stats
    carry percentiles, not buckets, so this names it; it does not merge)."""
    worst: dict[str, Any] | None = None
    for r in ranks:
        for stats in r.replicas:
            p999 = float(stats.get("latency", {}).get("p99.9_ms", 0.0))
            if worst is None or p999 > worst["p99.9_ms"]:
                worst = {"replica": stats.get("name"), "rank": r.rank, "p99.9_ms": p999}
    return worst
