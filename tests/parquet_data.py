"""Small Parquet datasets for the arrow and torch tests, written with pyarrow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_dataset(
    root: Path,
    *,
    files: int = 3,
    rows_per_file: int = 1000,
    row_group_rows: int = 100,
    columns: int = 7,
    seed: int = 0,
) -> list[Path]:
    """``files`` Parquet files whose ``row_id`` column numbers the rows
    0..N-1 across files, plus ``columns`` float64 columns c0.."""
    rng = np.random.default_rng(seed)
    paths = []
    for f in range(files):
        ids = np.arange(f * rows_per_file, (f + 1) * rows_per_file, dtype=np.int64)
        data = {"row_id": ids}
        for c in range(columns):
            data[f"c{c}"] = rng.random(rows_per_file)
        path = root / f"part-{f:03d}.parquet"
        pq.write_table(pa.table(data), path, row_group_size=row_group_rows)
        paths.append(path)
    return paths
