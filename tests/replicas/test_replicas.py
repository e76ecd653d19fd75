"""Replica sets end to end: routing, failover on real failures, ejection and
readmission, stats, and bad input. Fault-injected scenarios (slow, spiky,
dead replicas) live in test_replica_scenarios.py."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import feedline
import fsspec
import pytest
from feedline import _core

KEY = "shard-0/part.bin"
SIZE = 64 * 1024


def payload(seed: int, size: int = SIZE) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


@pytest.fixture
def roots(tmp_path: Path) -> Iterator[list[str]]:
    """Three replica roots holding the same object under KEY."""
    out = []
    for i in range(3):
        root = tmp_path / f"replica-{i}"
        (root / "shard-0").mkdir(parents=True)
        (root / KEY).write_bytes(payload(0))
        out.append(str(root))
    yield out


def order(roots: list[str], key: str) -> list[int]:
    """The key's preference list: the router places keys the same way."""
    return _core.Rendezvous(roots).preference_list(key)


def test_listing_names_keys_that_reads_take(roots: list[str]) -> None:
    """ls/info/glob on local replicas answer with keys relative to the
    replica root (what cat_file and ParquetStream take), not replica 0's
    own paths."""
    for root in roots:
        (Path(root) / "shard-0" / "other.bin").write_bytes(b"xy")
    fs = feedline.FileSystem(replicas=roots)
    assert fs.ls("", detail=False) == ["shard-0"]
    assert sorted(fs.ls("shard-0", detail=False)) == ["shard-0/other.bin", KEY]
    assert {e["name"] for e in fs.ls("shard-0")} == {"shard-0/other.bin", KEY}
    assert fs.info(KEY)["name"] == KEY and fs.info(KEY)["size"] == SIZE
    assert sorted(fs.glob("shard-0/*.bin")) == ["shard-0/other.bin", KEY]
    assert [fs.cat_file(k) for k in sorted(fs.find(""))] == [b"xy", payload(0)]


