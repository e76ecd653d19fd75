"""``feedline.arrow.ParquetStream``: Parquet row groups read through the
prefetch engine and decoded by pyarrow, with shuffle, sharding and exact resume.

How the bytes flow
------------------
1. Each file's footer is read once (one ``cat_ranges`` call for the tails of
   all files) and cached per process, keyed by path, size and mtime.
2. For every row group this shard will read, the column chunks of only the
   requested columns are planned as byte ranges (dictionary page offset ..
   + ``total_compressed_size``); ranges closer than ``max_gap_bytes`` are
   coalesced, as ``fsspec.parquet`` does.
3. The whole epoch's plan goes to ``FileSystem.stream``: the Rust core keeps
   ``depth`` reads in flight and lands each range, whole, in one slot of its
   ring (``chunk_bytes`` is sized to the largest range).
4. pyarrow decodes a row group from a sparse file view (:class:`_RangeFile`,
   wrapped in ``pyarrow.PythonFile``) whose reads return ``memoryview``
   slices of those slots. pyarrow wraps the returned buffer without copying
   and is given the cached footer, so it never reads the file itself; the
   only copy of the raw bytes is the storage read into the slot. After the
   row group is decoded the slots go back to the ring. A read outside the
   planned ranges (which pyarrow-written files never cause) falls back to
   ``cat_file`` and is counted in ``fallback_reads``.

Order, shards and resume
------------------------
An epoch's unit of work is a row group. Every epoch, all row groups of all
files are permuted (``shuffle=True``) with a generator seeded by
``(seed, epoch)``, then dealt round-robin to ``world_size * num_workers``
shards: disjoint and complete. A shard's row groups are cut into windows of
at least ``shuffle_buffer_rows`` rows (whole row groups); rows inside a window
are permuted by a generator seeded by ``(seed, epoch, shard, window)``. That
window is the bounded shuffle buffer, and because its permutation is a pure
function of its position, ``state_dict()`` needs only ``(epoch,
rows_delivered, skipped)`` to resume exactly: the window holding the next
row is re-read and the rows already delivered are dropped.

The remainder (row groups % shards) follows ``remainder``, as
``DistributedSampler``'s ``drop_last``: ``"keep"`` (default) deals every row
group once, so shards differ by at most one row group; ``"drop"`` leaves
out the last ``len % shards`` row groups of the epoch's order (different
ones each shuffled epoch); ``"pad"`` deals the first ones again so every
shard gets as many (those rows come twice). With row groups of equal size,
``"drop"`` and ``"pad"`` give every rank the same number of batches, which
DDP needs.

Elastic resume: :func:`redeal` turns the states of every shard of one layout
(``world_size * num_workers``) into a plan per shard of another. What a
shard had not delivered becomes pieces: its half-read window (read again
under its old permutation, from the row it stopped at) and each untouched
row group; the pieces are dealt round-robin to the new shards, so every
remaining row of the epoch comes exactly once (the remainder policy does not
apply to the rest of such an epoch; shards differ by at most one piece).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import io
import json
import os
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedline.fs import FileSystem

MiB = 1 << 20

#: Tail bytes read per file in the first footer request; most footers fit.
FOOTER_GUESS_BYTES = 64 * 1024
#: Concurrent ``info`` calls (HEAD requests on remote replicas) per stream.
INFO_THREADS = 16
#: Ranges closer than this are read as one (fsspec.parquet's default too).
DEFAULT_MAX_GAP_BYTES = 64 * 1024
#: Coalesced ranges stop growing here: one range is one ring slot.
DEFAULT_MAX_BLOCK_BYTES = 64 * MiB
DEFAULT_BATCH_ROWS = 65536
DEFAULT_SHUFFLE_BUFFER_ROWS = 1 << 18
STATE_VERSION = 1
REMAINDERS = ("keep", "drop", "pad")

_PARQUET_MAGIC = b"PAR1"


class ParquetReadError(OSError):
    """A Parquet file or row group could not be read or decoded. ``path`` and
    ``row_group`` (``None`` for the footer) name the culprit."""

    def __init__(self, message: str, *, path: str, row_group: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.row_group = row_group


# -- footers -------------------------------------------------------------------

_FOOTER_CACHE: dict[tuple[str, int, Any], bytes] = {}
_FOOTER_LOCK = threading.Lock()


def _footer_length(tail: bytes | memoryview, path: str) -> int:
    if len(tail) < 12 or bytes(tail[-4:]) != _PARQUET_MAGIC:
        raise ParquetReadError(
            f"{path}: not a Parquet file (no PAR1 magic at its end)", path=path, row_group=None
        )
    (length,) = struct.unpack("<I", bytes(tail[-8:-4]))
    return int(length)


def _parse_footer(footer: bytes, path: str) -> pq.FileMetaData:
    try:
        return pq.read_metadata(pa.BufferReader(pa.py_buffer(footer)))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ParquetReadError(
            f"{path}: corrupt Parquet footer: {exc}", path=path, row_group=None
        ) from exc


def _infos(fs: FileSystem, paths: Sequence[str]) -> list[dict[str, Any]]:
    """``fs.info`` of each path. On remote replicas each is a round trip
    (HEAD), so they run concurrently: one after another, 8 files behind
    5 ms of latency cost more than reading a row group."""
    if len(paths) < 2:
        return [fs.info(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), INFO_THREADS)) as pool:
        return list(pool.map(fs.info, paths))


def _read_footers(
    fs: FileSystem, paths: Sequence[str]
) -> tuple[list[bytes | ParquetReadError], list[int]]:
    """The footer bytes (metadata + length + magic) of each file, from cache
    or from one batched tail read (errors are returned, not raised), and
    each file's size."""
    out: list[bytes | ParquetReadError | None] = [None] * len(paths)
    keys: list[tuple[str, int, Any]] = []
    need: list[int] = []
    for i, (path, info) in enumerate(zip(paths, _infos(fs, paths), strict=True)):
        size = int(info["size"])
        key = (path, size, info.get("mtime", info.get("ETag")))
        keys.append(key)
        with _FOOTER_LOCK:
            cached = _FOOTER_CACHE.get(key)
        if cached is not None:
            out[i] = cached
        elif size < 12:
            out[i] = ParquetReadError(
                f"{path}: not a Parquet file ({size} bytes)", path=path, row_group=None
            )
        else:
            need.append(i)
    if need:
        starts: list[int | None] = [max(0, keys[i][1] - FOOTER_GUESS_BYTES) for i in need]
        tails = fs.cat_ranges([paths[i] for i in need], starts, [None] * len(need))
        for i, tail in zip(need, tails, strict=True):
            path, size = paths[i], keys[i][1]
            try:
                if isinstance(tail, BaseException):
                    raise ParquetReadError(
                        f"{path}: footer read failed: {tail}", path=path, row_group=None
                    ) from tail
                length = _footer_length(tail, path)
                if length + 8 > size - 4:
                    raise ParquetReadError(
                        f"{path}: corrupt Parquet footer (length {length} > file size {size})",
                        path=path,
                        row_group=None,
                    )
                if length + 8 > len(tail):
                    tail = fs.cat_file(path, size - length - 8, None)
                footer = bytes(tail[-(length + 8) :])
                _parse_footer(footer, path)  # validate before caching
                with _FOOTER_LOCK:
                    _FOOTER_CACHE[keys[i]] = footer
                out[i] = footer
            except ParquetReadError as exc:
                out[i] = exc
    footers = [
        o if o is not None else ParquetReadError("unreachable", path="", row_group=None)
        for o in out
    ]
    return footers, [key[1] for key in keys]


