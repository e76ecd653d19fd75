"""Ranged reads with a silent replica: feedline against fsspec and obstore
in the same run.

Three replicas on loopback, one of them silent: a listening socket that
completes TCP handshakes and never answers (``socket``), or a SIGSTOPped
nginx (``sigstop``). Every system reads the same 32 KiB ranges of 1 MiB
objects from the same pool of 8 threads, each range CRC-checked; rounds
alternate systems so drift hits all of them.

* feedline: ``FileSystem(replicas)`` with no routing options (the defaults
  are what is measured), ``cat_file(key, start, end)``.
* fsspec (``HTTPFileSystem.cat_file(url, start, end)``) and obstore
  (``get_range``) have no replicas: object *i* is read from replica *i* mod
  3, as a user spreads load by hand. Against a silent server they would
  wait for their own timeouts (aiohttp's 5 minutes, object_store's 30 s
  with 10 retries), so each gets a per-request timeout of
  ``BASELINE_TIMEOUT_S`` (and obstore no retries of its own), and a read
  that fails or times out is tried on the next replica, up to every
  replica once: the failover loop a user would write. A read that fails on
  every replica, or returns wrong bytes, is an error.

Latencies go into an HDR histogram (feedline's own ``LatencyHistogram``);
p50/p99/p99.9/max, errors and wall time per round, medians over rounds.

    make bench BENCH_ARGS="-k silent_replica -s"
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import socket
import statistics
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from feedline._core import LatencyHistogram
from feedline.testing import nginx_binary

MiB = 1 << 20
OBJECTS = int(os.environ.get("FEEDLINE_SILENT_BENCH_OBJECTS", "200"))
#: 32 KiB by default (``FEEDLINE_SILENT_BENCH_RANGE_KIB`` sets it). Before the
#: rig's nginx ran with ``tcp_nopush off``, a kept-alive connection answered
#: ranges of 1-2 MSS (64-128 KiB on loopback) ~44 ms late; see
#: docs/benchmarks.md.
RANGE_BYTES = int(os.environ.get("FEEDLINE_SILENT_BENCH_RANGE_KIB", "32")) << 10
#: Reads per round per system: a third of them placed on the silent replica.
READS = int(os.environ.get("FEEDLINE_SILENT_BENCH_READS", "480"))
ROUNDS = int(os.environ.get("FEEDLINE_SILENT_BENCH_ROUNDS", "3"))
CONCURRENCY = 8
#: The baselines' per-request timeout: 100x their p50 here, and short
#: enough that a round ends in seconds (a longer one only makes them slower).
BASELINE_TIMEOUT_S = float(os.environ.get("FEEDLINE_SILENT_BENCH_TIMEOUT_S", "0.5"))
#: Every round stops here even if a system hangs.
ROUND_TIMEOUT_S = 300.0
SILENT = 2

Reader = Callable[[int], bytes]

pytestmark = pytest.mark.skipif(
    nginx_binary() is None and os.environ.get("CI", "").lower() != "true",
    reason="nginx is not installed (apt-get install nginx)",
)


@dataclass
class Dataset:
    root: Path
    keys: list[str]
    #: (object index, offset) of each read, and the CRC32 of its bytes.
    reads: list[tuple[int, int]]
    crcs: list[int]


@dataclass
class Round:
    system: str
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("silentbench")
    keys, bodies = [], []
    for i in range(OBJECTS):
        key = f"obj{i:05d}.bin"
        body = os.urandom(MiB)
        (root / key).write_bytes(body)
        keys.append(key)
        bodies.append(body)
    rng = random.Random(11)
    reads = [(i % OBJECTS, rng.randrange(0, MiB - RANGE_BYTES)) for i in range(READS)]
    crcs = [zlib.crc32(bodies[i][o : o + RANGE_BYTES]) for i, o in reads]
    return Dataset(root, keys, reads, crcs)


@contextlib.contextmanager
def silent_socket() -> Iterator[str]:
    """A loopback socket that completes handshakes and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def replicas_with_a_silent_one(root: Path, mode: str) -> Iterator[list[str]]:
    """Three replica URLs of ``root``; replica ``SILENT`` never answers."""
    from feedline.testing import NginxReplicas

    if mode == "socket":
        with NginxReplicas(root, 2) as nginx, silent_socket() as silent:
            yield [*nginx.urls, silent]
        return
    with NginxReplicas(root, 3) as nginx:
        nginx.pause(SILENT)
        try:
            yield list(nginx.urls)
        finally:
            nginx.resume(SILENT)


def with_failover(urls: list[str], get: Callable[[int, int, int], bytes]) -> Callable[[int], bytes]:
    """Read ``i`` from replica ``i mod n``, then each next one on error."""

    def read(i: int) -> bytes:
        errors = []
        for attempt in range(len(urls)):
            try:
                return get((i + attempt) % len(urls), i, attempt)
            except Exception as e:
                errors.append(repr(e))
        raise OSError(f"every replica failed: {errors}")

    return read


def fsspec_reader(urls: list[str], data: Dataset) -> Reader:
    import aiohttp
    from fsspec.implementations.http import HTTPFileSystem

    fs = HTTPFileSystem(
        skip_instance_cache=True,
        client_kwargs={"timeout": aiohttp.ClientTimeout(total=BASELINE_TIMEOUT_S)},
    )

    def get(replica: int, i: int, _: int) -> bytes:
        obj, offset = data.reads[i]
        url = f"{urls[replica]}/{data.keys[obj]}"
        body: bytes = fs.cat_file(url, offset, offset + RANGE_BYTES)
        return body

    return with_failover(urls, get)


