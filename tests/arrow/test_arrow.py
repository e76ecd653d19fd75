"""ParquetStream end to end on real Parquet files: reads, projection, shuffle,
sharding, exact resume and bad data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import feedline
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feedline.arrow import ParquetReadError, ParquetStream
from parquet_data import write_dataset


def row_ids(stream: ParquetStream) -> list[int]:
    return [int(i) for b in stream.numpy() for i in b["row_id"]]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    write_dataset(tmp_path)
    return tmp_path


def test_reads_every_row_in_order_and_matches_pyarrow(dataset: Path) -> None:
    stream = ParquetStream(str(dataset / "*.parquet"), batch_rows=64)
    batches = list(stream)
    assert all(isinstance(b, pa.RecordBatch) for b in batches)
    assert [b.num_rows for b in batches] == [64] * 46 + [3000 - 46 * 64]
    got = pa.Table.from_batches(batches)
    want = pa.concat_tables(pq.read_table(p) for p in sorted(dataset.glob("*.parquet")))
    assert got.equals(want)
    # Every byte pyarrow asked for came from the planned, prefetched ranges.
    assert stream.fallback_reads == 0


def test_drop_last_and_paths_list(dataset: Path) -> None:
    paths = sorted(dataset.glob("*.parquet"))
    stream = ParquetStream(paths, batch_rows=64, drop_last=True, fs=feedline.FileSystem())
    sizes = [b.num_rows for b in stream]
    assert sizes == [64] * 46
    assert row_ids(ParquetStream(paths[:1], batch_rows=1000)) == list(range(1000))


def test_numpy_is_zero_copy_and_torch_view(dataset: Path) -> None:
    batch = next(iter(ParquetStream(str(dataset / "*.parquet"), batch_rows=50).numpy()))
    assert batch["c0"].dtype == np.float64
    assert not batch["c0"].flags.writeable  # a view of Arrow's buffer, not a copy
    assert batch["row_id"].tolist() == list(range(50))


def test_projection_reads_only_the_requested_columns(tmp_path: Path) -> None:
    # Column chunks of ~160 KiB: far apart enough not to be coalesced.
    write_dataset(tmp_path, files=2, rows_per_file=40_000, row_group_rows=20_000, columns=7)
    total = sum(p.stat().st_size for p in tmp_path.glob("*.parquet"))
    stream = ParquetStream(str(tmp_path / "*.parquet"), columns=["c1", "c5"], batch_rows=4096)
    batches = list(stream)
    assert batches[0].schema.names == ["c1", "c5"]
    assert sum(b.num_rows for b in batches) == 80_000
    assert stream.fallback_reads == 0
    assert stream.bytes_requested <= 0.30 * total, (stream.bytes_requested, total)


class CountingFileSystem(feedline.FileSystem):  # type: ignore[misc]
    """The real filesystem, counting tail (footer) reads."""

    tail_reads = 0

    def cat_ranges(self, paths: list[str], *args: Any, **kwargs: Any) -> Any:
        type(self).tail_reads += len(paths)
        return super().cat_ranges(paths, *args, **kwargs)


def test_footers_are_read_once_per_process(dataset: Path) -> None:
    fs = CountingFileSystem()
    ParquetStream(str(dataset / "*.parquet"), fs=fs)
    first = CountingFileSystem.tail_reads
    assert first == 3
    ParquetStream(str(dataset / "*.parquet"), fs=fs)
    assert CountingFileSystem.tail_reads == first


def test_shuffle_is_a_deterministic_permutation_per_epoch(dataset: Path) -> None:
    def run(seed: int, epoch: int) -> list[int]:
        stream = ParquetStream(
            str(dataset / "*.parquet"),
            batch_rows=100,
            shuffle=True,
            seed=seed,
            shuffle_buffer_rows=300,
        )
        stream.set_epoch(epoch)
        return row_ids(stream)

    a = run(1, 0)
    assert sorted(a) == list(range(3000))
    assert a != list(range(3000))
    assert run(1, 0) == a
    assert run(1, 1) != a
    assert run(2, 0) != a


def test_ranks_are_disjoint_and_complete(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = [
        row_ids(ParquetStream(str(dataset / "*.parquet"), shuffle=True, rank=r, world_size=3))
        for r in range(3)
    ]
    assert sorted(i for ids in seen for i in ids) == list(range(3000))
    # The environment is the fallback for explicit arguments.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert row_ids(ParquetStream(str(dataset / "*.parquet"), shuffle=True)) == seen[1]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [1, 7, 13])
def test_resume_continues_with_exactly_the_rows_not_delivered(
    dataset: Path, shuffle: bool, stop_after: int
) -> None:
    def make() -> ParquetStream:
        stream = ParquetStream(
            str(dataset / "*.parquet"),
            batch_rows=97,
            shuffle=shuffle,
            seed=5,
            shuffle_buffer_rows=250,
        )
        stream.set_epoch(2)
        return stream

    full = [b["row_id"].tolist() for b in make().numpy()]
    first = make()
    it = first.numpy()
    head = [next(it)["row_id"].tolist() for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    it.close()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b["row_id"].tolist() for b in resumed.numpy()]
    assert head + tail == full


def test_state_of_another_stream_is_refused(dataset: Path) -> None:
    state = ParquetStream(str(dataset / "*.parquet"), batch_rows=10).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        ParquetStream(str(dataset / "*.parquet"), batch_rows=11).load_state_dict(state)


def corrupt_page(path: Path, row_group: int) -> None:
    """Overwrite the first page header of ``row_group``'s first column."""
    col = pq.read_metadata(path).row_group(row_group).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 32)


