"""Inputs that used to hang, panic or read as something they are not:
pseudo-files, FIFOs and devices, fractional and huge offsets, writes that
escape a replica root."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import feedline
import pytest

PROC_FILE = "/proc/self/status"


def read_paths(fs: feedline.FileSystem, path: str) -> dict[str, Callable[[], Any]]:
    """Every read entry point, each reading `path` (or its first 100 bytes)."""
    return {
        "cat_file": lambda: fs.cat_file(path),
        "cat_file_range": lambda: fs.cat_file(path, 0, 100),
        "cat_ranges": lambda: fs.cat_ranges([path], [0], [100], on_error="raise")[0],
        "open_read": lambda: fs.open(path).read(),
        "size": lambda: fs.size(path),
        "stream": lambda: b"".join(bytes(c) for c in fs.stream([path])),
    }


def test_a_proc_file_reads_to_its_end_on_every_path() -> None:
    """`stat` says 0 bytes; the builtin `open` reads them all, and so must
    every feedline path (the content is this process's status: stable
    enough between two reads for the lines compared)."""
    fs = feedline.FileSystem()
    with open("/proc/cpuinfo", "rb") as f:
        cpuinfo = f.read()
    assert os.stat("/proc/cpuinfo").st_size == 0 and cpuinfo
    assert fs.cat_file("/proc/cpuinfo") == cpuinfo
    assert fs.size("/proc/cpuinfo") == len(cpuinfo)
    assert fs.open("/proc/cpuinfo").read() == cpuinfo
    assert fs.cat_file("/proc/cpuinfo", 0, 100) == cpuinfo[:100]
    assert fs.cat_ranges(["/proc/cpuinfo"] * 2, [0, 50], [10, 60]) == [
        cpuinfo[:10],
        cpuinfo[50:60],
    ]
    assert b"".join(bytes(c) for c in fs.stream(["/proc/cpuinfo"])) == cpuinfo
    status = fs.cat_file(PROC_FILE)
    assert status.startswith(b"Name:") and b"\nPid:" in status


@pytest.mark.parametrize("call", sorted(read_paths(feedline.FileSystem(), "")))
def test_a_character_device_is_refused_not_read_as_empty(call: str) -> None:
    fs = feedline.FileSystem()
    with pytest.raises(ValueError, match=r'"/dev/zero" is a character device, not a regular file'):
        read_paths(fs, "/dev/zero")[call]()


FIFO_CHILD = textwrap.dedent(
    """
    import sys
    import feedline
    fs = feedline.FileSystem([sys.argv[1]])
    calls = {
        "cat_file": lambda: fs.cat_file("pipe"),
        "cat_file_range": lambda: fs.cat_file("pipe", 0, 100),
        "cat_ranges": lambda: fs.cat_ranges(["pipe"], [0], [100], on_error="raise")[0],
        "open_read": lambda: fs.open("pipe").read(),
        "size": lambda: fs.size("pipe"),
        "stream": lambda: list(fs.stream(["pipe"])),
    }
    for name, call in sorted(calls.items()):
        try:
            got = call()
        except ValueError as e:
            print(name, "ValueError", e, flush=True)
        else:
            print(name, "returned", repr(got)[:40], flush=True)
    """
)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: in a child process, so
    a regression fails the test instead of hanging pytest."""
    os.mkfifo(tmp_path / "pipe")
    child = subprocess.run(
        [sys.executable, "-c", FIFO_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert len(lines) == 6, child.stdout
    for line in lines:
        assert ' ValueError "pipe" is a FIFO, not a regular file' in line, line


@pytest.fixture
def ten_bytes(tmp_path: Path) -> str:
    path = tmp_path / "ten"
    path.write_bytes(b"0123456789")
    return str(path)


def test_a_fractional_plan_entry_is_a_type_error_not_truncated(ten_bytes: str) -> None:
    fs = feedline.FileSystem()
    with pytest.raises(TypeError, match=r"offset must be an int, got 1\.9"):
        fs.stream([(ten_bytes, 1.9, 10.7)])
    with pytest.raises(TypeError, match=r"length must be an int, got 3\.0"):
        fs.stream([(ten_bytes, 1, 3.0)])
    # As cat_file and cat_ranges do.
    with pytest.raises(TypeError):
        fs.cat_file(ten_bytes, 1.9, 10.7)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fs.cat_ranges([ten_bytes], [1.9], [10.7])  # type: ignore[list-item]
    # Integers of any kind (`__index__`) still work.
    np = pytest.importorskip("numpy")
    (chunk,) = fs.stream([(ten_bytes, np.int64(2), np.uint8(3))])
    assert bytes(chunk) == b"234"


HUGE = [2**64, -(2**64), 2**100]


@pytest.mark.parametrize("value", HUGE)
def test_an_offset_past_64_bits_is_a_value_error_naming_it(ten_bytes: str, value: int) -> None:
    fs = feedline.FileSystem()
    named = rf"{value} is out of range"
    calls: list[Callable[[], Any]] = [
        lambda: fs.cat_file(ten_bytes, value),
        lambda: fs.cat_file(ten_bytes, 0, value),
        lambda: fs.cat_ranges([ten_bytes], [value], [None]),
        lambda: fs.cat_ranges([ten_bytes], [0], [value]),
        lambda: fs.stream([(ten_bytes, value, 1)]),
        lambda: fs.stream([(ten_bytes, 0, value)]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=named):
            call()
    with fs.open(ten_bytes) as f:
        if value > 0:
            with pytest.raises(ValueError, match=named):
                f.seek(value)
            with pytest.raises(ValueError, match=named):
                f.seek(value, os.SEEK_CUR)
        # A read of more than any file holds reads to the end.
        assert f.read(abs(value)) == b"0123456789"


def test_writes_cannot_escape_the_replica_root(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    root.mkdir()
    fs = feedline.FileSystem([str(root)])
    for key in ("../x", "a/../../x", "/../x"):
        for mode in ("wb", "ab", "xb"):
            with pytest.raises(ValueError, match="escapes the replica root"):
                fs.open(key, mode)
        with pytest.raises(ValueError, match="escapes the replica root"):
            fs.pipe_file(key, b"data")
    # Reads refuse the same keys.
    with pytest.raises(ValueError, match="escapes the replica root"):
        fs.cat_file("../x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica"]
    # Inside the root, writes work as before.
    with fs.open("ok.bin", "wb") as f:
        f.write(b"ok")
    assert fs.cat_file("ok.bin") == b"ok"


@pytest.mark.parametrize("endpoint", ["http://local host:9000", "http://h:9000/a\tb", "ftp://h"])
def test_an_endpoint_url_requests_cannot_use_is_refused_at_construction(endpoint: str) -> None:
    """It used to pass construction and panic on the first read."""
    with pytest.raises(ValueError, match='storage option "endpoint_url"'):
        feedline.FileSystem(["s3://bucket"], storage_options={"endpoint_url": endpoint})
