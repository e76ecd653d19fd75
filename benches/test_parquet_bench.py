"""P10: Parquet batches into numpy through ``ParquetStream`` vs pyarrow's own
``ParquetFile.iter_batches``, on local files, as a ratio measured in one run;
and the bytes a 2-of-8-column projection asks of storage.

Sizes come from the environment: ``FEEDLINE_P10_BYTES`` (default 2 GiB, 8
float64 columns, >= 64 row groups), ``FEEDLINE_P10_ROUNDS`` (default 5),
``FEEDLINE_P10_DIR`` (where the generated dataset is kept between runs).

The HTTP variant (3 nginx replicas behind the fault proxy vs fsspec's HTTP
filesystem with ``fsspec.parquet.open_parquet_file``) needs the replica and
remote-store work of other issues; it is skipped here until that lands.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feedline.arrow import ParquetStream

MiB = 1 << 20
GiB = 1 << 30
COLUMNS = [f"c{i}" for i in range(8)]
BATCH_ROWS = 65536
ROW_GROUPS = 64
FILES = 8


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _dataset() -> tuple[list[Path], int]:
    total = _env_int("FEEDLINE_P10_BYTES", 2 * GiB)
    rows = max(ROW_GROUPS * 64, total // (8 * len(COLUMNS)))
    rg_rows = rows // ROW_GROUPS
    per_file = rg_rows * (ROW_GROUPS // FILES)
    root = Path(
        os.environ.get("FEEDLINE_P10_DIR") or Path(tempfile.gettempdir()) / f"feedline-p10-{total}"
    )
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


def _feedline(paths: list[Path], columns: list[str] | None) -> tuple[int, int]:
    batches = rows = 0
    for batch in ParquetStream(
        [str(p) for p in paths], columns=columns, batch_rows=BATCH_ROWS
    ).numpy():
        batches += 1
        rows += len(next(iter(batch.values())))
    return batches, rows


def _pyarrow(paths: list[Path], columns: list[str] | None) -> tuple[int, int]:
    batches = rows = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            arrays = {
                n: c.to_numpy(zero_copy_only=False)
                for n, c in zip(batch.schema.names, batch.columns, strict=True)
            }
            batches += 1
            rows += len(next(iter(arrays.values())))
    return batches, rows


def _timed(fn: Callable[[], tuple[int, int]]) -> tuple[float, float, int, int]:
    """Wall seconds, process CPU seconds (all threads), batches, rows."""
    cpu = time.process_time()
    start = time.perf_counter()
    batches, rows = fn()
    return time.perf_counter() - start, time.process_time() - cpu, batches, rows


def test_p10_local_batches_per_second(benchmark: Any) -> None:
    paths, total_rows = _dataset()
    nbytes = sum(p.stat().st_size for p in paths)
    rounds = _env_int("FEEDLINE_P10_ROUNDS", 5)
    # Warm the page cache once for both, then alternate them so drift in a
    # noisy machine hits both alike.
    _pyarrow(paths, None)
    _feedline(paths, None)
    ours: list[float] = []
    theirs: list[float] = []
    # CPU seconds per GiB: steadier than wall time on a shared machine.
    ours_cpu: list[float] = []
    theirs_cpu: list[float] = []
    for _ in range(rounds):
        t, cpu, b_ours, rows = _timed(lambda: _feedline(paths, None))
        assert rows == total_rows
        ours.append(b_ours / t)
        ours_cpu.append(cpu / (nbytes / GiB))
        t, cpu, b_theirs, rows = _timed(lambda: _pyarrow(paths, None))
        assert rows == total_rows
        theirs.append(b_theirs / t)
        theirs_cpu.append(cpu / (nbytes / GiB))
    ratio = statistics.median(ours) / statistics.median(theirs)
    cpu_ratio = statistics.median(theirs_cpu) / statistics.median(ours_cpu)
    benchmark.extra_info.update(
        {
            "dataset_bytes": nbytes,
            "row_groups": ROW_GROUPS,
            "feedline_batches_per_s": statistics.median(ours),
            "pyarrow_batches_per_s": statistics.median(theirs),
            "feedline_gib_per_s": statistics.median(ours) * nbytes / b_ours / GiB,
            "pyarrow_gib_per_s": statistics.median(theirs) * nbytes / b_theirs / GiB,
            "ratio": ratio,
            "feedline_cpu_s_per_gib": statistics.median(ours_cpu),
            "pyarrow_cpu_s_per_gib": statistics.median(theirs_cpu),
            "cpu_ratio": cpu_ratio,
            "rounds_batches_per_s": {"feedline": ours, "pyarrow": theirs},
        }
    )
    print(
        f"\nP10 local: {nbytes / GiB:.2f} GiB, {ROW_GROUPS} row groups, {rounds} rounds: "
        f"ParquetStream {statistics.median(ours):.1f} batches/s, "
        f"pyarrow iter_batches {statistics.median(theirs):.1f} batches/s, ratio {ratio:.2f}x; "
        f"CPU s/GiB {statistics.median(ours_cpu):.2f} vs {statistics.median(theirs_cpu):.2f} "
        f"(pyarrow/feedline {cpu_ratio:.2f}x); rounds: feedline "
        f"{[round(x) for x in ours]}, pyarrow {[round(x) for x in theirs]}"
    )
    benchmark.pedantic(lambda: _feedline(paths, None), rounds=1, iterations=1)


def test_p10_projection_reads_at_most_30_percent(benchmark: Any) -> None:
    paths, total_rows = _dataset()
    nbytes = sum(p.stat().st_size for p in paths)
    stream = ParquetStream([str(p) for p in paths], columns=["c1", "c6"], batch_rows=BATCH_ROWS)

    def run() -> int:
        return sum(len(b["c1"]) for b in stream.numpy())

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    assert rows == total_rows
    share = stream.bytes_requested / nbytes
    benchmark.extra_info.update({"bytes_requested": stream.bytes_requested, "share": share})
    print(f"\nP10 projection 2 of 8 columns: {share:.1%} of {nbytes / GiB:.2f} GiB requested")
    assert stream.fallback_reads == 0
    assert share <= 0.30


@pytest.mark.skip(reason="needs nginx replicas + fault proxy (other issues); not built yet")
def test_p10_http_replicas_vs_fsspec() -> None:
    raise AssertionError("unreachable")
