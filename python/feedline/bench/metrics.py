"""What one system's run measured: per-read latency (HDR, from the Rust
core), the step timeline that AU and stall time come from, throughput per
second, errors, verified bytes, peak RSS."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from feedline import _core

#: Points of the latency CDF kept for plots and the JSON report.
CDF_PERCENTILES = (
    1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 98, 99, 99.5, 99.9, 99.95, 99.99, 100,
)  # fmt: skip


@dataclass(frozen=True)
class StepTiming:
    """One training step: waited for its batch from ``wait_start_s`` until
    ``ready_s``, then computed for ``compute_s`` (times relative to the run start)."""

    wait_start_s: float
    ready_s: float
    compute_s: float

    @property
    def stall_s(self) -> float:
        return self.ready_s - self.wait_start_s

    @property
    def end_s(self) -> float:
        return self.ready_s + self.compute_s


def accelerator_utilization(steps: list[StepTiming]) -> float | None:
    """AU as MLPerf Storage defines it: compute time / total time, with the
    first step excluded (it carries pipeline warm-up). None with < 2 steps
    or no compute."""
    if len(steps) < 2:
        return None
    start = steps[0].end_s
    total = steps[-1].end_s - start
    compute = sum(s.compute_s for s in steps[1:])
    if total <= 0 or compute <= 0:
        return None
    return min(1.0, compute / total)


def au_per_epoch(steps: list[StepTiming], steps_per_epoch: int) -> list[float | None]:
    """AU of each epoch's steps (``steps_per_epoch`` in a row): an epoch's
    time runs from the end of the step before it (the first epoch, like
    :func:`accelerator_utilization`, from the end of its first step)."""
    out: list[float | None] = []
    for start in range(0, len(steps), max(1, steps_per_epoch)):
        before = steps[start - 1].end_s if start > 0 else steps[0].end_s
        epoch = steps[start : start + steps_per_epoch]
        counted = epoch[1:] if start == 0 else epoch
        total = epoch[-1].end_s - before
        compute = sum(s.compute_s for s in counted)
        out.append(min(1.0, compute / total) if total > 0 and compute > 0 else None)
    return out


def stall_seconds(steps: list[StepTiming]) -> float:
    """Time the consumer waited for data, first step excluded (as AU)."""
    return sum(s.stall_s for s in steps[1:])


def peak_rss_bytes() -> int:
    """Current resident set size (sampled by the recorder's ticker)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def private_bytes(pid: int) -> int:
    """A child process's own memory (USS: private clean + dirty pages), the
    memory it adds beyond what it shares with its parent (a forked worker
    shares the parent's pages until it writes them). 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            total_kib = 0
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total_kib += int(line.split()[1])
            return total_kib * 1024
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Recorder:
    """Thread-safe collector for one system's run."""

    t0: float = field(default_factory=time.perf_counter)
    latency: Any = field(default_factory=_core.LatencyHistogram)
    # Open loop only: latency from each read's *intended* start (wrk2-style).
    latency_co: Any = field(default_factory=_core.LatencyHistogram)
    open_loop: bool = False
    samples: int = 0
    bytes: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    verified_bytes: int = 0
    mismatches: int = 0
    steps: list[StepTiming] = field(default_factory=list)
    per_second_samples: list[int] = field(default_factory=list)
    per_second_bytes: list[int] = field(default_factory=list)
    peak_rss: int = 0
    #: Worker processes whose private memory counts in ``peak_rss`` (the
    #: ``torch-dataloader`` system's DataLoader workers); None: none.
    child_pids: Callable[[], list[int]] | None = None
    #: The highest sum of those processes' private memory sampled.
    peak_children_private: int = 0
    end_s: float | None = None
    #: Steps in one epoch, when the workload runs whole epochs: the result
    #: then has each epoch's AU too.
    steps_per_epoch: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now_s(self) -> float:
        return time.perf_counter() - self.t0

    def record_read(
        self,
        *,
        latency_s: float,
        end_s: float,
        nbytes: int,
        ok: bool,
        verified: bool | None,
        error: str | None = None,
        intended_latency_s: float | None = None,
    ) -> None:
        self.latency.record_us(int(latency_s * 1e6))
        if intended_latency_s is not None:
            self.latency_co.record_us(int(intended_latency_s * 1e6))
        second = max(0, int(end_s))
        with self._lock:
            if ok:
                self.samples += 1
                self.bytes += nbytes
                while len(self.per_second_samples) <= second:
                    self.per_second_samples.append(0)
                    self.per_second_bytes.append(0)
                self.per_second_samples[second] += 1
                self.per_second_bytes[second] += nbytes
                if verified is True:
                    self.verified_bytes += nbytes
                elif verified is False:
                    self.mismatches += 1
            else:
                self.errors += 1
                if error and len(self.error_examples) < 5:
                    self.error_examples.append(error)

    def record_error(self, error: str) -> None:
        """An error that reached the consumer without being a read (a
        DataLoader worker died): counted, no latency recorded."""
        with self._lock:
            self.errors += 1
            if len(self.error_examples) < 5:
                self.error_examples.append(error)

    def record_step(self, step: StepTiming) -> None:
        with self._lock:
            self.steps.append(step)

    def sample_rss(self) -> None:
        rss = peak_rss_bytes()
        if self.child_pids is not None:
            children = sum(private_bytes(pid) for pid in self.child_pids())
            self.peak_children_private = max(self.peak_children_private, children)
            rss += children
        self.peak_rss = max(self.peak_rss, rss)

    # -- results ---------------------------------------------------------------

    def running(self) -> dict[str, float]:
        """A cheap snapshot for the live display."""
        with self._lock:
            last = self.per_second_bytes[-2] if len(self.per_second_bytes) > 1 else 0
            last_n = self.per_second_samples[-2] if len(self.per_second_samples) > 1 else 0
            return {
                "samples": self.samples,
                "steps": len(self.steps),
                "errors": self.errors,
                "mismatches": self.mismatches,
                "samples_per_s": float(last_n),
                "mb_per_s": last / 1e6,
                "p99_ms": self.latency.percentile_ms(99.0),
            }

    def result(self, percentiles: tuple[float, ...]) -> dict[str, Any]:
        end = self.end_s if self.end_s is not None else self.now_s()
        steps = list(self.steps)
        au = accelerator_utilization(steps)
        epochs = (
            au_per_epoch(steps, self.steps_per_epoch)
            if self.steps_per_epoch and len(steps) > self.steps_per_epoch
            else None
        )
        first_batch_ms = steps[0].ready_s * 1000 if steps else None
        return {
            "duration_s": end,
            "steps": len(steps),
            "samples": self.samples,
            "bytes": self.bytes,
            "first_batch_ms": first_batch_ms,
            "samples_per_s": self.samples / end if end > 0 else 0.0,
            "mb_per_s": self.bytes / 1e6 / end if end > 0 else 0.0,
            "stall_s": stall_seconds(steps) if steps else None,
            "compute_s": sum(s.compute_s for s in steps[1:]) if steps else None,
            "au": au,
            "au_per_epoch": epochs,
            "latency": histogram_result(self.latency, percentiles),
            "latency_co": histogram_result(self.latency_co, percentiles)
            if self.open_loop
            else None,
            "errors": self.errors,
            "error_examples": list(self.error_examples),
            "verified_bytes": self.verified_bytes,
            "mismatches": self.mismatches,
            "peak_rss_mb": self.peak_rss / 1e6,
            "timeline": self.timeline(end),
        }

    def timeline(self, end_s: float) -> list[dict[str, float]]:
        """Per-second rates; the last, partial second is scaled by its width."""
        out = []
        n = len(self.per_second_samples)
        for i, (count, nbytes) in enumerate(
            zip(self.per_second_samples, self.per_second_bytes, strict=True)
        ):
            width = min(1.0, max(end_s - i, 1e-3)) if i == n - 1 else 1.0
            out.append(
                {"t_s": float(i), "samples_per_s": count / width, "mb_per_s": nbytes / 1e6 / width}
            )
        return out


def _pkey(p: float) -> str:
    return f"{p:g}"


def histogram_result(hist: Any, percentiles: tuple[float, ...]) -> dict[str, Any]:
    summary = dict(hist.summary())
    summary["percentiles_ms"] = {_pkey(p): hist.percentile_ms(p) for p in percentiles}
    summary["cdf_ms"] = [[p, hist.percentile_ms(p)] for p in CDF_PERCENTILES] if hist.count else []
    return summary
