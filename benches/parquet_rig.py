"""The rig the Parquet benches share: the generated P10 dataset, and 3 real
nginx replicas each behind a fault proxy in its own process, so that
feedline and the plain pyarrow+fsspec path see the same faults.

The proxies run as ``feedline proxy`` processes (as in the network bench):
an in-process proxy would run on feedline's own tokio runtime and compete
with the client under test for its threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from feedline.testing import NginxReplicas
from feedline.testing.proxy_cli import proxy_processes

MiB = 1 << 20
GiB = 1 << 30
COLUMNS = [f"c{i}" for i in range(8)]
ROW_GROUPS = 64
FILES = 8

#: Per request on every replica: 5 ms +- 2 ms. On the upstream direction a
#: proxy chunk is one request, so this delays each request once.
WAN = "latency:name=wan,direction=upstream,latency_ms=5,jitter_ms=2"
#: The spiky replica: 5% of its requests wait 100 ms more.
SPIKE = "latency:name=spike,direction=upstream,latency_ms=100,toxicity=0.05"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def write_dataset(root: Path, total_bytes: int) -> tuple[list[Path], int]:
    """8 files of 8 float64 columns, 64 row groups in all, about
    ``total_bytes`` (kept when ``root/DONE`` exists). Returns the paths and
    the row count."""
    rows = max(ROW_GROUPS * 64, total_bytes // (8 * len(COLUMNS)))
    rg_rows = rows // ROW_GROUPS
    per_file = rg_rows * (ROW_GROUPS // FILES)
    done = root / "DONE"
    paths = [root / f"part-{f:02d}.parquet" for f in range(FILES)]
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(10)
        for path in paths:
            table = pa.table({c: rng.random(per_file) for c in COLUMNS})
            pq.write_table(table, path, row_group_size=rg_rows)
        done.write_text("ok\n")
    return paths, per_file * FILES


@contextlib.contextmanager
def dataset(env_dir: str, total_bytes: int) -> Iterator[tuple[list[Path], int]]:
    """The dataset in ``$env_dir`` (kept between runs) or in a temporary
    directory removed on exit, also on failure."""
    keep = os.environ.get(env_dir)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="feedline-p10-"))
    try:
        yield write_dataset(root, total_bytes)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


@dataclass
class ProxiedReplicas:
    """The proxies' URLs, in replica order, and the servers' pids."""

    urls: list[str]
    proxy_pids: list[int]
    nginx_groups: list[int]

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by the proxies and by nginx: the share of
        the machine the storage side takes, whichever client reads."""
        nginx = [p for g in self.nginx_groups for p in _group_pids(g)]
        return {
            "proxies": sum(_cpu_s(p) for p in self.proxy_pids),
            "nginx": sum(_cpu_s(p) for p in nginx),
        }


@contextlib.contextmanager
def proxied_replicas(root: Path, toxics: list[list[str]]) -> Iterator[ProxiedReplicas]:
    """3 nginx replicas serving ``root``, each behind its proxy process."""
    with NginxReplicas(root, len(toxics)) as replicas:
        upstreams = [u.removeprefix("http://") for u in replicas.urls]
        with proxy_processes(upstreams, toxics) as procs:
            yield ProxiedReplicas([u for _, u in procs], [p for p, _ in procs], replicas.pids)


class ColumnDigest:
    """BLAKE2b of each column's values in row order: equal digests mean the
    same rows in the same order, however the rows were cut into batches."""

    def __init__(self) -> None:
        self._hash: dict[str, hashlib.blake2b] = {}
        self.rows = 0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        for name, array in batch.items():
            h = self._hash.get(name) or self._hash.setdefault(name, hashlib.blake2b())
            h.update(np.ascontiguousarray(array).data.cast("B"))
        self.rows += len(next(iter(batch.values())))

    def digest(self) -> dict[str, str]:
        return {name: h.hexdigest()[:16] for name, h in sorted(self._hash.items())}
