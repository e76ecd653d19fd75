"""Ray Data over feedline: :func:`read_parquet` (a :class:`ParquetDatasource`)
whose read tasks stream row groups through the Rust core (prefetch, replica
routing, hedging, checksums) with :class:`feedline.arrow.ParquetStream`.

Read task i of n reads the row groups that shard i of n of a ParquetStream
reads: disjoint and complete, so a dataset holds every row once. Footers are
read once, in the driver, and travel to the tasks with the datasource.
``ds.streaming_split(n, equal=True)`` then feeds n consumers (Ray Train).

Plain ``ray.data.read_parquet(paths, filesystem=feedline.FileSystem(...))``
works too (Ray wraps any fsspec filesystem); it reads through feedline's
file objects rather than the row-group plan.

Needs ``ray[data]`` (the ``feedline[ray]`` extra).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from feedline.arrow import DEFAULT_BATCH_ROWS, ParquetStream
from feedline.fs import FileSystem


class ParquetDatasource(Datasource):
    """Parquet row groups as Ray blocks of up to ``batch_rows`` rows.
    ``fs_options`` are :class:`feedline.FileSystem`'s keyword arguments
    (replicas, hedging, chaos, ...); each read task builds its own."""

    def __init__(
        self,
        paths: str | Sequence[str],
        *,
        columns: Sequence[str] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        **fs_options: Any,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fs_options = fs_options
        self._stream = ParquetStream(
            paths, fs=FileSystem(**fs_options), columns=columns, batch_rows=batch_rows
        )

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self._shard_bytes(0, 1)) or None

    def _shard_bytes(self, shard: int, shards: int) -> tuple[int, int]:
        """(rows, uncompressed bytes) that shard ``shard`` of ``shards`` reads."""
        self._stream._shard_override = (shard, shards)
        try:
            units = self._stream._plan_epoch().units
        finally:
            self._stream._shard_override = None
        size = 0
        for u in units:
            meta = self._stream._metas[u.file]
            assert meta is not None
            size += meta.row_group(u.row_group).total_byte_size
        return sum(u.num_rows for u in units), size

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        row_groups = sum(m.num_row_groups for m in self._stream._metas if m is not None)
        tasks = max(1, min(int(parallelism), row_groups))
        out = []
        for shard in range(tasks):
            rows, size = self._shard_bytes(shard, tasks)
            meta = BlockMetadata(
                num_rows=rows,
                size_bytes=size,
                input_files=tuple(self._stream.paths),
                exec_stats=None,
            )
            out.append(
                ReadTask(
                    _Read(self._stream, self._fs_options, shard, tasks),
                    meta,
                    schema=self._stream.schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return out


class _Read:
    """One read task's body (a class, so it pickles without closures)."""

    def __init__(self, stream: ParquetStream, fs_options: dict[str, Any], shard: int, shards: int):
        self._stream, self._fs_options = stream, fs_options
        self._shard, self._shards = shard, shards

    def __call__(self) -> Iterator[pa.Table]:
        stream = copy.copy(self._stream)
        stream.fs = FileSystem(**self._fs_options)  # this process's own core
        stream._shard_override = (self._shard, self._shards)
        for batch in stream:
            yield pa.Table.from_batches([batch])


def read_parquet(
    paths: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    override_num_blocks: int | None = None,
    **fs_options: Any,
) -> ray.data.Dataset:
    """A Ray dataset of the Parquet files' rows, read through feedline."""
    source = ParquetDatasource(paths, columns=columns, batch_rows=batch_rows, **fs_options)
    dataset: ray.data.Dataset = ray.data.read_datasource(
        source, override_num_blocks=override_num_blocks
    )
    return dataset
