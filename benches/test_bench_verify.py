"""Cost of verified bytes and of the chaos wrapper, each as a ratio to the
same reads without it, measured in the same run.

Run: ``pytest benches/test_bench_verify.py --benchmark-only -o testpaths=benches``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
import pytest
from feedline.chaos import Chaos

MiB = 1 << 20
FILES = 32
FILE_BYTES = 4 * MiB
RANGES = 20_000
RANGE_BYTES = 4096


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str, str]]:
    root = tmp_path_factory.mktemp("verify") / "r0"
    root.mkdir()
    rng = random.Random(0)
    for i in range(FILES):
        (root / f"f{i:02d}.bin").write_bytes(rng.randbytes(FILE_BYTES))
    streaming = feedline.write_manifest(root, block_bytes=MiB, path=root.parent / "m1m.json")
    ranged = feedline.write_manifest(root, block_bytes=64 << 10, path=root.parent / "m64k.json")
    small = feedline.write_manifest(root, block_bytes=4 << 10, path=root.parent / "m4k.json")
    yield root, streaming, ranged, small


def _stream_all(fs: feedline.FileSystem) -> int:
    keys = [f"f{i:02d}.bin" for i in range(FILES)]
    total = 0
    with fs.stream(keys, chunk_bytes=4 * MiB, depth=8) as stream:
        for chunk in stream:
            total += chunk.nbytes
            chunk.release()
    return total


@pytest.mark.parametrize("mode", ["plain", "chaos_noop", "verified"])
def test_stream_throughput(benchmark: Any, replica: tuple[Path, str, str, str], mode: str) -> None:
    root, streaming, _, _ = replica
    kwargs: dict[str, Any] = {}
    if mode == "verified":
        kwargs["manifest"] = streaming
    if mode == "chaos_noop":
        kwargs["chaos"] = {0: Chaos(seed=1)}
    fs = feedline.FileSystem(replicas=[root], **kwargs)
    benchmark.group = "stream 128 MiB, 4 MiB chunks"
    assert benchmark.pedantic(_stream_all, args=(fs,), rounds=7, warmup_rounds=1) == (
        FILES * FILE_BYTES
    )


@pytest.mark.parametrize("mode", ["plain", "chaos_noop", "verified", "verified_4k_blocks"])
def test_random_4k_ranges(benchmark: Any, replica: tuple[Path, str, str, str], mode: str) -> None:
    root, _, ranged, small = replica
    kwargs: dict[str, Any] = {}
    if mode == "verified":
        kwargs["manifest"] = ranged
    if mode == "verified_4k_blocks":
        kwargs["manifest"] = small
    if mode == "chaos_noop":
        kwargs["chaos"] = {0: Chaos(seed=1)}
    fs = feedline.FileSystem(replicas=[root], **kwargs)
    rng = random.Random(1)
    paths = [f"f{rng.randrange(FILES):02d}.bin" for _ in range(RANGES)]
    starts = [rng.randrange(FILE_BYTES - RANGE_BYTES) for _ in range(RANGES)]
    ends = [s + RANGE_BYTES for s in starts]
    benchmark.group = "cat_ranges 20k x 4 KiB (verified: 64 KiB blocks unless named)"
    out = benchmark.pedantic(fs.cat_ranges, args=(paths, starts, ends), rounds=7, warmup_rounds=1)
    assert all(isinstance(b, bytes) for b in out)
