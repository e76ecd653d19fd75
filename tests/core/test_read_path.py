"""The fast read paths keep every figure and every byte: `cat_ranges` through
the router's per-thread tallies, chunk streams handed to Python in batches,
and local descriptors revalidated when a file is replaced."""

from __future__ import annotations

import os
from collections.abc import Callable

import feedline
import pytest
from feedline_helpers import pattern

MakeFile = Callable[..., tuple[str, bytes]]


def test_cat_ranges_counts_every_read_in_stats(make_file: MakeFile) -> None:
    path, data = make_file(size=1 << 20)
    other, other_data = make_file(name="other.bin", size=50_000, seed=3)
    fs = feedline.FileSystem()
    n = 5_000  # enough for several threads and many tally batches
    paths = [path if i % 7 else other for i in range(n)]
    starts = [(i * 4099) % 40_000 for i in range(n)]
    ends = [s + 100 + i % 50 for i, s in enumerate(starts)]
    out = fs.cat_ranges(paths, starts, ends)
    for p, s, e, got in zip(paths, starts, ends, out, strict=True):
        want = (data if p == path else other_data)[s:e]
        assert got == want
    stats = fs.stats()
    total = sum(e - s for s, e in zip(starts, ends, strict=True))
    assert stats["reads"] == n and stats["read_errors"] == 0
    assert stats["bytes"] == total
    assert stats["latency"]["count"] == n, "every read's latency is folded in"
    (replica,) = stats["replicas"]
    # Every range, plus one size per distinct file: sizes are routed too.
    assert replica["requests"] == n + 2 and replica["bytes"] == total
    assert replica["latency"]["count"] == n
    assert replica["in_flight"] == 0
    assert fs.stats(reset=True)["reads"] == n
    assert fs.stats()["reads"] == 0 and fs.stats()["latency"]["count"] == 0


def test_cat_ranges_accepts_distinct_str_objects_and_refuses_other_keys(
    make_file: MakeFile,
) -> None:
    path, data = make_file()
    fs = feedline.FileSystem()
    # Equal paths that are different objects (no memo shares them).
    paths = ["".join(list(path)) for _ in range(3)]
    assert fs.cat_ranges(paths, [0, 10, 20], [5, 15, 25]) == [data[0:5], data[10:15], data[20:25]]
    with pytest.raises(TypeError, match="keys must be str, got 7"):
        fs._storage.cat_ranges([path, 7], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="got one str"):
        fs._storage.cat_ranges(path, [0], [1])
    with pytest.raises(ValueError, match="one length"):
        fs.cat_ranges([path, path], [0], [1, 2])


def test_stream_in_batches_delivers_every_chunk_in_order_and_counts_it(
    make_file: MakeFile,
) -> None:
    path, data = make_file(size=64 * 4096 + 123)
    fs = feedline.FileSystem()
    plan = [(path, off, min(4096, len(data) - off)) for off in range(0, len(data), 4096)]
    got = bytearray()
    offsets = []
    with fs.stream(plan, chunk_bytes=4096, depth=8) as stream:
        for chunk in stream:
            with chunk:
                offsets.append(chunk.offset)
                got += memoryview(chunk)
    assert offsets == [off for _, off, _ in plan]
    assert bytes(got) == data
    stats = fs.stats()
    assert stats["reads"] == len(plan) and stats["latency"]["count"] == len(plan)
    assert stats["replicas"][0]["latency"]["count"] == len(plan)


def test_a_failed_range_arrives_after_every_chunk_before_it(make_file: MakeFile) -> None:
    path, data = make_file(size=33 * 1024)
    fs = feedline.FileSystem()
    # depth=16: a ring of 32 slots, so range #32 cannot be read before the
    # consumer releases chunk #0, by which time the file has shrunk.
    plan = [(path, i * 1024, 1024) for i in range(33)]
    got = []
    with fs.stream(plan, chunk_bytes=1024, depth=16) as stream:
        os.truncate(path, 32 * 1024)
        with pytest.raises(feedline.ShortReadError):
            for chunk in stream:
                got.append(bytes(memoryview(chunk)))
                chunk.release()
        assert stream.closed
        assert next(iter(stream), None) is None, "a failed stream stays ended"
    assert b"".join(got) == data[: 32 * 1024]


def test_close_drops_chunks_taken_ahead(make_file: MakeFile) -> None:
    path, data = make_file(size=64 * 1024)
    fs = feedline.FileSystem()
    plan = [(path, i * 1024, 1024) for i in range(64)]
    stream = fs.stream(plan, chunk_bytes=1024, depth=8)
    first = next(stream)
    assert bytes(memoryview(first)) == data[:1024]
    stream.close()
    assert stream.closed
    assert next(stream, None) is None, "a closed stream yields nothing more"
    assert bytes(memoryview(first)) == data[:1024], "a chunk taken stays valid"
    first.release()


def test_a_file_replaced_by_rename_is_read_anew(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "f.bin")
    old, new = pattern(10_000, 1), pattern(7_000, 2)
    with open(path, "wb") as f:
        f.write(old)
    fs = feedline.FileSystem()
    assert fs.cat_file(path, 0, 100) == old[:100]
    assert fs.cat_ranges([path], [9_000], [None]) == [old[9_000:]]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(new)
    os.replace(tmp, path)
    assert fs.cat_file(path) == new
    assert fs.cat_ranges([path], [6_000], [None]) == [new[6_000:]]
    with feedline.open(path) as f:
        assert f.read() == new
    os.remove(path)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(path)
