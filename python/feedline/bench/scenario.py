"""Scenario files: TOML read with ``tomllib`` into frozen dataclasses, with
errors that name the file, the key, what was expected and what was found.

The format is documented in ``docs/bench-scenarios.md``; the embedded default
is ``feedline/bench/default.toml``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from feedline import _core
from feedline._core import Chaos

#: Every system the harness knows; availability is checked at run time.
KNOWN_SYSTEMS = (
    "feedline",
    "fsspec",
    "fsspec-readahead",
    "fsspec-blockcache",
    "torch-dataloader",
    "obstore",
)
ACCESS_PATTERNS = ("sequential", "shuffled", "random_ranges")
SIZE_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")
COMPUTE_DISTRIBUTIONS = ("fixed", "normal", "uniform", "gamma", "exponential")
LATENCY_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal", "pareto")
EVENT_ACTIONS = ("kill", "stop", "resume", "loss", "delay")
REPLICA_KINDS = ("local", "nginx", "netns")
LOAD_MODES = ("closed", "open")
FORMATS = ("raw", "parquet")
#: multiprocessing start methods a DataLoader accepts (None: torch's default).
START_METHODS = ("fork", "spawn", "forkserver")
#: Systems that can only run a closed loop (their consumer pulls batches).
CLOSED_LOOP_ONLY = {
    "torch-dataloader": (
        "a DataLoader's workers read a batch only when the loop's prefetch asks for it, "
        "so reads cannot be issued at a fixed rate regardless of completions"
    ),
}

#: SLA metric -> (JSON field in a system's result, "max" = upper bound, "min" = lower bound).
SLA_METRICS: dict[str, tuple[str, str]] = {
    "p50_ms": ("latency.p50_ms", "max"),
    "p90_ms": ("latency.p90_ms", "max"),
    "p99_ms": ("latency.p99_ms", "max"),
    "p99.9_ms": ("latency.p99.9_ms", "max"),
    "max_ms": ("latency.max_ms", "max"),
    "au_min": ("au", "min"),
    "samples_per_s_min": ("samples_per_s", "min"),
    "mb_per_s_min": ("mb_per_s", "min"),
    "stall_s_max": ("stall_s", "max"),
    "first_batch_ms_max": ("first_batch_ms", "max"),
    "errors_max": ("errors", "max"),
    "mismatches_max": ("mismatches", "max"),
}


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and key."""


class NeedsRootError(RuntimeError):
    """The scenario needs root (network namespaces, nftables); the message says which part."""


# -- the model ----------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """A distribution of milliseconds (compute time, chaos latency)."""

    kind: str
    params: Mapping[str, float]

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.kind}({inner})"


@dataclass(frozen=True)
class Dataset:
    objects: int = 0
    size_bytes: int = 0
    size_distribution: str = "fixed"
    size_min_bytes: int = 0
    size_max_bytes: int = 0
    size_sigma: float = 0.0
    format: str = "raw"
    seed: int = 0
    path: str | None = None
    manifest: str | None = None

    @property
    def generated(self) -> bool:
        return self.path is None


@dataclass(frozen=True)
class Replicas:
    kind: str = "local"
    count: int = 3
    dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplicaFault:
    """One ``[[faults.replica]]`` table: the replica and its faults, as the
    same :class:`feedline.Chaos` that ``FileSystem(chaos=...)`` takes."""

    index: int
    chaos: Chaos


@dataclass(frozen=True)
class Event:
    """A timed fault: ``kill``/``stop`` a replica at ``at_s`` (until a ``resume``
    or ``until_s``), or network ``loss``/``delay`` between ``at_s`` and ``until_s``."""

    action: str
    at_s: float
    replica: int | None = None
    until_s: float | None = None
    loss_percent: float = 0.0
    delay_ms: float = 0.0


@dataclass(frozen=True)
class Workload:
    readers: int = 4
    batch_size: int = 16
    steps: int | None = None
    epochs: int | None = None
    access: str = "shuffled"
    range_bytes: int = 4096
    prefetch_batches: int = 2
    compute: Distribution | None = None


