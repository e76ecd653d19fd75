"""The pytest plugin works from a fresh pytest run in a user's project:
fixtures come from the installed ``pytest11`` entry point, and the latency
percentiles land in pytest-benchmark's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

USER_TEST = """
def test_user_code(benchmark, feedline_replicas, feedline_latency):
    replicas = feedline_replicas(n=2, objects=8, size_bytes=4096)
    assert len(replicas.roots) == 2 and len(replicas.keys) == 8
    fs = replicas.fsspec(1)

    def read_all():
        for key in replicas.keys:
            with feedline_latency.measure():
                assert len(fs.cat_file(key)) == 4096

    benchmark.pedantic(read_all, rounds=2, iterations=1)


def test_bad_chaos_index(feedline_replicas):
    import pytest
    with pytest.raises(ValueError, match="chaos names replica 5"):
        feedline_replicas(n=2, chaos={5: {"error_rate": 0.5}})
"""


def test_plugin_in_a_fresh_user_project(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_user.py").write_text(USER_TEST, encoding="utf-8")
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            f"--benchmark-json={out}",
            "test_user.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    extra = json.loads(out.read_text())["benchmarks"][0]["extra_info"]
    assert extra["latency_count"] == 16.0
    assert 0 < extra["latency_p50_ms"] <= extra["latency_p99_ms"] <= extra["latency_p99.9_ms"]
