"""Node cache benchmarks (ids P11a and P11b in docs/benchmarks.md), each with
its baseline in the same run:

* P11a: a whole file read from a warm node cache (the second epoch) vs the
  same bytes read from the page cache with builtin ``readinto``.
* P11b: a cold epoch, 8 DataLoader workers x 2 processes over 3 nginx
  replicas behind the fault proxy: bytes the replicas sent / dataset bytes,
  for feedline's node cache and fsspec's ``blockcache`` and ``filecache``
  (one cache directory shared by both processes in every case).

Sizes: ``FEEDLINE_BENCH_P11_BYTES`` (default 512 MiB, one file, P11a) and
``FEEDLINE_BENCH_P11B_OBJECTS`` (default 64 objects of 4 MiB, P11b)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
import numpy as np
import pytest
from conftest import ROUNDS, GiB, MiB, setting
from feedline import _core
from feedline.testing.nginx import NginxReplicas, nginx_binary

Benchmark = Any

READER = Path(__file__).with_name("cache_epoch_reader.py")
GET = re.compile(r'"GET /[^ ]+ HTTP/[0-9.]+" 20[06] (\d+)')


def _replicas(root: Path, log: Path | None = None) -> NginxReplicas:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    extra = f"access_log {log} combined;" if log is not None else ""
    return NginxReplicas(root, 3, extra_config=extra)


# ---------------------------------------------------------------- P11a


class Warm:
    def __init__(self, fs: feedline.FileSystem, local: str, nbytes: int) -> None:
        self.fs = fs
        self.local = local
        self.nbytes = nbytes
        self.buf = np.ones(nbytes, dtype=np.uint8)  # pages faulted in once


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warm]:
    nbytes = setting("FEEDLINE_BENCH_P11_BYTES", 512 * MiB)
    root = tmp_path_factory.mktemp("p11a")
    data = root / "data"
    data.mkdir()
    (data / "big").write_bytes(os.urandom(nbytes))
    with _replicas(data) as replicas:
        fs = feedline.FileSystem(
            replicas.urls,
            cache_dir=str(root / "cache"),
            cache_bytes=2 * nbytes,
            hedge_after_ms=None,
        )
        assert fs.cat_file("big") == (data / "big").read_bytes()  # epoch 1 fills it
        with open(data / "big", "rb") as f:  # the baseline's bytes in the page cache
            f.read()
        yield Warm(fs, str(data / "big"), nbytes)


def _run(benchmark: Benchmark, fn: Any, nbytes: int) -> Any:
    result = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["rate"] = f"{nbytes / median / GiB:.2f} GiB/s"
    return result


@pytest.mark.benchmark(group="P11a")
def test_p11a_feedline_warm_cache_readinto(benchmark: Benchmark, warm: Warm) -> None:
    def read() -> int:
        with warm.fs.open("big") as f:
            return int(f.readinto(warm.buf))

    assert _run(benchmark, read, warm.nbytes) == warm.nbytes
    assert warm.fs.cache is not None
    stats = warm.fs.cache.stats()
    benchmark.extra_info["cache_hit_bytes"] = stats["hit_bytes"]
    assert stats["fills"] == -(-warm.nbytes // (8 * MiB))  # epoch 1's only


@pytest.mark.benchmark(group="P11a")
def test_p11a_builtin_readinto_page_cache(benchmark: Benchmark, warm: Warm) -> None:
    def read() -> int:
        with open(warm.local, "rb", buffering=0) as f:
            return int(f.readinto(warm.buf))

    assert _run(benchmark, read, warm.nbytes) == warm.nbytes


# ---------------------------------------------------------------- P11b


@pytest.fixture(scope="module")
def p11b_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], int]:
    objects = setting("FEEDLINE_BENCH_P11B_OBJECTS", 64)
    root = tmp_path_factory.mktemp("p11b") / "data"
    root.mkdir()
    keys = [f"o{i:04d}" for i in range(objects)]
    for k in keys:
        (root / k).write_bytes(os.urandom(4 * MiB))
    return root, keys, objects * 4 * MiB


@pytest.mark.benchmark(group="P11b")
@pytest.mark.parametrize("system", ["feedline", "blockcache", "filecache"])
def test_p11b_cold_epoch_replica_bytes_over_dataset_bytes(
    benchmark: Benchmark,
    tmp_path: Path,
    p11b_data: tuple[Path, list[str], int],
    system: str,
) -> None:
    pytest.importorskip("torch")
    root, keys, dataset_bytes = p11b_data
    log = tmp_path / "access.log"
    with _replicas(root, log) as replicas:
        proxies = [_core.FaultProxy(url.removeprefix("http://")) for url in replicas.urls]
        try:
            config = {
                "system": system,
                "urls": [p.url for p in proxies],
                "keys": keys,
                "cache_dir": str(tmp_path / "cache"),
                "workers": 8,
            }

            delivered: list[int] = []

            def epoch() -> None:
                procs = [
                    subprocess.Popen(
                        [sys.executable, str(READER), json.dumps({**config, "seed": seed})],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for seed in range(2)
                ]
                for p in procs:
                    out, _ = p.communicate(timeout=600)
                    assert p.returncode == 0
                    delivered.append(int(out.split()[-1]))

            benchmark.pedantic(epoch, rounds=1, iterations=1)
            proxied = sum(p.stats()["bytes_downstream"] for p in proxies)
        finally:
            for p in proxies:
                p.close()
    body = sum(int(m.group(1)) for m in GET.finditer(log.read_text()))
    ratio = body / dataset_bytes
    benchmark.extra_info["replica_bytes_over_dataset"] = f"{ratio:.2f}"
    benchmark.extra_info["proxy_bytes_over_dataset"] = f"{proxied / dataset_bytes:.2f}"
    # fsspec's filecache shared by two processes has handed back short
    # files here (a reader saw another's partial download): recorded, not
    # asserted, for the baselines.
    benchmark.extra_info["delivered_over_expected"] = f"{sum(delivered) / (2 * dataset_bytes):.4f}"
    if system == "feedline":
        assert body == dataset_bytes and delivered == [dataset_bytes] * 2