def test_corrupt_page_names_file_and_row_group(dataset: Path) -> None:
    bad = dataset / "part-001.parquet"
    corrupt_page(bad, 2)
    with pytest.raises(ParquetReadError, match=r"part-001\.parquet: row group 2") as info:
        list(ParquetStream(str(dataset / "*.parquet"), batch_rows=64))
    assert info.value.row_group == 2
    assert info.value.path.endswith("part-001.parquet")


def test_skip_drops_the_bad_row_group_and_resumes_deterministically(dataset: Path) -> None:
    corrupt_page(dataset / "part-001.parquet", 2)

    def make() -> ParquetStream:
        return ParquetStream(
            str(dataset / "*.parquet"), batch_rows=64, on_error="skip", shuffle=True, seed=3
        )

    stream = make()
    full = [b["row_id"].tolist() for b in stream.numpy()]
    lost = set(range(1200, 1300))
    assert sorted(i for ids in full for i in ids) == sorted(set(range(3000)) - lost)
    assert [(s["path"].rsplit("/", 1)[-1], s["row_group"]) for s in stream.skipped] == [
        ("part-001.parquet", 2)
    ]
    for stop_after in (5, 30):
        first = make()
        it = first.numpy()
        head = [next(it)["row_id"].tolist() for _ in range(stop_after)]
        state = first.state_dict()
        it.close()
        resumed = make()
        resumed.load_state_dict(state)
        assert head + [b["row_id"].tolist() for b in resumed.numpy()] == full


def test_corrupt_footer_names_the_file(dataset: Path) -> None:
    bad = dataset / "part-002.parquet"
    data = bad.read_bytes()
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    bad.write_bytes(data[:start] + b"\xff" * 16 + data[start + 16 :])  # garbage in the footer
    with pytest.raises(ParquetReadError, match=r"part-002\.parquet"):
        ParquetStream(str(dataset / "*.parquet"))
    truncated = dataset / "part-001.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-3])
    stream = ParquetStream(str(dataset / "*.parquet"), on_error="skip", batch_rows=500)
    assert row_ids(stream) == list(range(1000))
    assert {s["path"].rsplit("/", 1)[-1] for s in stream.skipped} == {
        "part-001.parquet",
        "part-002.parquet",
    }


def test_schema_mismatch_is_refused_or_unified(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"a": pa.array([1, 2], pa.int32()), "b": [1.0, 2.0]}), tmp_path / "x.parquet"
    )
    pq.write_table(pa.table({"a": pa.array([3], pa.int64()), "c": ["s"]}), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match=r"y\.parquet differs from .*x\.parquet.*unify_schemas"):
        ParquetStream(str(tmp_path / "*.parquet"))
    stream = ParquetStream(str(tmp_path / "*.parquet"), unify_schemas=True)
    table = pa.Table.from_batches(list(stream))
    assert table.schema.field("a").type == pa.int64()
    assert table.column("a").to_pylist() == [1, 2, 3]
    assert table.column("b").to_pylist() == [1.0, 2.0, None]
    assert table.column("c").to_pylist() == [None, None, "s"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_rows": 0}, "batch_rows"),
        ({"on_error": "ignore"}, "on_error"),
        ({"rank": 1}, "both rank and world_size"),
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        ({"columns": "c0"}, "list of names"),
        ({"columns": ["nope"]}, "nope"),
        ({"columns": []}, "at least one column"),
    ],
)
def test_bad_arguments_are_named(dataset: Path, kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        ParquetStream(str(dataset / "*.parquet"), **kwargs)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ParquetStream(str(tmp_path / "nothing-here-*.parquet"))
    with pytest.raises(FileNotFoundError):
        ParquetStream(str(tmp_path / "absent.parquet"))


def test_shuffle_buffer_bounds_the_rows_held(dataset: Path) -> None:
    # Unshuffled, each row group is yielded as soon as it is decoded.
    plain = ParquetStream(str(dataset / "*.parquet"))._plan_epoch()
    assert all(len(w) == 1 for w in plain.windows)
    # Shuffled, a window holds whole row groups up to shuffle_buffer_rows.
    mixed = ParquetStream(
        str(dataset / "*.parquet"), shuffle=True, shuffle_buffer_rows=250
    )._plan_epoch()
    assert [len(w) for w in mixed.windows] == [3] * 10


def test_column_chunks_larger_than_a_slot_are_joined(tmp_path: Path) -> None:
    # ~1.6 MiB column chunks with 1 MiB slots: each spans two slots.
    (path,) = write_dataset(tmp_path, files=1, rows_per_file=200_000, row_group_rows=200_000)
    stream = ParquetStream(str(path), batch_rows=50_000, max_block_bytes=1 << 20)
    got = pa.Table.from_batches(list(stream))
    assert got.equals(pq.read_table(path))
    assert stream.fallback_reads == 0