# -- plans -----------------------------------------------------------------------


def _leaf_indices(meta: pq.FileMetaData, columns: Sequence[str] | None) -> list[int]:
    """Leaf (column chunk) indices of the named top-level columns."""
    n = meta.num_columns
    if columns is None:
        return list(range(n))
    wanted = set(columns)
    return [i for i in range(n) if meta.schema.column(i).path.split(".", 1)[0] in wanted]


def _column_ranges(
    meta: pq.FileMetaData, rg: int, leaves: Sequence[int], max_gap_bytes: int, max_block_bytes: int
) -> list[tuple[int, int]]:
    """Coalesced ``(offset, length)`` ranges covering the leaves' column
    chunks in row group ``rg``, ascending."""
    group = meta.row_group(rg)
    spans: list[tuple[int, int]] = []
    for leaf in leaves:
        col = group.column(leaf)
        start = col.data_page_offset
        dict_offset = col.dictionary_page_offset
        if col.has_dictionary_page and dict_offset is not None and 0 < dict_offset < start:
            start = dict_offset
        spans.append((start, start + col.total_compressed_size))
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if (
            merged
            and start - merged[-1][1] <= max_gap_bytes
            and max(end, merged[-1][1]) - merged[-1][0] <= max_block_bytes
        ):
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]


