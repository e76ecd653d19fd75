"""Bad input: each case ends in a clear Python exception that names the
offending value, never a hang, a panic or silently short bytes."""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import feedline
import numpy as np
import pytest
from feedline_helpers import prefetch_threads, wait_for

MakeFile = Callable[..., tuple[str, bytes]]


# -------------------------------------------------------------- missing files


def test_missing_file_everywhere(tmp_path: object) -> None:
    missing = os.path.join(str(tmp_path), "nope.bin")
    fs = feedline.FileSystem()
    for call in (
        lambda: fs.cat_file(missing),
        lambda: fs.cat_file(missing, 0, 10),
        lambda: fs.cat_ranges([missing], [0], [1], on_error="raise"),
        lambda: fs.stream([missing]),
        lambda: fs.stream([(missing, 0, 1)]),
        lambda: feedline.open(missing).open(),
    ):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert "nope.bin" in str(info.value)
    err = fs.cat_ranges([missing], [0], [1])[0]
    assert isinstance(err, FileNotFoundError) and err.filename == missing


def test_missing_file_mid_plan_ends_the_stream_with_its_name(make_file: MakeFile) -> None:
    path, _ = make_file()
    fs = feedline.FileSystem()
    # Sizes are taken when the plan is built: a missing file refuses the plan.
    with pytest.raises(FileNotFoundError, match=r"gone\.bin"):
        fs.stream([path, path + ".gone.bin"])


def test_a_directory(tmp_path: object) -> None:
    d = str(tmp_path)
    fs = feedline.FileSystem()
    with pytest.raises(IsADirectoryError) as info:
        fs.cat_file(d)
    assert d in str(info.value)
    with pytest.raises(IsADirectoryError):
        fs.stream([d])
    with pytest.raises(IsADirectoryError):
        feedline.open(d).open()
    out = fs.cat_ranges([d], [0], [1])
    assert isinstance(out[0], IsADirectoryError)


# ----------------------------------------------------------------- permission

_PERMISSION_CHILD = r"""
import sys
import feedline
readable, secret = sys.argv[1], sys.argv[2]
fs = feedline.FileSystem()
assert fs.cat_file(readable) == b"open to all"
for call in (lambda: fs.cat_file(secret), lambda: fs.stream([secret]),
             lambda: feedline.open(secret).open()):
    try:
        call()
    except PermissionError as e:
        assert "secret.bin" in str(e), e
    else:
        raise SystemExit("read a file without permission")
err = fs.cat_ranges([secret], [0], [1])[0]
assert isinstance(err, PermissionError), err
print("ok")
"""


@pytest.fixture
def world_dir() -> Iterator[str]:
    # tmp_path lives under a root-only directory; an unprivileged child must
    # be able to reach the files, so this one is world-traversable.
    d = tempfile.mkdtemp(prefix="feedline-perm-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_no_read_permission(world_dir: str) -> None:
    readable = os.path.join(world_dir, "public.bin")
    secret = os.path.join(world_dir, "secret.bin")
    with open(readable, "wb") as f:
        f.write(b"open to all")
    with open(secret, "wb") as f:
        f.write(b"nobody may read this")
    os.chmod(readable, 0o644)
    os.chmod(secret, 0o000)
    if os.geteuid() != 0:
        # Already unprivileged: check in-process.
        with pytest.raises(PermissionError, match=r"secret\.bin"):
            feedline.FileSystem().cat_file(secret)
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root (which bypasses permissions) and setpriv is missing")
    # Root bypasses file permissions, so the check runs as `nobody`.
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            _PERMISSION_CHILD,
            readable,
            secret,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if proc.returncode != 0 and "Permission denied" in proc.stderr and "import" in proc.stderr:
        pytest.skip(f"the unprivileged user cannot import feedline here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ------------------------------------------------------------ ranges and plans


@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (-1, 10, "offset -1"),
        (0, -5, "length -5"),
        (99_990, 11, "offset 99990 \\+ length 11 is past the end"),
        (100_001, 0, "offset 100001 \\+ length 0 is past the end"),
        (2**62, 2**62, "past the end"),
    ],
)
def test_bad_ranges_in_a_stream_plan(
    make_file: MakeFile, offset: int, length: int, message: str
) -> None:
    path, _ = make_file(size=100_000)
    with pytest.raises(ValueError, match=message):
        feedline.FileSystem().stream([(path, offset, length)])


