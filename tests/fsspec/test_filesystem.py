"""feedline's Python surface end to end on real local files: the fsspec
filesystem, zero-copy chunk streams and the `feedline.open` file object."""

from __future__ import annotations

import gc
import io
import os
from collections.abc import Callable

import feedline
import fsspec
import numpy as np
import pyarrow as pa
import pytest
from feedline_helpers import pattern, prefetch_threads, wait_for
from fsspec.implementations.local import LocalFileSystem

MakeFile = Callable[..., tuple[str, bytes]]

# ---------------------------------------------------------------- filesystem


def test_fsspec_finds_the_filesystem_through_its_entry_point(make_file: MakeFile) -> None:
    path, data = make_file()
    fs = fsspec.filesystem("feedline")
    assert isinstance(fs, feedline.FileSystem)
    assert fs.cat_file(path) == data
    assert fs.info(path)["size"] == len(data)
    assert fs.exists(path)
    assert not fs.exists(path + ".missing")
    assert [os.path.basename(p) for p in fs.ls(os.path.dirname(path), detail=False)] == ["data.bin"]


def test_fsspec_open_with_a_chained_url_reads_through_feedline(make_file: MakeFile) -> None:
    path, data = make_file()
    with fsspec.open(f"feedline::{path}", "rb") as f:
        assert isinstance(f, feedline.FeedlineFile)
        assert f.read() == data


# The values around the edges of a 100-byte file: inside, at, and past both ends.
SLICE_VALUES = [None, 0, 1, 5, 50, 99, 100, 101, 1000, -1, -5, -50, -99, -100, -101, -1000]


def _fsspec_defines(size: int, start: int | None, end: int | None) -> bool:
    """fsspec's cat_file seeks to start, then reads `end - tell` bytes; when
    that is negative it raises (or, at -1, reads everything). Those cases
    are fsspec accidents; everywhere else its answer is the reference."""
    if end is None:
        return True
    tell = 0 if start is None else (start if start >= 0 else max(0, size + start))
    end_abs = end if end >= 0 else size + end
    return end_abs >= tell


def test_cat_file_slices_exactly_like_fsspec_local(make_file: MakeFile) -> None:
    path, data = make_file(size=100)
    fs = feedline.FileSystem()
    local = LocalFileSystem()
    compared = 0
    for start in SLICE_VALUES:
        for end in SLICE_VALUES:
            got = fs.cat_file(path, start, end)
            # Python slice semantics always (fsspec documents "like usual
            # python slices")...
            assert got == data[start:end], (start, end)
            # ...and identical to fsspec's local filesystem where fsspec
            # gives an answer.
            if _fsspec_defines(len(data), start, end):
                assert got == local.cat_file(path, start, end), (start, end)
                compared += 1
    assert compared > 100


def test_cat_file_reads_large_files_whole(make_file: MakeFile) -> None:
    path, data = make_file(size=9 * 1024 * 1024 + 7)
    fs = feedline.FileSystem()
    assert fs.cat_file(path) == data
    assert fs.cat_file(path, 4096, -4096) == data[4096:-4096]
    assert fs.cat(path) == data


def test_cat_ranges_returns_every_range_in_order(make_file: MakeFile) -> None:
    a, da = make_file("a.bin", 50_000, seed=1)
    b, db = make_file("b.bin", 70_000, seed=2)
    fs = feedline.FileSystem()
    rng = np.random.default_rng(7)
    paths, starts, ends, want = [], [], [], []
    for _ in range(500):
        path, data = (a, da) if rng.random() < 0.5 else (b, db)
        s = int(rng.integers(0, len(data)))
        e = s + int(rng.integers(0, 8192))
        paths.append(path)
        starts.append(s)
        ends.append(e)
        want.append(data[s:e])
    assert fs.cat_ranges(paths, starts, ends) == want
    # Scalars apply to every path, as in fsspec.
    assert fs.cat_ranges([a, b], 10, 20) == [da[10:20], db[10:20]]
    assert fs.cat_ranges([a], None, None) == [da]
    assert fs.cat_ranges([], [], []) == []


