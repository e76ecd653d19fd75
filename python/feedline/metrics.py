"""Metrics a fleet can watch: Prometheus, OpenTelemetry and a text snapshot.

Turn them on with three lines::

    import feedline.metrics
    feedline.metrics.serve(port=9464)          # Prometheus on 127.0.0.1:9464
    feedline.metrics.otel(meter_provider)      # and/or OpenTelemetry

Every metric is defined once, in the core (``_core.metric_definitions()``):
the exporters here and the docs' metric table are generated from that table.

Across processes: when ``FEEDLINE_METRICS_DIR`` names a directory (``serve``
sets it to a fresh one when unset, so DataLoader workers started later,
forked or spawned, inherit it), every process that imports feedline writes
its figures there every ``FEEDLINE_METRICS_FLUSH_S`` seconds (default 1) and
when it exits, atomically (a temporary file renamed over the last one), one
file per process. A scrape merges this process's live figures with every
other process's file: counters and histograms summed (histograms through
their HDR buckets, exactly), gauges by their definition's rule and only from
processes still alive. A worker killed without warning keeps what it last
wrote: at most one flush interval of its counts is lost. A forked child
forgets the figures it inherited from its parent at ``fork``, so nothing is
counted twice.

``prometheus_client`` and ``opentelemetry-sdk`` are optional
(``pip install feedline[metrics]``); feedline imports without them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing.util
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedline import _core
from feedline._core import LatencyHistogram

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from feedline._core import MetricDefinition

__all__ = [
    "DEFINITIONS",
    "DIR_ENV",
    "FLUSH_ENV",
    "MetricsServer",
    "definitions_list",
    "definitions_table",
    "flush",
    "otel",
    "serve",
    "set_fault_active",
    "snapshot",
    "snapshot_dict",
]

#: Where processes of one job write their figures (inherited by workers).
DIR_ENV = "FEEDLINE_METRICS_DIR"
#: Seconds between two writes of a process's figures (default 1).
FLUSH_ENV = "FEEDLINE_METRICS_FLUSH_S"

#: Every metric, from the core's table.
DEFINITIONS: tuple[MetricDefinition, ...] = tuple(_core.metric_definitions())
_BY_NAME = {d["name"]: d for d in DEFINITIONS}

#: Quantiles a histogram is exported at where buckets do not fit (OTel
#: observable instruments, the log snapshot).
QUANTILES = (0.5, 0.9, 0.99, 0.999)

Key = tuple[str, tuple[str, ...]]
Figure = float | LatencyHistogram


def _local() -> dict[Key, Figure]:
    with _SNAPSHOT_LOCK:
        samples = _core.metrics_snapshot()
    return {(name, tuple(labels)): value for name, labels, value in samples}


# -- per-process files ---------------------------------------------------------


def _flush_interval_s() -> float:
    raw = os.environ.get(FLUSH_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{FLUSH_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{FLUSH_ENV}={raw!r} must be more than 0 seconds")
    return value


@dataclass
class _Process:
    """This process's file name: pid plus a random tag, so a pid reused
    later in the job never overwrites a dead worker's figures."""

    pid: int
    tag: str

    @classmethod
    def new(cls) -> _Process:
        return cls(os.getpid(), uuid.uuid4().hex[:12])

    @property
    def file_name(self) -> str:
        return f"{socket.gethostname()}-{self.pid}-{self.tag}.json"


_SELF = _Process.new()
_SNAPSHOT_LOCK = threading.Lock()


def _directory() -> Path | None:
    raw = os.environ.get(DIR_ENV)
    return Path(raw) if raw else None


def _encode(figures: dict[Key, Figure]) -> dict[str, Any]:
    samples: list[list[Any]] = []
    for (name, labels), value in sorted(figures.items()):
        if isinstance(value, LatencyHistogram):
            samples.append([name, list(labels), {"flh1": value.to_bytes().hex()}])
        else:
            samples.append([name, list(labels), value])
    return {
        "pid": _SELF.pid,
        "host": socket.gethostname(),
        "written_unix_s": time.time(),
        "samples": samples,
    }


