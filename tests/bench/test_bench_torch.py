"""The ``torch-dataloader`` system: a real DataLoader whose worker processes
read through plain fsspec under the scenario's faults, beside feedline and
fsspec. Small sizes; skips cleanly without torch."""

from __future__ import annotations

import _thread
import gc
import json
import os
import signal
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from feedline.bench import runner
from feedline.bench import scenario as sc
from feedline.bench.dataset import generate
from feedline.bench.metrics import Recorder
from feedline.bench.replicas import nginx_support
from feedline.bench.systems import fault_plan, make_system
from feedline.bench.workload import RunLimits, plan_batches
from feedline.cli import main
from feedline_helpers import interrupt_bench

SMALL = """
name = "torch_small"
seed = 5
systems = ["feedline", "fsspec", "torch-dataloader"]
[dataset]
objects = 48
size_bytes = 8192
size_distribution = "uniform"
size_min_bytes = 4096
size_max_bytes = 12288
[replicas]
count = 3
[[faults.replica]]
index = 1
spike_probability = 0.1
spike_ms = 5
[[faults.event]]
at = "0s"
action = "kill"
replica = 2
[workload]
readers = 2
batch_size = 4
steps = 30
access = "shuffled"
compute = { distribution = "fixed", ms = 2 }
[torch_dataloader]
workers = 2
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def shard(key: str, n: int = 3) -> int:
    """The fsspec paths' static sharding."""
    return zlib.crc32(key.encode()) % n


def test_runs_beside_feedline_and_fsspec_with_sane_figures() -> None:
    scenario = sc.loads(SMALL)
    rep = runner.run(scenario)
    by_name = {s["system"]: s for s in rep["systems"]}
    assert list(by_name) == ["feedline", "fsspec", "torch-dataloader"]
    for name, s in by_name.items():
        assert s["status"] == "ok", (name, s["notes"])
        assert s["steps"] == 30 and s["samples"] == 120 and s["errors"] == 0, name
        assert s["verified_bytes"] == s["bytes"] > 0 and s["mismatches"] == 0, name
    t, fs = by_name["torch-dataloader"], by_name["fsspec"]
    # Same dataset, same access order: the same bytes reach both loops.
    assert t["bytes"] == fs["bytes"]
    lat = t["latency"]
    assert lat["count"] == 120
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["p99.9_ms"] <= lat["max_ms"]
    assert 0 < t["au"] <= 1 and t["stall_s"] >= 0 and t["first_batch_ms"] > 0
    assert t["samples_per_s"] > 0 and t["mb_per_s"] > 0 and t["timeline"]
    assert sum(p["samples_per_s"] for p in t["timeline"][:-1]) <= 120
    assert t["latency_co"] is None
    # Replica 2 is dead from the start: every read sharded to it failed over
    # once, in the workers exactly as in the fsspec system's threads.
    batches = plan_batches(scenario, generate_keys_only(scenario))
    expected = sum(1 for b in batches for key, _, _ in b if shard(key) == 2)
    assert expected > 0
    assert t["retries"] == fs["retries"] == expected
    # Peak RSS counts the main process and the workers' own memory.
    info = t["system_info"]
    assert t["peak_rss_mb"] > info["peak_workers_private_mb"] > 0
    assert info["workers"] == 2 and len(info["worker_pids"]) == 2
    # The reads happened in the worker processes, not in the main one.
    readers = {int(p) for p in info["reads_per_pid"]}
    assert readers <= set(info["worker_pids"]) and os.getpid() not in readers
    assert info["main_pid"] == os.getpid()
    assert sum(info["reads_per_pid"].values()) == 120
    # Chaos fates were drawn in the main process for replicas 1 and 2.
    assert info["chaos_broker_requests"] > 0
    # Every worker is gone once the system's run returns.
    assert not [pid for pid in info["worker_pids"] if alive(pid)]
    assert by_name["fsspec"]["system_info"] is None
    assert rep["scenario"]["torch_dataloader"]["workers"] == 2


