"""Datasets for a bench run: generated objects (raw bytes or Parquet) on N
replica directories with a CRC32C manifest, or an existing directory with its
manifest. The harness verifies every byte a system delivers against it."""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedline.bench.scenario import Dataset, Scenario, ScenarioError

#: Name of the manifest the harness writes (one JSON object per dataset).
MANIFEST_NAME = "feedline-manifest.json"


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C via the Rust core (the same code manifests use)."""
    from feedline import _core

    return int(_core.crc32c(data, value))


@dataclass
class Materialized:
    """A dataset on disk: keys, sizes, checksums and the replica roots."""

    keys: list[str]
    sizes: dict[str, int]
    checksums: dict[str, int]
    replica_dirs: list[str]
    manifest_path: str
    workdir: str | None = None  # removed by cleanup() when the harness made it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def cleanup(self) -> None:
        if self.workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None


def object_sizes(ds: Dataset) -> list[int]:
    rng = random.Random(ds.seed)
    if ds.size_distribution == "fixed":
        return [ds.size_bytes] * ds.objects
    if ds.size_distribution == "uniform":
        return [rng.randint(ds.size_min_bytes, ds.size_max_bytes) for _ in range(ds.objects)]
    mu = math.log(ds.size_bytes)
    # Clamp the tail so one object cannot eat the disk: 64x the median.
    return [
        max(1, min(int(rng.lognormvariate(mu, ds.size_sigma)), 64 * ds.size_bytes))
        for _ in range(ds.objects)
    ]


def check_fits(scenario: Scenario, workdir: str | None = None) -> None:
    """Refuses a generated dataset this machine cannot hold: each object is
    built in memory (at most half of RAM), the replicas share one copy on
    the disk under ``workdir`` (default: the temp directory), one file each."""
    ds = scenario.dataset
    if not ds.generated:
        return
    largest = {
        "fixed": ds.size_bytes,
        "uniform": ds.size_max_bytes,
        # The lognormal tail is clamped there (see object_sizes).
        "lognormal": 64 * ds.size_bytes,
    }.get(ds.size_distribution, ds.size_bytes)
    # Expected bytes on disk: the mean size, times the objects.
    mean = {
        "uniform": (ds.size_min_bytes + ds.size_max_bytes) / 2,
        "lognormal": min(ds.size_bytes * math.exp(min(ds.size_sigma, 10.0) ** 2 / 2), largest),
    }.get(ds.size_distribution, ds.size_bytes)
    where = workdir or tempfile.gettempdir()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disk = shutil.disk_usage(where)
    inodes = os.statvfs(where).f_favail
    source = f"{scenario.source}: [dataset]"
    if largest > memory // 2:
        raise ScenarioError(
            f"{source} objects of up to {largest:,} bytes are built in memory, and this machine "
            f"has {memory:,} bytes of RAM: use objects of at most {memory // 2:,} bytes"
        )
    if ds.objects * mean > disk.free:
        raise ScenarioError(
            f"{source} {ds.objects:,} objects of ~{int(mean):,} bytes need "
            f"~{int(ds.objects * mean):,} bytes, and {where} has {disk.free:,} free"
        )
    # statvfs reports 0 free inodes on filesystems without a fixed table.
    if inodes and ds.objects > inodes:
        raise ScenarioError(
            f"{source} {ds.objects:,} objects need a file each, and {where} has room for "
            f"{inodes:,} more files"
        )


def _parquet_bytes(rng: random.Random, size: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One binary column of incompressible rows sized so the file is close to
    # `size` (random bytes do not compress, so file size ~ payload).
    row_bytes = 4096
    rows = max(1, size // row_bytes)
    col = pa.array([rng.randbytes(row_bytes) for _ in range(rows)], type=pa.binary())
    sink = io.BytesIO()
    pq.write_table(pa.table({"sample": col}), sink, compression="none")
    return sink.getvalue()


def _key(i: int, fmt: str) -> str:
    # Two-level layout, like sharded training data.
    ext = "parquet" if fmt == "parquet" else "bin"
    return f"shard-{i // 256:04d}/sample-{i:06d}.{ext}"


def generate(scenario: Scenario, workdir: str | None = None) -> Materialized:
    """Writes the scenario's generated dataset into ``count`` replica dirs."""
    ds = scenario.dataset
    n = scenario.replicas.count
    base = workdir or tempfile.mkdtemp(prefix="feedline-bench-")
    rng = random.Random(ds.seed)
    sizes = object_sizes(ds)
    dirs = [os.path.join(base, f"replica-{i}") for i in range(n)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    keys: list[str] = []
    size_of: dict[str, int] = {}
    sums: dict[str, int] = {}
    try:
        for i, size in enumerate(sizes):
            key = _key(i, ds.format)
            data = _parquet_bytes(rng, size) if ds.format == "parquet" else rng.randbytes(size)
            first = os.path.join(dirs[0], key)
            os.makedirs(os.path.dirname(first), exist_ok=True)
            with open(first, "wb") as f:
                f.write(data)
            for d in dirs[1:]:
                target = os.path.join(d, key)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Replicas hold the same bytes; a hard link saves disk and
                # time. Faults are injected in-process, never on the files.
                try:
                    os.link(first, target)
                except OSError:
                    shutil.copyfile(first, target)
            keys.append(key)
            size_of[key] = len(data)
            sums[key] = crc32c(data)
        manifest = write_manifest_json(base, sums, size_of)
    except BaseException:
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        raise
    return Materialized(
        keys, size_of, sums, dirs, manifest, workdir=base if workdir is None else None
    )


def write_manifest_json(base: str, sums: dict[str, int], sizes: dict[str, int]) -> str:
    path = os.path.join(base, MANIFEST_NAME)
    doc = {
        "algorithm": "crc32c",
        "objects": {k: {"size": sizes[k], "crc32c": f"{sums[k]:08x}"} for k in sorted(sums)},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return path


def read_manifest(path: str) -> dict[str, tuple[int | None, int]]:
    """Reads a manifest into {key: (size or None, crc32c)}.

    Accepts the harness's own format, and ``feedline.write_manifest``'s as far
    as it is a JSON object mapping keys to a checksum (an int, a hex string, or
    a table with ``crc32c`` and optionally ``size``), possibly under ``objects``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read manifest: {exc}") from None
    entries = doc.get("objects", doc) if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise ScenarioError(f"{path}: a manifest is a JSON object of key -> crc32c")
    out: dict[str, tuple[int | None, int]] = {}
    for key, v in entries.items():
        size: int | None = None
        if isinstance(v, dict):
            size = v.get("size")
            v = v.get("crc32c")
        try:
            crc = int(v, 16) if isinstance(v, str) else int(v)
        except (TypeError, ValueError):
            raise ScenarioError(f"{path}: {key!r}: malformed crc32c {v!r}") from None
        out[key] = (size if isinstance(size, int) else None, crc)
    return out


def existing(scenario: Scenario) -> Materialized:
    """An existing dataset: ``path`` is replica 0 (or [replicas] dirs)."""
    ds = scenario.dataset
    assert ds.path is not None and ds.manifest is not None
    manifest = read_manifest(ds.manifest)
    dirs = list(scenario.replicas.dirs) or [ds.path] * scenario.replicas.count
    keys = sorted(manifest)
    sizes: dict[str, int] = {}
    for key in keys:
        p = Path(dirs[0]) / key
        if not p.is_file():
            raise ScenarioError(f"{ds.manifest}: names {key!r}, missing under {dirs[0]}")
        sizes[key] = p.stat().st_size
    return Materialized(keys, sizes, {k: manifest[k][1] for k in keys}, dirs, ds.manifest)


def materialize(scenario: Scenario, workdir: str | None = None) -> Materialized:
    if scenario.dataset.generated:
        return generate(scenario, workdir)
    return existing(scenario)