def _decode(doc: dict[str, Any]) -> dict[Key, Figure]:
    out: dict[Key, Figure] = {}
    for name, labels, value in doc["samples"]:
        if name not in _BY_NAME:
            continue  # written by another feedline version
        key = (str(name), tuple(str(v) for v in labels))
        out[key] = (
            LatencyHistogram.from_bytes(bytes.fromhex(value["flh1"]))
            if isinstance(value, dict)
            else float(value)
        )
    return out


def flush() -> Path | None:
    """Writes this process's figures to its file in ``FEEDLINE_METRICS_DIR``
    (atomically); returns the path, or None when no directory is set."""
    directory = _directory()
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / _SELF.file_name
    _write(target, _encode(_local()))
    return target


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Where the figures of exited processes are folded (see `_compact`).
RETIRED = "retired.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # vanished: files are replaced whole, never torn
    return doc if isinstance(doc, dict) else None


def _write(path: Path, doc: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _compact(directory: Path) -> None:
    """Folds the files of exited processes into ``retired.json`` and deletes
    them, so that a job whose DataLoader starts new workers every epoch
    does not leave a scrape thousands of files to read. Idempotent under a
    crash: ``retired.json`` names the files it absorbed (readers skip them),
    and is written before they are deleted. One process compacts at a time
    (``flock``); others skip this round."""
    import fcntl

    with open(directory / ".compact.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        retired = _read(directory / RETIRED) or {"absorbed": [], "samples": []}
        absorbed = set(retired.get("absorbed", []))
        for name in absorbed:  # a crash left them after their figures were folded
            with contextlib.suppress(OSError):
                (directory / name).unlink()
        figures = _decode(retired)
        dead = []
        for path in sorted(directory.glob("*.json")):
            if path.name in (RETIRED, _SELF.file_name) or path.name in absorbed:
                continue
            doc = _read(path)
            if doc is None or _alive(int(doc.get("pid", -1)), str(doc.get("host", ""))):
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                _combine(figures, _decode(doc), alive=False)
                dead.append(path)
        if not dead:
            return
        # Names whose files could not be deleted stay listed, never counted twice.
        left = [n for n in absorbed if (directory / n).exists()]
        names = sorted({p.name for p in dead} | set(left))
        _write(directory / RETIRED, {"absorbed": names, "samples": _encode(figures)["samples"]})
        for path in dead:
            with contextlib.suppress(OSError):
                path.unlink()


def _others() -> Iterator[tuple[bool, dict[Key, Figure]]]:
    """(alive, figures) of every other process's file, and of the exited
    processes folded into ``retired.json``."""
    directory = _directory()
    if directory is None or not directory.is_dir():
        return
    with contextlib.suppress(OSError):
        _compact(directory)
    retired = _read(directory / RETIRED) or {}
    absorbed = set(retired.get("absorbed", []))
    for path in sorted(directory.glob("*.json")):
        if path.name == _SELF.file_name or path.name in absorbed:
            continue  # this process counts live; absorbed ones are in retired
        doc = retired if path.name == RETIRED else _read(path)
        if doc is None:
            continue
        try:
            figures = _decode(doc)
        except (ValueError, KeyError, TypeError):
            continue  # foreign
        if path.name == RETIRED:
            yield False, figures
        else:
            yield _alive(int(doc["pid"]), str(doc.get("host", ""))), figures


def _combine(into: dict[Key, Figure], figures: dict[Key, Figure], alive: bool) -> None:
    for key, value in figures.items():
        d = _BY_NAME.get(key[0])
        if d is None:
            continue
        if d["kind"] == "gauge" and not alive:
            continue  # a dead process has nothing in flight
        old = into.get(key)
        if old is None:
            if isinstance(value, LatencyHistogram):
                copy = LatencyHistogram()
                copy.merge(value)
                value = copy
            into[key] = value
        elif isinstance(old, LatencyHistogram) and isinstance(value, LatencyHistogram):
            old.merge(value)
        elif isinstance(old, float | int) and isinstance(value, float | int):
            rule = d["merge"]
            into[key] = (
                old + value
                if rule == "sum"
                else max(old, value)
                if rule == "max"
                else min(old, value)
            )


def merged() -> dict[Key, Figure]:
    """This process's figures plus every other process's file."""
    out: dict[Key, Figure] = {}
    _combine(out, _local(), alive=True)
    for alive, figures in _others():
        _combine(out, figures, alive)
    return out


class _Flusher:
    """Writes this process's file every interval, from a daemon thread."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        if _directory() is None:
            return
        interval = _flush_interval_s()
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(interval, self.stop), name="feedline-metrics", daemon=True
        )
        self.thread.start()

    @staticmethod
    def _run(interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):
                flush()


_FLUSHER = _Flusher()


def _final_flush() -> None:
    with contextlib.suppress(OSError, ValueError):
        flush()


class _ForkMark:
    """An object `multiprocessing.util.register_after_fork` can hold."""


_FORK_MARK = _ForkMark()


def _register_exit_flush(_: object = None) -> None:
    # multiprocessing children leave through os._exit after running these
    # finalizers (atexit does not run there); the registry is cleared when a
    # child starts, so this runs again from the after-fork hook below.
    multiprocessing.util.Finalize(None, _final_flush, exitpriority=10)


# The snapshot lock is held across fork, so no other thread is inside it
# when the child is made (waiting for it releases the GIL). The core holds
# its registry across fork itself, and a forked child never waits on a lock
# a parent thread held (rust/core/src/fork.rs).
def _before_fork() -> None:
    _SNAPSHOT_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _SNAPSHOT_LOCK.release()


def _after_fork_in_child() -> None:
    global _SELF, _SNAPSHOT_LOCK
    _SNAPSHOT_LOCK = threading.Lock()
    _core.metrics_after_fork_in_child()
    _SELF = _Process.new()
    _FLUSHER.thread = None
    _FLUSHER.start()


def _install() -> None:
    atexit.register(_final_flush)
    _register_exit_flush()
    multiprocessing.util.register_after_fork(_FORK_MARK, _register_exit_flush)
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
    _FLUSHER.start()


_install()


def _forkserver_running() -> bool:
    """Whether this process already started multiprocessing's forkserver
    (whose children inherit the environment it started with, not ours)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    return getattr(server, "_forkserver_pid", None) is not None


def _use_directory(directory: str | os.PathLike[str] | None) -> Path:
    """Sets ``FEEDLINE_METRICS_DIR`` (given, inherited, or a fresh one) so
    that workers started from now on write there, and starts flushing."""
    previous = os.environ.get(DIR_ENV)
    if directory is not None:
        os.environ[DIR_ENV] = os.fspath(directory)
    elif not previous:
        os.environ[DIR_ENV] = tempfile.mkdtemp(prefix="feedline-metrics-")
    if os.environ[DIR_ENV] != previous and _forkserver_running():
        warnings.warn(
            f"a multiprocessing forkserver started before {DIR_ENV} was set to "
            f"{os.environ[DIR_ENV]!r}: workers it starts (DataLoader "
            "multiprocessing_context='forkserver') inherit its environment and "
            "will not report to this endpoint; set the variable (or call "
            "feedline.metrics.serve) before the first forkserver worker starts",
            RuntimeWarning,
            stacklevel=3,
        )
    path = Path(os.environ[DIR_ENV])
    path.mkdir(parents=True, exist_ok=True)
    _FLUSHER.start()
    return path


def set_fault_active(fault: str, active: bool) -> None:
    """Marks an injected fault window open or closed
    (``feedline_fault_active{fault=...}``, drawn as annotations by
    ``docs/grafana-dashboard.json``)."""
    _core.metrics_set_gauge("feedline_fault_active", [fault], 1.0 if active else 0.0)


# -- Prometheus ------------------------------------------------------------------


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 (any free port) to 65535, got {port!r}")
    return port


class _Collector:
    """Yields every defined metric from the merged figures (prometheus_client
    writes the exposition format)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        figures = merged()
        by_name: dict[str, list[tuple[tuple[str, ...], Figure]]] = {}
        for (name, labels), value in sorted(figures.items(), key=lambda kv: kv[0]):
            by_name.setdefault(name, []).append((labels, value))
        for d in DEFINITIONS:
            unit = d["unit"]
            samples = by_name.get(d["name"], [])
            family: Any
            if d["kind"] == "histogram":
                family = HistogramMetricFamily(d["name"], d["help"], labels=d["labels"], unit=unit)
                for labels, h in samples:
                    if not isinstance(h, LatencyHistogram):
                        continue
                    counts = h.cumulative_counts(d["buckets"])
                    buckets = [
                        (repr(b), float(c)) for b, c in zip(d["buckets"], counts, strict=True)
                    ]
                    buckets.append(("+Inf", float(h.count)))
                    family.add_metric(list(labels), buckets, h.sum_seconds)
            else:
                cls = CounterMetricFamily if d["kind"] == "counter" else GaugeMetricFamily
                family = cls(d["name"], d["help"], labels=d["labels"], unit=unit)
                for labels, v in samples:
                    if not isinstance(v, LatencyHistogram):
                        family.add_metric(list(labels), v)
            yield family


@dataclass
class MetricsServer:
    """A running Prometheus endpoint; :meth:`close` stops it."""

    addr: str
    port: int
    directory: Path
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    port: int = 9464,
    addr: str = "127.0.0.1",
    *,
    directory: str | os.PathLike[str] | None = None,
) -> MetricsServer:
    """Serves every defined metric in Prometheus' text format at
    ``http://addr:port/metrics``, merged over this process and every process
    writing to ``directory`` (``FEEDLINE_METRICS_DIR``; a fresh directory
    when neither is set). Loopback by default; ``port=0`` picks a free one."""
    port = _check_port(port)
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ImportError(
            "feedline.metrics.serve needs prometheus_client: pip install 'feedline[metrics]'"
        ) from exc
    path = _use_directory(directory)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {addr}:{port}: {exc.strerror}") from exc
    return MetricsServer(addr, int(server.server_address[1]), path, server, thread)


# -- OpenTelemetry ---------------------------------------------------------------


def _otel_name(name: str) -> str:
    # OTel names carry no `_total`; its Prometheus exporter adds it back.
    return name.removesuffix("_total")


_UCUM = {"seconds": "s", "bytes": "By", "": "1"}


def otel(meter_provider: Any = None) -> None:
    """Registers every defined metric with OpenTelemetry as observable
    instruments (read at each collection): counters as observable counters
    (named without ``_total``), gauges as observable gauges, and each
    latency histogram as an observable counter ``<name>_count`` and an
    observable gauge ``<name>`` with a ``quantile`` attribute (the OTel API
    has no asynchronous histogram). ``meter_provider`` defaults to the global
    one."""
    try:
        from opentelemetry import metrics as otel_metrics
        from opentelemetry.metrics import CallbackOptions, Observation
    except ImportError as exc:
        raise ImportError(
            "feedline.metrics.otel needs opentelemetry-api: pip install 'feedline[metrics]'"
        ) from exc
    provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    meter = provider.get_meter("feedline", _core.__version__)
    recent = _Recent()

    def observe(d: MetricDefinition, part: str) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for (name, labels), value in recent.figures().items():
                if name != d["name"]:
                    continue
                attrs: dict[str, str | float] = dict(zip(d["labels"], labels, strict=True))
                if not isinstance(value, LatencyHistogram):
                    out.append(Observation(value, attrs))
                elif part == "count":
                    out.append(Observation(value.count, attrs))
                else:
                    for q in QUANTILES:
                        seconds = value.percentile_ms(q * 100) / 1e3
                        out.append(Observation(seconds, {**attrs, "quantile": q}))
            return out

        return callback

    for d in DEFINITIONS:
        unit = _UCUM.get(d["unit"], d["unit"])
        name = _otel_name(d["name"])
        if d["kind"] == "counter":
            meter.create_observable_counter(name, [observe(d, "")], unit, d["help"])
        elif d["kind"] == "gauge":
            meter.create_observable_gauge(name, [observe(d, "")], unit, d["help"])
        else:
            meter.create_observable_counter(
                f"{name}_count", [observe(d, "count")], "1", f"{d['help']} (count)"
            )
            meter.create_observable_gauge(
                name, [observe(d, "quantile")], unit, f"{d['help']} (quantiles)"
            )


class _Recent:
    """The merged figures, read once per collection: the callbacks of one
    collection run within milliseconds of each other."""

    MAX_AGE_S = 0.05

    def __init__(self) -> None:
        self.at = -1.0
        self.cached: dict[Key, Figure] = {}
        self.lock = threading.Lock()

    def figures(self) -> dict[Key, Figure]:
        with self.lock:
            now = time.monotonic()
            if now - self.at > self.MAX_AGE_S:
                self.cached, self.at = merged(), now
            return self.cached


# -- snapshot for logs and reports -----------------------------------------------


def _labels_text(d: MetricDefinition, labels: tuple[str, ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(d["labels"], labels, strict=True)) + "}"


def snapshot_dict() -> dict[str, list[dict[str, Any]]]:
    """Every figure (merged across processes) as JSON-ready values, by
    metric name: ``{"labels": {...}, "value": x}``, histograms as
    ``{"labels", "count", "sum_seconds", "p50_seconds", ...}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for (name, labels), value in sorted(merged().items(), key=lambda kv: kv[0]):
        d = _BY_NAME[name]
        row: dict[str, Any] = {"labels": dict(zip(d["labels"], labels, strict=True))}
        if isinstance(value, LatencyHistogram):
            row["count"] = value.count
            row["sum_seconds"] = value.sum_seconds
            for q in QUANTILES:
                row[f"p{q * 100:g}_seconds"] = value.percentile_ms(q * 100) / 1e3
        else:
            row["value"] = value
        out.setdefault(name, []).append(row)
    return out


def snapshot() -> str:
    """One line per figure, for logs: ``name{labels} value`` (histograms as
    count, sum and quantiles)."""
    lines = []
    for name, rows in snapshot_dict().items():
        d = _BY_NAME[name]
        for row in rows:
            labels = _labels_text(d, tuple(row["labels"].values()))
            if "value" in row:
                lines.append(f"{name}{labels} {row['value']:g}")
            else:
                quantiles = " ".join(
                    f"p{q * 100:g}={row[f'p{q * 100:g}_seconds']:g}s" for q in QUANTILES
                )
                lines.append(
                    f"{name}{labels} count={row['count']} sum={row['sum_seconds']:g}s {quantiles}"
                )
    return "\n".join(lines)


def definitions_table() -> str:
    """The docs' metric table (Markdown), generated from the definitions."""
    rows = [
        "| Metric | Type | Unit | Labels | Merged across processes | Description |",
        "|---|---|---|---|---|---|",
    ]
    for d in DEFINITIONS:
        labels = ", ".join(f"`{label}`" for label in d["labels"]) or "-"
        unit = d["unit"] or "-"
        rows.append(
            f"| `{d['name']}` | {d['kind']} | {unit} | {labels} | {d['merge']} | {d['help']} |"
        )
    return "\n".join(rows) + "\n"


def definitions_list() -> str:
    """The README's list of metrics (Markdown), generated from the
    definitions: each name with its labels and what it counts."""
    rows = []
    for d in DEFINITIONS:
        labels = "{" + ", ".join(d["labels"]) + "}" if d["labels"] else ""
        rows.append(f"- `{d['name']}{labels}`: {d['help']}")
    return "\n".join(rows) + "\n"
