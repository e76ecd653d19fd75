"""The data paths a bench run compares, behind one small interface, and the
adapter to feedline's optional parts (replica routing, chaos, manifests).
A build without one degrades with a note in the report, never a crash.

Every system reads the same keys from the same replica directories under
the same faults (``feedline.chaos`` applied in-process, per replica):

* ``feedline``: ``feedline.FileSystem(replicas=..., chaos=..., hedge_after_ms=...)``;
  routing, failover, hedging and verification happen in Rust.
* ``fsspec``: what a careful user writes with plain fsspec: each object is
  read from replica ``crc32(key) % n`` (static sharding) and, on an error,
  once more from the next replica (a hand-written failover).
* ``fsspec-readahead``: as ``fsspec``, through fsspec's ``ReadAheadCache``.
* ``fsspec-blockcache``: as ``fsspec``, through fsspec's ``blockcache``
  (``CachingFileSystem``, blocks cached on local disk).
* ``torch-dataloader``: a real ``torch.utils.data.DataLoader`` whose worker
  processes read through the ``fsspec`` path (same sharding, failover and
  chaos, fates drawn in the main process); see :mod:`feedline.bench.torch_loader`.
* ``obstore``: needs HTTP replicas (nginx); skipped on local directories.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from feedline._core import Chaos
from feedline.bench.dataset import Materialized
from feedline.bench.scenario import Scenario

#: How long a killed replica stays down when no ``resume`` event follows.
FOREVER_S = 10.0 * 24 * 3600


class SystemUnavailable(RuntimeError):
    """This system cannot run here; the message says why (shown, not fatal)."""


# -- feature detection ----------------------------------------------------------


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def chaos_module() -> Any:
    """``feedline.chaos`` (imported late: the bench CLI starts without it)."""
    return importlib.import_module("feedline.chaos")


# -- faults -> chaos specs ------------------------------------------------------


@dataclass
class FaultPlan:
    """Per-replica chaos and the fault windows to shade."""

    per_replica: dict[int, Chaos] = field(default_factory=dict)
    windows: list[tuple[float, float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.per_replica


def fault_plan(scenario: Scenario, run_s: float | None = None) -> FaultPlan:
    """See :func:`_fault_plan`; on nginx replicas kill/stop/resume act on the
    real processes, so they are not turned into chaos outages."""
    return _fault_plan(scenario, run_s, events_as_outages=scenario.replicas.kind == "local")


def _fault_plan(scenario: Scenario, run_s: float | None, *, events_as_outages: bool) -> FaultPlan:
    """The scenario's ``[[faults.replica]]`` chaos, with timed events added.

    On local directories a ``kill`` or ``stop`` is an outage window from its
    ``at`` until a later ``resume`` of that replica (or ``until``, or the end).
    """
    plan = FaultPlan()
    by_index: dict[int, Chaos] = {f.index: f.chaos for f in scenario.faults}
    outages: dict[int, list[tuple[float, float]]] = {
        i: [(float(a), float(b)) for a, b in c.outages] for i, c in by_index.items()
    }
    end_default = run_s if run_s is not None else FOREVER_S
    events = sorted(scenario.events, key=lambda e: e.at_s)
    for i, ev in enumerate(events):
        if ev.action in ("kill", "stop") and ev.replica is not None:
            end = ev.until_s
            if end is None:
                later = [
                    e.at_s
                    for e in events[i + 1 :]
                    if e.action == "resume" and e.replica == ev.replica
                ]
                end = later[0] if later else FOREVER_S
            if events_as_outages:
                outages.setdefault(ev.replica, []).append((ev.at_s, end))
            shown_end = min(end, end_default)
            plan.windows.append((ev.at_s, shown_end, f"replica {ev.replica} {ev.action}"))
        elif ev.action in ("loss", "delay"):
            plan.windows.append((ev.at_s, ev.until_s or end_default, ev.action))
    for f in scenario.faults:
        for start, end in f.chaos.outages:
            plan.windows.append((start, min(end, end_default), f"replica {f.index} outage"))
    for index in sorted(set(by_index) | set(outages)):
        chaos = by_index.get(index, Chaos())
        plan.per_replica[index] = chaos.replace(
            seed=scenario.seed * 1000 + index, outages=sorted(outages.get(index, []))
        )
    return plan


# -- the systems ----------------------------------------------------------------


class System:
    """One data path. ``read`` is called from many reader threads at once.

    ``roots`` are the replicas as this system reaches them: directories, or
    ``http://`` URLs of nginx replicas serving the same objects."""

    name = "system"

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any] | None,
        roots: list[str] | None = None,
    ):
        self.scenario = scenario
        self.data = data
        self.chaos = chaos or {}
        self.roots = list(roots) if roots is not None else list(data.replica_dirs)
        self.http = any(r.startswith(("http://", "https://")) for r in self.roots)
        self.notes: list[str] = []

    def read(self, key: str, start: int | None, end: int | None) -> bytes:
        raise NotImplementedError

    def run_closed(
        self,
        batches: list[list[Any]],
        *,
        readers: int,
        prefetch_batches: int,
        compute: Callable[[], float],
        rec: Any,
        verify: Any,
        limits: Any,
    ) -> None:
        """The closed-loop training loop; reader threads call :meth:`read`.
        A system with its own loop (``torch-dataloader``) overrides this."""
        from feedline.bench.workload import run_closed

        run_closed(
            self.read,
            batches,
            readers=readers,
            prefetch_batches=prefetch_batches,
            compute=compute,
            rec=rec,
            verify=verify,
            limits=limits,
        )

    def stats(self) -> dict[str, Any] | None:
        """Retries, hedges, ejections... where the system counts them."""
        return None

    def info(self) -> dict[str, Any] | None:
        """How the system ran (worker processes...), for the report; None: nothing to say."""
        return None

    def close(self) -> None:
        pass


