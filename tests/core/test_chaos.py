"""Fault injection (`feedline.chaos`): validation, determinism, and faults
that are visible through the filesystem API and its counters."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import feedline
import fsspec
import pytest
from feedline import _core
from feedline.chaos import (
    Chaos,
    ChaosFileSystem,
    Fixed,
    LogNormal,
    Normal,
    Pareto,
    Uniform,
)

OBJ_BYTES = 4096


@pytest.fixture()
def replica(tmp_path: Path) -> Path:
    root = tmp_path / "replica"
    root.mkdir()
    (root / "obj").write_bytes(bytes(i % 251 for i in range(OBJ_BYTES)))
    return root


def fs_with(replica: Path, chaos: Chaos, **kwargs: object) -> feedline.FileSystem:
    return feedline.FileSystem(replicas=[replica], chaos={0: chaos}, **kwargs)


def injected(fs: feedline.FileSystem) -> dict[str, int]:
    counts: dict[str, int] = fs.fault_stats()[0]["injected"]
    return counts


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Chaos(error_rate=1.5), "error_rate"),
        (lambda: Chaos(spike_probability=-0.1), "spike_probability"),
        (lambda: Chaos(stall_rate=2), "stall_rate"),
        (lambda: Chaos(corrupt_rate=math.nan), "corrupt_rate"),
        (lambda: Chaos(spike_ms=-1), "spike_ms"),
        (lambda: Chaos(outages=[(5, 2)]), "outages"),
        (lambda: Chaos(outages=[(1,)]), "outages"),
        (lambda: Chaos(fail_after_requests=-1), "fail_after_requests"),
        (lambda: Chaos(bandwidth_bytes_per_s=0), "bandwidth_bytes_per_s"),
        (lambda: Chaos(seed=-1), "seed"),
        (lambda: Chaos(latency=Fixed(-1)), "fixed ms"),
        (lambda: Chaos(latency=Uniform(5, 1)), "low_ms"),
        (lambda: Chaos(latency=Normal(-3, 1)), "mean_ms"),
        (lambda: Chaos(latency=LogNormal(0, 1)), "median_ms"),
        (lambda: Chaos(latency=Pareto(1, 0)), "shape"),
        (lambda: Chaos(latency=Pareto(1, -2)), "shape"),
        (lambda: Chaos(latency=Pareto(0, 1)), "scale_ms"),
        (lambda: Chaos(spike_ms=1e300), "spike_ms"),
        (lambda: Chaos(bandwidth_bytes_per_s=1e-300), "bandwidth_bytes_per_s"),
    ],
)
def test_bad_values_name_field_and_value(make: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make()  # type: ignore[operator]


def test_bad_types_and_bad_replica_keys(replica: Path) -> None:
    with pytest.raises(TypeError, match="latency"):
        Chaos(latency=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="error_rate"):
        Chaos(error_rate="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replica 3"):
        feedline.FileSystem(replicas=[replica], chaos={3: Chaos()})
    with pytest.raises(ValueError, match="nowhere"):
        feedline.FileSystem(replicas=[replica], chaos={"/nowhere": Chaos()})
    with pytest.raises(TypeError, match="Chaos"):
        feedline.FileSystem(replicas=[replica], chaos={0: {"error_rate": 0.1}})  # type: ignore[dict-item]
    # The same checks hold for a configuration given as plain dicts.
    bad = {"replicas": [str(replica)], "chaos": {"0": {"error_rate": 3}}}
    with pytest.raises(ValueError, match="error_rate"):
        _core.Storage(bad)
    unknown = {"replicas": [str(replica)], "chaos": {"0": {"eror_rate": 0.1}}}
    with pytest.raises(ValueError, match=r"'eror_rate' in chaos\.0; did you mean 'error_rate'"):
        _core.Storage(unknown)


def test_root_keys_and_lists_are_accepted(replica: Path) -> None:
    chaos = Chaos(outages=[[0, 3600]])  # type: ignore[list-item]
    assert chaos.outages == [[0.0, 3600.0]]
    fs = feedline.FileSystem(replicas=[replica], chaos={str(replica): chaos})
    with pytest.raises(OSError, match="injected outage"):
        fs.cat_file("obj")


def test_same_seed_same_fault_sequence() -> None:
    spec = Chaos(
        latency=LogNormal(2, 1), error_rate=0.2, spike_probability=0.1, spike_ms=9, seed=11
    )
    a = _core.ChaosSampler(spec)
    b = _core.ChaosSampler(spec)
    seq_a = [a.next(100) for _ in range(300)]
    assert seq_a == [b.next(100) for _ in range(300)]
    kinds = {kind for _, kind, _ in seq_a}
    assert kinds == {"none", "error"}
    other = _core.ChaosSampler(Chaos(error_rate=0.2, seed=12))
    assert [k for _, k, _ in seq_a] != [other.next(100)[1] for _ in range(300)]


def test_latency_and_spikes_show_in_read_times_and_counters(replica: Path) -> None:
    spec = Chaos(latency=Fixed(1), spike_probability=0.25, spike_ms=40, seed=7)
    expected = _core.ChaosSampler(spec)
    fs = fs_with(replica, spec)
    spiked: list[float] = []
    plain: list[float] = []
    for _ in range(40):
        delay_ms, kind, _ = expected.next(OBJ_BYTES)
        t0 = time.perf_counter()
        assert len(fs.cat_file("obj")) == OBJ_BYTES
        took_ms = (time.perf_counter() - t0) * 1000
        # A sleep never ends early: each read took at least its injected delay.
        assert took_ms >= delay_ms
        assert kind == "none"
        (spiked if delay_ms > 40 else plain).append(took_ms)
    counts = injected(fs)
    assert counts["requests"] == 40
    assert counts["spikes"] == len(spiked) == expected.stats()["spikes"]
    assert 0 < len(spiked) < 40
    assert statistics.median(spiked) > statistics.median(plain)


def test_errors_are_retryable_oserrors_naming_the_replica(replica: Path) -> None:
    fs = fs_with(replica, Chaos(error_rate=0.5, seed=3))
    out = fs.cat_ranges(["obj"] * 200, 0, 100)
    errors = [e for e in out if isinstance(e, BaseException)]
    assert len(errors) == injected(fs)["errors"]
    assert 50 < len(errors) < 150
    for e in errors:
        assert isinstance(e, OSError)
        assert "injected error" in str(e) and str(replica) in str(e)
    good = [b for b in out if isinstance(b, bytes)]
    assert all(b == bytes(i % 251 for i in range(100)) for b in good)


def test_fail_after_requests_and_outage_windows(replica: Path) -> None:
    fs = fs_with(replica, Chaos(fail_after_requests=2))
    assert fs.cat_file("obj", 0, 10) == bytes(range(10))
    assert fs.cat_file("obj", 0, 10) == bytes(range(10))
    with pytest.raises(OSError, match="injected outage"):
        fs.cat_file("obj", 0, 10)
    assert injected(fs)["outage_rejections"] >= 1

    fs = fs_with(replica, Chaos(outages=[(0.2, 3600)]))
    assert fs.cat_file("obj", 0, 10) == bytes(range(10))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            fs.cat_file("obj", 0, 10)
        except OSError as e:
            assert "injected outage" in str(e)
            break
        time.sleep(0.05)
    else:
        pytest.fail("the outage window never started")


def test_corruption_is_visible_without_a_manifest(replica: Path) -> None:
    fs = fs_with(replica, Chaos(corrupt_rate=1.0, seed=1))
    data = fs.cat_file("obj")
    want = (replica / "obj").read_bytes()
    diff = [i for i in range(OBJ_BYTES) if data[i] != want[i]]
    assert len(diff) == 1
    assert data[diff[0]] == want[diff[0]] ^ 0xFF
    assert injected(fs)["corruptions"] == 1


def test_stream_sees_latency_and_delivers_in_order(replica: Path) -> None:
    fs = fs_with(replica, Chaos(latency=Uniform(1, 5), seed=2))
    with fs.stream(["obj"], chunk_bytes=1024, depth=4) as stream:
        got = b"".join(bytes(chunk) for chunk in stream)
    assert got == (replica / "obj").read_bytes()
    assert injected(fs)["requests"] == 4


def test_chaos_filesystem_matches_feedline_fault_sequence(replica: Path) -> None:
    spec = Chaos(error_rate=0.3, corrupt_rate=0.2, seed=5)

    def outcomes(cat: object) -> list[object]:
        out: list[object] = []
        for _ in range(40):
            try:
                out.append(cat("obj", 0, 512))  # type: ignore[operator]
            except OSError as e:
                assert "injected error" in str(e)
                out.append("error")
        return out

    local = fsspec.filesystem("file")
    path = os.fspath(replica / "obj")
    baseline_a = ChaosFileSystem(local, spec)
    baseline_b = ChaosFileSystem(local, spec)
    a = outcomes(lambda p, s, e: baseline_a.cat_file(path, s, e))
    assert a == outcomes(lambda p, s, e: baseline_b.cat_file(path, s, e))
    assert "error" in a
    clean = (replica / "obj").read_bytes()[:512]
    assert any(x != clean and x != "error" for x in a), "no corruption drawn"
    # The Rust store wrapper draws the same fate for the same request.
    fs = fs_with(replica, spec)
    assert a == outcomes(fs.cat_file)
    assert baseline_a.fault_stats() == injected(fs)


def test_chaos_filesystem_open_latency_stall_and_outage(replica: Path) -> None:
    local = fsspec.filesystem("file")
    path = os.fspath(replica / "obj")
    slow = ChaosFileSystem(local, Chaos(latency=Fixed(5)))
    t0 = time.perf_counter()
    with slow.open(path, "rb", block_size=1024) as f:
        assert f.read() == (replica / "obj").read_bytes()
    assert time.perf_counter() - t0 >= 0.005
    assert slow.fault_stats()["requests"] >= 1
    stalled = ChaosFileSystem(local, Chaos(stall_rate=1.0), stall_s=0.01)
    with pytest.raises(TimeoutError, match="stall"):
        stalled.cat_file(path)
    dead = ChaosFileSystem(local, Chaos(fail_after_requests=0))
    with pytest.raises(OSError, match="outage"):
        dead.cat_file(path)
    with pytest.raises(TypeError, match="Chaos"):
        ChaosFileSystem(local, {"error_rate": 0.1})  # type: ignore[arg-type]
