"""Runs a scenario: materializes the dataset once, then each system in turn
under the same faults and seed, ``repeat`` times; builds the report dict
(schema in ``docs/bench-json.md``). Ctrl-C stops the current system, keeps
what was measured, and still cleans up."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import feedline
from feedline import _core
from feedline.bench import dataset as _dataset
from feedline.bench.metrics import Recorder
from feedline.bench.replicas import ReplicaSet, nginx_support, open_replicas
from feedline.bench.scenario import SLA_METRICS, Scenario, ScenarioError, check_systems_fit_load
from feedline.bench.systems import (
    FOREVER_S,
    FaultPlan,
    SystemUnavailable,
    fault_plan,
    make_system,
)
from feedline.bench.workload import (
    RunLimits,
    compute_draw,
    manifest_verifier,
    plan_batches,
    run_open,
)

SCHEMA_VERSION = 1

#: Figures aggregated over --repeat runs (dotted paths into a system result).
REPEAT_FIGURES = (
    "samples_per_s",
    "mb_per_s",
    "au",
    "stall_s",
    "first_batch_ms",
    "latency.p50_ms",
    "latency.p99_ms",
    "latency.p99.9_ms",
    "errors",
    "mismatches",
)
#: MLPerf Storage's replication rule: flag a figure whose runs differ by more.
SPREAD_LIMIT = 0.05

ProgressFn = Callable[[str, Recorder, int], None]


def get_path(result: dict[str, Any], dotted: str) -> Any:
    """``"latency.p99.9_ms"`` -> result["latency"]["p99.9_ms"]."""
    head, _, rest = dotted.partition(".")
    value = result.get(head)
    if rest and isinstance(value, dict):
        return value.get(rest)
    return None if rest else value


def evaluate_sla(sla: dict[str, float], result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, limit in sla.items():
        path, kind = SLA_METRICS[metric]
        value = get_path(result, path)
        passed: bool | None
        if value is None:
            passed = None
        elif kind == "max":
            passed = value <= limit
        else:
            passed = value >= limit
        out[metric] = {"limit": limit, "value": value, "bound": kind, "pass": passed}
    return out


def check_runnable(scenario: Scenario, *, is_root: bool | None = None) -> None:
    """Raises a clear error for what this machine cannot run."""
    scenario.check_requirements(is_root=is_root)
    # Also for scenarios built in code (``override``), not only parsed ones.
    check_systems_fit_load(scenario)
    _dataset.check_fits(scenario)
    kind = scenario.replicas.kind
    if kind == "nginx":
        why = nginx_support()
        if why is not None:
            raise ScenarioError(f'{scenario.source}: [replicas] kind = "nginx": {why}')


def run_system(
    name: str,
    scenario: Scenario,
    data: _dataset.Materialized,
    *,
    stop: threading.Event,
    progress: ProgressFn | None = None,
    replicas: ReplicaSet | None = None,
) -> dict[str, Any]:
    """One system, one run. Returns its result dict (status ok/partial/skipped)."""
    batches = plan_batches(scenario, data)
    plan = fault_plan(scenario)
    chaos = plan.per_replica
    # Fault-plan notes concern every system: the report carries them once.
    base: dict[str, Any] = {"system": name, "notes": []}
    try:
        system = make_system(name, scenario, data, chaos, replicas.roots if replicas else None)
    except SystemUnavailable as exc:
        return {**base, "status": "skipped", "notes": [*base["notes"], str(exc)]}
    except (OSError, ValueError, TypeError) as exc:
        # A system that cannot be built is reported, not fatal for the others.
        return {
            **base,
            "status": "skipped",
            "notes": [*base["notes"], f"{name} could not start: {type(exc).__name__}: {exc}"],
        }
    base["notes"].extend(system.notes)
    rec = Recorder()
    w = scenario.workload
    if w.epochs is not None and w.steps is None and w.access != "random_ranges":
        rec.steps_per_epoch = -(-len(data.keys) // w.batch_size)
    limits = RunLimits(duration_s=scenario.load.duration_s, stop=stop)
    ticker_stop = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while not ticker_stop.wait(0.25):
            show_fault_windows(plan, time.monotonic() - t0)
            rec.sample_rss()
            if progress is not None:
                progress(name, rec, len(batches))

    ticker = threading.Thread(target=tick, name="bench-ticker", daemon=True)
    ticker.start()
    status = "ok"
    if replicas is not None:
        replicas.start_events(scenario.events, stop)
    try:
        rec.sample_rss()
        if scenario.load.mode == "open":
            assert scenario.load.rate_per_s is not None
            run_open(
                system.read,
                batches,
                readers=w.readers,
                rate_per_s=scenario.load.rate_per_s,
                rec=rec,
                verify=manifest_verifier(data),
                limits=limits,
            )
        else:
            system.run_closed(
                batches,
                readers=w.readers,
                prefetch_batches=w.prefetch_batches,
                compute=compute_draw(w.compute, scenario.seed),
                rec=rec,
                verify=manifest_verifier(data),
                limits=limits,
            )
        if stop.is_set():
            status = "partial"
    except KeyboardInterrupt:
        stop.set()
        status = "partial"
    finally:
        if replicas is not None:
            replicas.end_events()
        ticker_stop.set()
        ticker.join(timeout=2)
        show_fault_windows(plan, None)
        rec.sample_rss()
        stats = system.stats()
        info = system.info()
        system.close()
    result = {**base, "status": status, **rec.result(scenario.percentiles)}
    totals = (stats or {}).get("totals", {})
    for counter in ("requests", "retries", "hedges_sent", "hedges_won", "ejections"):
        result[counter] = totals.get(counter) if stats is not None else None
    result["replica_stats"] = (stats or {}).get("replicas")
    result["cache"] = (stats or {}).get("cache")
    result["system_info"] = info
    # (retries + hedges) / reads, as feedline's router counts it
    # against its retry budget.
    result["extra_request_ratio"] = (stats or {}).get("extra_request_ratio")
    result["sla"] = evaluate_sla(dict(scenario.sla), result)
    verdicts = [v["pass"] for v in result["sla"].values()]
    result["sla_pass"] = None if not verdicts or None in verdicts else all(verdicts)
    return result


def show_fault_windows(plan: FaultPlan, elapsed_s: float | None) -> None:
    """Sets ``feedline_fault_active{fault=...}`` to 1 for each fault window
    open at ``elapsed_s`` into a system's run (0 when closed, or all 0 with
    None), so dashboards can draw the windows as annotations."""
    open_now: dict[str, bool] = {}
    for start, end, label in plan.windows:
        inside = elapsed_s is not None and start <= elapsed_s < end
        open_now[label] = open_now.get(label, False) or inside
    for label, inside in open_now.items():
        feedline.metrics.set_fault_active(label, inside)


def _aggregate(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per system: the first run's result with figures replaced by the mean
    over runs, plus ``repeat`` = {figure: mean, stdev, min, max, spread, flagged}."""
    if len(runs) == 1:
        return runs[0]
    out: list[dict[str, Any]] = []
    for i, first in enumerate(runs[0]):
        same = [r[i] for r in runs if i < len(r) and r[i].get("status") != "skipped"]
        agg = dict(first)
        agg["latency"] = dict(first.get("latency") or {})
        stats: dict[str, Any] = {}
        for fig in REPEAT_FIGURES:
            values = [get_path(r, fig) for r in same]
            nums = [float(v) for v in values if isinstance(v, int | float)]
            if len(nums) < 2:
                continue
            mean = statistics.fmean(nums)
            stdev = statistics.stdev(nums)
            spread = (max(nums) - min(nums)) / abs(mean) if mean else 0.0
            stats[fig] = {
                "mean": mean,
                "stdev": stdev,
                "min": min(nums),
                "max": max(nums),
                "spread": spread,
                "flagged": spread > SPREAD_LIMIT,
            }
            head, _, rest = fig.partition(".")
            if rest:
                agg[head][rest] = mean
            else:
                agg[head] = mean
        agg["repeat"] = stats
        out.append(agg)
    return out