def test_cat_ranges_on_error_return_and_raise(make_file: MakeFile, tmp_path: object) -> None:
    path, data = make_file()
    missing = path + ".missing"
    fs = feedline.FileSystem()
    out = fs.cat_ranges([path, missing, path], [0, 0, 5], [10, 10, 15])
    assert out[0] == data[:10]
    assert isinstance(out[1], FileNotFoundError)
    assert missing in str(out[1])
    assert out[2] == data[5:15]
    with pytest.raises(FileNotFoundError, match="missing"):
        fs.cat_ranges([path, missing], [0, 0], [10, 10], on_error="raise")
    with pytest.raises(ValueError, match="'ignore'"):
        fs.cat_ranges([path], [0], [10], on_error="ignore")
    with pytest.raises(ValueError, match="one length"):
        fs.cat_ranges([path, path], [0], [10, 10])


def test_replica_root_reads_keys_relative_to_it(make_file: MakeFile) -> None:
    path, data = make_file("sub/x.bin")
    root = os.path.dirname(os.path.dirname(path))
    fs = feedline.FileSystem(replicas=[root])
    assert fs.cat_file("sub/x.bin") == data
    assert fs.cat_file("/sub/x.bin", 3, 9) == data[3:9]
    with pytest.raises(ValueError, match="escapes"):
        fs.cat_file("../etc/passwd")


# -------------------------------------------------------------------- stream


def _collect(stream: feedline.ChunkStream) -> list[tuple[str, int, bytes]]:
    out = []
    for chunk in stream:
        with chunk:
            out.append((chunk.path, chunk.offset, bytes(memoryview(chunk))))
    return out