def generate_keys_only(scenario: sc.Scenario) -> Any:
    """The dataset's keys as ``plan_batches`` sees them (sizes do not matter
    for shuffled whole-object reads): generated again in a temp dir."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = generate(scenario, d)
        data.workdir = None
        return data


def test_a_replica_dying_after_n_requests_counts_requests_of_all_workers(
    tmp_path: Path,
) -> None:
    """``fail_after_requests`` is the replica's count across every worker:
    its fates come from one sampler in the main process, so torch-dataloader
    fails over exactly as often as the single-process fsspec system."""
    text = SMALL.replace('[[faults.event]]\nat = "0s"\naction = "kill"\nreplica = 2\n', "")
    assert "kill" not in text
    text = text.replace(
        "[[faults.replica]]\nindex = 1\nspike_probability = 0.1\nspike_ms = 5\n",
        "[[faults.replica]]\nindex = 0\nfail_after_requests = 5\n",
    )
    scenario = sc.override(sc.loads(text), systems=("fsspec", "torch-dataloader"))
    rep = runner.run(scenario)
    fs, t = rep["systems"]
    data = generate_keys_only(scenario)
    to_zero = sum(1 for b in plan_batches(scenario, data) for key, _, _ in b if shard(key) == 0)
    assert to_zero > 5
    assert fs["retries"] == to_zero - 5
    assert t["retries"] == to_zero - 5, t["system_info"]
    assert t["errors"] == 0 and t["mismatches"] == 0 and t["samples"] == 120


def test_corruption_in_a_worker_is_caught_by_the_manifest() -> None:
    text = SMALL.replace(
        "[[faults.replica]]\nindex = 1\nspike_probability = 0.1\nspike_ms = 5\n",
        "[[faults.replica]]\nindex = 1\ncorrupt_rate = 1.0\n",
    )
    scenario = sc.override(sc.loads(text), systems=("torch-dataloader",))
    rep = runner.run(scenario)
    t = rep["systems"][0]
    data = generate_keys_only(scenario)
    to_one = sum(1 for b in plan_batches(scenario, data) for key, _, _ in b if shard(key) == 1)
    assert to_one > 0
    assert t["status"] == "ok" and t["samples"] == 120
    assert t["mismatches"] == to_one
    assert t["verified_bytes"] < t["bytes"]


def test_spawned_workers_read_too(tmp_path: Path) -> None:
    text = SMALL.replace("workers = 2", 'workers = 2\nstart_method = "spawn"').replace(
        "steps = 30", "steps = 6"
    )
    scenario = sc.override(sc.loads(text), systems=("torch-dataloader",))
    rep = runner.run(scenario)
    t = rep["systems"][0]
    assert t["status"] == "ok", t["notes"]
    assert t["samples"] == 24 and t["mismatches"] == 0 and t["errors"] == 0
    info = t["system_info"]
    assert info["start_method"] == "spawn"
    assert {int(p) for p in info["reads_per_pid"]} <= set(info["worker_pids"])
    assert not [pid for pid in info["worker_pids"] if alive(pid)]


# The interrupt lands at an arbitrary bytecode of the main thread: inside
# multiprocessing's descriptor hand-over (an AF_UNIX connection the
# DataLoader uses to pass worker file descriptors) it leaves that socket to
# the garbage collector. What this test checks is that the run ends and the
# workers are gone; a leaked socket of the interrupted library is not ours.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)
def test_ctrl_c_mid_run_shuts_the_workers_down() -> None:
    scenario = sc.override(
        sc.loads(SMALL.replace("steps = 30", "steps = 20000")), systems=("torch-dataloader",)
    )
    interrupted = threading.Event()

    def progress(name: str, rec: Recorder, total: int) -> None:
        if len(rec.steps) >= 3 and not interrupted.is_set():
            interrupted.set()
            _thread.interrupt_main()  # Ctrl-C, delivered to the main thread

    rep = runner.run(scenario, progress=progress)
    assert interrupted.is_set()
    assert rep["partial"] is True
    t = rep["runs"][0][0]
    assert t["status"] == "partial" and 3 <= t["steps"] < 20000
    pids = t["system_info"]["worker_pids"]
    assert len(pids) == 2
    assert not [pid for pid in pids if alive(pid)]
    gc.collect()  # such a socket is collected here, under this test's filters


def test_an_error_in_the_loop_shuts_the_workers_down(tmp_path: Path) -> None:
    scenario = sc.loads(SMALL)
    data = generate(scenario, str(tmp_path))
    plan = fault_plan(scenario)
    system = make_system("torch-dataloader", scenario, data, plan.per_replica)
    steps = 0

    def compute() -> float:
        nonlocal steps
        steps += 1
        if steps == 3:
            raise RuntimeError("the training step failed")
        return 0.001

    with pytest.raises(RuntimeError, match="training step failed"):
        system.run_closed(
            plan_batches(scenario, data),
            readers=1,
            prefetch_batches=2,
            compute=compute,
            rec=Recorder(),
            verify=None,
            limits=RunLimits(),
        )
    info = system.info()
    assert info is not None and len(info["worker_pids"]) == 2
    assert not [pid for pid in info["worker_pids"] if alive(pid)]
    system.close()


def test_a_duration_limit_ends_the_run_and_the_workers() -> None:
    text = SMALL.replace("steps = 30", "steps = 20000").replace(
        "[torch_dataloader]", '[load]\nduration_s = "1s"\n[torch_dataloader]'
    )
    rep = runner.run(sc.override(sc.loads(text), systems=("torch-dataloader",)))
    t = rep["systems"][0]
    assert t["status"] == "ok" and 0 < t["steps"] < 20000
    assert not [pid for pid in t["system_info"]["worker_pids"] if alive(pid)]


def test_sigint_to_the_cli_writes_partial_json_and_leaves_no_worker(tmp_path: Path) -> None:
    scen = tmp_path / "long.toml"
    scen.write_text(SMALL.replace("steps = 30", "steps = 20000"), encoding="utf-8")
    out = tmp_path / "partial.json"
    returncode, _, stderr = interrupt_bench(scen, out, "torch-dataloader", after_s=2.0)
    assert returncode == 130, stderr
    rep = json.loads(out.read_text())
    t = rep["runs"][0][0]
    assert t["system"] == "torch-dataloader" and t["status"] == "partial"
    pids = t["system_info"]["worker_pids"]
    assert len(pids) == 2 and not [pid for pid in pids if alive(pid)]


def test_open_loop_is_rejected_for_torch_dataloader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SMALL.replace(
        "[torch_dataloader]", '[load]\nmode = "open"\nrate_per_s = 100\n[torch_dataloader]'
    )
    with pytest.raises(
        sc.ScenarioError,
        match=r'\[load\] mode = "open": system \'torch-dataloader\' runs a closed loop only',
    ):
        sc.loads(text, source="open.toml")
    # Without it the scenario is fine; adding it on the command line is refused too.
    scen = tmp_path / "open.toml"
    scen.write_text(text.replace(', "torch-dataloader"', ""), encoding="utf-8")
    assert sc.load(scen).load.mode == "open"
    code = main(["bench", str(scen), "--systems", "fsspec,torch-dataloader", "--check"])
    assert code == 2
    assert "runs a closed loop only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("workers = 0", r"\[torch_dataloader\] workers: expected an integer >= 1, got 0"),
        ('workers = "2"', r"\[torch_dataloader\] workers: expected an integer >= 1, got str '2'"),
        ("prefetch_factor = -1", r"prefetch_factor: expected an integer >= 1, got -1"),
        ('start_method = "frk"', r"unknown value 'frk' \(did you mean 'fork'\?\)"),
        ("worker = 2", r"unknown key 'worker' \(did you mean 'workers'\?\)"),
    ],
)
def test_bad_torch_dataloader_options(table: str, message: str) -> None:
    with pytest.raises(sc.ScenarioError, match=message):
        sc.loads(f"[torch_dataloader]\n{table}\n", source="bad.toml")


@pytest.mark.nginx
def test_workers_see_a_real_nginx_kill() -> None:
    why = nginx_support()
    if why is not None:
        pytest.skip(why)
    text = """