def _run_notes(scenario: Scenario) -> list[str]:
    return fault_plan(scenario).notes


def _feedline_options(s: Scenario) -> dict[str, Any]:
    config = _core.check_options(dict(s.feedline))
    return {"routing": config["routing"], "prefetch": config["prefetch"], "cache": config["cache"]}


def scenario_summary(s: Scenario) -> dict[str, Any]:
    ds = s.dataset
    return {
        "name": s.name,
        "source": s.source,
        "description": s.description,
        "seed": s.seed,
        "systems": list(s.systems),
        "percentiles": list(s.percentiles),
        "dataset": {
            "generated": ds.generated,
            "objects": ds.objects,
            "size_bytes": ds.size_bytes,
            "size_distribution": ds.size_distribution,
            "format": ds.format,
            "path": ds.path,
        },
        "replicas": {"kind": s.replicas.kind, "count": s.replicas.count},
        "workload": {
            "readers": s.workload.readers,
            "batch_size": s.workload.batch_size,
            "steps": s.workload.steps,
            "epochs": s.workload.epochs,
            "access": s.workload.access,
            "compute": s.workload.compute.describe() if s.workload.compute else None,
        },
        "load": {
            "mode": s.load.mode,
            "rate_per_s": s.load.rate_per_s,
            "duration_s": s.load.duration_s,
        },
        "sla": dict(s.sla),
        # The feedline options and faults as the core reads them, defaults in.
        "feedline": _feedline_options(s),
        "faults": {str(f.index): f.chaos.to_dict() for f in s.faults},
        "torch_dataloader": {
            "workers": s.torch_dataloader.workers,
            "prefetch_factor": s.torch_dataloader.prefetch_factor_for(s.workload.prefetch_batches),
            "start_method": s.torch_dataloader.start_method,
        }
        if "torch-dataloader" in s.systems
        else None,
    }