def test_stream_delivers_every_byte_in_plan_order(
    make_file: MakeFile, no_thread_leak: None
) -> None:
    files = [
        make_file(f"f{i}.bin", size, seed=i) for i, size in enumerate([0, 1, 4096, 10_001, 70_000])
    ]
    fs = feedline.FileSystem()
    with fs.stream([p for p, _ in files], chunk_bytes=4096, depth=3) as stream:
        assert len(stream) == sum(-(-len(d) // 4096) for _, d in files)
        got = _collect(stream)
    want = []
    for path, data in files:
        want += [(path, off, data[off : off + 4096]) for off in range(0, len(data), 4096)]
    assert got == want
    for path, data in files:
        assert b"".join(d for p, _, d in got if p == path) == data


def test_stream_of_explicit_ranges(make_file: MakeFile, no_thread_leak: None) -> None:
    a, da = make_file("a.bin", 30_000, seed=1)
    b, db = make_file("b.bin", 30_000, seed=2)
    plan = [(b, 100, 9000), (a, 0, 1), (a, 29_999, 1), (b, 0, 0), a]
    with feedline.FileSystem().stream(plan, chunk_bytes=4096, depth=2) as stream:
        got = _collect(stream)
    assert [(p, o, len(d)) for p, o, d in got] == [
        (b, 100, 4096),
        (b, 4196, 4096),
        (b, 8292, 808),
        (a, 0, 1),
        (a, 29_999, 1),
        *[(a, off, min(4096, 30_000 - off)) for off in range(0, 30_000, 4096)],
    ]
    assert b"".join(d for p, _, d in got[:3]) == db[100:9100]
    assert got[3][2] == da[:1] and got[4][2] == da[-1:]


def test_stream_accepts_pathlike_and_a_single_path(make_file: MakeFile) -> None:
    path, data = make_file()
    fs = feedline.FileSystem()
    with fs.stream(path, chunk_bytes=1 << 20) as s1:
        assert b"".join(d for _, _, d in _collect(s1)) == data
    from pathlib import Path

    with fs.stream([Path(path)], chunk_bytes=1 << 20) as s2:
        assert b"".join(d for _, _, d in _collect(s2)) == data


def test_chunks_are_zero_copy_views_of_their_slot(make_file: MakeFile) -> None:
    path, data = make_file(size=3 * 4096)
    with feedline.FileSystem().stream([path], chunk_bytes=4096, depth=2) as stream:
        chunk = next(stream)
        assert (chunk.path, chunk.offset, chunk.nbytes, len(chunk)) == (path, 0, 4096, 4096)
        address = chunk.address
        assert address % 4096 == 0  # slots are page-aligned
        arr = np.frombuffer(chunk, dtype=np.uint8)
        assert arr.ctypes.data == address
        assert not arr.flags.writeable
        view = memoryview(chunk)
        assert view.readonly
        assert np.frombuffer(view, dtype=np.uint8).ctypes.data == address
        buf = pa.py_buffer(chunk)
        assert buf.address == address
        assert buf.to_pybytes() == data[:4096]
        assert arr.tobytes() == data[:4096]
        # A typed view of the same memory, still without a copy.
        words = np.frombuffer(chunk, dtype=np.uint32)
        assert words.ctypes.data == address and words.size == 1024
        # Views hold the slot: release is refused until they are gone.
        with pytest.raises(BufferError, match="still exported"):
            chunk.release()
        del arr, words, buf
        view.release()
        chunk.release()
        assert chunk.released
        # Nobody may write into a slot through the buffer protocol.
        second = next(stream)
        arr2 = np.frombuffer(second, dtype=np.uint8)
        with pytest.raises(ValueError, match="WRITEABLE"):
            arr2.setflags(write=True)
        with memoryview(second) as view2, pytest.raises(TypeError, match="read-only"):
            view2[0:1] = b"x"
        del arr2
        second.release()


def test_release_is_idempotent_and_context_manager_releases(make_file: MakeFile) -> None:
    path, _ = make_file(size=2 * 4096)
    with feedline.FileSystem().stream([path], chunk_bytes=4096, depth=1) as stream:
        with next(stream) as chunk:
            assert not chunk.released
        assert chunk.released
        chunk.release()  # a second release is harmless
        assert "released" in repr(chunk)
        with pytest.raises(ValueError, match="released"):
            memoryview(chunk)
        with pytest.raises(ValueError, match="released"):
            _ = chunk.address
        # What does not need the bytes stays readable.
        assert (chunk.offset, chunk.nbytes) == (0, 4096)


def test_dropped_chunks_return_their_slots(make_file: MakeFile, no_thread_leak: None) -> None:
    # depth=1: a ring of two slots. Forty chunks only flow if each chunk's
    # slot comes back when Python drops it (no explicit release).
    path, data = make_file(size=40 * 1024)
    with feedline.FileSystem().stream([path], chunk_bytes=1024, depth=1) as stream:
        total = 0
        seen = 0
        for chunk in stream:
            arr = np.frombuffer(chunk, dtype=np.uint8)
            total += int(arr.sum(dtype=np.uint64))
            seen += 1
            del arr
        assert seen == 40
    assert total == sum(data)


def test_a_chunk_outlives_its_stream(make_file: MakeFile, no_thread_leak: None) -> None:
    path, data = make_file(size=8192)
    stream = feedline.FileSystem().stream([path], chunk_bytes=4096, depth=2)
    chunk = next(stream)
    arr = np.frombuffer(chunk, dtype=np.uint8)
    stream.close()
    assert stream.closed
    del stream
    gc.collect()
    assert arr.tobytes() == data[:4096]
    del arr
    chunk.release()


def test_closing_a_stream_stops_its_workers(make_file: MakeFile) -> None:
    path, _ = make_file(size=1 << 20)
    gc.collect()
    before = prefetch_threads()
    stream = feedline.FileSystem().stream([path] * 64, chunk_bytes=4096, depth=2)
    held = [next(stream), next(stream)]  # the ring is full: the driver waits
    assert prefetch_threads() == before + 1
    stream.close()
    assert wait_for(lambda: prefetch_threads() == before, timeout_s=1.0)
    assert stream.closed
    with pytest.raises(StopIteration):
        next(stream)
    stream.close()  # idempotent
    assert all(c.nbytes == 4096 for c in held)


def test_abandoning_a_stream_stops_its_workers(make_file: MakeFile) -> None:
    path, _ = make_file(size=1 << 20)
    gc.collect()
    before = prefetch_threads()
    stream = feedline.FileSystem().stream([path] * 64, chunk_bytes=4096, depth=4)
    next(stream)
    assert prefetch_threads() == before + 1
    del stream
    gc.collect()
    assert wait_for(lambda: prefetch_threads() == before, timeout_s=1.0)


def test_a_finished_stream_leaves_no_thread(make_file: MakeFile) -> None:
    path, _ = make_file(size=10_000)
    gc.collect()
    before = prefetch_threads()
    stream = feedline.FileSystem().stream([path], chunk_bytes=4096, depth=2)
    assert sum(1 for _ in stream) == 3
    assert stream.closed
    assert wait_for(lambda: prefetch_threads() == before, timeout_s=1.0)


# ------------------------------------------------------------- feedline.open


def test_open_read_readinto_seek_tell(make_file: MakeFile, no_thread_leak: None) -> None:
    path, data = make_file(size=300_000)
    with feedline.open(path, chunk_bytes=4096, depth=2) as f:
        assert isinstance(f, feedline.FeedlineFile)
        assert f.readable() and f.seekable() and not f.writable()
        assert f.read(10) == data[:10]
        assert f.tell() == 10
        buf = bytearray(1000)
        assert f.readinto(buf) == 1000 and bytes(buf) == data[10:1010]
        view = memoryview(bytearray(500))
        assert f.readinto1(view) == 500 and view.tobytes() == data[1010:1510]
        arr = np.zeros(64, dtype=np.uint32)  # a typed buffer is filled bytewise
        assert f.readinto(arr) == 256 and arr.tobytes() == data[1510:1766]
        assert f.seek(-100, io.SEEK_END) == len(data) - 100
        assert f.read() == data[-100:]
        assert f.read() == b""
        assert f.readinto(buf) == 0
        assert f.seek(5) == 5
        assert f.seek(10, io.SEEK_CUR) == 15
        assert f.read(5) == data[15:20]
        assert f.seek(len(data) + 50) == len(data) + 50
        assert f.read(10) == b""
        with pytest.raises(ValueError, match="negative seek"):
            f.seek(-1)
        with pytest.raises(ValueError, match="whence"):
            f.seek(0, 7)
    assert f.closed
    with pytest.raises(ValueError, match="closed"):
        f.read(1)


def test_open_reads_a_whole_file_in_every_read_size(make_file: MakeFile) -> None:
    path, data = make_file(size=200_003)
    for size in (1, 777, 4096, 65_536, 1 << 20):
        with feedline.open(path, chunk_bytes=8192, depth=2, direct_bytes=1 << 16) as f:
            parts = []
            for _ in range(len(data) + 2):  # bounded
                part = f.read(size) if size > 100 else f.read(size * 97)
                if not part:
                    break
                parts.append(part)
            assert b"".join(parts) == data, size


def test_open_readinto_a_large_buffer_goes_direct(make_file: MakeFile) -> None:
    path, data = make_file(size=3 << 20)
    buf = bytearray(4 << 20)
    with feedline.open(path, direct_bytes=1 << 20, chunk_bytes=1 << 18) as f:
        assert f.readinto(buf) == len(data)
        assert not f._reader.reading_ahead  # a direct read needs no readahead
    assert bytes(buf[: len(data)]) == data


def test_sequential_reads_read_ahead_and_random_reads_do_not(make_file: MakeFile) -> None:
    path, data = make_file(size=200_000)
    with feedline.open(path, chunk_bytes=4096, depth=2) as f:
        assert not f._reader.reading_ahead
        f.read(1000)  # the first read may be the start of anything
        assert f.read(1000) == data[1000:2000]
        assert f._reader.reading_ahead
        for pos in (150_000, 10, 90_000, 500):
            f.seek(pos)
            assert f.read(100) == data[pos : pos + 100]
            assert not f._reader.reading_ahead
        assert f.read(100) == data[600:700]  # sequential again
        assert f._reader.reading_ahead
    gc.collect()


def test_iteration_and_readline(make_file: MakeFile, tmp_path: object) -> None:
    import pathlib

    lines = [f"line {i} {'x' * (i % 50)}\n".encode() for i in range(500)]
    path = pathlib.Path(str(tmp_path)) / "lines.txt"
    path.write_bytes(b"".join(lines))
    with feedline.open(str(path), chunk_bytes=4096, depth=2) as f:
        assert f.readline() == lines[0]
        assert list(f) == lines[1:]
    with feedline.open(str(path)) as f:
        assert f.readlines() == lines


def test_text_mode(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "t.txt"
    text = "héllo wörld\n" * 1000
    path.write_text(text, encoding="utf-8")
    with feedline.open(str(path), "r", encoding="utf-8") as f:
        assert f.readline() == "héllo wörld\n"
        assert f.read() == text[len("héllo wörld\n") :]


def test_write_and_append_modes_delegate_to_fsspec(tmp_path: object) -> None:
    import pathlib

    path = os.fspath(pathlib.Path(str(tmp_path)) / "ckpt" / "model.bin")
    os.makedirs(os.path.dirname(path))
    with feedline.open(path, "wb") as f:
        f.write(b"weights:")
    with feedline.open(path, "ab") as f:
        f.write(b"1234")
    with feedline.open(path, "rb") as f:
        assert f.read() == b"weights:1234"
    with feedline.open(path, "w") as f:
        f.write("text checkpoint\n")
    with feedline.open(path, "r") as f:
        assert f.read() == "text checkpoint\n"
    with pytest.raises(FileExistsError), feedline.open(path, "xb") as f:
        f.write(b"no")
    # The fsspec filesystem writes through fsspec's local filesystem too.
    fs = feedline.FileSystem()
    with fs.open(path, "wb") as f:
        f.write(b"via fs")
    assert fs.cat_file(path) == b"via fs"


def test_open_accepts_pathlike_and_feedline_urls(make_file: MakeFile) -> None:
    import pathlib

    path, data = make_file()
    with feedline.open(pathlib.Path(path)) as f:
        assert f.read() == data
    with feedline.open(f"feedline::{path}") as f:
        assert f.read() == data
    with feedline.open(f"file://{path}") as f:
        assert f.read() == data


def test_closing_a_file_stops_its_readahead(make_file: MakeFile) -> None:
    path, _ = make_file(size=1 << 20)
    gc.collect()
    before = prefetch_threads()
    f = feedline.open(path, chunk_bytes=4096, depth=4).open()
    f.read(10)
    f.read(10)
    assert f._reader.reading_ahead
    assert prefetch_threads() == before + 1
    f.close()
    assert wait_for(lambda: prefetch_threads() == before, timeout_s=1.0)


def test_pattern_pages_differ() -> None:
    # The helper the tests rely on to catch misplaced chunks.
    data = pattern(3 * 4096)
    assert data[:4096] != data[4096:8192]


def test_chunks_held_and_released_out_of_order(make_file: MakeFile, no_thread_leak: None) -> None:
    # A consumer that keeps chunks a while and drops them in any order gets
    # every byte, in order, as long as chunk k is gone before chunk
    # k + slots is asked for (the ring reuses k's slot for it).
    import random

    path, data = make_file(size=300 * 1024)
    rnd = random.Random(5)
    for depth in (1, 2, 4):
        slots = 2 * depth
        held: dict[int, feedline.Chunk] = {}
        got = bytearray()
        with feedline.FileSystem().stream([path], chunk_bytes=1024, depth=depth) as stream:
            for seq, chunk in enumerate(stream):
                assert chunk.offset == len(got)
                got += memoryview(chunk)
                held[seq] = chunk
                del chunk
                for k in list(held):
                    if k <= seq + 1 - slots or rnd.random() < 0.3:
                        held.pop(k).release()
        assert bytes(got) == data