class FeedlineSystem(System):
    name = "feedline"

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any] | None,
        roots: list[str] | None = None,
    ):
        super().__init__(scenario, data, chaos, roots)
        import feedline

        kwargs: dict[str, Any] = dict(scenario.feedline)
        if self.chaos:
            kwargs["chaos"] = dict(self.chaos)
        manifest = feedline_manifest(data)
        if manifest is not None:
            kwargs["manifest"] = manifest
        replicas = list(self.roots)
        self.fs = feedline.FileSystem(replicas=replicas, **kwargs)

    def read(self, key: str, start: int | None, end: int | None) -> bytes:
        return self.fs.cat_file(key, start, end)

    def stats(self) -> dict[str, Any] | None:
        stats = getattr(self.fs, "stats", None)
        if stats is None:
            return None
        summary = summarize_replica_stats(stats())
        cache = getattr(self.fs, "cache", None)
        if cache is not None:
            summary["cache"] = cache.stats()
        return summary


def feedline_manifest(data: Materialized) -> Any:
    """A manifest feedline's FileSystem accepts: ``feedline.write_manifest``'s
    own file when available (cached on ``data``), else None."""
    import feedline

    if "feedline_manifest" in data.extra:
        return data.extra["feedline_manifest"]
    writer = getattr(feedline, "write_manifest", None)
    path = None
    if writer is not None:
        try:
            path = writer(data.replica_dirs[0])
        except Exception:  # a manifest is an optimisation here; the harness verifies anyway
            path = None
    data.extra["feedline_manifest"] = path
    return path


COUNTERS = ("requests", "errors", "retries", "hedges_sent", "hedges_won", "ejections")


def summarize_replica_stats(raw: Any) -> dict[str, Any]:
    """Sums fs.stats()'s per-replica counters; keeps the per-replica detail."""
    replicas: dict[str, Any] = {}
    if isinstance(raw, dict):
        inner = raw.get("replicas", raw)
        if isinstance(inner, dict):
            replicas = {str(k): v for k, v in inner.items() if isinstance(v, dict)}
        elif isinstance(inner, list):
            replicas = {str(i): v for i, v in enumerate(inner) if isinstance(v, dict)}
    elif isinstance(raw, list):
        replicas = {str(i): v for i, v in enumerate(raw) if isinstance(v, dict)}
    totals = {c: 0 for c in COUNTERS}
    for rep in replicas.values():
        for c in COUNTERS:
            v = rep.get(c)
            if isinstance(v, int | float) and not isinstance(v, bool):
                totals[c] += int(v)
    out: dict[str, Any] = {"totals": totals, "replicas": _jsonable(replicas)}
    if isinstance(raw, dict) and isinstance(raw.get("extra_request_ratio"), int | float):
        out["extra_request_ratio"] = float(raw["extra_request_ratio"])
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