@dataclass(frozen=True)
class Load:
    mode: str = "closed"
    rate_per_s: float | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class TorchDataLoaderOptions:
    """``[torch_dataloader]``: the ``torch-dataloader`` system's DataLoader."""

    #: DataLoader(num_workers=...): worker processes that read the samples.
    workers: int = 2
    #: Batches each worker loads ahead; None: enough for the scenario's
    #: ``prefetch_batches + 1`` batches in flight, as the thread-based loop keeps.
    prefetch_factor: int | None = None
    #: multiprocessing start method; None: torch's default for the platform.
    start_method: str | None = None

    def prefetch_factor_for(self, prefetch_batches: int) -> int:
        if self.prefetch_factor is not None:
            return self.prefetch_factor
        return max(1, math.ceil((prefetch_batches + 1) / self.workers))


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str
    description: str = ""
    seed: int = 0
    systems: tuple[str, ...] = ("feedline", "fsspec")
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)
    dataset: Dataset = field(default_factory=Dataset)
    replicas: Replicas = field(default_factory=Replicas)
    faults: tuple[ReplicaFault, ...] = ()
    events: tuple[Event, ...] = ()
    workload: Workload = field(default_factory=Workload)
    load: Load = field(default_factory=Load)
    sla: Mapping[str, float] = field(default_factory=dict)
    #: ``[feedline]``: FileSystem options (routing, prefetch), as given.
    feedline: Mapping[str, Any] = field(default_factory=dict)
    torch_dataloader: TorchDataLoaderOptions = field(default_factory=TorchDataLoaderOptions)

    def root_requirements(self) -> list[str]:
        """The parts of this scenario that need root, in words (empty: none)."""
        needs = []
        if self.replicas.kind == "netns":
            needs.append('[replicas] kind = "netns" (network namespaces and veth pairs)')
        for i, ev in enumerate(self.events):
            if ev.action in ("loss", "delay"):
                needs.append(
                    f"[[faults.event]] #{i + 1} action = {ev.action!r} (nftables/tc in a namespace)"
                )
        return needs

    def check_requirements(self, *, is_root: bool | None = None) -> None:
        """Raises :class:`NeedsRootError` naming each part that needs root."""
        if is_root is None:
            is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        needs = self.root_requirements()
        if needs and not is_root:
            raise NeedsRootError(
                f"{self.source}: this scenario needs root for: "
                + "; ".join(needs)
                + ". Run it as root (CI does), or pick a local-directory scenario."
            )


# -- parsing helpers ----------------------------------------------------------

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|min)?\s*$")


class _Ctx:
    """Where we are in the file, for error messages."""

    def __init__(self, source: str, table: str) -> None:
        self.source = source
        self.table = table

    def sub(self, table: str) -> _Ctx:
        return _Ctx(self.source, table)

    def fail(self, key: str | None, message: str) -> ScenarioError:
        where = f"[{self.table}]" if self.table else "top level"
        key_part = f" {key}" if key else ""
        return ScenarioError(f"{self.source}: {where}{key_part}: {message}")


def _check_keys(ctx: _Ctx, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ctx.fail(
                None, f"unknown key {key!r}{hint}; known keys: {', '.join(sorted(allowed))}"
            )


def _table(ctx: _Ctx, raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ctx.fail(key, f"expected a table, got {type(value).__name__} {value!r}")
    return value


def _int(ctx: _Ctx, t: Mapping[str, Any], key: str, default: Any, *, minimum: int = 1) -> Any:
    if key not in t:
        return default
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(key, f"expected an integer >= {minimum}, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ctx.fail(key, f"expected an integer >= {minimum}, got {v}")
    return v


def _num(
    ctx: _Ctx,
    t: Mapping[str, Any],
    key: str,
    default: Any,
    *,
    positive: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    if key not in t:
        return default
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.fail(key, f"expected a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        raise ctx.fail(key, f"expected a finite number, got {v}")
    if positive and v <= 0:
        raise ctx.fail(key, f"expected a number > 0, got {v:g}")
    if minimum is not None and v < minimum:
        raise ctx.fail(key, f"expected a number >= {minimum:g}, got {v:g}")
    if maximum is not None and v > maximum:
        raise ctx.fail(key, f"expected a number <= {maximum:g}, got {v:g}")
    return v


def _str(
    ctx: _Ctx, t: Mapping[str, Any], key: str, default: Any, choices: Sequence[str] | None = None
) -> Any:
    if key not in t:
        return default
    v = t[key]
    if not isinstance(v, str):
        raise ctx.fail(key, f"expected a string, got {type(v).__name__} {v!r}")
    if choices is not None and v not in choices:
        close = difflib.get_close_matches(v, choices, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.fail(key, f"unknown value {v!r}{hint}; expected one of {', '.join(choices)}")
    return v


def parse_duration_s(ctx: _Ctx, key: str, value: Any, *, allow_zero: bool = False) -> float:
    """``"5s"``, ``"250ms"``, ``"2m"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ctx.fail(key, f'expected a duration like "5s" or "250ms", got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ctx.fail(key, f'expected a duration like "5s" or "250ms", got {value!r}')
        unit = m.group(2) or "s"
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0}[unit]
    else:
        raise ctx.fail(key, f'expected a duration like "5s" or "250ms", got {type(value).__name__}')
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ctx.fail(key, f"expected a duration {bound}, got {value!r}")
    return seconds


_DIST_PARAMS: dict[str, tuple[str, ...]] = {
    "fixed": ("ms",),
    "uniform": ("low_ms", "high_ms"),
    "normal": ("mean_ms", "stdev_ms"),
    "lognormal": ("median_ms", "sigma"),
    "pareto": ("scale_ms", "shape"),
    "gamma": ("shape", "scale_ms"),
    "exponential": ("mean_ms",),
}


def _distribution(ctx: _Ctx, t: Mapping[str, Any], key: str, kinds: Sequence[str]) -> Any:
    if key not in t:
        return None
    raw = t[key]
    if isinstance(raw, bool) or not isinstance(raw, dict | int | float):
        raise ctx.fail(
            key,
            f'expected a table like {{ distribution = "fixed", ms = 20 }} or a number of ms, '
            f"got {type(raw).__name__} {raw!r}",
        )
    if isinstance(raw, int | float):
        raw = {"distribution": "fixed", "ms": raw}
    sub = ctx.sub(f"{ctx.table}.{key}" if ctx.table else key)
    kind = _str(sub, raw, "distribution", None, kinds)
    if kind is None:
        raise sub.fail("distribution", f"missing; expected one of {', '.join(kinds)}")
    names = _DIST_PARAMS[kind]
    _check_keys(sub, raw, ("distribution", *names))
    params: dict[str, float] = {}
    for name in names:
        if name not in raw:
            raise sub.fail(name, f"missing; a {kind} distribution needs {', '.join(names)}")
        zero_ok = name == "stdev_ms" or (kind == "fixed" and name == "ms" and key == "latency")
        params[name] = _num(
            sub, raw, name, None, minimum=0.0 if zero_ok else None, positive=not zero_ok
        )
    if kind == "uniform" and params["high_ms"] < params["low_ms"]:
        raise sub.fail(
            "high_ms", f"must be >= low_ms ({params['low_ms']:g}), got {params['high_ms']:g}"
        )
    return Distribution(kind, params)


# -- the tables ---------------------------------------------------------------


def _parse_dataset(ctx: _Ctx, t: Mapping[str, Any], seed: int, base: Path) -> Dataset:
    keys = (
        "objects",
        "size_bytes",
        "size_distribution",
        "size_min_bytes",
        "size_max_bytes",
        "size_sigma",
        "format",
        "seed",
        "path",
        "manifest",
    )
    _check_keys(ctx, t, keys)
    path = _str(ctx, t, "path", None)
    manifest = _str(ctx, t, "manifest", None)
    if path is not None:
        generated_keys = [k for k in keys[:7] if k in t]
        if generated_keys:
            raise ctx.fail(
                generated_keys[0], "is for generated datasets; an existing `path` takes none"
            )
        p = (base / path).resolve()
        if not p.is_dir():
            raise ctx.fail("path", f"{str(p)!r} is not a directory")
        if manifest is None:
            raise ctx.fail(
                "manifest",
                f"missing: dataset path {str(p)!r} needs a manifest of CRC32C per object "
                '(write one with feedline.write_manifest(root) or `manifest = "..."`)',
            )
        m = (base / manifest).resolve()
        if not m.is_file():
            raise ctx.fail("manifest", f"{str(m)!r} does not exist")
        return Dataset(path=str(p), manifest=str(m), seed=seed)
    if manifest is not None:
        raise ctx.fail("manifest", "only with `path`; generated datasets write their own")
    objects = _int(ctx, t, "objects", None)
    if objects is None:
        raise ctx.fail("objects", "missing; a generated dataset needs `objects` (or give `path`)")
    size = _int(ctx, t, "size_bytes", None)
    if size is None:
        raise ctx.fail("size_bytes", "missing; a generated dataset needs `size_bytes`")
    dist = _str(ctx, t, "size_distribution", "fixed", SIZE_DISTRIBUTIONS)
    lo = _int(ctx, t, "size_min_bytes", 0)
    hi = _int(ctx, t, "size_max_bytes", 0)
    sigma = _num(ctx, t, "size_sigma", 0.0, minimum=0.0)
    if dist == "uniform":
        if not lo or not hi:
            raise ctx.fail(
                "size_min_bytes", "a uniform size needs size_min_bytes and size_max_bytes"
            )
        if hi < lo:
            raise ctx.fail("size_max_bytes", f"must be >= size_min_bytes ({lo}), got {hi}")
    if dist == "lognormal" and sigma <= 0:
        raise ctx.fail("size_sigma", "a lognormal size needs size_sigma > 0")
    return Dataset(
        objects=objects,
        size_bytes=size,
        size_distribution=dist,
        size_min_bytes=lo,
        size_max_bytes=hi,
        size_sigma=sigma,
        format=_str(ctx, t, "format", "raw", FORMATS),
        seed=_int(ctx, t, "seed", seed, minimum=0),
    )


def _parse_replicas(ctx: _Ctx, t: Mapping[str, Any], base: Path) -> Replicas:
    _check_keys(ctx, t, ("kind", "count", "dirs"))
    kind = _str(ctx, t, "kind", "local", REPLICA_KINDS)
    dirs: tuple[str, ...] = ()
    if "dirs" in t:
        raw = t["dirs"]
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw) or not raw:
            raise ctx.fail("dirs", f"expected a non-empty list of directory paths, got {raw!r}")
        if kind != "local":
            raise ctx.fail("dirs", f'only for kind = "local", not {kind!r}')
        dirs = tuple(str((base / d).resolve()) for d in raw)
        for d in dirs:
            if not os.path.isdir(d):
                raise ctx.fail("dirs", f"{d!r} is not a directory")
    count = _int(ctx, t, "count", len(dirs) or 3)
    if dirs and count != len(dirs):
        raise ctx.fail("count", f"is {count} but `dirs` names {len(dirs)} directories")
    return Replicas(kind=kind, count=count, dirs=dirs)


def _parse_faults(
    ctx: _Ctx, t: Mapping[str, Any], replicas: int
) -> tuple[tuple[ReplicaFault, ...], tuple[Event, ...]]:
    _check_keys(ctx, t, ("replica", "event"))
    faults: list[ReplicaFault] = []
    raw_faults = t.get("replica", [])
    if not isinstance(raw_faults, list):
        raise ctx.fail("replica", "expected an array of tables: [[faults.replica]]")
    seen: set[int] = set()
    for i, rf in enumerate(raw_faults):
        sub = ctx.sub(f"[faults.replica] #{i + 1}")
        if not isinstance(rf, dict):
            raise sub.fail(None, f"expected a table, got {rf!r}")
        index = _replica_index(sub, rf, "index", replicas, required=True)
        if index in seen:
            raise sub.fail("index", f"replica {index} already has a [[faults.replica]] entry")
        seen.add(index)
        options = {k: v for k, v in rf.items() if k != "index"}
        outages: list[tuple[float, float]] = []
        for j, o in enumerate(rf.get("outages", [])):
            if not isinstance(o, list) or len(o) != 2:
                raise sub.fail("outages", f"entry {j}: expected [start, end], got {o!r}")
            start = parse_duration_s(sub, f"outages[{j}][0]", o[0], allow_zero=True)
            end = parse_duration_s(sub, f"outages[{j}][1]", o[1])
            outages.append((start, end))
        if outages:
            options["outages"] = outages
        latency = _distribution(sub, rf, "latency", LATENCY_DISTRIBUTIONS)
        if latency is not None:
            options["latency"] = {"kind": latency.kind, **latency.params}
        try:
            chaos = Chaos(**options)
        except (TypeError, ValueError) as e:
            raise sub.fail(None, str(e)) from None
        faults.append(ReplicaFault(index=index, chaos=chaos))
    events: list[Event] = []
    raw_events = t.get("event", [])
    if not isinstance(raw_events, list):
        raise ctx.fail("event", "expected an array of tables: [[faults.event]]")
    for i, ev in enumerate(raw_events):
        sub = ctx.sub(f"[faults.event] #{i + 1}")
        if not isinstance(ev, dict):
            raise sub.fail(None, f"expected a table, got {ev!r}")
        _check_keys(sub, ev, ("at", "action", "replica", "until", "loss_percent", "delay_ms"))
        action = _str(sub, ev, "action", None, EVENT_ACTIONS)
        if action is None:
            raise sub.fail("action", f"missing; expected one of {', '.join(EVENT_ACTIONS)}")
        if "at" not in ev:
            raise sub.fail("at", 'missing; when the event happens, like "5s"')
        at_s = parse_duration_s(sub, "at", ev["at"], allow_zero=True)
        until_s = parse_duration_s(sub, "until", ev["until"]) if "until" in ev else None
        if until_s is not None and until_s <= at_s:
            raise sub.fail("until", f"must come after at ({ev['at']!r}), got {ev['until']!r}")
        replica = _replica_index(sub, ev, "replica", replicas, required=action != "loss")
        if action in ("loss", "delay") and until_s is None:
            raise sub.fail("until", f"a {action} event needs `until` (the end of the window)")
        loss = _num(sub, ev, "loss_percent", 0.0, minimum=0, maximum=100)
        if action == "loss" and loss <= 0:
            raise sub.fail("loss_percent", "a loss event needs loss_percent in (0, 100]")
        delay = _num(sub, ev, "delay_ms", 0.0, minimum=0)
        if action == "delay" and delay <= 0:
            raise sub.fail("delay_ms", "a delay event needs delay_ms > 0")
        events.append(Event(action, at_s, replica, until_s, loss, delay))
    return tuple(faults), tuple(events)


def _replica_index(
    ctx: _Ctx, t: Mapping[str, Any], key: str, replicas: int, *, required: bool
) -> Any:
    if key not in t:
        if required:
            raise ctx.fail(key, f"missing; a replica index in 0..{replicas - 1}")
        return None
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(key, f"expected a replica index (integer), got {type(v).__name__} {v!r}")
    if not 0 <= v < replicas:
        raise ctx.fail(
            key,
            f"replica {v} does not exist: this scenario has {replicas} (indices 0..{replicas - 1})",
        )
    return v


def _parse_workload(ctx: _Ctx, t: Mapping[str, Any]) -> Workload:
    _check_keys(
        ctx,
        t,
        (
            "readers",
            "batch_size",
            "steps",
            "epochs",
            "access",
            "range_bytes",
            "prefetch_batches",
            "compute",
        ),
    )
    steps = _int(ctx, t, "steps", None)
    epochs = _int(ctx, t, "epochs", None)
    if steps is None and epochs is None:
        epochs = 1
    return Workload(
        readers=_int(ctx, t, "readers", 4),
        batch_size=_int(ctx, t, "batch_size", 16),
        steps=steps,
        epochs=epochs,
        access=_str(ctx, t, "access", "shuffled", ACCESS_PATTERNS),
        range_bytes=_int(ctx, t, "range_bytes", 4096),
        prefetch_batches=_int(ctx, t, "prefetch_batches", 2),
        compute=_distribution(ctx, t, "compute", COMPUTE_DISTRIBUTIONS),
    )


def _parse_load(ctx: _Ctx, t: Mapping[str, Any]) -> Load:
    _check_keys(ctx, t, ("mode", "rate_per_s", "duration_s"))
    mode = _str(ctx, t, "mode", "closed", LOAD_MODES)
    rate = _num(ctx, t, "rate_per_s", None, positive=True)
    if mode == "open" and rate is None:
        raise ctx.fail(
            "rate_per_s", "missing; an open loop issues reads at a target rate per second"
        )
    if mode == "closed" and rate is not None:
        raise ctx.fail("rate_per_s", 'only for mode = "open"; a closed loop waits for each batch')
    duration = parse_duration_s(ctx, "duration_s", t["duration_s"]) if "duration_s" in t else None
    return Load(mode=mode, rate_per_s=rate, duration_s=duration)


def _parse_sla(ctx: _Ctx, t: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in t:
        if key not in SLA_METRICS:
            close = difflib.get_close_matches(key, list(SLA_METRICS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ctx.fail(
                None,
                f"SLA on unknown metric {key!r}{hint}; metrics: {', '.join(SLA_METRICS)}",
            )
        out[key] = _num(ctx, t, key, None, minimum=0.0)
    return out


#: Options the bench sets itself for every run, so a scenario cannot.
_BENCH_OWNED = ("replicas", "chaos", "manifest", "storage_options")


def _parse_feedline(ctx: _Ctx, t: Mapping[str, Any]) -> Mapping[str, Any]:
    """``[feedline]``: any ``FileSystem`` option, checked by the core."""
    for key in _BENCH_OWNED:
        if key in t:
            raise ctx.fail(key, "is set by the bench from the scenario's other tables")
    try:
        _core.check_options(dict(t))
    except (TypeError, ValueError) as e:
        raise ctx.fail(None, str(e)) from None
    return dict(t)


def _parse_torch_dataloader(ctx: _Ctx, t: Mapping[str, Any]) -> TorchDataLoaderOptions:
    _check_keys(ctx, t, ("workers", "prefetch_factor", "start_method"))
    return TorchDataLoaderOptions(
        workers=_int(ctx, t, "workers", 2),
        prefetch_factor=_int(ctx, t, "prefetch_factor", None),
        start_method=_str(ctx, t, "start_method", None, START_METHODS),
    )


def check_systems_fit_load(s: Scenario) -> None:
    """Raises :class:`ScenarioError` when a listed system cannot run the
    scenario's load mode (checked again after ``--systems`` overrides)."""
    if s.load.mode != "open":
        return
    for name in s.systems:
        why = CLOSED_LOOP_ONLY.get(name)
        if why is not None:
            raise ScenarioError(
                f'{s.source}: [load] mode = "open": system {name!r} runs a closed loop only '
                f'({why}); use mode = "closed" or drop {name!r} from `systems`'
            )


TOP_KEYS = (
    "name",
    "description",
    "seed",
    "systems",
    "percentiles",
    "dataset",
    "replicas",
    "faults",
    "workload",
    "load",
    "sla",
    "feedline",
    "torch_dataloader",
)


def parse(
    raw: Mapping[str, Any], *, source: str = "<scenario>", base: Path | None = None
) -> Scenario:
    """Validates a decoded TOML document into a :class:`Scenario`."""
    base = base or Path.cwd()
    ctx = _Ctx(source, "")
    _check_keys(ctx, raw, TOP_KEYS)
    seed = _int(ctx, raw, "seed", 0, minimum=0)
    systems_raw = raw.get("systems", ["feedline", "fsspec"])
    if not isinstance(systems_raw, list) or not systems_raw:
        raise ctx.fail("systems", f"expected a non-empty list of system names, got {systems_raw!r}")
    for s in systems_raw:
        if not isinstance(s, str) or s not in KNOWN_SYSTEMS:
            close = difflib.get_close_matches(str(s), KNOWN_SYSTEMS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ctx.fail(
                "systems", f"unknown system {s!r}{hint}; known: {', '.join(KNOWN_SYSTEMS)}"
            )
    if len(set(systems_raw)) != len(systems_raw):
        raise ctx.fail("systems", f"lists a system twice: {systems_raw!r}")
    pct_raw = raw.get("percentiles", [50, 90, 99, 99.9])
    if not isinstance(pct_raw, list) or not pct_raw:
        raise ctx.fail("percentiles", f"expected a non-empty list of numbers, got {pct_raw!r}")
    percentiles: list[float] = []
    for p in pct_raw:
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise ctx.fail("percentiles", f"expected numbers, got {type(p).__name__} {p!r}")
        if not 0 < p <= 100 or math.isnan(p):
            raise ctx.fail("percentiles", f"percentile {p!r} is outside (0, 100]")
        percentiles.append(float(p))
    replicas = _parse_replicas(ctx.sub("replicas"), _table(ctx, raw, "replicas"), base)
    faults, events = _parse_faults(ctx.sub("faults"), _table(ctx, raw, "faults"), replicas.count)
    if "dataset" in raw:
        dataset = _parse_dataset(ctx.sub("dataset"), _table(ctx, raw, "dataset"), seed, base)
    else:
        dataset = Dataset(objects=256, size_bytes=64 * 1024, seed=seed)
    name = _str(ctx, raw, "name", Path(source).stem if source != "<scenario>" else "scenario")
    scenario = Scenario(
        name=name,
        source=source,
        description=_str(ctx, raw, "description", ""),
        seed=seed,
        systems=tuple(systems_raw),
        percentiles=tuple(percentiles),
        dataset=dataset,
        replicas=replicas,
        faults=faults,
        events=events,
        workload=_parse_workload(ctx.sub("workload"), _table(ctx, raw, "workload")),
        load=_parse_load(ctx.sub("load"), _table(ctx, raw, "load")),
        sla=_parse_sla(ctx.sub("sla"), _table(ctx, raw, "sla")),
        feedline=_parse_feedline(ctx.sub("feedline"), _table(ctx, raw, "feedline")),
        torch_dataloader=_parse_torch_dataloader(
            ctx.sub("torch_dataloader"), _table(ctx, raw, "torch_dataloader")
        ),
    )
    check_systems_fit_load(scenario)
    return scenario


def loads(text: str, *, source: str = "<string>", base: Path | None = None) -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    return parse(raw, source=source, base=base)


def load(path: str | os.PathLike[str]) -> Scenario:
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():
        # A FIFO or a device would block or never end.
        raise ScenarioError(f"{p}: not a regular file, not a scenario file")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{p}: scenario file not found") from None
    except IsADirectoryError:
        raise ScenarioError(f"{p}: is a directory, not a scenario file") from None
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise ScenarioError(
            f"{p}: not a TOML scenario (not UTF-8 text: byte {exc.start} is 0x{bad:02x})"
        ) from None
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the scenario file: {exc.strerror or exc}") from None
    return loads(text, source=str(p), base=p.parent)


def default() -> Scenario:
    """The embedded scenario `feedline bench` runs with no arguments."""
    text = resources.files("feedline.bench").joinpath("default.toml").read_text(encoding="utf-8")
    return loads(text, source="<embedded default.toml>")


def override(scenario: Scenario, **changes: Any) -> Scenario:
    """A copy with top-level fields replaced (used by --systems and tests)."""
    from dataclasses import replace

    return replace(scenario, **changes)
