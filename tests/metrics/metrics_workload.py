"""What DataLoader workers run in the metrics tests: hedged reads over
three local replicas (one spiky) and a prefetching stream whose consumer
waits, each worker reporting the figures its own process counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
from feedline import _core
from feedline.chaos import Chaos, Fixed
from torch.utils.data import IterableDataset, get_worker_info

OBJ_BYTES = 16 * 1024


def make_replicas(root: Path, objects: int) -> tuple[list[str], list[str]]:
    """Three replica directories holding the same `objects` keys."""
    keys = [f"obj-{i:03}.bin" for i in range(objects)]
    roots = []
    for r in range(3):
        d = root / f"replica-{r}"
        d.mkdir(parents=True)
        for i, key in enumerate(keys):
            (d / key).write_bytes(bytes([i % 251]) * OBJ_BYTES)
        roots.append(str(d))
    return roots, keys


def filesystem(roots: list[str]) -> feedline.FileSystem:
    """Replica 1 spikes (hedged around); every read is slow enough that a
    stream's consumer waits for its next chunk."""
    return feedline.FileSystem(
        replicas=roots,
        hedge_after_ms=20,
        chaos={
            0: Chaos(latency=Fixed(2)),
            1: Chaos(latency=Fixed(2), spike_probability=0.2, spike_ms=150, seed=3),
            2: Chaos(latency=Fixed(2)),
        },
        skip_instance_cache=True,
    )


def local_figures() -> dict[str, float]:
    """This process's own figures, straight from the core (no files),
    summed over label sets."""
    out: dict[str, float] = {}
    for name, _labels, value in _core.metrics_snapshot():
        if isinstance(value, _core.LatencyHistogram):
            out[f"{name}_count"] = out.get(f"{name}_count", 0.0) + value.count
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def read_share(roots: list[str], keys: list[str], share: list[str]) -> dict[str, Any]:
    """Reads `share` through the replicas and streams it; returns what this
    process counted and how long its consumer saw itself wait."""
    fs = filesystem(roots)
    for key in share:
        assert fs.cat_file(key) == Path(roots[0], key).read_bytes()
    waited = 0.0
    stream = fs.stream(share, chunk_bytes=OBJ_BYTES, depth=1)
    while True:
        t0 = time.perf_counter()
        chunk = next(stream, None)
        waited += time.perf_counter() - t0
        if chunk is None:
            break
        assert len(chunk) == OBJ_BYTES
        del chunk
    stats = fs.stats()
    return {
        "reads": stats["reads"],
        "hedges_won": sum(r["hedges_won"] for r in stats["replicas"]),
        "hedges_sent": sum(r["hedges_sent"] for r in stats["replicas"]),
        "requests": sum(r["requests"] for r in stats["replicas"]),
        "python_waited_s": waited,
        "figures": local_figures(),
    }


class WorkerReads(IterableDataset[dict[str, Any]]):
    """An iterable dataset: each DataLoader worker reads its share of the
    keys and yields one report of its own figures."""

    def __init__(self, roots: list[str], keys: list[str]) -> None:
        super().__init__()
        self.roots = roots
        self.keys = keys

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        report = read_share(self.roots, self.keys, self.keys[wid::n])
        report["pid"] = __import__("os").getpid()
        yield report
