"""The ``torch-dataloader`` system: a real ``torch.utils.data.DataLoader``
whose worker processes read every sample through plain fsspec (the ``fsspec``
system's static sharding and hand-written failover), and a training loop in
the main process that consumes its batches with the same emulated compute.

Faults across processes: the chaos that the ``fsspec`` system applies with
one ``ChaosFileSystem`` per replica is applied here by the same class in each
worker, but every read's fate (delay, error, outage, stall, corruption) is
drawn by *one* sampler per replica living in the main process
(:class:`ChaosBroker`): request ``n`` of a replica gets the same fate whichever
worker sends it, ``fail_after_requests`` counts the replica's requests across
all workers, bandwidth queues reads from every worker, and outage windows
(timed ``kill``/``stop`` events on local replicas) run on the main process's
clock from the same start. The worker sleeps, raises or flips the byte itself,
so the fault costs the worker's time as it would a real slow replica. Faults
on server replicas (nginx: kill, stop; netns: packet loss) act on real
processes and packets, which workers reach like any other client.

Each worker measures its reads (start and end on the system-wide monotonic
clock, so the main process places them on its own timeline), checks them
against the manifest, and ships the payload as a ``torch.uint8`` tensor with
the batch: the shared-memory hand-off a real DataLoader does.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_connections
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from feedline.bench.dataset import Materialized
from feedline.bench.metrics import Recorder, StepTiming
from feedline.bench.scenario import Scenario
from feedline.bench.workload import RunLimits, Sample, sleep_until

#: How long a worker waits for the broker's answer before failing the read.
BROKER_TIMEOUT_S = 30.0
#: How long the loop waits for workers to exit before killing them.
SHUTDOWN_JOIN_S = 5.0

# A read as a worker ships it: (sample index, worker pid, start, end (perf_counter
# seconds, system-wide monotonic), payload tensor, verified, error, retries, errors).
ReadRecord = tuple[int, int, float, float, torch.Tensor, bool | None, str | None, int, int]


class ChaosBroker:
    """Draws chaos fates for worker processes from the main process's
    samplers, one per replica, over one pipe per worker."""

    def __init__(self, samplers: Mapping[int, Any], ctx: Any, workers: int) -> None:
        self.samplers = dict(samplers)
        pairs = [ctx.Pipe(duplex=True) for _ in range(workers)]
        self.main_ends: list[Connection] = [a for a, _ in pairs]
        self.worker_ends: list[Connection] = [b for _, b in pairs]
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="bench-chaos-broker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        live = list(self.main_ends)
        while live and not self._stop.is_set():
            for conn in wait_for_connections(live, timeout=0.1):
                assert isinstance(conn, Connection)
                try:
                    replica, nbytes = conn.recv()
                except (EOFError, OSError):
                    live.remove(conn)
                    continue
                try:
                    reply: Any = self.samplers[replica].next(nbytes)
                except Exception as exc:  # shipped to the worker, raised there
                    reply = f"chaos broker: replica {replica}: {type(exc).__name__}: {exc}"
                self.requests += 1
                try:
                    conn.send(reply)
                except OSError:
                    live.remove(conn)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for conn in self.main_ends + self.worker_ends:
            conn.close()


class RemoteSampler:
    """Stands in for ``_core.ChaosSampler`` inside a worker's
    ``ChaosFileSystem``: asks the broker for request ``n``'s fate."""

    def __init__(self, conn: Connection, replica: int) -> None:
        self.conn = conn
        self.replica = replica

    def next(self, nbytes: int) -> tuple[float, str, int | None]:
        self.conn.send((self.replica, nbytes))
        if not self.conn.poll(BROKER_TIMEOUT_S):
            raise TimeoutError(
                f"chaos broker did not answer within {BROKER_TIMEOUT_S} s (replica {self.replica})"
            )
        reply = self.conn.recv()
        if isinstance(reply, str):
            raise RuntimeError(reply)
        delay_ms, kind, corrupt_at = reply
        return float(delay_ms), str(kind), corrupt_at

    def stats(self) -> dict[str, int]:
        return {}  # counted by the broker's samplers in the main process


# Builds a worker's reader: ``(scenario, data, chaos, roots) -> system``.
# Passed in by the caller (the ``fsspec`` system class) so this module does
# not import the systems module that imports it.
ReaderFactory = Callable[[Scenario, Materialized, Mapping[int, Any], list[str]], Any]


