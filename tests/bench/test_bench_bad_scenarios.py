"""`feedline bench --check` on scenario files that are not scenarios, or that
ask for more than the machine can hold: one line on stderr, exit 2, no
traceback (a real `feedline` process each time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TIB = 1 << 40

SCENARIO = """
name = "sized"
systems = ["feedline"]
[dataset]
{dataset}
[replicas]
kind = "local"
count = 2
[workload]
readers = 1
batch_size = 1
steps = 1
"""


def check(path: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feedline.cli", "bench", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_binary_file_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(check(binary), str(binary), "not UTF-8")
    nuls = tmp_path / "nuls.toml"
    nuls.write_bytes(b"\x00" * 64)
    assert_one_line_error(check(nuls), str(nuls), "not valid TOML")


def test_a_directory_fifo_or_device_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(check(tmp_path), "is a directory")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_one_line_error(check(fifo), "not a regular file")
    assert_one_line_error(check("/dev/zero"), "not a regular file")


@pytest.mark.parametrize(
    ("dataset", "needle"),
    [
        (f"objects = 1\nsize_bytes = {TIB}", "built in memory"),
        (
            f'objects = 4\nsize_bytes = 1024\nsize_distribution = "uniform"\n'
            f"size_min_bytes = 1024\nsize_max_bytes = {TIB}",
            "built in memory",
        ),
        (
            f'objects = 4\nsize_bytes = {TIB // 64}\nsize_distribution = "lognormal"\n'
            "size_sigma = 1.0",
            "built in memory",
        ),
        (f"objects = {2**40}\nsize_bytes = {1 << 20}", "free"),
    ],
    ids=["fixed_1tib", "uniform_to_1tib", "lognormal_tail", "too_many_bytes"],
)
def test_a_dataset_the_machine_cannot_hold_is_refused_at_check(
    tmp_path: Path, dataset: str, needle: str
) -> None:
    scenario = tmp_path / "big.toml"
    scenario.write_text(SCENARIO.format(dataset=dataset))
    assert_one_line_error(check(scenario), "[dataset]", needle)


def test_a_dataset_that_fits_still_passes_check(tmp_path: Path) -> None:
    scenario = tmp_path / "small.toml"
    scenario.write_text(SCENARIO.format(dataset="objects = 4\nsize_bytes = 1024"))
    run = check(scenario)
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout
