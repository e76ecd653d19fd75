"""The consumer's arithmetic: AU and stall time on a synthetic timeline, and
the open loop's coordinated-omission correction under an injected stall."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from feedline.bench import scenario as sc
from feedline.bench.dataset import Materialized, generate
from feedline.bench.metrics import Recorder, StepTiming, accelerator_utilization, stall_seconds
from feedline.bench.systems import FsspecSystem, fault_plan
from feedline.bench.workload import (
    RunLimits,
    compute_draw,
    manifest_verifier,
    plan_batches,
    run_closed,
    run_open,
)

TINY = """
seed = 1
[dataset]
objects = 40
size_bytes = 4096
[replicas]
count = 2
[workload]
readers = 1
batch_size = 4
steps = 25
access = "sequential"
compute = { distribution = "fixed", ms = 1 }
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[tuple[sc.Scenario, Materialized]]:
    scenario = sc.loads(TINY)
    data = generate(scenario, str(tmp_path))
    yield scenario, data
    data.cleanup()


def test_au_on_a_synthetic_timeline() -> None:
    steps = [
        StepTiming(0.0, 0.5, 0.1),  # first step: warm-up, excluded
        StepTiming(0.6, 0.6, 0.1),  # no stall
        StepTiming(0.7, 0.8, 0.1),  # 0.1 s stall
        StepTiming(0.9, 0.9, 0.1),
    ]
    # total after the first step: 1.0 - 0.6 = 0.4 s; compute 0.3 s.
    assert accelerator_utilization(steps) == pytest.approx(0.75)
    assert stall_seconds(steps) == pytest.approx(0.1)
    assert accelerator_utilization(steps[:1]) is None
    no_stall = [StepTiming(i * 0.1, i * 0.1, 0.1) for i in range(5)]
    assert accelerator_utilization(no_stall) == pytest.approx(1.0)


def test_compute_distributions_are_seeded_and_non_negative() -> None:
    for text in (
        '{ distribution = "normal", mean_ms = 5, stdev_ms = 10 }',
        '{ distribution = "gamma", shape = 2, scale_ms = 3 }',
        '{ distribution = "exponential", mean_ms = 4 }',
        '{ distribution = "uniform", low_ms = 1, high_ms = 2 }',
    ):
        dist = sc.loads(f"[workload]\ncompute = {text}\n").workload.compute
        a = [compute_draw(dist, 3)() for _ in range(50)]
        b = [compute_draw(dist, 3)() for _ in range(50)]
        assert a == b
        assert all(x >= 0 for x in a)


def test_plan_covers_epochs_and_ranges(tiny: tuple[sc.Scenario, Materialized]) -> None:
    scenario, data = tiny
    batches = plan_batches(scenario, data)
    assert len(batches) == 25 and all(len(b) == 4 for b in batches)
    assert [s[0] for s in batches[0]] == data.keys[:4]
    ranged = sc.override(
        scenario,
        workload=sc.Workload(batch_size=4, steps=5, access="random_ranges", range_bytes=100),
    )
    for key, start, end in (s for b in plan_batches(ranged, data) for s in b):
        assert start is not None and end is not None
        assert end - start == 100 and start >= 0 and end <= data.sizes[key]


def test_closed_loop_verifies_every_byte(tiny: tuple[sc.Scenario, Materialized]) -> None:
    scenario, data = tiny
    system = FsspecSystem(scenario, data, {})
    rec = Recorder()
    run_closed(
        system.read,
        plan_batches(scenario, data),
        readers=2,
        prefetch_batches=2,
        compute=compute_draw(scenario.workload.compute, 0),
        rec=rec,
        verify=manifest_verifier(data),
    )
    r = rec.result((50.0, 99.0))
    assert r["steps"] == 25 and r["samples"] == 100
    assert r["verified_bytes"] == 100 * 4096 and r["mismatches"] == 0
    assert r["errors"] == 0
    assert 0 < r["au"] <= 1


def test_corrupted_bytes_are_counted(tiny: tuple[sc.Scenario, Materialized]) -> None:
    scenario, data = tiny
    system = FsspecSystem(scenario, data, {})

    def flipping(key: str, start: int | None, end: int | None) -> bytes:
        b = bytearray(system.read(key, start, end))
        if key == data.keys[3]:
            b[0] ^= 0xFF
        return bytes(b)

    rec = Recorder()
    run_closed(
        flipping,
        plan_batches(scenario, data)[:2],
        readers=1,
        prefetch_batches=1,
        compute=lambda: 0.0,
        rec=rec,
        verify=manifest_verifier(data),
    )
    assert rec.mismatches == 1