class WorkerReads(Dataset[ReadRecord]):
    """Map-style dataset over the planned samples; item ``j`` is one read of
    ``samples[j]`` done in the worker process that fetches it."""

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any],
        roots: list[str],
        samples: list[Sample],
        broker_ends: list[Connection] | None,
        make_reader: ReaderFactory,
    ) -> None:
        self.scenario = scenario
        self.data = data
        self.chaos = dict(chaos)
        self.roots = roots
        self.samples = samples
        self.broker_ends = broker_ends
        self.make_reader = make_reader
        self._reader: Any = None
        self._verify: Callable[[Sample, bytes], bool | None] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _setup(self) -> None:
        # In the worker: its own fsspec filesystems (never shared across a fork).
        from feedline.bench.workload import manifest_verifier
        from feedline.chaos import ChaosFileSystem

        reader = self.make_reader(self.scenario, self.data, self.chaos, self.roots)
        if self.broker_ends is not None:
            info = torch.utils.data.get_worker_info()
            conn = self.broker_ends[info.id if info is not None else 0]
            for index, fs in enumerate(reader.replica_fs):
                if isinstance(fs, ChaosFileSystem) and index in self.chaos:
                    fs.sampler = RemoteSampler(conn, index)
        self._reader = reader
        self._verify = manifest_verifier(self.data)

    def __getitem__(self, j: int) -> ReadRecord:
        if self._reader is None:
            self._setup()
        reader, verify = self._reader, self._verify
        assert verify is not None
        sample = self.samples[j]
        retries, errors = reader.retries, reader.errors
        start = time.perf_counter()
        try:
            payload: bytes | None = reader.read(*sample)
            error = None
        except Exception as exc:  # errors that reach the consumer are a measured figure
            payload = None
            error = f"{sample[0]}: {type(exc).__name__}: {exc}"[:300]
        end = time.perf_counter()
        verified = None if payload is None else verify(sample, payload)
        if payload:
            # What a real dataset hands the loop: a tensor, moved to shared
            # memory by the DataLoader's queue (bytearray: a writable buffer).
            tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            tensor = torch.empty(0, dtype=torch.uint8)
        return (
            j,
            os.getpid(),
            start,
            end,
            tensor,
            verified,
            error,
            reader.retries - retries,
            reader.errors - errors,
        )


def keep_list(batch: list[ReadRecord]) -> list[ReadRecord]:
    """collate_fn: the samples' sizes differ, so a batch stays a list."""
    return batch