class _RangeFile:
    """A read-only, sparse view of one Parquet file: reads inside the loaded
    ranges return ``memoryview`` slices of the prefetched slots (no copy);
    anything else is read through the filesystem and counted."""

    def __init__(self, fs: FileSystem, path: str, size: int) -> None:
        self._fs = fs
        self._path = path
        self._size = size
        self._pos = 0
        self._pieces: list[tuple[int, int, Any]] = []  # (start, end, chunk)
        self.closed = False
        self.fallback_reads = 0
        self.fallback_bytes = 0

    def load(self, pieces: list[tuple[int, int, Any]]) -> None:
        self._pieces = pieces

    def unload(self) -> list[Any]:
        chunks = [p[2] for p in self._pieces]
        self._pieces = []
        return chunks

    # The file protocol pyarrow.PythonFile drives (it serialises calls).
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = pos
        elif whence == io.SEEK_CUR:
            self._pos += pos
        else:
            self._pos = self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self.closed = True

    def read(self, nbytes: int = -1) -> memoryview | bytes:
        start = self._pos
        end = self._size if nbytes is None or nbytes < 0 else min(self._size, start + nbytes)
        self._pos = max(start, end)
        if end <= start:
            return b""
        for p_start, p_end, chunk in self._pieces:
            if p_start <= start and end <= p_end:
                return memoryview(chunk)[start - p_start : end - p_start]
        # Spans pieces (a range cut into several slots) or was not planned.
        parts: list[bytes | memoryview] = []
        pos = start
        for p_start, p_end, chunk in self._pieces:
            if p_start <= pos < p_end:
                take = min(end, p_end)
                parts.append(memoryview(chunk)[pos - p_start : take - p_start])
                pos = take
                if pos >= end:
                    return b"".join(parts)
        self.fallback_reads += 1
        self.fallback_bytes += end - pos
        parts.append(self._fs.cat_file(self._path, pos, end))
        return b"".join(parts)


# -- the plan of an epoch ------------------------------------------------------------


@dataclass
class _Unit:
    """One row group of one file, with the ranges that hold its columns."""

    file: int
    row_group: int
    num_rows: int
    ranges: list[tuple[int, int]]


@dataclass
class _Epoch:
    shard: int
    shards: int
    units: list[_Unit]
    windows: list[list[int]]  # indices into units
    # Per window: the seed of its row permutation, and the rows of it
    # (after that permutation) that an earlier layout already delivered.
    keys: list[list[int]]
    starts: list[int]
    skipped_keys: set[tuple[int, int]] = field(default_factory=set)


def _shard_from_env() -> tuple[int, int] | None:
    from feedline.distributed import find_rank

    rank = find_rank()
    return None if rank is None else (rank.rank, rank.world_size)


def _worker() -> tuple[int, int]:
    """(worker id, workers) of the DataLoader worker running this code."""
    data = sys.modules.get("torch.utils.data")
    if data is None:
        return 0, 1
    info = data.get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)


def _expand(
    paths_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], fs: FileSystem
) -> list[str]:
    """The paths, each glob pattern expanded: on the replicas when ``fs``
    has any (object stores list; keys come back), else on local files."""
    items = [paths_or_glob] if isinstance(paths_or_glob, str | os.PathLike) else paths_or_glob
    paths: list[str] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            found = fs.glob(text) if fs.replicas else _glob.glob(text)
            matches = sorted(str(m) for m in found)
            if not matches:
                raise FileNotFoundError(f"no file matches {text!r}")
            paths.extend(matches)
        else:
            paths.append(text)
    if not paths:
        raise ValueError("ParquetStream needs at least one path")
    return paths


