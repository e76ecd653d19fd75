"""The consumer: a training loop that waits for each batch and then
"computes" (closed loop, DLIO-style), or reads issued at a target rate
regardless of completions (open loop, latency from the intended start as
wrk2 does, so a stall cannot hide the requests it delayed)."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from feedline.bench.dataset import Materialized, crc32c
from feedline.bench.metrics import Recorder, StepTiming
from feedline.bench.scenario import Distribution, Scenario

Sample = tuple[str, int | None, int | None]  # key, start, end (None: whole object)
ReadFn = Callable[[str, int | None, int | None], bytes]
Verifier = Callable[[Sample, bytes], bool | None]


def plan_batches(scenario: Scenario, data: Materialized) -> list[list[Sample]]:
    """The batches every system reads, in order, from the scenario's seed."""
    w = scenario.workload
    rng = random.Random(scenario.seed)
    keys = list(data.keys)
    if not keys:
        raise ValueError("the dataset has no objects")
    per_epoch = len(keys)
    total = w.steps * w.batch_size if w.steps is not None else (w.epochs or 1) * per_epoch
    samples: list[Sample] = []
    epoch = 0
    while len(samples) < total:
        if w.access == "random_ranges":
            for _ in range(min(per_epoch, total - len(samples))):
                key = rng.choice(keys)
                size = data.sizes[key]
                length = min(w.range_bytes, size)
                start = rng.randrange(0, size - length + 1)
                samples.append((key, start, start + length))
        else:
            order = list(keys)
            if w.access == "shuffled":
                random.Random(scenario.seed * 7919 + epoch).shuffle(order)
            samples.extend((k, None, None) for k in order[: total - len(samples)])
        epoch += 1
    b = w.batch_size
    return [samples[i : i + b] for i in range(0, len(samples), b)]


def compute_draw(dist: Distribution | None, seed: int) -> Callable[[], float]:
    """Draws the seconds of emulated compute of each step (DLIO's computation_time)."""
    rng = random.Random(seed)
    if dist is None:
        return lambda: 0.0
    p = dist.params
    ms: Callable[[], float]
    if dist.kind == "fixed":
        ms = lambda: p["ms"]  # noqa: E731
    elif dist.kind == "normal":
        ms = lambda: rng.gauss(p["mean_ms"], p["stdev_ms"])  # noqa: E731
    elif dist.kind == "uniform":
        ms = lambda: rng.uniform(p["low_ms"], p["high_ms"])  # noqa: E731
    elif dist.kind == "gamma":
        ms = lambda: rng.gammavariate(p["shape"], p["scale_ms"])  # noqa: E731
    elif dist.kind == "exponential":
        ms = lambda: rng.expovariate(1.0 / p["mean_ms"])  # noqa: E731
    else:
        raise ValueError(f"unknown compute distribution {dist.kind!r}")
    return lambda: max(0.0, ms()) / 1000.0


def manifest_verifier(data: Materialized) -> Verifier:
    """Checks each delivered sample: a whole object against the manifest's
    CRC32C; a range against the same range of replica 0's file (whose whole
    CRC matched the manifest when generated)."""

    def verify(sample: Sample, payload: bytes) -> bool | None:
        key, start, end = sample
        expected = data.checksums.get(key)
        if expected is None:
            return None
        if start is None and end is None:
            return crc32c(payload) == expected
        import os

        s = start or 0
        e = data.sizes[key] if end is None else end
        fd = os.open(os.path.join(data.replica_dirs[0], key), os.O_RDONLY)
        try:
            truth = os.pread(fd, e - s, s)
        finally:
            os.close(fd)
        return crc32c(payload) == crc32c(truth)

    return verify