def ignore_sigint(worker_id: int) -> None:
    """worker_init_fn: Ctrl-C reaches the whole process group; the main
    process decides (the CLI's first Ctrl-C is a graceful stop) and shuts
    the workers down, so they must not die mid-batch on their own."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)


#: The DataLoader's ``timeout``: the loop waits for a batch in slices this
#: long, so a stop request is honoured while a worker is stuck in a slow read.
WAIT_SLICE_S = 0.05


def next_batch(iterator: Any, stop: threading.Event, deadline: float) -> Any:
    """The iterator's next batch; None when ``stop`` is set or ``deadline``
    passes first. A DataLoader's ``timeout`` raises before it changes any
    state, so the same batch is waited for again after each slice."""
    while True:
        try:
            return next(iterator)
        except RuntimeError as exc:
            if not str(exc).startswith("DataLoader timed out"):
                raise
        if stop.is_set() or time.perf_counter() >= deadline:
            return None


def shutdown(iterator: Any, workers: list[Any]) -> None:
    """Stops the DataLoader's workers: torch's own shutdown (join, then
    terminate), then a kill for any that survived it. Never raises."""
    shut = getattr(iterator, "_shutdown_workers", None)
    if shut is not None:
        # The workers are killed below if torch's shutdown fails.
        with contextlib.suppress(Exception):
            shut()
    for w in workers:
        try:
            if w.is_alive():
                w.kill()
            w.join(timeout=SHUTDOWN_JOIN_S)
        except (OSError, ValueError, AssertionError):
            pass


class LoaderRun:
    """One run of the DataLoader-driven training loop; ``worker_pids`` and
    ``reads_per_pid`` say which processes read what."""

    def __init__(
        self,
        scenario: Scenario,
        data: Materialized,
        chaos: Mapping[int, Any],
        roots: list[str],
        samplers: Mapping[int, Any],
        make_reader: ReaderFactory,
    ) -> None:
        opts = scenario.torch_dataloader
        self.scenario = scenario
        self.data = data
        self.chaos = dict(chaos)
        self.roots = roots
        self.samplers = dict(samplers)
        self.make_reader = make_reader
        self.workers = opts.workers
        self.prefetch_factor = opts.prefetch_factor_for(scenario.workload.prefetch_batches)
        self.start_method = opts.start_method or multiprocessing.get_start_method()
        self.worker_pids: list[int] = []
        self.reads_per_pid: dict[int, int] = {}
        self.retries = 0
        self.errors = 0
        self.broker_requests = 0
        self.peak_workers_private_bytes = 0

    def run(
        self,
        batches: list[list[Sample]],
        *,
        compute: Callable[[], float],
        rec: Recorder,
        limits: RunLimits,
    ) -> None:
        """Closed loop: wait for batch i from the DataLoader (stall), then
        compute; stops early on ``limits``. Workers are always shut down."""
        stop = limits.stop or threading.Event()
        deadline = rec.t0 + limits.duration_s if limits.duration_s else math.inf
        samples = [s for b in batches for s in b]
        index_batches: list[list[int]] = []
        first = 0
        for b in batches:
            index_batches.append(list(range(first, first + len(b))))
            first += len(b)
        ctx = multiprocessing.get_context(self.start_method)
        broker = ChaosBroker(self.samplers, ctx, self.workers) if self.samplers else None
        dataset = WorkerReads(
            self.scenario,
            self.data,
            self.chaos,
            self.roots,
            samples,
            broker.worker_ends if broker is not None else None,
            self.make_reader,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=index_batches,
            num_workers=self.workers,
            collate_fn=keep_list,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=ctx,
            worker_init_fn=ignore_sigint,
            persistent_workers=False,
            pin_memory=False,
            timeout=WAIT_SLICE_S,
        )
        iterator: Any = None
        workers: list[Any] = []
        try:
            if broker is not None:
                broker.start()
            iterator = iter(loader)  # starts the worker processes
            workers = list(getattr(iterator, "_workers", []))
            self.worker_pids = [w.pid for w in workers if w.pid is not None]
            pids = list(self.worker_pids)
            rec.child_pids = lambda: pids
            rec.sample_rss()  # once with the workers, however short the run
            self._loop(iterator, batches, compute, rec, stop, deadline)
        except RuntimeError as exc:
            # A worker died (killed, out of memory): torch raises this from
            # its SIGCHLD handler or from next(). It reaches the loop as an
            # error, and the run ends there, as it would end a training job.
            if "DataLoader worker" not in str(exc):
                raise
            rec.record_error(f"DataLoader: {type(exc).__name__}: {exc}"[:300])
        finally:
            rec.end_s = rec.now_s()
            shutdown(iterator, workers)
            rec.sample_rss()
            rec.child_pids = None
            self.peak_workers_private_bytes = rec.peak_children_private
            if broker is not None:
                self.broker_requests = broker.requests
                broker.close()

    def _loop(
        self,
        iterator: Any,
        batches: list[list[Sample]],
        compute: Callable[[], float],
        rec: Recorder,
        stop: threading.Event,
        deadline: float,
    ) -> None:
        for _ in range(len(batches)):
            if stop.is_set() or time.perf_counter() >= deadline:
                return
            wait_start = rec.now_s()
            try:
                batch = next_batch(iterator, stop, deadline)
            except (OSError, EOFError) as exc:
                # The hand-off of a batch's tensors from a dying worker broke
                # (connection reset while fetching its shared memory).
                raise RuntimeError(
                    f"DataLoader worker hand-off failed: {type(exc).__name__}: {exc}"
                ) from exc
            if batch is None:
                return
            ready_at = time.perf_counter()
            ready = ready_at - rec.t0
            c = compute()
            self._record(batch, rec)  # bookkeeping overlaps the compute
            sleep_until(ready_at + c, stop)
            rec.record_step(StepTiming(wait_start, ready, c))

    def _record(self, batch: list[ReadRecord], rec: Recorder) -> None:
        for j, pid, start, end, tensor, verified, error, retries, errors in batch:
            del j
            self.reads_per_pid[pid] = self.reads_per_pid.get(pid, 0) + 1
            self.retries += retries
            self.errors += errors
            rec.record_read(
                latency_s=end - start,
                end_s=end - rec.t0,
                nbytes=int(tensor.numel()),
                ok=error is None,
                verified=verified,
                error=error,
            )

    def info(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "prefetch_factor": self.prefetch_factor,
            "start_method": self.start_method,
            "main_pid": os.getpid(),
            "worker_pids": list(self.worker_pids),
            "reads_per_pid": {str(k): v for k, v in sorted(self.reads_per_pid.items())},
            "chaos_broker_requests": self.broker_requests,
            "peak_workers_private_mb": self.peak_workers_private_bytes / 1e6,
        }