seed = 2
systems = ["fsspec", "torch-dataloader"]
[dataset]
objects = 32
size_bytes = 16384
[replicas]
kind = "nginx"
count = 2
[[faults.event]]
at = "0s"
action = "kill"
replica = 1
[workload]
readers = 2
batch_size = 4
steps = 40
compute = { distribution = "fixed", ms = 5 }
"""
    rep = runner.run(sc.loads(text))
    for s in rep["systems"]:
        assert s["status"] == "ok", (s["system"], s["notes"])
        assert s["steps"] == 40 and s["errors"] == 0 and s["mismatches"] == 0
        assert s["verified_bytes"] == s["bytes"] > 0
        # Reads sharded to the killed server failed over by hand.
        assert s["retries"] > 0, s["system"]


def test_open_loop_scenario_built_in_code_is_refused_before_running() -> None:
    open_loop = sc.override(sc.loads(SMALL), load=sc.Load(mode="open", rate_per_s=100.0))
    with pytest.raises(sc.ScenarioError, match="runs a closed loop only"):
        runner.run(open_loop)


def test_a_worker_killed_mid_run_is_an_error_not_a_crash() -> None:
    scenario = sc.override(
        sc.loads(SMALL.replace("steps = 30", "steps = 20000")), systems=("torch-dataloader",)
    )
    killed: list[int] = []

    def progress(name: str, rec: Recorder, total: int) -> None:
        if len(rec.steps) >= 3 and not killed and rec.child_pids is not None:
            pid = rec.child_pids()[0]
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)  # as the OOM killer would

    rep = runner.run(scenario, progress=progress)
    t = rep["systems"][0]
    assert killed and t["status"] == "ok"
    assert 3 <= t["steps"] < 20000
    assert t["errors"] >= 1
    assert any("DataLoader" in e and "worker" in e for e in t["error_examples"]), t[
        "error_examples"
    ]
    assert not [pid for pid in t["system_info"]["worker_pids"] if alive(pid)]
