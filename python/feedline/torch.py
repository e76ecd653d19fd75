"""PyTorch hand-off: :class:`ParquetDataset` for ``DataLoader`` and
:func:`to_device`, the double-buffered host-to-GPU feeder.

Needs ``torch`` (the ``feedline[torch]`` extra)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed
from torch.utils.data import DataLoader, IterableDataset

from feedline.arrow import (
    ParquetStream,
    batch_to_numpy,
    batch_to_torch,
    redeal,
    tensor_from_numpy,
)
from feedline.distributed import find_rank
from feedline.fs import FileSystem

Batch = dict[str, Any]

FORMATS = ("torch", "numpy", "arrow")


class ParquetDataset(IterableDataset):  # type: ignore[type-arg]
    """An ``IterableDataset`` of whole batches from a :class:`ParquetStream`:
    use it with ``DataLoader(dataset, batch_size=None, num_workers=N)``.

    Each DataLoader worker reads a disjoint share of the row groups (and each
    rank a disjoint share of those), so the union over ranks and workers is
    every row exactly once per epoch. It pickles (``spawn``/``forkserver``)
    as its arguments plus the cached footers; nothing is read until a worker
    iterates. ``format`` is ``"torch"`` (dict of tensors), ``"numpy"`` or
    ``"arrow"`` (``pyarrow.RecordBatch``).

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``.
    With ``persistent_workers=True`` the workers keep the copy they were
    started with, so there the epoch advances by itself in each worker after
    every full pass.
    """

    def __init__(
        self,
        paths_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        fs: FileSystem | None = None,
        *,
        format: str = "torch",
        **stream_kwargs: Any,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.format = format
        self.stream = ParquetStream(paths_or_glob, fs=fs, **stream_kwargs)
        self._passes = 0
        # Per-worker states from load_state_dict(loader_state_dict(...)).
        self._worker_states: list[dict[str, Any]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self._passes = 0
        self._worker_states = None

    def state_dict(self) -> dict[str, Any]:
        """The underlying stream's state (meaningful where this object is the
        one iterated: ``num_workers=0``). With workers use
        :meth:`loader_state_dict`."""
        return self.stream.state_dict()

    def loader_state_dict(self, batches_consumed: int, num_workers: int) -> dict[str, Any]:
        """The state of ``DataLoader(self, batch_size=None,
        num_workers=num_workers)`` after the training loop took
        ``batches_consumed`` batches of this epoch (counted from where this
        dataset's loaded state, if any, started).

        A DataLoader over an ``IterableDataset`` hands out batches round-robin
        over its workers, dropping each worker once it runs dry; each worker's
        batch count follows from the footers, so the rows every worker has
        delivered follow from ``batches_consumed`` alone. Exact while no row
        group is skipped for bad data after this point.
        """
        if isinstance(batches_consumed, bool) or not isinstance(batches_consumed, int):
            raise TypeError(f"batches_consumed must be an int, got {batches_consumed!r}")
        if batches_consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {batches_consumed}")
        workers = max(1, int(num_workers))
        batch_rows = self.stream.batch_rows
        # Loader slot j (DataLoader worker j) reads the share of worker
        # slots[j]: the identity, unless a resumed state rotated them.
        if self._worker_states is not None:
            if len(self._worker_states) != workers:
                raise ValueError(
                    f"the loaded state is for {len(self._worker_states)} worker(s), not {workers}"
                )
            slots = [int(st.get("worker", j)) for j, st in enumerate(self._worker_states)]
        else:
            slots = list(range(workers))
        states: dict[int, dict[str, Any]] = {}
        totals: dict[int, int] = {}
        left: list[int] = []  # batches still to come, per slot
        for j, w in enumerate(slots):
            plan = self._worker_states[j].get("plan") if self._worker_states else None
            rows, state = self.stream._shard_rows(w, workers, plan)
            base = self._start_rows(j)
            remaining = rows - base
            n = remaining // batch_rows
            if remaining % batch_rows and not self.stream.drop_last:
                n += 1
            state["rows_delivered"] = base
            states[w], totals[w] = state, rows
            left.append(n)
        # Replay the DataLoader's round-robin over the slots still active.
        taken = [0] * workers
        k = batches_consumed
        last = -1
        while k:
            active = [j for j in range(workers) if taken[j] < left[j]]
            if not active:
                raise ValueError(
                    f"batches_consumed={batches_consumed} is more than this epoch holds "
                    f"({sum(left)} batches over {workers} worker(s))"
                )
            for j in active:
                if not k:
                    break
                taken[j] += 1
                k -= 1
                last = j
        for j, w in enumerate(slots):
            rows = states[w]["rows_delivered"] + taken[j] * batch_rows
            # A worker that ran dry stays dry on resume (not a new pass).
            states[w]["rows_delivered"] = min(rows, totals[w])
            states[w]["worker"] = w
        # A new DataLoader starts its round-robin at worker 0: let worker i
        # read the share whose turn comes i-th, so the order of the batches
        # continues as it would have.
        order = [slots[(last + 1 + i) % workers] for i in range(workers)]
        return {"num_workers": workers, "workers": [states[w] for w in order]}

    def _start_rows(self, slot: int) -> int:
        """Rows loader slot ``slot``'s share had delivered when this
        dataset's loaded state was taken (0 without one)."""
        if self._worker_states is None:
            return 0
        return int(self._worker_states[slot]["rows_delivered"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` or a :meth:`loader_state_dict`; a
        DataLoader must then use the same ``num_workers``."""
        if "workers" in state:
            self._worker_states = [dict(s) for s in state["workers"]]
            self.stream.set_epoch(int(self._worker_states[0]["epoch"]))
        else:
            self._worker_states = None
            self.stream.load_state_dict(state)

    def _rank(self) -> tuple[int, int]:
        """(rank, world size) this dataset reads as."""
        if self.stream.rank is not None and self.stream.world_size is not None:
            return self.stream.rank, self.stream.world_size
        found = find_rank()
        return (found.rank, found.world_size) if found is not None else (0, 1)

    def load_job_state(self, job: dict[str, Any], num_workers: int) -> None:
        """Loads a :meth:`ResumableLoader.state_dict` (every rank's state)
        for this rank's DataLoader with ``num_workers``: exactly where this
        rank stopped when the layout (world size, workers) is the same, else
        this rank's share of every row the old layout had not delivered."""
        rank, world = self._rank()
        workers = max(1, int(num_workers))
        ranks = job.get("ranks")
        if job.get("version") != JOB_STATE_VERSION or not isinstance(ranks, list):
            raise ValueError(f"not a ResumableLoader state: keys {sorted(job)}")
        if len(ranks) != int(job["world_size"]):
            raise ValueError(
                f"the state holds {len(ranks)} of {job['world_size']} ranks; "
                "gather every rank's (a process group makes state_dict() do it)"
            )
        order = [r.get("rank") for r in ranks]
        if order != list(range(len(ranks))):
            raise ValueError(f"the state holds ranks {order}, not 0..{len(ranks) - 1}")
        old_workers = {int(r["num_workers"]) for r in ranks}
        if len(ranks) == world and old_workers == {workers}:
            self.load_state_dict(ranks[rank])
            return
        if len(old_workers) != 1:
            raise ValueError(f"the old ranks ran different numbers of workers: {old_workers}")
        old = old_workers.pop()
        shards: list[dict[str, Any]] = [{}] * (len(ranks) * old)
        for r, entry in enumerate(ranks):
            for st in entry["workers"]:
                shards[r * old + int(st["worker"])] = st
        missing = [s for s, st in enumerate(shards) if not st]
        if missing:
            raise ValueError(f"the state has no worker state for old shard(s) {missing}")
        states = []
        for w in range(workers):
            state = redeal(self.stream, shards, rank * workers + w, world * workers)
            states.append(state | {"worker": w})
        self.load_state_dict({"num_workers": workers, "workers": states})

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if self._passes and info is not None:
            # A persistent worker's second pass: main's set_epoch cannot
            # reach this copy, so take the next epoch here.
            self.stream.set_epoch(self.stream.epoch + 1)
        elif self._worker_states is not None:
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            if len(self._worker_states) != workers:
                raise ValueError(
                    f"the loaded state is for {len(self._worker_states)} DataLoader "
                    f"worker(s); this DataLoader has {workers}"
                )
            state = self._worker_states[worker]
            # Read the share of the worker whose turn this one took over.
            self.stream._worker_override = (int(state.get("worker", worker)), workers)
            self.stream.load_state_dict(state)
            if info is None:
                self._worker_states = None  # in-process: consumed by this pass
        self._passes += 1
        for batch in self.stream:
            if self.format == "torch":
                yield batch_to_torch(batch)
            elif self.format == "numpy":
                yield batch_to_numpy(batch)
            else:
                yield batch


JOB_STATE_VERSION = 1


class ResumableLoader(DataLoader):  # type: ignore[type-arg]
    """``DataLoader(dataset, batch_size=None, **kwargs)`` over a
    :class:`ParquetDataset` that counts the batches it hands out and speaks
    the ``Stateful`` protocol (``torch.distributed.checkpoint`` saves it).

    :meth:`state_dict` is the job's: every rank's worker states, gathered
    with ``all_gather_object`` when a process group is initialised (so every
    rank must call it, as for any checkpoint). :meth:`load_state_dict`
    resumes exactly with the same world size and ``num_workers`` (the batch
    stream continues bit-identical on every rank), and with another layout
    reads this rank's share of what the epoch had not delivered, each row
    exactly once across the new ranks and workers.
    """

    def __init__(self, dataset: ParquetDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, ParquetDataset):
            raise TypeError(f"ResumableLoader reads a ParquetDataset, got {type(dataset)!r}")
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("ParquetDataset yields whole batches: leave batch_size out")
        super().__init__(dataset, batch_size=None, **kwargs)
        self.dataset: ParquetDataset
        #: Batches handed out since the epoch (or the loaded state) began.
        self.batches_taken = 0
        self._pending_epoch: int | None = None
        self._done = False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.batches_taken = 0
        self._pending_epoch = None
        self._done = False
        for batch in super().__iter__():
            self.batches_taken += 1
            yield batch
        self._done = True

    def set_epoch(self, epoch: int) -> None:
        """As ``DistributedSampler.set_epoch``; a no-op for the epoch a
        loaded state is about to resume."""
        if self._pending_epoch == int(epoch):
            return
        self._pending_epoch = None
        self.batches_taken = 0
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, str]:
        """``{"job_state": JSON}``: one string, because
        ``torch.distributed.checkpoint`` loads into the structure of the
        target's own state dict, and a nested one (plans in one layout, none
        in another) would lose keys on the way."""
        return {"job_state": json.dumps(self.job_state())}

    def job_state(self) -> dict[str, Any]:
        """Every rank's state (a collective under a process group)."""
        rank, world = self.dataset._rank()
        if self.num_workers == 0 and self.batches_taken:
            mine = {"rank": rank, "num_workers": 1, "workers": [self._in_process_state()]}
        else:
            mine = {"rank": rank} | self.dataset.loader_state_dict(
                self.batches_taken, self.num_workers
            )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return {"version": JOB_STATE_VERSION, "world_size": world, "ranks": ranks}

    def _in_process_state(self) -> dict[str, Any]:
        """Without workers the stream ran here and knows where it stands;
        once it has run dry, it stands at its end (not at a replay)."""
        stream = self.dataset.stream
        state = stream.state_dict() | {"worker": 0}
        if self._done:
            state["rows_delivered"] = stream._shard_rows(0, 1, stream._plan)[0]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` (or a :meth:`job_state`)."""
        job = json.loads(state["job_state"]) if "job_state" in state else state
        self._done = False
        self.dataset.load_job_state(job, self.num_workers)
        self.batches_taken = 0
        self._pending_epoch = self.dataset.stream.epoch


def _as_tensor(value: Any) -> torch.Tensor | None:
    """A CPU tensor over ``value``'s memory where possible, else ``None``
    (strings, objects: passed through unchanged)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, pa.Array | pa.ChunkedArray):
        value = value.to_numpy(zero_copy_only=False)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        tensor: torch.Tensor = tensor_from_numpy(value)
        return tensor
    return None


def _as_dict(batch: Any) -> Batch:
    if isinstance(batch, pa.RecordBatch):
        return batch_to_torch(batch)
    if not isinstance(batch, dict):
        raise TypeError(f"to_device takes dicts of arrays or RecordBatches, got {type(batch)!r}")
    return batch


def to_device(
    batches: Iterable[Any],
    device: str | torch.device | None = None,
    *,
    depth: int = 2,
    events: list[tuple[Any, Any]] | None = None,
) -> Iterator[Batch]:
    """Moves each batch (a dict of arrays/tensors, or a RecordBatch) to
    ``device``.

    On CUDA: each batch is staged into one of ``depth`` reusable pinned host
    buffers (tensors already pinned skip this) and copied with
    ``non_blocking=True`` on a side CUDA stream;
    batch n is handed out only after the copy of batch n+1 has been queued,
    so that copy overlaps whatever the caller computes on batch n. Tensors
    handed out are safe on the current stream (it waits on the copy's event).
    ``events``, if given, collects a (start, end) CUDA event pair per copy.

    Elsewhere (``device`` "cpu", or ``None`` without CUDA): batches come back
    as dicts of CPU tensors over the same memory; nothing is copied.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"depth must be an int >= 2 (double buffering), got {depth!r}")
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"to_device({str(dev)!r}): CUDA is not available here")
        return _CudaFeeder(batches, dev, depth, events)
    if dev.type != "cpu":
        raise ValueError(f"to_device supports 'cuda' and 'cpu' devices, got {str(dev)!r}")
    return _cpu_batches(batches)


def _cpu_batches(batches: Iterable[Any]) -> Iterator[Batch]:
    for batch in batches:
        out: Batch = {}
        for name, value in _as_dict(batch).items():
            tensor = _as_tensor(value)
            out[name] = value if tensor is None else tensor
        yield out


class _CudaFeeder:
    """Iterator behind :func:`to_device` on CUDA (see there)."""

    def __init__(
        self,
        batches: Iterable[Any],
        device: torch.device,
        depth: int,
        events: list[tuple[Any, Any]] | None,
    ) -> None:
        self._source = iter(batches)
        self._device = device
        self._copy_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        # Pinned staging buffers per slot and column, grown on demand.
        self._pool: list[dict[str, torch.Tensor]] = [{} for _ in range(depth)]
        # The copy that last read each slot: the slot is refilled only after it.
        self._slot_done: list[Any] = [None] * depth
        self._events = events
        self._count = 0
        self._ready: tuple[Batch, Any] | None = None
        self._exhausted = False

    def __iter__(self) -> _CudaFeeder:
        return self

    def _pinned(self, slot: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._pool[slot].get(name)
        if buf is None or buf.dtype != tensor.dtype or buf.numel() < tensor.numel():
            buf = torch.empty(max(tensor.numel(), 1), dtype=tensor.dtype, pin_memory=True)
            self._pool[slot][name] = buf
        return buf[: tensor.numel()].view(tensor.shape)

    def _stage(self, batch: Any) -> tuple[Batch, Any]:
        slot = self._count % len(self._pool)
        self._count += 1
        done = self._slot_done[slot]
        if done is not None:
            done.synchronize()  # its previous copy must finish before we overwrite
        out: Batch = {}
        start = torch.cuda.Event(enable_timing=self._events is not None)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=self._events is not None)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(self._copy_stream):
            start.record(self._copy_stream)
            for name, value in _as_dict(batch).items():
                tensor = _as_tensor(value)
                if tensor is None:
                    out[name] = value
                    continue
                if tensor.is_pinned():
                    # Already pinned (DataLoader's pin_memory=True): copy as
                    # is; torch's host allocator keeps it until the copy ends.
                    out[name] = tensor.to(self._device, non_blocking=True)
                    continue
                staged = self._pinned(slot, name, tensor)
                staged.copy_(tensor)
                out[name] = staged.to(self._device, non_blocking=True)
            end.record(self._copy_stream)
        self._slot_done[slot] = end
        if self._events is not None:
            self._events.append((start, end))
        return out, end

    def __next__(self) -> Batch:
        if self._ready is None:
            if self._exhausted:
                raise StopIteration
            try:
                self._ready = self._stage(next(self._source))
            except StopIteration:
                self._exhausted = True
                raise
        out, done = self._ready
        # Queue the next copy before handing this batch out: it overlaps
        # the caller's work on this one.
        try:
            self._ready = None if self._exhausted else self._stage(next(self._source))
        except StopIteration:
            self._exhausted = True
            self._ready = None
        current = torch.cuda.current_stream(self._device)
        current.wait_event(done)
        for value in out.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                # The allocator must not reuse this memory while the
                # caller's stream may still read it.
                value.record_stream(current)
        return out
