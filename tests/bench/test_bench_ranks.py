"""`feedline bench --nproc N [--nnodes 2]`: a real `feedline` process that
launches torchrun (gloo, CPU); per-rank rows and a job row; every planned
sample delivered once across ranks x DataLoader workers, each checked
against the manifest's CRC32C; two nodes as network namespaces (root);
bad values as one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from feedline.bench import nodes
from feedline.bench.scenario import ScenarioError

pytest.importorskip("torch")

IS_ROOT = os.geteuid() == 0
RUN_TIMEOUT_S = 150
OBJECTS = 64
OBJECT_BYTES = 4096

# One epoch: 16 steps x 4 samples = the 64 objects, each planned once.
SCENARIO = f"""
name = "ranks"
seed = 11
systems = ["feedline"]
[dataset]
objects = {OBJECTS}
size_bytes = {OBJECT_BYTES}
[replicas]
kind = "local"
count = 3
[[faults.replica]]
index = 1
spike_probability = 0.1
spike_ms = 5
[workload]
readers = 4
batch_size = 4
steps = 16
access = "shuffled"
compute = {{ distribution = "fixed", ms = 2 }}
"""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ranks") / "ranks.toml"
    path.write_text(SCENARIO)
    return path


def bench(*args: str, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """A real `feedline bench`; whatever it started dies with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedline.cli", "bench", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_json(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "report.json"
    done = bench(*args, "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def check_every_sample_once(system: dict[str, Any], world: int) -> None:
    ranks = system["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world))
    keys = Counter(k for r in ranks for k in r["delivered"])
    assert len(keys) == OBJECTS and set(keys.values()) == {1}, keys.most_common(3)
    assert system["delivery"] == {
        "planned": OBJECTS,
        "delivered": OBJECTS,
        "duplicates": 0,
        "missing": 0,
    }
    # Every byte was checked against the manifest, none differed.
    assert system["verified_bytes"] == OBJECTS * OBJECT_BYTES
    assert sum(r["verified_bytes"] for r in ranks) == OBJECTS * OBJECT_BYTES
    assert system["mismatches"] == 0 and system["errors"] == 0


def test_two_ranks_two_workers_give_rank_rows_and_a_job_row(scenario: Path, tmp_path: Path) -> None:
    report, text = run_json(tmp_path, str(scenario), "--nproc", "2", "--workers", "2")
    assert report["ranks"]["world_size"] == 2 and report["ranks"]["workers"] == 2
    (system,) = report["systems"]
    assert system["status"] == "ok"
    check_every_sample_once(system, 2)
    ranks = system["ranks"]
    # Each rank read through its own 2 DataLoader worker processes.
    pids = [set(r["worker_pids"]) for r in ranks]
    assert all(len(p) == 2 for p in pids) and not pids[0] & pids[1]
    # The job row: samples summed, read percentiles pooled (between the ranks'),
    # AU over the slowest rank's duration, that rank named.
    assert system["samples"] == sum(r["samples"] for r in ranks) == OBJECTS
    p999 = [r["latency"]["p99.9_ms"] for r in ranks]
    assert min(p999) <= system["latency"]["p99.9_ms"] <= max(p999)
    assert system["latency"]["count"] == OBJECTS
    job = system["job"]
    assert job["ranks"] == 2
    # Every rank computes the same fixed 2 ms per step for as many steps, so
    # the job's AU (compute over the slowest rank's duration) is the AU of
    # the slowest rank, the lowest of the ranks'.
    slowest = min(ranks, key=lambda r: r["au"])
    assert system["au"] == pytest.approx(slowest["au"])
    assert system["slowest_rank"]["rank"] == slowest["rank"]
    assert system["slowest_rank"]["host"] == slowest["node"]
    # The text report: a row per rank and the job's.
    assert "rank" in text and "job" in text and "slowest: rank" in text
    assert f"{OBJECTS} of {OBJECTS} planned samples delivered, 0 twice, 0 missing" in text


@pytest.mark.root
@pytest.mark.nginx
@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root")
def test_two_nodes_over_tcp_with_a_lossy_link_to_one(scenario: Path, tmp_path: Path) -> None:
    report, text = run_json(
        tmp_path,
        str(scenario),
        "--nproc", "1", "--nnodes", "2", "--workers", "1", "--link-loss", "1:5",
    )  # fmt: skip
    layout = report["ranks"]
    assert layout["nnodes"] == 2 and layout["world_size"] == 2
    (system,) = report["systems"]
    check_every_sample_once(system, 2)
    assert sorted(r["node"] for r in system["ranks"]) == ["node0", "node1"]
    # Real loss on node 1's link only; the replicas served every byte over HTTP.
    assert layout["link_drops"]["1"] > 0 and layout["link_drops"]["0"] == 0
    assert layout["replica_sent_bytes"] >= OBJECTS * OBJECT_BYTES
    assert "node1" in text
    # The namespaces are gone with the run.
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"{nodes.PREFIX}-" not in left.stdout


def test_two_nodes_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ScenarioError, match="--nnodes 2 needs root"):
        nodes.check_support()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nproc", "0"], "--nproc must be an integer from 1 to 64, got 0"),
        (["--nproc", "two"], "--nproc must be an integer, got 'two'"),
        (["--nproc", "1.5"], "--nproc must be an integer, got '1.5'"),
        (["--nproc", "2", "--nnodes", "3"], "--nnodes must be 1 or 2"),
        (["--nproc", "2", "--nnodes", "x"], "--nnodes must be an integer, got 'x'"),
        (["--nproc", "2", "--workers", "-1"], "--workers must be an integer from 0 to 64"),
        (["--nnodes", "2"], "--nnodes needs --nproc"),
        (["--nproc", "2", "--link-loss", "1:5"], "--link-loss needs --nnodes 2"),
        (["--nproc", "2", "--nnodes", "2", "--link-loss", "2:5"], "got '2:5'"),
        (["--nproc", "2", "--repeat", "3"], "--repeat is not supported with --nproc"),
    ],
)
def test_bad_values_are_one_line_errors(scenario: Path, args: list[str], needle: str) -> None:
    done = bench(str(scenario), *args, "--check", timeout_s=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert needle in lines[0]


def netns_of(pid: int) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [n for n in names.stdout.split() if n.startswith(f"{nodes.PREFIX}-{pid}-")]


@pytest.mark.root
@pytest.mark.nginx
@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root")
def test_ctrl_c_during_two_nodes_removes_namespaces_and_ranks(
    scenario: Path, tmp_path: Path
) -> None:
    endless = tmp_path / "endless.toml"
    endless.write_text(SCENARIO.replace("steps = 16", "steps = 100000"))
    out = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedline.cli", "bench", str(endless), "--no-progress",
         "--nproc", "1", "--nnodes", "2", "--workers", "1", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        # Bounded wait for the rig, then for the ranks to be reading.
        for _ in range(300):
            if len(netns_of(proc.pid)) == 3 or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert len(netns_of(proc.pid)) == 3, proc.poll()
        # 3 nginx (master, worker), 2 agents, 2 ranks, 2 DataLoader workers.
        started: list[int] = []
        for _ in range(600):
            started = descendants(proc.pid)
            if len(started) >= 12 or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert len(started) >= 12, f"the ranks never started: {started}"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert json.loads(out.read_text())["partial"] is True
    assert netns_of(proc.pid) == []
    left = [p for p in started if alive(p)]
    assert not left, f"processes outlived the launcher: {left}"


def descendants(pid: int) -> list[int]:
    """``pid``'s children, theirs, and so on (torchrun agents, ranks, workers)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        children = subprocess.run(
            ["pgrep", "-P", str(todo.pop())], capture_output=True, text=True
        ).stdout.split()
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root")
def test_a_killed_launchers_namespaces_and_servers_are_swept() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a launcher pid that no longer runs
    name = f"{nodes.PREFIX}-{gone.pid}-abc123-node0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        for _ in range(100):  # bounded: until `ip netns exec` has entered it
            if subprocess.run(["ip", "netns", "pids", name], capture_output=True).stdout:
                break
            time.sleep(0.05)
        assert nodes.sweep_stale() >= 1
        assert server.wait(timeout=10) == -signal.SIGKILL
        assert (
            name
            not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
    finally:
        server.kill()
        server.wait()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