class ParquetStream:
    """Iterates ``pyarrow.RecordBatch`` es of ``batch_rows`` rows (the last
    may be shorter unless ``drop_last``) from Parquet files, read through
    feedline's prefetcher. ``.numpy()`` and ``.torch()`` give dicts of arrays.

    Sharding: explicit ``rank``/``world_size`` win; else ``torch.distributed``
    when initialised; else the ``RANK``/``WORLD_SIZE`` environment; else one
    rank. DataLoader workers split a rank's share further. The unit of a
    shard is a row group, so a dataset needs at least as many row groups as
    shards for every shard to get data; ``remainder`` ("keep", "drop",
    "pad") is what happens to the row groups left over (see the module doc).
    Globs (``*``, ``?``, ``[``) are expanded on the local filesystem, or
    with ``fs.glob`` when ``fs`` has replicas (directories, object stores;
    HTTP cannot list: pass the keys).
    """

    def __init__(
        self,
        paths_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        fs: FileSystem | None = None,
        columns: Sequence[str] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
        unify_schemas: bool = False,
        *,
        remainder: str = "keep",
        shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
        depth: int | None = None,
        max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        use_threads: bool = True,
        verify_page_checksums: bool = False,
    ) -> None:
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        for name, value in (
            ("batch_rows", batch_rows),
            ("shuffle_buffer_rows", shuffle_buffer_rows),
            ("depth", 1 if depth is None else depth),
            ("max_block_bytes", max_block_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither, got {rank=} {world_size=}")
        if world_size is not None and rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if isinstance(columns, str):
            raise TypeError(f"columns must be a list of names, got the string {columns!r}")
        if columns is not None and not list(columns):
            raise ValueError("columns must name at least one column, got []")
        self.fs = fs if fs is not None else FileSystem()
        self.paths = _expand(paths_or_glob, self.fs)
        self.columns = list(columns) if columns is not None else None
        self.batch_rows = batch_rows
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.remainder = remainder
        self.rank = rank
        self.world_size = world_size
        self.on_error = on_error
        self.unify_schemas = bool(unify_schemas)
        self.shuffle_buffer_rows = shuffle_buffer_rows
        # Row groups in flight; by default the filesystem's prefetch depth.
        self.depth = self.fs.prefetch.depth if depth is None else depth
        self.max_gap_bytes = max(0, int(max_gap_bytes))
        self.max_block_bytes = max_block_bytes
        self.use_threads = bool(use_threads)
        self.verify_page_checksums = bool(verify_page_checksums)

        #: Row groups (or whole files, ``row_group=None``) skipped for bad
        #: data this epoch: dicts with ``path``, ``row_group``, ``error``.
        self.skipped: list[dict[str, Any]] = []
        #: Bytes asked of storage: footers plus planned ranges (gaps included).
        self.bytes_requested = 0
        #: Reads pyarrow made outside the planned ranges (expected: 0).
        self.fallback_reads = 0
        self._epoch = 0
        self._rows_delivered = 0
        # Set to plan as a given DataLoader worker from outside that worker.
        self._worker_override: tuple[int, int] | None = None
        # Set to plan as (shard, shards) of another layout (elastic resume).
        self._shard_override: tuple[int, int] | None = None
        # This epoch's pieces after an elastic resume (see ``redeal``).
        self._plan: list[dict[str, Any]] | None = None
        self._footers: list[bytes | None] = []
        self._metas: list[pq.FileMetaData | None] = []
        self._sizes: list[int] = []
        self._load_footers()
        self.schema = self._resolve_schema()

    # -- set-up ------------------------------------------------------------

    def _load_footers(self) -> None:
        footers, sizes = _read_footers(self.fs, self.paths)
        self._footers, self._metas, self._sizes = [], [], []
        for path, footer, size in zip(self.paths, footers, sizes, strict=True):
            if isinstance(footer, ParquetReadError):
                if self.on_error == "raise":
                    raise footer
                self._footers.append(None)
                self._metas.append(None)
                self._sizes.append(0)
                self._record_skip(path, None, footer)
                continue
            self.bytes_requested += len(footer)
            self._footers.append(footer)
            self._metas.append(_parse_footer(footer, path))
            self._sizes.append(size)
        if all(m is None for m in self._metas):
            raise ParquetReadError(
                f"no readable Parquet file among {len(self.paths)}: {self.skipped}",
                path=self.paths[0],
                row_group=None,
            )

    def _file_schema(self, i: int) -> pa.Schema:
        meta = self._metas[i]
        assert meta is not None
        schema = meta.schema.to_arrow_schema()
        if self.columns is None:
            return schema
        missing = [c for c in self.columns if schema.get_field_index(c) < 0]
        if missing and not self.unify_schemas:
            raise ValueError(f"{self.paths[i]}: no column(s) {missing}; it has {schema.names}")
        return pa.schema([schema.field(c) for c in self.columns if c not in missing])

    def _resolve_schema(self) -> pa.Schema:
        readable = [i for i, m in enumerate(self._metas) if m is not None]
        schemas = [(i, self._file_schema(i).remove_metadata()) for i in readable]
        first_i, first = schemas[0]
        if self.unify_schemas:
            try:
                unified = pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
            except (pa.ArrowException, TypeError) as exc:
                raise ValueError(f"cannot unify the schemas of {self.paths}: {exc}") from exc
            if self.columns is not None:
                missing = [c for c in self.columns if unified.get_field_index(c) < 0]
                if missing:
                    raise ValueError(f"no file has column(s) {missing}")
                unified = pa.schema([unified.field(c) for c in self.columns])
            return unified
        for i, schema in schemas[1:]:
            if not schema.equals(first):
                diff = [
                    f"{f.name}: {f.type}"
                    if first.get_field_index(f.name) < 0
                    else f"{f.name}: {first.field(f.name).type} vs {f.type}"
                    for f in schema
                    if first.get_field_index(f.name) < 0 or not first.field(f.name).equals(f)
                ]
                diff += [f"{n}: missing" for n in first.names if schema.get_field_index(n) < 0]
                raise ValueError(
                    f"schema of {self.paths[i]} differs from {self.paths[first_i]} "
                    f"({'; '.join(diff)}); pass unify_schemas=True to merge them"
                )
        return first

    def _record_skip(self, path: str, row_group: int | None, exc: BaseException) -> None:
        entry = {"path": path, "row_group": row_group, "error": str(exc)}
        if entry not in self.skipped:
            self.skipped.append(entry)

    # -- epochs, shards, windows -------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch (its permutation) and rewinds to its start."""
        self._epoch = int(epoch)
        self._rows_delivered = 0
        self._plan = None
        self.skipped = [s for s in self.skipped if s["row_group"] is None]

    @property
    def epoch(self) -> int:
        return self._epoch

    def _shard(self) -> tuple[int, int]:
        if self._shard_override is not None:
            return self._shard_override
        if self.rank is not None and self.world_size is not None:
            rank, world = self.rank, self.world_size
        else:
            rank, world = _shard_from_env() or (0, 1)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        worker, workers = self._worker_override or _worker()
        return rank * workers + worker, world * workers

    def _shard_rows(
        self, worker: int, workers: int, plan: list[dict[str, Any]] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Rows the DataLoader worker ``worker`` of ``workers`` reads this
        epoch (row groups already known to be bad excluded; with ``plan``,
        the pieces an elastic resume dealt it), and its state at the start."""
        saved = self._worker_override, self._plan, self._rows_delivered
        self._worker_override, self._plan, self._rows_delivered = (worker, workers), plan, 0
        try:
            epoch = self._plan_epoch()
            state = self.state_dict()
        finally:
            self._worker_override, self._plan, self._rows_delivered = saved
        rows = self._locate(epoch, 1 << 62)[1]
        return rows, state

    def _all_units(self) -> list[_Unit]:
        units: list[_Unit] = []
        for f, meta in enumerate(self._metas):
            if meta is None:
                continue
            leaves = _leaf_indices(meta, self.columns)
            for rg in range(meta.num_row_groups):
                ranges = _column_ranges(meta, rg, leaves, self.max_gap_bytes, self.max_block_bytes)
                units.append(_Unit(f, rg, meta.row_group(rg).num_rows, ranges))
        return units

    def _plan_epoch(self) -> _Epoch:
        units = self._all_units()
        shard, shards = self._shard()
        skipped = {
            (self.paths.index(s["path"]), s["row_group"])
            for s in self.skipped
            if s["row_group"] is not None
        }
        if self._plan is not None:
            return self._planned_epoch(units, shard, shards, skipped)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(len(units))
            units = [units[int(i)] for i in order]
        if self.remainder == "drop":
            units = units[: len(units) - len(units) % shards]
        elif self.remainder == "pad" and units:
            units = units + (units * shards)[: -len(units) % shards]
        mine = units[shard::shards]
        windows: list[list[int]] = []
        rows = 0
        for i, unit in enumerate(mine):
            # Unshuffled, a window is one row group: nothing waits for more.
            if not windows or not self.shuffle or rows >= self.shuffle_buffer_rows:
                windows.append([])
                rows = 0
            windows[-1].append(i)
            rows += unit.num_rows
        keys = [[self.seed, self._epoch, shard, shards, w] for w in range(len(windows))]
        return _Epoch(shard, shards, mine, windows, keys, [0] * len(windows), skipped)

    def _planned_epoch(
        self, units: list[_Unit], shard: int, shards: int, skipped: set[tuple[int, int]]
    ) -> _Epoch:
        assert self._plan is not None
        by_key = {(u.file, u.row_group): u for u in units}
        mine: list[_Unit] = []
        windows: list[list[int]] = []
        for piece in self._plan:
            windows.append([])
            for f, rg in piece["units"]:
                unit = by_key.get((int(f), int(rg)))
                if unit is None:
                    raise ValueError(f"resume plan names row group {rg} of file {f}: not here")
                windows[-1].append(len(mine))
                mine.append(unit)
        keys = [[int(k) for k in piece["key"]] for piece in self._plan]
        starts = [int(piece["start"]) for piece in self._plan]
        return _Epoch(shard, shards, mine, windows, keys, starts, skipped)

    def _leftover(self) -> list[dict[str, Any]]:
        """This shard's windows not yet fully delivered, as plan pieces."""
        epoch = self._plan_epoch()
        first, offset = self._locate(epoch, self._rows_delivered)
        pieces = []
        for w in range(first, len(epoch.windows)):
            units = [epoch.units[i] for i in epoch.windows[w]]
            pieces.append(
                {
                    "units": [[u.file, u.row_group] for u in units],
                    "key": list(epoch.keys[w]),
                    "start": epoch.starts[w] + (offset if w == first else 0),
                }
            )
        return pieces

    # -- state -------------------------------------------------------------

    def _fingerprint(self) -> str:
        shard, shards = self._shard()
        parts = {
            "files": [
                [p, m.num_rows if m is not None else None]
                for p, m in zip(self.paths, self._metas, strict=True)
            ],
            "columns": self.columns,
            "batch_rows": self.batch_rows,
            "shuffle": self.shuffle,
            "shuffle_buffer_rows": self.shuffle_buffer_rows,
            "seed": self.seed,
            "remainder": self.remainder,
            "shard": [shard, shards],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Where this stream (this shard) stands: enough for a new stream with
        the same arguments to continue with exactly the rows not delivered."""
        state = {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "rows_delivered": self._rows_delivered,
            "skipped": [dict(s) for s in self.skipped],
            "fingerprint": self._fingerprint(),
        }
        if self._plan is not None:
            state["plan"] = [dict(piece) for piece in self._plan]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown ParquetStream state version {state.get('version')!r}")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError(
                "this state belongs to a stream over other files, columns, batch size, "
                "shuffle, seed or shard; it cannot resume this one"
            )
        self._epoch = int(state["epoch"])
        self._rows_delivered = int(state["rows_delivered"])
        self.skipped = [dict(s) for s in state["skipped"]]
        plan = state.get("plan")
        self._plan = None if plan is None else [dict(piece) for piece in plan]

    # -- reading -----------------------------------------------------------

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self._batches()

    def _locate(self, epoch: _Epoch, rows: int) -> tuple[int, int]:
        """(window, row offset inside what is left of it) of the
        ``rows``-th row of the epoch; past the end: (windows, rows in all)."""
        total = 0
        for w, window in enumerate(epoch.windows):
            n = sum(
                epoch.units[i].num_rows
                for i in window
                if (epoch.units[i].file, epoch.units[i].row_group) not in epoch.skipped_keys
            )
            n = max(0, n - epoch.starts[w])
            if rows < n:
                return w, rows
            rows -= n
            total += n
        return len(epoch.windows), total

    def _batches(self) -> Iterator[pa.RecordBatch]:
        epoch = self._plan_epoch()
        start_window, offset = self._locate(epoch, self._rows_delivered)
        todo = [i for window in epoch.windows[start_window:] for i in window]
        plan = [
            (self.paths[epoch.units[i].file], start, length)
            for i in todo
            for start, length in epoch.units[i].ranges
        ]
        if not plan:
            self._rows_delivered = 0
            return
        largest = max(length for _, _, length in plan)
        # One range per slot (zero-copy), unless a single column chunk is
        # over max_block_bytes: then it spans slots and is joined (a copy).
        chunk_bytes = max(MiB, -(-min(largest, self.max_block_bytes) // MiB) * MiB)
        pieces = max(
            sum(-(-length // chunk_bytes) for _, length in epoch.units[i].ranges) for i in todo
        )
        # The consumer holds every slot of one row group while it decodes;
        # 2 * depth slots must cover that plus the reads in flight.
        depth = max(self.depth, pieces)
        self.bytes_requested += sum(length for _, _, length in plan)
        pending: list[pa.Table] = []
        pending_rows = 0
        stream = self.fs.stream(
            plan,
            chunk_bytes=chunk_bytes,
            depth=depth,
            memory_budget_bytes=max(4 << 30, 2 * depth * chunk_bytes),
        )
        try:
            for w in range(start_window, len(epoch.windows)):
                read = (self._read_unit(epoch, epoch.units[i], stream) for i in epoch.windows[w])
                tables = [t for t in read if t is not None]
                if not tables:
                    continue  # every row group of the window was skipped (and recorded)
                table = pa.concat_tables(tables)
                if self.shuffle and table.num_rows > 1:
                    perm = np.random.default_rng(epoch.keys[w]).permutation(table.num_rows)
                    table = table.take(pa.array(perm))
                skip = epoch.starts[w] + (offset if w == start_window else 0)
                if skip:
                    table = table.slice(skip)
                if table.num_rows:
                    pending.append(table)
                    pending_rows += table.num_rows
                while pending_rows >= self.batch_rows:
                    batch, pending, pending_rows = _cut(pending, self.batch_rows)
                    self._rows_delivered += batch.num_rows
                    yield batch
            if pending_rows and not self.drop_last:
                batch, pending, pending_rows = _cut(pending, pending_rows)
                self._rows_delivered += batch.num_rows
                yield batch
            # The epoch is done: a new iteration replays it unless set_epoch.
            self._rows_delivered = 0
        finally:
            stream.close()

    def _read_unit(
        self,
        epoch: _Epoch,
        unit: _Unit,
        stream: Any,
    ) -> pa.Table | None:
        path = self.paths[unit.file]
        pieces: list[tuple[int, int, Any]] = []
        for start, length in unit.ranges:
            got = 0
            while got < length:
                try:
                    chunk = next(stream)
                except StopIteration:
                    raise ParquetReadError(
                        f"{path}: row group {unit.row_group}: prefetch stream ended early",
                        path=path,
                        row_group=unit.row_group,
                    ) from None
                except OSError as exc:
                    raise ParquetReadError(
                        f"{path}: row group {unit.row_group}: read failed: {exc}",
                        path=path,
                        row_group=unit.row_group,
                    ) from exc
                pieces.append((start + got, start + got + chunk.nbytes, chunk))
                got += chunk.nbytes
        # A fresh reader per row group: pyarrow's reader keeps the last
        # buffer it read alive until it is destroyed, which would pin a slot.
        rf = _RangeFile(self.fs, path, self._sizes[unit.file])
        rf.load(pieces)
        del pieces
        try:
            pf = pq.ParquetFile(
                pa.PythonFile(rf, mode="r"),
                metadata=self._metas[unit.file],
                page_checksum_verification=self.verify_page_checksums,
            )
            table = pf.read_row_group(
                unit.row_group, columns=self._file_columns(unit.file), use_threads=self.use_threads
            )
            del pf
            table = self._conform(table, unit.file)
        except (pa.ArrowException, OSError, ValueError) as exc:
            err = ParquetReadError(
                f"{path}: row group {unit.row_group}: cannot decode: {exc}",
                path=path,
                row_group=unit.row_group,
            )
            if self.on_error == "raise":
                raise err from exc
            self._record_skip(path, unit.row_group, err)
            epoch.skipped_keys.add((unit.file, unit.row_group))
            return None
        finally:
            self.fallback_reads += rf.fallback_reads
            for chunk in rf.unload():
                # Give the slot back now; if something still holds a view,
                # the slot goes back when that view dies.
                with contextlib.suppress(BufferError):
                    chunk.release()
        return table

    def _file_columns(self, f: int) -> list[str] | None:
        if self.columns is None:
            return None
        meta = self._metas[f]
        assert meta is not None
        names = set(meta.schema.to_arrow_schema().names)
        return [c for c in self.columns if c in names]

    def _conform(self, table: pa.Table, f: int) -> pa.Table:
        table = table.replace_schema_metadata(None)
        if table.schema.equals(self.schema):
            return table
        if not self.unify_schemas:
            raise ValueError(f"{self.paths[f]}: schema {table.schema} is not {self.schema}")
        arrays = [
            table.column(fld.name).cast(fld.type)
            if table.schema.get_field_index(fld.name) >= 0
            else pa.nulls(table.num_rows, fld.type)
            for fld in self.schema
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    # -- views -------------------------------------------------------------

    def numpy(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches as ``{column: numpy array}``; zero-copy for fixed-width
        columns without nulls (those arrays are read-only)."""
        for batch in self:
            yield batch_to_numpy(batch)

    def torch(self) -> Iterator[dict[str, Any]]:
        """Batches as ``{column: torch.Tensor}`` sharing Arrow's memory where
        numpy can (treat them as read-only); non-numeric columns stay numpy."""
        for batch in self:
            yield batch_to_torch(batch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_metas"] = None  # FileMetaData is rebuilt from the footer bytes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._metas = [
            _parse_footer(f, p) if f is not None else None
            for f, p in zip(self._footers, self.paths, strict=True)
        ]


def redeal(
    stream: ParquetStream, states: Sequence[dict[str, Any]], shard: int, shards: int
) -> dict[str, Any]:
    """The state that makes ``stream`` read, as shard ``shard`` of
    ``shards``, its share of what an old layout had not delivered this
    epoch; ``states[s]`` is the state old shard s (of ``len(states)``)
    stopped at. See the module doc."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    if not states:
        raise ValueError("redeal needs the state of every shard of the old layout")
    epochs = {int(st["epoch"]) for st in states}
    if len(epochs) != 1:
        raise ValueError(f"the old shards are in different epochs {sorted(epochs)}")
    saved_state, saved_shard = stream.state_dict(), stream._shard_override
    pieces: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    try:
        for old, st in enumerate(states):
            stream._shard_override = (old, len(states))
            stream.load_state_dict(st)
            for piece in stream._leftover():
                if piece["start"] or len(piece["units"]) == 1:
                    pieces.append(piece)  # its permutation is fixed: keep it whole
                    continue
                # An untouched window: its row groups travel one by one.
                pieces += [
                    {"units": [unit], "key": [stream.seed, *epochs, *unit], "start": 0}
                    for unit in piece["units"]
                ]
            skipped += [s for s in stream.skipped if s not in skipped]
        stream._shard_override = (shard, shards)
        stream._plan, stream._rows_delivered, stream.skipped = pieces[shard::shards], 0, skipped
        return stream.state_dict()
    finally:
        stream._shard_override = saved_shard
        stream.load_state_dict(saved_state)


def _cut(pending: list[pa.Table], n: int) -> tuple[pa.RecordBatch, list[pa.Table], int]:
    """The first ``n`` rows of ``pending`` as one RecordBatch (zero-copy when
    they lie in one decoded chunk), and the tables left over."""
    taken: list[pa.Table] = []
    need = n
    i = 0
    while need and i < len(pending):
        table = pending[i]
        if table.num_rows <= need:
            taken.append(table)
            need -= table.num_rows
            i += 1
        else:
            taken.append(table.slice(0, need))
            pending = [table.slice(need), *pending[i + 1 :]]
            i = 0
            need = 0
            break
    else:
        pending = pending[i:]
    joined = pa.concat_tables(taken) if len(taken) > 1 else taken[0]
    batches = [b for b in joined.to_batches() if b.num_rows]
    if len(batches) != 1:
        batches = joined.combine_chunks().to_batches()
    return batches[0], pending, sum(t.num_rows for t in pending)


def batch_to_numpy(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        out[name] = column.to_numpy(zero_copy_only=False)
    return out


def tensor_from_numpy(array: np.ndarray) -> Any:
    """``torch.from_numpy`` without its warning on read-only memory: Arrow's
    buffers are read-only and the tensor shares them (treat it read-only)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(array)


def batch_to_torch(batch: pa.RecordBatch) -> dict[str, Any]:
    """A batch as ``{column: torch.Tensor}`` (numeric columns, sharing
    memory where numpy does); other columns stay numpy arrays."""
    out: dict[str, Any] = {}
    for name, array in batch_to_numpy(batch).items():
        out[name] = tensor_from_numpy(array) if array.dtype.kind in "biufc" else array
    return out