class FsspecSystem(System):
    """Plain fsspec with static sharding and one hand-written failover."""

    name = "fsspec"

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any] | None,
        roots: list[str] | None = None,
    ):
        super().__init__(scenario, data, chaos, roots)
        from fsspec.implementations.local import LocalFileSystem

        self.replica_fs: list[Any] = []
        wrapper = chaos_module().ChaosFileSystem if self.chaos else None
        for i in range(len(self.roots)):
            fs: Any = LocalFileSystem()
            if self.http:
                import fsspec

                fs = fsspec.filesystem("http", skip_instance_cache=True)
            if wrapper is not None and i in self.chaos:
                fs = wrapper(fs, self.chaos[i])
            self.replica_fs.append(self._wrap(fs, i))
        self.retries = 0
        self.errors = 0

    def _wrap(self, fs: Any, index: int) -> Any:
        return fs

    def _path(self, index: int, key: str) -> str:
        if self.http:
            return f"{self.roots[index].rstrip('/')}/{key}"
        return os.path.join(self.roots[index], key)

    def _cat(self, fs: Any, path: str, start: int | None, end: int | None) -> bytes:
        data: bytes = fs.cat_file(path, start=start, end=end)
        return data

    #: What the hand-written failover catches.
    failover_errors: tuple[type[BaseException], ...] = (OSError,)

    def read(self, key: str, start: int | None, end: int | None) -> bytes:
        n = len(self.replica_fs)
        first = zlib.crc32(key.encode()) % n
        try:
            return self._cat(self.replica_fs[first], self._path(first, key), start, end)
        except self.failover_errors:
            self.errors += 1
            if n == 1:
                raise
        self.retries += 1
        second = (first + 1) % n
        return self._cat(self.replica_fs[second], self._path(second, key), start, end)

    def stats(self) -> dict[str, Any] | None:
        # Only what a hand-written failover can count; no hedges, no ejections.
        return {"totals": {"retries": self.retries, "errors": self.errors}, "replicas": {}}


class FsspecReadaheadSystem(FsspecSystem):
    """fsspec's ``ReadAheadCache`` (the cache its remote files use) in front of
    each read, as a remote fsspec file would read."""

    name = "fsspec-readahead"
    block_bytes = 1 << 20

    def _cat(self, fs: Any, path: str, start: int | None, end: int | None) -> bytes:
        from fsspec.caching import ReadAheadCache

        size = int(fs.size(path))
        cache = ReadAheadCache(
            self.block_bytes, lambda s, e: fs.cat_file(path, start=s, end=e), size
        )
        s = 0 if start is None else start
        e = size if end is None else end
        data: bytes = cache._fetch(s, e)
        return data


class FsspecBlockcacheSystem(FsspecSystem):
    """fsspec's ``blockcache`` filesystem (blocks cached on local disk), one
    instance and cache directory per reader thread, like one per DataLoader
    worker: a shared instance is not thread-safe (its cache metadata raises
    ``KeyError`` under concurrent opens)."""

    name = "fsspec-blockcache"

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any] | None,
        roots: list[str] | None = None,
    ):
        self._cache_dirs: list[str] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        super().__init__(scenario, data, chaos, roots)

    def _cat(self, fs: Any, path: str, start: int | None, end: int | None) -> bytes:
        import fsspec

        caches: dict[int, Any] = self._local.__dict__.setdefault("caches", {})
        cached = caches.get(id(fs))
        if cached is None:
            d = tempfile.mkdtemp(prefix="feedline-bench-blockcache-")
            with self._lock:
                self._cache_dirs.append(d)
            cached = fsspec.filesystem(
                "blockcache", fs=fs, cache_storage=d, check_files=False, skip_instance_cache=True
            )
            caches[id(fs)] = cached
        data: bytes = cached.cat_file(path, start=start, end=end)
        return data

    def close(self) -> None:
        with self._lock:
            dirs, self._cache_dirs = self._cache_dirs, []
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