def run(
    scenario: Scenario,
    *,
    repeat: int = 1,
    is_root: bool | None = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    on_system_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs every system ``repeat`` times; returns the report dict. On Ctrl-C
    the report has ``"partial": true`` and what was measured so far."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    check_runnable(scenario, is_root=is_root)
    stop = stop or threading.Event()
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    runs: list[list[dict[str, Any]]] = []
    interrupted = False
    data = _dataset.materialize(scenario)
    replicas: ReplicaSet | None = None
    try:
        replicas = open_replicas(scenario, data)
        for _ in range(repeat):
            this_run: list[dict[str, Any]] = []
            runs.append(this_run)
            for name in scenario.systems:
                result = run_system(
                    name, scenario, data, stop=stop, progress=progress, replicas=replicas
                )
                this_run.append(result)
                if on_system_done is not None:
                    on_system_done(result)
                if stop.is_set():
                    interrupted = True
                    break
            if interrupted:
                break
    except KeyboardInterrupt:
        stop.set()
        interrupted = True
    finally:
        if replicas is not None:
            replicas.close()
        data.cleanup()
    complete_runs = [r for r in runs if len(r) == len(scenario.systems)] or runs[:1]
    plan = fault_plan(scenario)
    return {
        "schema_version": SCHEMA_VERSION,
        "feedline_version": feedline.__version__,
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - t_start,
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "partial": interrupted,
        "notes": _run_notes(scenario),
        "scenario": scenario_summary(scenario),
        "dataset_bytes": data.total_bytes,
        "fault_windows": [
            {"start_s": s, "end_s": e if e < FOREVER_S else None, "label": label}
            for s, e, label in plan.windows
        ],
        "repeat": len(complete_runs),
        "systems": _aggregate(complete_runs) if complete_runs and complete_runs[0] else [],
        "runs": runs,
        # What feedline's own metrics counted in this run's processes (this
        # one, and its workers when a metrics directory is set), as served
        # by `--metrics-port`: see docs/metrics.md.
        "metrics": feedline.metrics.snapshot_dict(),
    }