def obstore_reader(urls: list[str], data: Dataset) -> Reader:
    import obstore
    from obstore.store import HTTPStore

    timeout = f"{int(BASELINE_TIMEOUT_S * 1000)}ms"
    stores = [
        HTTPStore.from_url(
            u,
            client_options={"allow_http": True, "timeout": timeout, "connect_timeout": timeout},
            retry_config={"max_retries": 0},
        )
        for u in urls
    ]

    def get(replica: int, i: int, _: int) -> bytes:
        obj, offset = data.reads[i]
        got = obstore.get_range(stores[replica], data.keys[obj], start=offset, length=RANGE_BYTES)
        return bytes(got)

    return with_failover(urls, get)


def feedline_reader(urls: list[str], data: Dataset) -> tuple[Reader, Any]:
    import feedline

    fs = feedline.FileSystem(replicas=urls, skip_instance_cache=True)

    def read(i: int) -> bytes:
        obj, offset = data.reads[i]
        body: bytes = fs.cat_file(data.keys[obj], offset, offset + RANGE_BYTES)
        return body

    return read, fs


def run_round(system: str, read: Reader, data: Dataset) -> Round:
    result = Round(system)

    def one(i: int) -> tuple[float, str | None]:
        started = time.perf_counter()
        try:
            body = read(i)
        except Exception as e:
            return time.perf_counter() - started, f"read {i}: {e!r}"[:300]
        elapsed = time.perf_counter() - started
        if zlib.crc32(body) != data.crcs[i]:
            return elapsed, f"read {i}: wrong bytes ({len(body)})"
        return elapsed, None

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, i) for i in range(len(data.reads))]
        for f in concurrent.futures.as_completed(futures, timeout=ROUND_TIMEOUT_S):
            elapsed, error = f.result()
            result.histogram.record_us(max(1, round(elapsed * 1e6)))
            if error:
                result.errors.append(error)
    result.wall_s = time.perf_counter() - started
    return result


def figures(r: Round) -> dict[str, float]:
    h = r.histogram
    return {
        "p50_ms": h.percentile_ms(50),
        "p99_ms": h.percentile_ms(99),
        "p99.9_ms": h.percentile_ms(99.9),
        "max_ms": h.percentile_ms(100),
        "errors": float(len(r.errors)),
        "wall_s": r.wall_s,
    }


@pytest.mark.parametrize("mode", ["socket", "sigstop"])
def test_silent_replica_ranged_reads(mode: str, benchmark: Any, dataset: Dataset) -> None:
    with replicas_with_a_silent_one(dataset.root, mode) as urls:
        feedline_read, fs = feedline_reader(urls, dataset)
        systems: dict[str, Reader] = {
            "feedline": feedline_read,
            "fsspec": fsspec_reader(urls, dataset),
            "obstore": obstore_reader(urls, dataset),
        }
        rounds: dict[str, list[Round]] = {name: [] for name in systems}

        def all_rounds() -> None:
            for _ in range(ROUNDS):
                for name, read in systems.items():
                    rounds[name].append(run_round(name, read, dataset))

        benchmark.pedantic(all_rounds, rounds=1, iterations=1)
        stats = fs.stats()
    title = (
        f"silent replica ({mode}): 1 of 3, {READS} ranged reads of {RANGE_BYTES >> 10} KiB "
        f"per round, baselines' timeout {BASELINE_TIMEOUT_S} s"
    )
    print(f"\n{title}")
    results: dict[str, Any] = {}
    for name, rs in rounds.items():
        per_round = [figures(r) for r in rs]
        for i, f in enumerate(per_round):
            print(f"  {name:9} round {i}  " + "  ".join(f"{k}={v:.1f}" for k, v in f.items()))
        median = {k: statistics.median(f[k] for f in per_round) for k in per_round[0]}
        print(f"  {name:9} median   " + "  ".join(f"{k}={v:.1f}" for k, v in median.items()))
        # The run: every round's reads in one histogram, so feedline's first
        # round (finding the silent replica out) counts as much as the rest.
        run = Round(
            name, errors=[e for r in rs for e in r.errors], wall_s=sum(r.wall_s for r in rs)
        )
        for r in rs:
            run.histogram.merge(r.histogram)
        whole = figures(run)
        print(f"  {name:9} run      " + "  ".join(f"{k}={v:.1f}" for k, v in whole.items()))
        results[name] = {"rounds": per_round, "median": median, "run": whole}
    silent = stats["replicas"][SILENT]
    results["feedline_silent_replica"] = {
        k: silent[k] for k in ("requests", "ejections", "cancelled", "timeouts", "ejected")
    }
    results["feedline_hedges_won"] = sum(r["hedges_won"] for r in stats["replicas"])
    print(f"  feedline: silent replica {results['feedline_silent_replica']}, "
          f"hedges won {results['feedline_hedges_won']}")  # fmt: skip
    benchmark.extra_info.update(results)
    out = Path(os.environ.get("FEEDLINE_BENCH_OUT", "bench-out"))
    out.mkdir(exist_ok=True)
    import json

    (out / f"silent_replica_{mode}.json").write_text(json.dumps(results, indent=2))
    # Correctness, not speed: every byte feedline delivered is right, and it
    # took the silent replica out.
    feedline_errors = [e for r in rounds["feedline"] for e in r.errors]
    assert not feedline_errors, feedline_errors[:5]
    assert silent["ejections"] >= 1, silent