def test_parquet_stream_globs_on_the_replicas(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from feedline.arrow import ParquetStream

    table = pa.table({"id": pa.array(range(600))})
    roots = []
    for i in range(2):
        root = tmp_path / f"pq-replica-{i}"
        (root / "set").mkdir(parents=True)
        for part in range(2):
            pq.write_table(table.slice(part * 300, 300), root / "set" / f"p{part}.parquet")
        roots.append(str(root))
    stream = ParquetStream("set/p*.parquet", fs=feedline.FileSystem(replicas=roots))
    assert stream.paths == ["set/p0.parquet", "set/p1.parquet"]
    assert pa.Table.from_batches(list(stream)).equals(table)


def test_reads_go_through_the_router_and_stick_to_the_primary(roots: list[str]) -> None:
    fs = feedline.FileSystem(replicas=roots)
    data = payload(0)
    assert fs.cat_file(KEY) == data
    assert fs.cat_file(KEY, 10, 20) == data[10:20]
    assert fs.cat_ranges([KEY, KEY], [0, 100], [5, 200]) == [data[:5], data[100:200]]
    with fs.open(KEY, "rb") as f:
        assert f.read() == data
    assert b"".join(bytes(c) for c in fs.stream(KEY, chunk_bytes=4096)) == data
    stats = fs.stats()
    primary = order(roots, KEY)[0]
    per_replica = [r["requests"] for r in stats["replicas"]]
    assert per_replica[primary] == sum(per_replica), per_replica
    assert stats["read_errors"] == 0
    assert [r["name"] for r in stats["replicas"]] == roots
    assert set(stats["latency"]) >= {"p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms"}
    fs.stats(reset=True)
    assert fs.stats()["reads"] == 0


def test_fails_over_when_replicas_lack_the_file(roots: list[str]) -> None:
    prefs = order(roots, KEY)
    # Only the last choice has it: the first two are lagging.
    for i in prefs[:2]:
        os.remove(os.path.join(roots[i], KEY))
    fs = feedline.FileSystem(replicas=roots)
    assert fs.cat_file(KEY) == payload(0)
    assert fs.cat_ranges([KEY], [0], [10]) == [payload(0)[:10]]
    assert b"".join(bytes(c) for c in fs.stream([KEY], chunk_bytes=8192)) == payload(0)
    with fs.open(KEY, "rb") as f:
        assert f.read() == payload(0)
    stats = fs.stats()
    assert stats["read_errors"] == 0
    assert stats["replicas"][prefs[0]]["not_found"] > 0
    assert stats["replicas"][prefs[2]]["bytes"] >= SIZE


def test_file_not_found_only_when_every_replica_lacks_it(roots: list[str]) -> None:
    fs = feedline.FileSystem(replicas=roots)
    with pytest.raises(FileNotFoundError, match="nope"):
        fs.cat_file("nope.bin")
    [err] = fs.cat_ranges(["nope.bin"], [0], [1])
    assert isinstance(err, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.open("nope.bin", "rb")


def test_a_root_removed_mid_run_fails_over(roots: list[str]) -> None:
    keys = [f"shard-0/k{i}.bin" for i in range(40)]
    for root in roots:
        for k in keys:
            Path(root, k).write_bytes(payload(7, 4096))
    fs = feedline.FileSystem(replicas=roots)
    for k in keys[:10]:
        assert fs.cat_file(k) == payload(7, 4096)
    shutil.rmtree(roots[1])
    got = fs.cat_ranges(keys, [0] * len(keys), [None] * len(keys), on_error="raise")
    assert got == [payload(7, 4096)] * len(keys)
    chunks = fs.stream(keys, chunk_bytes=4096)
    assert sum(len(c) for c in chunks) == 4096 * len(keys)
    assert fs.stats()["read_errors"] == 0


def test_replicas_unavailable_names_each_replica(roots: list[str]) -> None:
    # Three different real failures: a directory, a symlink loop, no file.
    os.remove(os.path.join(roots[0], KEY))
    os.mkdir(os.path.join(roots[0], KEY))
    os.remove(os.path.join(roots[1], KEY))
    os.symlink(os.path.join(roots[1], KEY), os.path.join(roots[1], KEY))
    os.remove(os.path.join(roots[2], KEY))
    fs = feedline.FileSystem(replicas=roots, deadline_ms=2000)
    for read in (
        lambda: fs.cat_file(KEY),
        lambda: fs.open(KEY, "rb"),
        lambda: list(fs.stream([KEY])),
    ):
        with pytest.raises(feedline.ReplicasUnavailable) as info:
            read()
        message = str(info.value)
        for root in roots:
            assert root in message
        assert "directory" in message and "no such file" in message, message
        assert isinstance(info.value, OSError)
    [err] = fs.cat_ranges([KEY], [0], [100])
    assert isinstance(err, feedline.ReplicasUnavailable)


def test_ejection_after_failures_and_readmission(roots: list[str]) -> None:
    prefs = order(roots, KEY)
    primary = roots[prefs[0]]
    # A real, non-"not found" failure on the primary: its object is a
    # directory (a broken deploy), so every read there fails.
    os.remove(os.path.join(primary, KEY))
    os.mkdir(os.path.join(primary, KEY))
    fs = feedline.FileSystem(
        replicas=roots, eject_after_failures=3, base_ejection_ms=200, backoff_base_ms=0
    )
    for _ in range(20):
        assert fs.cat_file(KEY, 0, 100) == payload(0)[:100]
        if fs.stats()["replicas"][prefs[0]]["ejected"]:
            break
    s = fs.stats()["replicas"][prefs[0]]
    # Ejected on the third failure in a row, not before, not later.
    assert s["errors"] == 3, s
    assert s["ejections"] == 1 and s["ejected"]
    # Repair the primary; once its ejection is over a probe readmits it.
    os.rmdir(os.path.join(primary, KEY))
    Path(primary, KEY).write_bytes(payload(0))
    deadline = time.monotonic() + 10
    while fs.stats()["replicas"][prefs[0]]["ejected"] and time.monotonic() < deadline:
        assert fs.cat_file(KEY, 0, 100) == payload(0)[:100]
        time.sleep(0.02)
    s = fs.stats()["replicas"][prefs[0]]
    assert not s["ejected"] and s["readmissions"] == 1, s
    before = s["bytes"]
    assert fs.cat_file(KEY, 0, 100) == payload(0)[:100]
    assert fs.stats()["replicas"][prefs[0]]["bytes"] == before + 100
    assert fs.stats()["read_errors"] == 0


def test_open_and_fsspec_route_the_same_way(
    roots: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefs = order(roots, KEY)
    Path(roots[prefs[0]], KEY).write_bytes(payload(1))
    # The primary's copy differs: whoever routes like the router reads it.
    with feedline.open(KEY, replicas=roots, policy="affinity") as f:
        assert f.read() == payload(1)
    with fsspec.open(f"feedline::{KEY}", feedline={"replicas": roots}) as f:
        assert f.read() == payload(1)
    monkeypatch.chdir(roots[0])
    with fsspec.open(f"feedline::/{KEY}", feedline={"replicas": roots}) as f:
        assert f.read() == payload(1)
    with feedline.open(KEY, replicas=roots, hedge_after_ms="p95", timeout_ms=5000) as f:
        assert f.read() == payload(1)


def test_weights_and_p2c_serve_every_read(roots: list[str]) -> None:
    keys = [f"shard-0/w{i}.bin" for i in range(300)]
    for root in roots:
        for k in keys:
            Path(root, k).write_bytes(b"x" * 16)
    fs = feedline.FileSystem(replicas=roots, weights=[1, 1, 8])
    assert fs.cat_ranges(keys, [0] * 300, [None] * 300) == [b"x" * 16] * 300
    requests = [r["requests"] for r in fs.stats()["replicas"]]
    assert requests[2] > requests[0] + requests[1], requests
    p2c = feedline.FileSystem(replicas=roots, policy="p2c", load_factor=1.25)
    assert p2c.cat_ranges(keys, [0] * 300, [None] * 300) == [b"x" * 16] * 300


def test_rendezvous_binding() -> None:
    r = _core.Rendezvous(["a", "b", "c"], [1.0, 2.0, 3.0])
    assert len(r) == 3
    prefs = r.preference_list("k")
    assert sorted(prefs) == [0, 1, 2]
    assert r.replica_for("k") == "abc"[prefs[0]]
    with pytest.raises(ValueError, match="twice"):
        _core.Rendezvous(["a", "a"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"replicas": []}, ValueError, r"at least one root, got \[\]"),
        ({"replicas": "/tmp"}, TypeError, "list of roots"),
        ({"replicas": "DUP"}, ValueError, "listed twice"),
        ({"replicas": "MISSING"}, ValueError, "does not exist"),
        ({"weights": [1, -1, 1]}, ValueError, "weight of replica .* above 0, got -1"),
        (
            {"weights": [1, math.nan, 1]},
            ValueError,
            r"weights\[1\] must be a finite number, got nan",
        ),
        ({"weights": [1, 1]}, ValueError, "2 weights for 3 replicas"),
        ({"weights": [1, "a", 1]}, TypeError, r"weights\[1\] must be a number, got 'a'"),
        ({"hedge_after_ms": 0}, ValueError, "hedge_after_ms must be .* above 0 .*, got 0"),
        ({"hedge_after_ms": -5}, ValueError, "hedge_after_ms must be .* above 0 .*, got -5"),
        ({"hedge_after_ms": "p1e1"}, ValueError, "percentile like 'p95', got 'p1e1'"),
        ({"hedge_after_ms": [5]}, TypeError, r"hedge_after_ms must be .*, got \[5\]"),
        (
            {"hedge_afer_ms": 20},
            TypeError,
            "unknown option 'hedge_afer_ms'; did you mean 'hedge_after_ms'",
        ),
        (
            {"hedge_after": "p95"},
            TypeError,
            "unknown option 'hedge_after'; did you mean 'hedge_after_ms'",
        ),
        ({"hedge_after_ms": "fast"}, ValueError, "percentile like 'p95', got 'fast'"),
        ({"hedge_after_ms": "p100"}, ValueError, "got 'p100'"),
        ({"policy": "random"}, ValueError, "unknown policy 'random'"),
        ({"load_factor": 0.9}, ValueError, "load_factor must be a number above 1"),
        ({"eject_after_failures": 0}, ValueError, "eject_after_failures must be .* at least 1"),
        ({"eject_after_failures": 2**70}, ValueError, "eject_after_failures is out of range"),
        ({"deadline_ms": -1}, ValueError, "deadline_ms must be .* above 0"),
        ({"deadline_ms": 1e23}, ValueError, "deadline_ms must be .* at most 1e9"),
        ({"timeout_ms": math.inf}, ValueError, "timeout_ms must be a finite number"),
        ({"timeout_ms": math.nan}, ValueError, "timeout_ms must be a finite number, got nan"),
        ({"retry_budget_ratio": -0.1}, ValueError, "retry_budget_ratio must be .* at least 0"),
    ],
)
def test_bad_input_is_refused_clearly(
    roots: list[str], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    if kwargs.get("replicas") == "DUP":
        kwargs["replicas"] = [roots[0], roots[1], roots[0] + "/"]
    elif kwargs.get("replicas") == "MISSING":
        kwargs["replicas"] = [*roots[:2], roots[2] + "-missing"]
    else:
        kwargs.setdefault("replicas", roots)
    with pytest.raises(error, match=match):
        feedline.FileSystem(**kwargs)  # type: ignore[arg-type]


def test_a_configuration_as_plain_dicts_is_checked_the_same_way(roots: list[str]) -> None:
    bad = [
        ({"replicas": roots, "policy": "nope"}, "unknown policy"),
        ({"replicas": roots, "routing": {"hedge_after_ms": 0}}, "hedge_after_ms"),
        ({"replicas": roots, "weights": [1, 2]}, "weights"),
        ({"replicas": [roots[0], roots[0]]}, "twice"),
        ({"replicas": [roots[0] + "-missing"]}, "does not exist"),
        ({"replicas": roots, "nonsense": 1}, "unknown option 'nonsense'"),
        ({"replicas": roots, "routing": {"polcy": "p2c"}}, "did you mean 'policy'"),
        ({"replicas": roots, "depth": 2, "prefetch": {"depth": 3}}, "depth is given twice"),
    ]
    for config, needle in bad:
        with pytest.raises(ValueError, match=needle):
            _core.Storage(config)