def test_out_of_int64_range_values_are_refused(make_file: MakeFile) -> None:
    path, _ = make_file()
    fs = feedline.FileSystem()
    with pytest.raises(ValueError, match=f"{2**70} is out of range"):
        fs.stream([(path, 2**70, 1)])
    with pytest.raises(ValueError, match=f"{2**70} is out of range"):
        fs.cat_file(path, 2**70)


def test_malformed_plan_entries(make_file: MakeFile) -> None:
    path, _ = make_file()
    fs = feedline.FileSystem()
    with pytest.raises(TypeError, match=r"\(path, offset, length\)"):
        fs.stream([(path, 0)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="42"):
        fs.stream([42])  # type: ignore[list-item]


def test_cat_file_past_the_end_is_empty_like_a_slice(make_file: MakeFile) -> None:
    path, data = make_file(size=100)
    fs = feedline.FileSystem()
    assert fs.cat_file(path, 1000) == b""
    assert fs.cat_file(path, 50, 10_000) == data[50:]
    assert fs.cat_file(path, -10_000, 10) == data[:10]
    assert fs.cat_file(path, 60, 40) == b""


# ----------------------------------------------------------- sizes and modes


@pytest.mark.parametrize("name", ["chunk_bytes", "depth"])
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_sizes(make_file: MakeFile, name: str, value: int) -> None:
    path, _ = make_file()
    fs = feedline.FileSystem()
    pattern = f"{name} must be a whole number of at least 1, got {value}"
    with pytest.raises(ValueError, match=pattern):
        fs.stream([path], **{name: value})
    with pytest.raises(ValueError, match=pattern):
        feedline.FileSystem(**{name: value})
    with pytest.raises(ValueError, match=pattern):
        feedline.open(path, **{name: value})


@pytest.mark.parametrize("name", ["chunk_bytes", "depth"])
def test_non_integer_sizes(make_file: MakeFile, name: str) -> None:
    path, _ = make_file()
    with pytest.raises(TypeError, match=f"{name} must be a whole number of at least 1, got '4'"):
        feedline.FileSystem().stream([path], **{name: "4"})


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"chunk_bytes": 1 << 40, "depth": 1}, "chunk_bytes=1099511627776"),
        ({"chunk_bytes": 1 << 20, "depth": 1 << 20}, "depth=1048576"),
        ({"chunk_bytes": 2**63, "depth": 1}, "chunk_bytes=9223372036854775808"),
        ({"chunk_bytes": 2**200, "depth": 1}, "chunk_bytes"),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(
    make_file: MakeFile, kwargs: dict[str, int], named: str
) -> None:
    path, _ = make_file()
    fs = feedline.FileSystem()
    with pytest.raises(ValueError, match=named):
        fs.stream([path], **kwargs)
    with pytest.raises(ValueError, match=named):
        feedline.open(path, **kwargs).open()


def test_a_smaller_memory_budget_is_enforced(make_file: MakeFile) -> None:
    path, _ = make_file()
    with pytest.raises(ValueError, match="memory budget of 1000 bytes"):
        feedline.FileSystem().stream([path], chunk_bytes=4096, depth=1, memory_budget_bytes=1000)


@pytest.mark.parametrize("mode", ["rw", "r+b", "bogus", "", "rb+", "wr"])
def test_unknown_modes(make_file: MakeFile, mode: str) -> None:
    path, _ = make_file()
    with pytest.raises(ValueError, match=re.escape(f"unsupported mode {mode!r}")):
        feedline.open(path, mode)
    with pytest.raises(ValueError, match=re.escape(f"unsupported mode {mode!r}")):
        feedline.FileSystem()._open(path, mode)


# ----------------------------------------------------------- shrinking files