class TorchDataLoaderSystem(FsspecSystem):
    """``torch.utils.data.DataLoader`` with ``[torch_dataloader] workers``
    worker processes, each reading samples through the ``fsspec`` path
    (same sharding, failover and chaos); the training loop runs in the main
    process (:mod:`feedline.bench.torch_loader`). Closed loop only."""

    name = "torch-dataloader"

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any] | None,
        roots: list[str] | None = None,
    ):
        if not has_module("torch"):
            raise SystemUnavailable("torch-dataloader skipped: torch is not installed")
        # Imported (torch with it, seconds) before the chaos samplers are
        # built: outage windows count from their construction.
        from feedline.bench.torch_loader import LoaderRun

        # The main process's ChaosFileSystems: their samplers draw every
        # replica's fault sequence for all workers (torch_loader.ChaosBroker).
        super().__init__(scenario, data, chaos, roots)
        chaos_fs = chaos_module().ChaosFileSystem
        samplers = {
            i: fs.sampler
            for i, fs in enumerate(self.replica_fs)
            if i in self.chaos and isinstance(fs, chaos_fs)
        }
        self.loader = LoaderRun(scenario, data, self.chaos, self.roots, samplers, FsspecSystem)
        self.notes.append(
            f"DataLoader: {self.loader.workers} worker processes "
            f"({self.loader.start_method}), prefetch_factor {self.loader.prefetch_factor}; "
            "each worker reads its batch's samples one after another, so "
            "[workload] readers does not apply"
        )

    def run_closed(
        self,
        batches: list[list[Any]],
        *,
        readers: int,
        prefetch_batches: int,
        compute: Callable[[], float],
        rec: Any,
        verify: Any,
        limits: Any,
    ) -> None:
        del readers, prefetch_batches, verify  # the DataLoader's own; workers verify
        self.loader.run(batches, compute=compute, rec=rec, limits=limits)

    def read(self, key: str, start: int | None, end: int | None) -> bytes:
        raise RuntimeError("torch-dataloader reads in its DataLoader workers, not through read()")

    def stats(self) -> dict[str, Any] | None:
        return {
            "totals": {"retries": self.loader.retries, "errors": self.loader.errors},
            "replicas": {},
        }

    def info(self) -> dict[str, Any] | None:
        return self.loader.info()


class ObstoreSystem(FsspecSystem):
    """obstore's ``HTTPStore`` per nginx replica, with the same static
    sharding and one hand-written failover as ``fsspec``. In-process chaos
    does not reach it (obstore has no wrapper); real events (kill, stop) do."""

    name = "obstore"

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any] | None,
        roots: list[str] | None = None,
    ):
        if not has_module("obstore"):
            raise SystemUnavailable("obstore skipped: obstore is not installed")
        System.__init__(self, scenario, data, chaos, roots)
        if not self.http:
            raise SystemUnavailable(
                'obstore skipped: it is compared on HTTP replicas (replicas kind = "nginx")'
            )
        from obstore.exceptions import BaseError
        from obstore.store import HTTPStore

        self.failover_errors = (OSError, BaseError)
        if self.chaos:
            self.notes.append("in-process faults NOT applied to obstore (no chaos wrapper)")
        # Two retries, not obstore's default ten: with ten, every read of a
        # dead replica costs seconds of backoff before the failover.
        self.replica_fs = [
            HTTPStore.from_url(
                r, client_options={"allow_http": True}, retry_config={"max_retries": 2}
            )
            for r in self.roots
        ]
        self.retries = 0
        self.errors = 0

    def _path(self, index: int, key: str) -> str:
        return key

    def _cat(self, fs: Any, path: str, start: int | None, end: int | None) -> bytes:
        import obstore

        if start is None and end is None:
            return bytes(obstore.get(fs, path).bytes())
        s = 0 if start is None else start
        if end is None:
            end = int(obstore.head(fs, path)["size"])
        return bytes(obstore.get_range(fs, path, start=s, end=end))


SYSTEMS: dict[str, type[System]] = {
    "feedline": FeedlineSystem,
    "fsspec": FsspecSystem,
    "fsspec-readahead": FsspecReadaheadSystem,
    "fsspec-blockcache": FsspecBlockcacheSystem,
    "torch-dataloader": TorchDataLoaderSystem,
    "obstore": ObstoreSystem,
}


def make_system(
    name: str,
    scenario: Scenario,
    data: Materialized,
    chaos: Mapping[int, Any] | None,
    roots: list[str] | None = None,
) -> System:
    try:
        cls = SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}") from None
    return cls(scenario, data, chaos, roots)
