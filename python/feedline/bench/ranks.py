"""``feedline bench --nproc N [--nnodes 2]``: a scenario run as a torchrun job.

For each system the launcher starts ``torch.distributed.run`` (one agent
per node; ``--standalone`` on one node, c10d rendezvous over TCP across
nodes) with :mod:`feedline.bench.rank` as every rank's program, starts the
scenario's timed events when rank 0 says every rank is ready, and builds the
report from the ranks' files: a row per rank and a job row whose figures are
merged across ranks (:func:`feedline.distributed.job_figures`: AU as MLPerf
Storage defines it, compute over the slowest rank's duration; read latency
percentiles of every read pooled; the slowest rank and replica named).

Every system, baselines included, runs the same way: each rank reads its
shard through a DataLoader with ``workers`` worker processes, each worker
through its own instance of the system (see :mod:`feedline.bench.rank`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import feedline
from feedline.bench import dataset as _dataset
from feedline.bench.metrics import histogram_result
from feedline.bench.replicas import ReplicaSet, open_replicas
from feedline.bench.scenario import Scenario, ScenarioError
from feedline.bench.systems import FOREVER_S, SystemUnavailable, fault_plan, make_system
from feedline.bench.workload import plan_batches
from feedline.distributed import RankFigures

#: What `--nproc` and `--nnodes` accept.
MAX_NPROC = 64
NNODES = (1, 2)
#: How long a job may take to start (torchrun, gloo, DataLoader workers).
START_TIMEOUT_S = 120.0
#: How long a job may run once started, unless the scenario bounds it.
RUN_TIMEOUT_S = 1800.0
#: Grace between SIGTERM to an agent (it stops its ranks) and SIGKILL.
TERM_GRACE_S = 5.0
#: Systems that are a DataLoader themselves: every system is one here.
SAME_AS_FSSPEC = "torch-dataloader"


def check_layout(nproc: Any, nnodes: Any, workers: Any) -> tuple[int, int, int]:
    """The job's layout, or a ScenarioError naming the bad value."""
    for flag, value, low, high in (
        ("--nproc", nproc, 1, MAX_NPROC),
        ("--workers", workers, 0, MAX_NPROC),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ScenarioError(f"{flag} must be an integer from {low} to {high}, got {value!r}")
    if isinstance(nnodes, bool) or nnodes not in NNODES:
        raise ScenarioError(
            f"--nnodes must be 1 or 2 (two network namespaces on this machine), got {nnodes!r}"
        )
    return nproc, nnodes, workers


def check_scenario(sc: Scenario) -> None:
    if sc.load.mode != "closed":
        raise ScenarioError(
            f"{sc.source}: --nproc runs closed-loop training ranks; [load] mode is {sc.load.mode!r}"
        )


class Agents(Protocol):
    """Where the torchrun agents run and how they reach the replicas."""

    replicas: ReplicaSet
    nnodes: int

    def commands(self, nproc: int, program: list[str]) -> list[tuple[list[str], dict[str, str]]]:
        """(argv, extra environment) of each node's torchrun agent."""
        ...

    def figures(self) -> dict[str, Any]:
        """What the rig itself measured (packets dropped per link...)."""
        ...

    def close(self) -> None: ...


def torchrun_argv(nproc: int, program: list[str], *rendezvous: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(rendezvous or ("--standalone",)),
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        *program,
    ]


class OneNode:
    """One torchrun agent here (``--standalone``), replicas as the
    single-process bench opens them."""

    nnodes = 1

    def __init__(self, scenario: Scenario, data: _dataset.Materialized) -> None:
        self.replicas = open_replicas(scenario, data)

    def commands(self, nproc: int, program: list[str]) -> list[tuple[list[str], dict[str, str]]]:
        return [(torchrun_argv(nproc, program), {})]

    def figures(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.replicas.close()


def _set_parent_death_signal() -> None:
    # Runs in the child before exec: the agent dies with the launcher.
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


class Job:
    """The agents of one system's run; :meth:`close` stops them all."""

    def __init__(self, commands: list[tuple[list[str], dict[str, str]]], log_dir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            base.pop(name, None)
        try:
            for i, (argv, env) in enumerate(commands):
                log = log_dir / f"agent-{i}.log"
                self.logs.append(log)
                with open(log, "wb") as out:
                    self.procs.append(
                        subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            env=base | env,
                            start_new_session=True,
                            preexec_fn=_set_parent_death_signal,
                        )
                    )
        except BaseException:
            self.close()
            raise

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def failed(self) -> bool:
        return any(p.poll() not in (None, 0) for p in self.procs)

    def wait(self, deadline: float, stop: threading.Event) -> bool:
        """True when every agent exited before ``deadline`` / ``stop``."""
        while self.running():
            if stop.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def log_tail(self, lines: int = 15) -> str:
        tails = []
        for path in self.logs:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip().splitlines()
                tails.append("\n".join(text[-lines:]))
        return "\n".join(tails)

    def close(self) -> None:
        """SIGTERM (the agent stops its ranks), then SIGKILL of the agents'
        sessions; never raises."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=TERM_GRACE_S)


def run_system(
    name: str,
    scenario: Scenario,
    data: _dataset.Materialized,
    agents: Agents,
    *,
    nproc: int,
    workers: int,
    stop: threading.Event,
    run_timeout_s: float,
) -> dict[str, Any]:
    """One system as a torchrun job; its job row with per-rank rows."""
    from feedline.bench.rank import STARTED, RankSpec

    base: dict[str, Any] = {"system": name, "notes": []}
    if name == SAME_AS_FSSPEC:
        note = "skipped with --nproc: every system reads in DataLoader workers here (see fsspec)"
        return {**base, "status": "skipped", "notes": [note]}
    why = _unavailable(name, scenario, data, list(agents.replicas.roots))
    if why is not None:
        return {**base, "status": "skipped", "notes": [why]}
    with tempfile.TemporaryDirectory(prefix="feedline-ranks-") as tmp:
        out = Path(tmp)
        spec = RankSpec(scenario, data, list(agents.replicas.roots), name, workers, str(out))
        spec_path = out / "spec.pickle"
        spec_path.write_bytes(pickle.dumps(spec))
        program = ["-m", "feedline.bench.rank", str(spec_path)]
        job = Job(agents.commands(nproc, program), out)
        status = "ok"
        try:
            started = _wait_started(job, out / STARTED, stop)
            if started:
                agents.replicas.start_events(scenario.events, stop)
                finished = job.wait(time.monotonic() + run_timeout_s, stop)
                agents.replicas.end_events()
                if not finished:
                    status = "partial"
            if stop.is_set():
                status = "partial"
            elif job.failed() or not started:
                codes = [p.returncode for p in job.procs]
                how = f"exit status {codes}" if started else "its ranks never started"
                raise RuntimeError(f"{name}: the torchrun job failed ({how}):\n{job.log_tail()}")
        finally:
            job.close()
        return _collect(base, status, scenario, data, out, nproc * agents.nnodes)


def _unavailable(
    name: str, scenario: Scenario, data: _dataset.Materialized, roots: list[str]
) -> str | None:
    """Why ``name`` cannot run here (a missing module, replicas of the wrong
    kind), found before any rank starts; None when it may. feedline always
    can, and its FileSystem would check the manifest against replicas that
    only the ranks may reach (``--nnodes 2``); other failures are the ranks'
    to report."""
    if name == "feedline":
        return None
    try:
        make_system(name, scenario, data, None, roots).close()
    except SystemUnavailable as exc:
        return str(exc)
    except Exception:  # the ranks report it, where it counts
        return None
    return None


def _wait_started(job: Job, marker: Path, stop: threading.Event) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not marker.exists():
        if not job.running() or stop.is_set() or time.monotonic() > deadline:
            return marker.exists()
        time.sleep(0.02)
    return True


def _collect(
    base: dict[str, Any],
    status: str,
    scenario: Scenario,
    data: _dataset.Materialized,
    out: Path,
    world: int,
) -> dict[str, Any]:
    rows = []
    for r in range(world):
        path = out / f"rank-{r}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    job_path = out / "job.json"
    if not job_path.exists():
        return {**base, "status": "partial", "ranks": rows, "job": None}
    gathered = json.loads(job_path.read_text())
    job = gathered["job"]
    figures = [RankFigures.from_json(f) for f in gathered["figures"]]
    return {
        **base,
        "status": status,
        **job_row(job, figures, rows, scenario),
        "delivery": delivery(scenario, data, rows),
        "job": job,
        "ranks": rows,
    }


def job_row(
    job: dict[str, Any], figures: list[RankFigures], rows: list[dict[str, Any]], sc: Scenario
) -> dict[str, Any]:
    """The job's figures under the single-process report's names, so the
    same table, SLA checks and JSON readers apply."""
    from feedline._core import LatencyHistogram

    reads = LatencyHistogram()
    for f in figures:
        if "read" in f.histograms:
            reads.merge(f.histograms["read"])
    counters = job["counters"]
    wall_s = max((r["duration_s"] for r in rows), default=0.0)
    samples = int(counters.get("samples", 0))
    nbytes = int(counters.get("bytes", 0))
    firsts = [r["first_batch_ms"] for r in rows if r.get("first_batch_ms") is not None]
    row: dict[str, Any] = {
        "duration_s": wall_s,
        "steps": job["steps"] + len(rows),  # job_figures leaves each rank's first step out
        "samples": samples,
        "bytes": nbytes,
        "first_batch_ms": max(firsts) if firsts else None,
        "samples_per_s": samples / wall_s if wall_s > 0 else 0.0,
        "mb_per_s": nbytes / 1e6 / wall_s if wall_s > 0 else 0.0,
        "stall_s": job["stall_s"],
        "compute_s": job["compute_s"],
        "au": job["au"] if job["duration_s"] > 0 else None,
        "latency": histogram_result(reads, sc.percentiles),
        "latency_co": None,
        "errors": int(counters.get("errors", 0)),
        "error_examples": [e for r in rows for e in r.get("error_examples", [])][:5],
        "verified_bytes": int(counters.get("verified_bytes", 0)),
        "mismatches": int(counters.get("mismatches", 0)),
        "slowest_rank": job["slowest_rank"],
        "slowest_replica": job["slowest_replica"],
    }
    for name in ("requests", "retries", "hedges_sent", "hedges_won", "ejections"):
        row[name] = int(counters[name]) if name in counters else None
    return row


def delivery(
    sc: Scenario, data: _dataset.Materialized, rows: list[dict[str, Any]]
) -> dict[str, int]:
    """Planned samples against those the ranks delivered (by key)."""
    planned = Counter(s[0] for b in plan_batches(sc, data) for s in b)
    got: Counter[str] = Counter()
    for r in rows:
        got.update(r.get("delivered", []))
    return {
        "planned": sum(planned.values()),
        "delivered": sum(got.values()),
        "duplicates": sum(max(0, n - planned[k]) for k, n in got.items()),
        "missing": sum(max(0, n - got[k]) for k, n in planned.items()),
    }


def open_agents(scenario: Scenario, data: _dataset.Materialized, nnodes: int, **kw: Any) -> Agents:
    if nnodes == 1:
        return OneNode(scenario, data)
    from feedline.bench.nodes import TwoNodes

    return TwoNodes(scenario, data, **kw)


def run(
    scenario: Scenario,
    *,
    nproc: int,
    nnodes: int = 1,
    workers: int = 2,
    link_loss: dict[int, float] | None = None,
    stop: threading.Event | None = None,
    on_system_done: Callable[[dict[str, Any]], None] | None = None,
    run_timeout_s: float = RUN_TIMEOUT_S,
    agents_factory: Callable[[Scenario, _dataset.Materialized], Agents] | None = None,
) -> dict[str, Any]:
    """Runs every system of ``scenario`` as ``nnodes`` x ``nproc`` ranks
    with ``workers`` DataLoader workers each; returns the report dict.
    ``agents_factory`` replaces the rig (:class:`OneNode`, or the two-node
    one) with the caller's, given the generated dataset."""
    from feedline.bench import runner

    check_layout(nproc, nnodes, workers)
    check_scenario(scenario)
    runner.check_runnable(scenario)
    if link_loss and nnodes == 1:
        raise ScenarioError("--link-loss needs --nnodes 2 (a link to each node)")
    if nnodes == 2:
        # The replicas are nginx in the store namespace: events act on the
        # servers, not as in-process outages of local directories.
        scenario = replace(scenario, replicas=replace(scenario.replicas, kind="nginx"))
    stop = stop or threading.Event()
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    data = _dataset.materialize(scenario)
    agents: Agents | None = None
    rig: dict[str, Any] = {}
    try:
        kw = {"link_loss": link_loss or {}} if nnodes == 2 else {}
        if agents_factory is not None:
            agents = agents_factory(scenario, data)
        else:
            agents = open_agents(scenario, data, nnodes, **kw)
        for name in scenario.systems:
            result = run_system(
                name,
                scenario,
                data,
                agents,
                nproc=nproc,
                workers=workers,
                stop=stop,
                run_timeout_s=scenario.load.duration_s or run_timeout_s,
            )
            if result.get("status") != "skipped":
                result["sla"] = runner.evaluate_sla(dict(scenario.sla), result)
                verdicts = [v["pass"] for v in result["sla"].values()]
                result["sla_pass"] = None if not verdicts or None in verdicts else all(verdicts)
            results.append(result)
            if on_system_done is not None:
                on_system_done(result)
            if stop.is_set():
                break
    except KeyboardInterrupt:
        stop.set()
    finally:
        if agents is not None:
            with contextlib.suppress(Exception):  # figures are a bonus; cleanup is not
                rig = agents.figures()
            agents.close()
        data.cleanup()
    plan = fault_plan(scenario)
    return {
        "schema_version": runner.SCHEMA_VERSION,
        "feedline_version": feedline.__version__,
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - t_start,
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "partial": stop.is_set(),
        "notes": [
            *plan.notes,
            f"{nnodes} node(s) x {nproc} rank(s) x {workers} DataLoader worker(s) per rank; "
            "every system, baselines too, reads in each rank's workers; "
            "faults drawn in each worker process from the scenario's seed",
        ],
        "scenario": runner.scenario_summary(scenario),
        "dataset_bytes": data.total_bytes,
        "fault_windows": [
            {"start_s": s, "end_s": e if e < FOREVER_S else None, "label": label}
            for s, e, label in plan.windows
        ],
        "ranks": {
            "nproc": nproc,
            "nnodes": nnodes,
            "world_size": nproc * nnodes,
            "workers": workers,
            "link_loss_percent": {str(k): v for k, v in (link_loss or {}).items()},
            **rig,
        },
        "repeat": 1,
        "systems": results,
        "runs": [results],
    }