def test_a_file_that_shrinks_mid_read_raises_short_read(make_file: MakeFile) -> None:
    path, data = make_file(size=1 << 20)
    with feedline.open(path, chunk_bytes=4096, depth=2) as f:
        first = f.read(4096)
        assert first == data[:4096]
        os.truncate(path, 10_000)
        got = bytearray(first)
        with pytest.raises(feedline.ShortReadError) as info:
            for _ in range(len(data)):  # bounded: one byte per step at worst
                part = f.read(4096)
                assert part, "a short file must not look like the end of the file"
                got += part
        # Whatever was delivered is the file's real bytes, never padding.
        assert bytes(got) == data[: len(got)]
        assert len(got) < len(data)
        assert "data.bin" in str(info.value)
        assert isinstance(info.value, OSError)


def test_a_file_that_shrinks_before_a_direct_read(make_file: MakeFile) -> None:
    path, _ = make_file(size=4 << 20)
    with feedline.open(path, direct_bytes=1 << 20) as f:
        os.truncate(path, 1 << 20)
        buf = bytearray(4 << 20)
        with pytest.raises(feedline.ShortReadError, match=r"data\.bin"):
            f.readinto(buf)


def test_a_file_that_shrinks_mid_stream_raises_short_read(
    make_file: MakeFile, no_thread_leak: None
) -> None:
    path, data = make_file(size=1 << 20)
    stream = feedline.FileSystem().stream([path], chunk_bytes=4096, depth=1)
    got = bytearray()
    with stream:
        with next(stream) as chunk:
            got += memoryview(chunk)
        os.truncate(path, 0)
        with pytest.raises(feedline.ShortReadError, match=r"data\.bin"):
            for chunk in stream:
                with chunk:
                    got += memoryview(chunk)
    assert bytes(got) == data[: len(got)]
    assert len(got) < len(data)
    # The failed stream is over: no more chunks, and its thread is gone.
    with pytest.raises(StopIteration):
        next(stream)


# ---------------------------------------------------------- released chunks


def test_using_a_released_chunk(make_file: MakeFile) -> None:
    path, _ = make_file(size=8192)
    with feedline.FileSystem().stream([path], chunk_bytes=4096, depth=1) as stream:
        chunk = next(stream)
        chunk.release()
        for use in (
            lambda: memoryview(chunk),
            lambda: np.frombuffer(chunk, dtype=np.uint8),
            lambda: bytes(chunk),
            lambda: chunk.address,
        ):
            with pytest.raises(
                ValueError, match=r"chunk of .*data\.bin.* at offset 0 was released"
            ):
                use()


def test_a_closed_stream_and_file_refuse_use(make_file: MakeFile) -> None:
    path, _ = make_file()
    gc.collect()
    before = prefetch_threads()
    stream = feedline.FileSystem().stream([path], chunk_bytes=4096)
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    f = feedline.open(path).open()
    f.close()
    for call in (lambda: f.read(1), lambda: f.readinto(bytearray(1)), f.tell, lambda: f.seek(0)):
        with pytest.raises(ValueError, match="closed file"):
            call()
    assert wait_for(lambda: prefetch_threads() == before)


def test_readinto_refuses_a_read_only_buffer(make_file: MakeFile) -> None:
    path, _ = make_file()
    with feedline.open(path) as f, pytest.raises(TypeError):
        f.readinto(b"immutable")


def test_holding_every_slot_raises_instead_of_hanging(make_file: MakeFile) -> None:
    path, data = make_file(size=8 * 4096)
    with feedline.FileSystem().stream([path], chunk_bytes=4096, depth=1) as stream:
        # `list(stream)` would keep every chunk alive: a ring of two slots
        # cannot deliver the third.
        held = [next(stream), next(stream)]
        # After a grace period (another thread might still drop one).
        with pytest.raises(ValueError, match="all 2 slots of this stream have been held"):
            next(stream)
        held[0].release()
        third = next(stream)
        assert third.offset == 2 * 4096
        assert bytes(memoryview(third)) == data[8192:12288]