def sleep_until(deadline: float, stop: threading.Event) -> None:
    """Sleeps until ``deadline`` (perf_counter) or until ``stop`` is set,
    waking every 50 ms to check."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or stop.is_set():
            return
        time.sleep(min(left, 0.05))


def _read_task(
    read: ReadFn,
    verify: Verifier,
    rec: Recorder,
    sample: Sample,
    intended: float | None,
) -> None:
    start = time.perf_counter()
    try:
        payload = read(*sample)
    except Exception as exc:  # errors that reach the consumer are a measured figure
        end = time.perf_counter()
        rec.record_read(
            latency_s=end - start,
            end_s=end - rec.t0,
            nbytes=0,
            ok=False,
            verified=None,
            error=f"{sample[0]}: {type(exc).__name__}: {exc}"[:300],
            intended_latency_s=None if intended is None else end - intended,
        )
        return
    end = time.perf_counter()
    ok = verify(sample, payload)
    rec.record_read(
        latency_s=end - start,
        end_s=end - rec.t0,
        nbytes=len(payload),
        ok=True,
        verified=ok,
        intended_latency_s=None if intended is None else end - intended,
    )


@dataclass
class RunLimits:
    duration_s: float | None = None
    stop: threading.Event | None = None


def run_closed(
    read: ReadFn,
    batches: list[list[Sample]],
    *,
    readers: int,
    prefetch_batches: int,
    compute: Callable[[], float],
    rec: Recorder,
    verify: Verifier,
    limits: RunLimits | None = None,
) -> None:
    """A training loop: ``readers`` threads keep ``prefetch_batches`` batches
    loading ahead (a DataLoader's prefetch); the loop waits for its batch
    (stall), then computes. Stops early on ``limits``."""
    limits = limits or RunLimits()
    stop = limits.stop or threading.Event()
    deadline = rec.t0 + limits.duration_s if limits.duration_s else math.inf
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="bench-reader")
    pending: dict[int, list[Future[None]]] = {}

    def submit(i: int) -> None:
        if i < len(batches):
            pending[i] = [pool.submit(_read_task, read, verify, rec, s, None) for s in batches[i]]

    try:
        for i in range(prefetch_batches + 1):
            submit(i)
        for i in range(len(batches)):
            if stop.is_set() or time.perf_counter() >= deadline:
                break
            wait_start = rec.now_s()
            for fut in pending.pop(i):
                # Bounded: every read returns or raises; a stop request
                # abandons the wait without waiting for stuck reads.
                while not fut.done():
                    if stop.is_set():
                        return
                    try:
                        fut.result(timeout=0.05)
                    except TimeoutError:
                        continue
            ready = rec.now_s()
            submit(i + prefetch_batches + 1)
            c = compute()
            sleep_until(time.perf_counter() + c, stop)
            rec.record_step(StepTiming(wait_start, ready, c))
    finally:
        rec.end_s = rec.now_s()
        for futs in pending.values():
            for fut in futs:
                fut.cancel()
        pool.shutdown(wait=not stop.is_set(), cancel_futures=True)


def run_open(
    read: ReadFn,
    batches: list[list[Sample]],
    *,
    readers: int,
    rate_per_s: float,
    rec: Recorder,
    verify: Verifier,
    limits: RunLimits | None = None,
) -> None:
    """Issues every sample at ``t0 + i / rate`` whether or not earlier reads
    finished; records latency from the actual start (service time) and from
    the intended start (what a user at that rate experiences)."""
    limits = limits or RunLimits()
    stop = limits.stop or threading.Event()
    rec.open_loop = True
    deadline = rec.t0 + limits.duration_s if limits.duration_s else math.inf
    samples = [s for b in batches for s in b]
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="bench-reader")
    futures: list[Future[None]] = []
    try:
        start = time.perf_counter()
        for i, sample in enumerate(samples):
            intended = start + i / rate_per_s
            if intended >= deadline or stop.is_set():
                break
            sleep_until(intended, stop)
            futures.append(pool.submit(_read_task, read, verify, rec, sample, intended))
        for fut in futures:
            while not stop.is_set():
                try:
                    fut.result(timeout=0.05)
                    break
                except TimeoutError:
                    continue
    finally:
        rec.end_s = rec.now_s()
        pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
