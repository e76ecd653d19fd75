"""Ray Data on a local cluster: ray.data.read_parquet over a feedline
FileSystem (nginx replicas, one of them failing), and feedline.ray's
datasource streaming row groups through the core into streaming_split
consumers. Every row is checked against pyarrow's local read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import feedline
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feedline.testing import NginxReplicas
from parquet_data import write_dataset

ray = pytest.importorskip("ray")

from feedline.ray import ParquetDatasource, read_parquet  # noqa: E402

pytestmark = [
    pytest.mark.nginx,
    # Ray's own DataContext sets its deprecated fields when it starts.
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*"),
]
ROWS = 1200


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # no token written under ~/.ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield
        finally:
            ray.shutdown()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, list[str], pa.Table]:
    paths = write_dataset(tmp_path, files=3, rows_per_file=400, row_group_rows=50, columns=2)
    want = pa.concat_tables(pq.read_table(p) for p in paths)
    return tmp_path, [p.name for p in paths], want


def by_row_id(table: pa.Table) -> pa.Table:
    return table.sort_by("row_id").select(["row_id", "c0", "c1"])


def faulty_replicas(replicas: NginxReplicas) -> dict[str, Any]:
    """FileSystem options over 3 replicas: 0 is dead (its nginx killed), 1
    fails 30% of reads; the core must fail over without losing a row."""
    replicas.kill(0)
    return {
        "replicas": replicas.urls,
        "chaos": {1: feedline.Chaos(error_rate=0.3, seed=1)},
    }


def test_ray_read_parquet_over_a_feedline_filesystem(
    cluster: None,
    files: tuple[Path, list[str], pa.Table],
    nginx_replicas: Callable[..., NginxReplicas],
) -> None:
    root, keys, want = files
    replicas = nginx_replicas(root, 3)
    fs = feedline.FileSystem(**faulty_replicas(replicas))
    ds = ray.data.read_parquet(keys, filesystem=fs)
    got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert by_row_id(got).equals(by_row_id(want))


def test_datasource_streams_row_groups_into_split_consumers(
    cluster: None,
    files: tuple[Path, list[str], pa.Table],
    nginx_replicas: Callable[..., NginxReplicas],
) -> None:
    root, keys, want = files
    replicas = nginx_replicas(root, 3)
    options = faulty_replicas(replicas)
    source = ParquetDatasource(keys, batch_rows=64, **options)
    tasks = source.get_read_tasks(4)
    assert len(tasks) == 4 and sum(t.metadata.num_rows for t in tasks) == ROWS
    ds = read_parquet(keys, batch_rows=64, override_num_blocks=4, **options)
    assert by_row_id(pa.concat_tables(ray.get(ds.to_arrow_refs()))).equals(by_row_id(want))

    # num_cpus=0: on 2 CPUs two consuming tasks would starve the read tasks.
    @ray.remote(num_cpus=0)
    def consume(split: Any) -> list[int]:
        return [int(i) for batch in split.iter_batches(batch_size=None) for i in batch["row_id"]]

    splits = ds.streaming_split(2, equal=True)
    got = ray.get([consume.remote(s) for s in splits], timeout=90)
    assert len(got[0]) == len(got[1]) == ROWS // 2
    assert Counter(got[0] + got[1]) == Counter(range(ROWS))
