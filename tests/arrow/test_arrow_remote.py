"""ParquetStream over real nginx replicas (URL roots): the same rows as
pyarrow reads locally, footers and sizes from concurrent HEADs, missing
keys named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import feedline
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feedline import arrow
from feedline.arrow import ParquetStream
from feedline.testing import NginxReplicas
from parquet_data import write_dataset

pytestmark = pytest.mark.nginx


def test_replicas_deliver_the_rows_pyarrow_reads_locally(
    tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    # More files than the concurrent info calls (INFO_THREADS), so the
    # sizes come back from several waves in order.
    files = arrow.INFO_THREADS + 4
    paths = write_dataset(tmp_path, files=files, rows_per_file=120, row_group_rows=40, columns=2)
    replicas = nginx_replicas(tmp_path, 3)
    fs = feedline.FileSystem(replicas.urls)
    keys = [p.name for p in paths]
    arrow._FOOTER_CACHE.clear()
    stream = ParquetStream(keys, fs=fs, columns=["row_id", "c1"], batch_rows=50)
    assert stream._sizes == [p.stat().st_size for p in paths]
    got = pa.Table.from_batches(list(stream))
    want = pa.concat_tables(pq.read_table(p, columns=["row_id", "c1"]) for p in paths)
    assert got.equals(want)
    assert stream.fallback_reads == 0
    # Shuffled and sharded over 2 ranks: every row once.
    seen = [
        int(i)
        for rank in range(2)
        for b in ParquetStream(keys, fs=fs, shuffle=True, seed=3, rank=rank, world_size=2).numpy()
        for i in b["row_id"]
    ]
    assert sorted(seen) == list(range(files * 120))


def test_a_missing_key_on_the_replicas_is_named(
    tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    paths = write_dataset(tmp_path, files=2, rows_per_file=50, row_group_rows=25, columns=1)
    replicas = nginx_replicas(tmp_path, 2)
    fs = feedline.FileSystem(replicas.urls)
    with pytest.raises(FileNotFoundError, match=r"absent\.parquet"):
        ParquetStream([paths[0].name, "absent.parquet", paths[1].name], fs=fs)
