"""Datasets for the benchmarks, generated once per session in a temporary
directory (removed afterwards) and read once so they sit in the page cache.

Sizes come from the environment so a quick run is possible:

    FEEDLINE_BENCH_P1_BYTES   (default 1 GiB)    one file, P1 and P2
    FEEDLINE_BENCH_P2_RANGES  (default 100000)   4 KiB ranges per round
    FEEDLINE_BENCH_P3_BYTES   (default 2 GiB)    of 1 MiB files
    FEEDLINE_BENCH_P7_CHUNKS  (default 200000)   chunks per round
    FEEDLINE_BENCH_ROUNDS     (default 5)        measured rounds per benchmark
    FEEDLINE_BENCH_QUICK=1    divides every size by 16 and uses 3 rounds
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1 << 20
GiB = 1 << 30

QUICK = os.environ.get("FEEDLINE_BENCH_QUICK", "") not in ("", "0")


def setting(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is not None:
        return int(value)
    return max(1, default // 16) if QUICK else default


ROUNDS = int(os.environ.get("FEEDLINE_BENCH_ROUNDS", "3" if QUICK else "5"))


@dataclass(frozen=True)
class Dataset:
    root: Path
    big_file: str
    big_bytes: int
    small_files: list[str]
    small_bytes: int


def _write(path: Path, size: int, seed: int) -> None:
    block = os.urandom(MiB) if seed == 0 else bytes([seed % 256]) * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def _warm(path: str) -> None:
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


@pytest.fixture(scope="session")
def dataset() -> Iterator[Dataset]:
    root = Path(tempfile.mkdtemp(prefix="feedline-bench-"))
    try:
        big_bytes = setting("FEEDLINE_BENCH_P1_BYTES", GiB)
        big = root / "big.bin"
        _write(big, big_bytes, 0)
        p3_bytes = setting("FEEDLINE_BENCH_P3_BYTES", 2 * GiB)
        small_dir = root / "small"
        small_dir.mkdir()
        small = []
        for i in range(max(1, p3_bytes // MiB)):
            path = small_dir / f"{i:05d}.bin"
            _write(path, MiB, i + 1)
            small.append(os.fspath(path))
        for path in [os.fspath(big), *small]:
            _warm(path)
        yield Dataset(root, os.fspath(big), big_bytes, small, MiB)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Prints feedline/baseline ratios (median vs median) after a run."""
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None)
    if not benchmarks:
        return
    import report

    data = {
        "benchmarks": [
            {"name": b.name, "stats": {"median": b.stats.median}, "extra_info": b.extra_info}
            for b in benchmarks
            if getattr(b, "stats", None) is not None
        ]
    }
    table = report.rows(data)
    if table:
        terminalreporter.section("feedline ratios (median vs median)")
        terminalreporter.write_line(report.format_table(table))