def test_open_loop_corrected_percentiles_cover_the_stall(
    tiny: tuple[sc.Scenario, Materialized],
) -> None:
    """One read stalls for 300 ms while reads keep arriving at 200/s on one
    reader: the reads queued behind it only show in the corrected figures."""
    scenario, data = tiny
    system = FsspecSystem(scenario, data, {})
    stall_s = 0.3
    stalled = threading.Event()

    def read(key: str, start: int | None, end: int | None) -> bytes:
        if key == data.keys[10] and not stalled.is_set():
            stalled.set()
            time.sleep(stall_s)
        return system.read(key, start, end)

    rec = Recorder()
    run_open(
        read,
        plan_batches(scenario, data),
        readers=1,
        rate_per_s=200.0,
        rec=rec,
        verify=manifest_verifier(data),
    )
    r = rec.result((50.0, 90.0, 99.0, 99.9))
    assert stalled.is_set()
    assert r["samples"] == 100 and r["errors"] == 0
    plain, corrected = r["latency"], r["latency_co"]
    for p in ("50", "90", "99", "99.9"):
        assert corrected["percentiles_ms"][p] >= plain["percentiles_ms"][p]
    # About 60 reads were due during the stall: the corrected p90 carries a
    # large part of it, the service-time p90 does not.
    assert corrected["p90_ms"] >= stall_s * 1000 / 3
    assert plain["p90_ms"] < corrected["p90_ms"]
    assert corrected["max_ms"] >= stall_s * 1000


def test_stop_event_ends_a_run_early(tiny: tuple[sc.Scenario, Materialized]) -> None:
    scenario, data = tiny
    system = FsspecSystem(scenario, data, {})
    stop = threading.Event()
    rec = Recorder()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    try:
        run_closed(
            system.read,
            plan_batches(scenario, data) * 1000,
            readers=1,
            prefetch_batches=1,
            compute=lambda: 0.01,
            rec=rec,
            verify=manifest_verifier(data),
            limits=RunLimits(stop=stop),
        )
    finally:
        timer.cancel()
    assert 0 < len(rec.steps) < 25000


def test_fault_plan_turns_events_into_outages() -> None:
    text = """
[replicas]
count = 3
[[faults.replica]]
index = 1
spike_probability = 0.1
spike_ms = 50
[[faults.event]]
at = "2s"
action = "kill"
replica = 2
[[faults.event]]
at = "5s"
action = "resume"
replica = 2
[[faults.event]]
at = "7s"
action = "stop"
replica = 0
until = "8s"
"""
    plan = fault_plan(sc.loads(text))
    assert plan.per_replica[2].outages == [[2.0, 5.0]]
    assert plan.per_replica[0].outages == [[7.0, 8.0]]
    assert plan.per_replica[1].spike_probability == 0.1
    assert plan.per_replica[1].outages == []
    assert [w[:2] for w in plan.windows] == [(2.0, 5.0), (7.0, 8.0)]


def test_parquet_and_lognormal_datasets(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    text = """
seed = 9
[dataset]
objects = 6
size_bytes = 20000
size_distribution = "lognormal"
size_sigma = 0.5
format = "parquet"
[replicas]
count = 2
"""
    scenario = sc.loads(text)
    data = generate(scenario, str(tmp_path))
    assert all(k.endswith(".parquet") for k in data.keys)
    first = Path(data.replica_dirs[1]) / data.keys[0]
    assert pq.read_table(first).column_names == ["sample"]
    verify = manifest_verifier(data)
    for key in data.keys:
        payload = (Path(data.replica_dirs[1]) / key).read_bytes()
        assert verify((key, None, None), payload) is True
        assert verify((key, None, None), payload[:-1] + b"\0") is False


def test_existing_dataset_with_its_manifest(tmp_path: Path) -> None:
    from feedline.bench import runner

    made = generate(sc.loads(TINY), str(tmp_path / "made"))
    text = f"""
systems = ["fsspec"]
[dataset]
path = "{made.replica_dirs[0]}"
manifest = "{made.manifest_path}"
[replicas]
dirs = ["{made.replica_dirs[0]}", "{made.replica_dirs[1]}"]
[workload]
readers = 1
batch_size = 4
steps = 5
"""
    p = tmp_path / "existing.toml"
    p.write_text(text, encoding="utf-8")
    rep = runner.run(sc.load(p))
    s = rep["systems"][0]
    assert s["status"] == "ok" and s["samples"] == 20
    assert s["verified_bytes"] == s["bytes"] and s["mismatches"] == 0
    assert rep["dataset_bytes"] == 40 * 4096


def test_manifest_naming_a_missing_object(tmp_path: Path) -> None:
    from feedline.bench.dataset import existing

    (tmp_path / "d").mkdir()
    (tmp_path / "m.json").write_text('{"objects": {"nope.bin": {"crc32c": "0000abcd"}}}')
    scen = tmp_path / "s.toml"
    scen.write_text('[dataset]\npath = "d"\nmanifest = "m.json"\n', encoding="utf-8")
    with pytest.raises(sc.ScenarioError, match=r"names 'nope.bin', missing under"):
        existing(sc.load(scen))
    (tmp_path / "m.json").write_text('{"x": "zz"}')
    with pytest.raises(sc.ScenarioError, match=r"'x': malformed crc32c 'zz'"):
        existing(sc.load(scen))
