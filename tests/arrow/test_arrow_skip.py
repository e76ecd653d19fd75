"""ParquetStream(on_error="skip") over several kinds of corrupt row groups:
each is skipped and recorded, every other row is delivered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from feedline.arrow import ParquetReadError, ParquetStream
from parquet_data import write_dataset

ROWS_PER_FILE = 1000
ROW_GROUP_ROWS = 100


def overwrite_chunk(path: Path, row_group: int, column: int, whole: bool, seed: int) -> None:
    """Garbage over one column chunk of ``row_group``: its first page header
    (32 bytes), or (``whole``) every byte of it."""
    col = pq.read_metadata(path).row_group(row_group).column(column)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    length = col.total_compressed_size if whole else 32
    garbage = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(garbage if whole else b"\xff" * length)


# (file, row group, column, whole chunk): first and last row groups of a
# file, a later column, and whole chunks of random bytes.
CORRUPTIONS = [(0, 0, 0, False), (1, 2, 3, False), (1, 3, 0, True), (2, 9, 5, True)]


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_skip_records_each_corrupt_row_group_and_delivers_the_rest(
    tmp_path: Path, shuffle: bool
) -> None:
    paths = write_dataset(tmp_path, rows_per_file=ROWS_PER_FILE, row_group_rows=ROW_GROUP_ROWS)
    for seed, (f, rg, col, whole) in enumerate(CORRUPTIONS):
        overwrite_chunk(paths[f], rg, col, whole, seed)
    # Each corruption must be one the reader notices.
    with pytest.raises(ParquetReadError):
        list(ParquetStream(str(tmp_path / "*.parquet"), batch_rows=64))

    stream = ParquetStream(
        str(tmp_path / "*.parquet"), batch_rows=64, on_error="skip", shuffle=shuffle, seed=1
    )
    got = sorted(int(i) for batch in stream.numpy() for i in batch["row_id"])
    lost = {
        f * ROWS_PER_FILE + rg * ROW_GROUP_ROWS + r
        for f, rg, _, _ in CORRUPTIONS
        for r in range(ROW_GROUP_ROWS)
    }
    assert got == sorted(set(range(3 * ROWS_PER_FILE)) - lost)
    skipped = sorted((s["path"].rsplit("/", 1)[-1], s["row_group"]) for s in stream.skipped)
    assert skipped == sorted((f"part-{f:03d}.parquet", rg) for f, rg, _, _ in CORRUPTIONS)
    assert all("cannot decode" in s["error"] for s in stream.skipped)


def test_a_file_whose_every_row_group_is_corrupt_is_skipped_whole(tmp_path: Path) -> None:
    paths = write_dataset(tmp_path, files=2, rows_per_file=300, row_group_rows=100)
    for rg in range(3):
        overwrite_chunk(paths[0], rg, 0, False, rg)
    stream = ParquetStream(str(tmp_path / "*.parquet"), batch_rows=64, on_error="skip")
    assert [int(i) for b in stream.numpy() for i in b["row_id"]] == list(range(300, 600))
    assert [s["row_group"] for s in stream.skipped] == [0, 1, 2]
