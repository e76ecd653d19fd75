"""The node cache end to end: real nginx replicas (their access logs count
what was fetched), real processes and DataLoader workers sharing one cache
directory, real signals, real files flipped on disk, a real tmpfs filled up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import feedline
import pytest
from feedline import _core
from feedline.testing.nginx import NginxReplicas
from feedline_helpers import pattern

BLOCK = 256 << 10
#: Three blocks: two whole and a short last one.
OBJECT = 2 * BLOCK + 100_000
READER = Path(__file__).with_name("cache_reader.py")
REQUEST = re.compile(r'"(GET|HEAD) /([^ ]+) HTTP/[0-9.]+" (\d+) (\d+)')


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "data"
    root.mkdir()
    objects = {f"o{i:02d}": pattern(OBJECT, seed=i) for i in range(12)}
    for key, data in objects.items():
        (root / key).write_bytes(data)
    return objects


@pytest.fixture
def logged_replicas(
    tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> tuple[NginxReplicas, Path]:
    """Three nginx replicas of the dataset, all logging to one access log."""
    log = tmp_path / "access.log"
    replicas = nginx_replicas(tmp_path / "data", 3, extra_config=f"access_log {log} combined;")
    return replicas, log


def fetches(log: Path) -> Counter[tuple[str, str]]:
    """(method, key) -> requests that the replicas answered, from the log."""
    seen: Counter[tuple[str, str]] = Counter()
    for line in log.read_text().splitlines() if log.exists() else []:
        m = REQUEST.search(line)
        if m and m.group(3) in ("200", "206"):
            seen[(m.group(1), m.group(2))] += 1
    return seen


def get_bytes(log: Path) -> int:
    total = 0
    for line in log.read_text().splitlines():
        m = REQUEST.search(line)
        if m and m.group(1) == "GET":
            total += int(m.group(4))
    return total


def cache_options(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "cache_dir": str(tmp_path / "cache"),
        "cache_bytes": 64 << 20,
        "cache_block_bytes": BLOCK,
    }
    options.update(changes)
    return options


def cached_fs(urls: list[str], tmp_path: Path, **changes: Any) -> feedline.FileSystem:
    return feedline.FileSystem(urls, hedge_after_ms=None, **cache_options(tmp_path, **changes))


def block_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "blocks").rglob("*") if p.is_file())


@pytest.mark.timeout(240)
def test_processes_and_their_dataloader_workers_fetch_each_block_once(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    pytest.importorskip("torch")
    replicas, log = logged_replicas
    config = {
        "replicas": replicas.urls,
        "cache": cache_options(tmp_path),
        "objects": {k: _core.crc32c(v) for k, v in dataset.items()},
        "workers": 4,
        "rounds": 3,
    }
    # Two training processes at once, one with forked workers and one with
    # spawned ones, each reading every object three times, shuffled.
    procs = [
        subprocess.Popen(
            [sys.executable, str(READER), json.dumps({**config, "context": ctx, "seed": i})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, ctx in enumerate(["fork", "spawn"])
    ]
    try:
        outs = [p.communicate(timeout=200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1])["read"] == 36
    got = fetches(log)
    # Each of the 3 blocks of each object was fetched from one replica, once.
    gets = {key: n for (method, key), n in got.items() if method == "GET"}
    assert gets == dict.fromkeys(dataset, 3), gets
    assert get_bytes(log) == sum(len(v) for v in dataset.values())


@pytest.mark.timeout(60)
def test_a_filler_killed_mid_block_is_taken_over(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    replicas, _ = logged_replicas
    # The filler's replicas answer after 30 s (chaos latency under the
    # router): it holds the blocks' locks when it is killed.
    script = (
        "import feedline, sys, json; "
        f"fs = feedline.FileSystem({replicas.urls!r}, hedge_after_ms=None, "
        f"chaos={{i: feedline.Chaos(latency=feedline.chaos.Fixed(30000)) for i in range(3)}}, "
        f"**{cache_options(tmp_path)!r}); "
        "print('reading', flush=True); fs.cat_file('o00')"
    )
    filler = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert filler.stdout is not None
        assert filler.stdout.readline().strip() == "reading"
        time.sleep(1.0)  # its version check is done; its fetches are sleeping
        fs = cached_fs(replicas.urls, tmp_path)
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(fs.cat_file("o00")))
        reader.start()
        time.sleep(0.5)
        assert fs.cache is not None and fs.cache.stats()["waits"] >= 1
        filler.send_signal(signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive()
    finally:
        filler.kill()
        filler.wait()
        if filler.stdout is not None:
            filler.stdout.close()
    assert result == [dataset["o00"]]
    stats = fs.cache.stats()
    assert stats["fills"] == 3 and stats["corrupt_blocks"] == 0, stats
    # Nothing the dead filler left reads as a block: a fresh process reads
    # only intact blocks, from the cache.
    again = cached_fs(replicas.urls, tmp_path)
    assert again.cat_file("o00") == dataset["o00"]
    assert again.cache is not None and again.cache.stats()["hits"] == 3


def test_a_flipped_byte_is_detected_counted_and_fetched_again(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    replicas, log = logged_replicas
    fs = cached_fs(replicas.urls, tmp_path)
    assert fs.cat_file("o01") == dataset["o01"]
    (victim,) = [p for p in block_files(tmp_path) if p.stat().st_size > BLOCK + 4096 - 1][:1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    assert fs.cat_file("o01") == dataset["o01"]
    assert fs.cache is not None
    stats = fs.cache.stats()
    assert stats["corrupt_blocks"] == 1 and stats["fills"] == 4, stats
    assert fetches(log)[("GET", "o01")] == 4


def test_a_rewritten_object_is_served_new(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    replicas, _ = logged_replicas
    fs = cached_fs(replicas.urls, tmp_path)
    assert fs.cat_file("o02") == dataset["o02"]
    new = pattern(OBJECT, seed=99)
    path = tmp_path / "data" / "o02"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(new)
    # nginx's ETag is mtime (seconds) and size: a same-size rewrite must
    # land in another second to get a new version.
    later = path.stat().st_mtime + 10
    os.utime(tmp, (later, later))
    tmp.rename(path)
    time.sleep(1.1)  # one version check per object per second
    assert fs.cat_file("o02") == new
    assert fs.cat_file("o02", start=BLOCK + 5, end=BLOCK + 4101) == new[BLOCK + 5 : BLOCK + 4101]


def test_with_every_replica_dead_cached_blocks_are_served_and_the_rest_fail(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    replicas, _ = logged_replicas
    fs = cached_fs(replicas.urls, tmp_path, deadline_ms=3000)
    assert fs.cat_file("o03") == dataset["o03"]
    for i in range(3):
        replicas.kill(i)
    time.sleep(1.1)  # the version is asked again, and no replica answers
    assert fs.cat_file("o03") == dataset["o03"]
    with fs.open("o03") as f:
        assert f.read() == dataset["o03"]
    with pytest.raises(feedline.ReplicasUnavailable):
        fs.cat_file("o04")
    assert fs.cache is not None and fs.cache.stats()["stale_versions"] >= 1


def test_the_directory_stays_within_the_bound_during_a_run(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    replicas, _ = logged_replicas
    total = sum(len(v) for v in dataset.values())
    capacity = total // 2
    threads = 4
    fs = cached_fs(replicas.urls, tmp_path, cache_bytes=capacity)
    root = tmp_path / "cache"
    stop = threading.Event()
    worst = [0, 0]

    def sample() -> None:
        while not stop.is_set() and worst[1] < 200_000:
            size = 0
            for sub in ("blocks", "tmp"):
                for dirpath, _, files in os.walk(root / sub):
                    for f in files:
                        # Evicted or renamed while walking: not there.
                        with contextlib.suppress(FileNotFoundError):
                            size += os.stat(os.path.join(dirpath, f)).st_size
            worst[0] = max(worst[0], size)
            worst[1] += 1

    def epochs(offset: int) -> None:
        keys = sorted(dataset)
        for _ in range(3):
            for key in keys[offset:] + keys[:offset]:
                assert fs.cat_file(key) == dataset[key]

    sampler = threading.Thread(target=sample)
    sampler.start()
    readers = [threading.Thread(target=epochs, args=(3 * i,)) for i in range(threads)]
    try:
        for r in readers:
            r.start()
        for r in readers:
            r.join(120)
    finally:
        stop.set()
        sampler.join()
    assert worst[1] > 10
    # The bound: capacity, plus one block file (payload and its 4 KiB
    # header) per fill in flight; a whole-object read fills its 3 at once.
    in_flight = threads * 3 * (BLOCK + 4096)
    assert worst[0] <= capacity + in_flight, (worst, capacity)
    assert fs.cache is not None
    stats = fs.cache.stats()
    assert stats["resident_bytes"] <= capacity and stats["evictions"] > 0, stats


@contextlib.contextmanager
def tmpfs(at: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``at`` (root only: skips otherwise), unmounted
    after, also on failure."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    at.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(at)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tmpfs", "size=600k") as mount:
        yield mount


def test_a_read_only_cache_directory_bypasses_the_cache(
    tmp_path: Path,
    dataset: dict[str, bytes],
    logged_replicas: tuple[NginxReplicas, Path],
    capfd: pytest.CaptureFixture[str],
) -> None:
    replicas, _ = logged_replicas
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        fs = cached_fs(replicas.urls, tmp_path, cache_dir=str(mount / "c"))
        for _ in range(2):
            assert fs.cat_file("o10") == dataset["o10"]
        assert fs.cache is not None
        stats = fs.cache.stats()
        assert stats["bypasses"] >= 2 and stats["hits"] == 0, stats
    assert capfd.readouterr().err.count("feedline: the node cache") == 1


def test_a_full_disk_bypasses_the_cache_and_reads_succeed(
    tmp_path: Path,
    dataset: dict[str, bytes],
    logged_replicas: tuple[NginxReplicas, Path],
    small_tmpfs: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    replicas, _ = logged_replicas
    # The bound is far above the disk: writes hit ENOSPC before eviction.
    fs = cached_fs(replicas.urls, tmp_path, cache_dir=str(small_tmpfs / "c"))
    for key in ["o05", "o06", "o07"]:
        assert fs.cat_file(key) == dataset[key]
        assert fs.cat_file(key) == dataset[key]
    assert fs.cache is not None
    stats = fs.cache.stats()
    assert stats["bypasses"] >= 1 and stats["hits"] >= 1, stats
    # One warning, however many bypasses.
    assert capfd.readouterr().err.count("could not store a block") == 1


def test_warm_fills_the_cache_in_the_background_and_later_reads_hit(
    tmp_path: Path, dataset: dict[str, bytes], logged_replicas: tuple[NginxReplicas, Path]
) -> None:
    replicas, log = logged_replicas
    fs = cached_fs(replicas.urls, tmp_path)
    assert fs.cache is not None
    plan = ["o08", ("o09", BLOCK + 10, 100)]
    assert fs.cache.warm(plan).result(timeout=60) == OBJECT + BLOCK
    assert fs.cache.stats()["fills"] == 4
    assert fs.cat_file("o08") == dataset["o08"]
    assert fs.cat_file("o09", start=BLOCK, end=2 * BLOCK) == dataset["o09"][BLOCK : 2 * BLOCK]
    assert fs.cache.stats()["hits"] == 4
    gets = {k: n for (m, k), n in fetches(log).items() if m == "GET"}
    assert gets == {"o08": 3, "o09": 1}
    failed = fs.cache.warm(["missing"])
    with pytest.raises(FileNotFoundError):
        failed.result(timeout=60)
    with pytest.raises(TypeError, match="warm takes paths"):
        fs.cache.warm([42])
    fs.cache.clear()
    assert fs.cache.stats()["resident_bytes"] == 0 and block_files(tmp_path) == []
