"""``feedline.FileSystem`` (an fsspec filesystem), its file object, and
``feedline.open``, the drop-in for ``fsspec.open``."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import fsspec
from fsspec.core import OpenFile
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from feedline import _core, _fsspec
from feedline.chaos import Chaos
from feedline.routing import ROUTING_OPTIONS, check_replicas, routing_config

if TYPE_CHECKING:
    from typing_extensions import Buffer

MiB = 1 << 20

#: Chunk size of a stream or a file's readahead.
DEFAULT_CHUNK_BYTES = 4 * MiB
#: Fetches in flight per stream.
DEFAULT_DEPTH = 8
#: A ``readinto``/``read`` at least this large bypasses readahead and reads
#: straight into the caller's buffer, in parallel.
DEFAULT_DIRECT_BYTES = 16 * MiB

#: Manifest block: divides the default chunk, so streams verify in place.
DEFAULT_MANIFEST_BLOCK_BYTES = 1 * MiB

PlanEntry = str | tuple[str, int, int]
#: A replica: a local directory, a URL (``http://``, ``s3://``, ``gs://``,
#: ``az://``, or any fsspec protocol), or an fsspec filesystem instance
#: (optionally with a root path inside it).
Replica: TypeAlias = "str | os.PathLike[str] | AbstractFileSystem | tuple[AbstractFileSystem, str]"

#: URL schemes with a native (Rust, object_store) backend.
NATIVE_SCHEMES = frozenset(
    {"http", "https", "s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss"}
)
#: Native schemes whose stores list objects (HTTP has no listing API).
LISTING_SCHEMES = NATIVE_SCHEMES - {"http", "https"}
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

READ_MODES = frozenset({"rb"})
WRITE_MODES = frozenset({"wb", "ab", "xb", "w", "a", "x", "wt", "at", "xt"})
TEXT_READ_MODES = frozenset({"r", "rt"})


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be at least 1, got {value}")
    if value > sys.maxsize:
        # Past what the core can even count; the memory budget check in Rust
        # covers everything smaller.
        raise ValueError(f"{name}={value} is larger than any memory budget")
    return value


def _chaos_config(
    replicas: list[str], chaos: Mapping[int | str | os.PathLike[str], Chaos]
) -> dict[str, Any]:
    """``{replica index or root: Chaos}`` -> ``{"index": spec}``."""
    if not isinstance(chaos, Mapping):
        raise TypeError(f"chaos must map a replica index or root to a Chaos, got {chaos!r}")
    count = max(1, len(replicas))
    roots = {os.path.abspath(r): i for i, r in enumerate(replicas)}
    out: dict[str, Any] = {}
    for key, spec in chaos.items():
        if not isinstance(spec, Chaos):
            raise TypeError(f"chaos[{key!r}] must be a feedline.chaos.Chaos, got {spec!r}")
        if isinstance(key, bool):
            raise TypeError(f"chaos key must be a replica index or root, got {key!r}")
        if isinstance(key, int):
            if not 0 <= key < count:
                raise ValueError(
                    f"chaos names replica {key}, but there are {count} (indices 0..{count - 1})"
                )
            index = key
        elif isinstance(key, str | os.PathLike):
            found = roots.get(os.path.abspath(os.fspath(key)))
            if found is None:
                raise ValueError(f"chaos names replica root {key!r}, which is not in {replicas!r}")
            index = found
        else:
            raise TypeError(f"chaos key must be a replica index or root, got {key!r}")
        if str(index) in out:
            raise ValueError(f"chaos names replica {index} twice (as {key!r})")
        out[str(index)] = spec.to_dict()
    return out


def _manifest_config(manifest: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    if isinstance(manifest, str | os.PathLike):
        return os.fspath(manifest)
    if isinstance(manifest, Mapping):
        return dict(manifest)
    raise TypeError(f"manifest must be a path or a dict, got {manifest!r}")


def write_manifest(
    root: str | os.PathLike[str],
    block_bytes: int = DEFAULT_MANIFEST_BLOCK_BYTES,
    path: str | os.PathLike[str] | None = None,
) -> str:
    """Writes the per-block CRC32C manifest of directory ``root`` (to
    ``path``, default ``<root>/.feedline-manifest.json``) and returns its
    path. Pass it as ``FileSystem(..., manifest=path)`` to verify every read."""
    block_bytes = _positive_int("block_bytes", block_bytes)
    out = _core.write_manifest(
        os.fspath(root), block_bytes, None if path is None else os.fspath(path)
    )
    return os.fspath(out)


class FileSystem(AbstractFileSystem):  # type: ignore[misc]
    """An fsspec filesystem whose reads run in feedline's Rust core.

    ``FileSystem()`` reads local paths as given. ``FileSystem(replicas=[root])``
    reads keys relative to a replica root; with several roots (each holding
    the same objects under the same keys) every read is routed: weighted
    rendezvous hashing gives each key a preference list, ``policy`` picks a
    healthy replica from it (``"affinity"``, the default, or ``"p2c"``),
    failures fail over to the next with backoff under ``deadline_ms``, slow
    reads are hedged after ``hedge_after_ms`` (milliseconds or ``"p95"``),
    and a replica failing ``eject_after_failures`` times in a row is ejected
    for ``base_ejection_ms`` times its ejection count, then probed. See ``stats()``.
    """

    protocol = ("feedline",)
    root_marker = "/"
    # Instances hold threads and arenas per configuration; fsspec's instance
    # cache would hand one user's replicas to another's call.
    cachable = False

    def __init__(
        self,
        replicas: Sequence[Replica] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        concurrency: int | None = None,
        weights: Sequence[float] | None = None,
        policy: str | None = None,
        load_factor: float | None = None,
        hedge_after_ms: float | str | None = None,
        timeout_ms: float | None = None,
        deadline_ms: float | None = None,
        eject_after_failures: int | None = None,
        base_ejection_ms: float | None = None,
        max_ejection_ms: float | None = None,
        retry_budget_ratio: float | None = None,
        retry_budget_floor_per_s: float | None = None,
        backoff_base_ms: float | None = None,
        backoff_max_ms: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        depth: int = DEFAULT_DEPTH,
        direct_bytes: int = DEFAULT_DIRECT_BYTES,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fo: str | None = None,
        chaos: Mapping[int | str | os.PathLike[str], Chaos] | None = None,
        manifest: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if target_protocol not in (None, "file", "local"):
            raise ValueError(
                f"feedline:: cannot chain onto protocol {target_protocol!r} yet; local paths only"
            )
        del target_options
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        # What the filesystem is rebuilt from when pickled (spawn/forkserver
        # workers): configuration, never threads, handles or connections.
        self._init_config: dict[str, Any] = {
            "replicas": list(replicas) if replicas is not None else None,
            "storage_options": dict(storage_options) if storage_options else None,
            "concurrency": concurrency,
            "chunk_bytes": chunk_bytes,
            "depth": depth,
            "direct_bytes": direct_bytes,
            "fo": fo,
        }
        # In a chained URL ("feedline::/data/x") fsspec hands the inner path
        # over as `fo` and asks this filesystem for "".
        self._fo = self._strip_protocol(fo) if fo else None
        if self._fo and replicas:
            # fsspec's local layer made a relative key ("feedline::shard/x")
            # absolute against the cwd; with replicas a key is relative to
            # each root, so take the cwd back off.
            cwd = os.getcwd().rstrip(os.sep) + os.sep
            if self._fo.startswith(cwd):
                self._fo = self._fo[len(cwd) :]
        self.chunk_bytes = _positive_int("chunk_bytes", chunk_bytes)
        self.depth = _positive_int("depth", depth)
        self.direct_bytes = _positive_int("direct_bytes", direct_bytes)
        self._storage_options: dict[str, Any] = dict(storage_options or {})
        roots: Any = replicas
        if replicas is not None and not isinstance(replicas, str | bytes | os.PathLike):
            roots = [_replica_root(r) for r in replicas]
        self.replicas = check_replicas(roots)
        config: dict[str, Any] = {"replicas": self.replicas}
        routing = {
            "weights": weights,
            "policy": policy,
            "load_factor": load_factor,
            "hedge_after_ms": hedge_after_ms,
            "timeout_ms": timeout_ms,
            "deadline_ms": deadline_ms,
            "eject_after_failures": eject_after_failures,
            "base_ejection_ms": base_ejection_ms,
            "max_ejection_ms": max_ejection_ms,
            "retry_budget_ratio": retry_budget_ratio,
            "retry_budget_floor_per_s": retry_budget_floor_per_s,
            "backoff_base_ms": backoff_base_ms,
            "backoff_max_ms": backoff_max_ms,
        }
        self._init_config.update(routing, chaos=chaos, manifest=manifest)
        config.update(routing_config(self.replicas, **routing))
        if chaos:
            config["chaos"] = _chaos_config(self.replicas, chaos)
        if manifest is not None:
            config["manifest"] = _manifest_config(manifest)
        if self._storage_options:
            try:
                json.dumps(self._storage_options)
            except TypeError as e:
                raise TypeError(
                    f"storage_options must be JSON-like (str, number, bool, dict): {e}"
                ) from None
            config["storage_options"] = self._storage_options
        if concurrency is not None:
            config["concurrency"] = _positive_int("concurrency", concurrency)
        self._storage = _core.Storage(json.dumps(config))
        self._local = LocalFileSystem()

    def fault_stats(self) -> list[dict[str, Any]]:
        """Per replica: ``injected`` fault counts (``None`` without chaos),
        ``verified_bytes`` and ``checksum_mismatches`` (``None`` without a
        manifest)."""
        return self._storage.fault_stats()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._init_config,))

    def __repr__(self) -> str:
        shown = [_redact_url(r) for r in self.replicas]
        return f"<feedline.FileSystem replicas={shown!r}>"

    @property
    def _first_replica_is_url(self) -> bool:
        return bool(self.replicas) and _URL_RE.match(self.replicas[0]) is not None

    # -- paths -------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = os.fspath(path)
        for prefix in ("feedline::", "feedline://", "feedline:"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
                break
        if path.startswith("file://"):
            path = path[len("file://") :]
        return path

    def _key(self, path: str) -> str:
        path = self._strip_protocol(path)
        if not path and self._fo:
            path = self._fo
        if self.replicas:
            return path.lstrip("/")
        return os.path.abspath(path) if path else path

    def _keys(self, paths: Sequence[str]) -> list[str]:
        """`_key` of each path, resolving each distinct path once."""
        memo: dict[str, str] = {}
        return [memo.get(p) or memo.setdefault(p, self._key(p)) for p in paths]

    def _local_path(self, path: str) -> str:
        key = self._key(path)
        if not self.replicas:
            return key
        # As reads refuse it (the core's local store): no write or listing
        # outside the replica.
        if ".." in key.split("/"):
            raise ValueError(f"key {key!r} escapes the replica root")
        return os.path.join(self.replicas[0], key)

    # -- metadata -------------------------------------------------------------
    # Local replicas: fsspec's local filesystem on the replicas. URL replicas:
    # the size through the store (HEAD on HTTP, routed like a read);
    # fsspec-protocol replicas: that filesystem's own metadata calls.

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        if not self.replicas:
            found: dict[str, Any] = self._local.info(self._key(path), **kwargs)
            return found
        key = self._key(path)
        if self._first_replica_is_url:
            fallback = self._fsspec_target(key)
            if fallback is not None:
                fs, full = fallback
                info = dict(fs.info(full, **kwargs))
                info["name"] = key
                return info
            try:
                size = self._storage.size(key)
            except FileNotFoundError:
                # An object store has no directories, only keys that share
                # a prefix: a prefix with something under it is one.
                if self._lists and (not key or self._list(key)):
                    return {"name": key, "size": 0, "type": "directory"}
                raise
            return {"name": key, "size": size, "type": "file"}
        # Replicas lag: the first one that has the path answers.
        for root in self.replicas:
            try:
                found = dict(self._local.info(os.path.join(root, key), **kwargs))
            except FileNotFoundError:
                continue
            found["name"] = key
            return found
        raise FileNotFoundError(2, f"no such file on any replica: {key!r}", key)

    def size(self, path: str) -> int | None:
        info = self.info(path)
        if info["type"] == "directory" or self._first_replica_is_url:
            return info.get("size")
        # What reads see: `stat` says 0 for `/proc` files that hold bytes,
        # and FIFOs or devices (refused by reads) must not look empty.
        return self._storage.size(self._key(path))

    # -- routing figures ------------------------------------------------------

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Read figures: ``reads``, ``read_errors``, ``bytes``,
        ``extra_request_ratio`` (retries + hedges per read), ``latency``
        (end to end, ms percentiles) and ``replicas``: per replica
        ``requests``, ``bytes``, ``errors``, ``retries``, ``hedges_sent``,
        ``hedges_won``, ``ejections``, ``checksum_mismatches``, ``latency``
        (``p50_ms``, ``p90_ms``, ``p99_ms``, ``p99.9_ms``, ``max_ms``), ...
        ``reset=True`` clears them after reading (the adaptive hedge delay
        keeps the latencies from before the reset until new ones come in)."""
        stats: dict[str, Any] = json.loads(self._storage.stats_json(reset))
        return stats

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        if not self._first_replica_is_url:
            result: list[Any] = self._local.ls(self._local_path(path), detail=detail, **kwargs)
            if not self.replicas:
                return result
            return self._as_keys(result, os.path.abspath(self.replicas[0]))
        key = self._key(path)
        fallback = self._fsspec_target(key)
        if fallback is not None:
            fs, full = fallback
            listed: list[Any] = fs.ls(full, detail=detail, **kwargs)
            return self._as_keys(listed, full[: len(full) - len(key)])
        if not self._lists:
            raise NotImplementedError(
                f"ls({path!r}): listing is not supported on remote replica "
                f"{_redact_url(self.replicas[0])!r} (HTTP has no listing API); "
                "pass the object names (a manifest) instead"
            )
        entries = self._list(key)
        if not entries and key:
            # A file lists as itself, as in fsspec. Its size straight away:
            # `info` would list the (empty) prefix a second time first.
            entries = [{"name": key, "size": self._storage.size(key), "type": "file"}]
        return entries if detail else [e["name"] for e in entries]

    @staticmethod
    def _as_keys(listed: list[Any], root: str) -> list[Any]:
        """``ls`` results of a replica's own filesystem with each name made
        a key relative to the replica ``root``, as every other call takes."""
        base = root.rstrip("/") + "/"

        def key(name: str) -> str:
            return name[len(base) :] if name.startswith(base) else name.lstrip("/")

        if listed and isinstance(listed[0], dict):
            return [{**entry, "name": key(str(entry["name"]))} for entry in listed]
        return [key(str(name)) for name in listed]

    @property
    def _lists(self) -> bool:
        """Whether the replicas are object stores, which list their keys."""
        scheme = self.replicas[0].split("://", 1)[0].lower() if self.replicas else ""
        return scheme in LISTING_SCHEMES

    def _list(self, key: str) -> list[dict[str, Any]]:
        """fsspec entries for what lies directly under the prefix ``key``,
        from the first replica that answers."""
        objects, prefixes = self._storage.ls(key)
        entries: list[dict[str, Any]] = [
            {"name": name, "size": 0, "type": "directory"} for name in prefixes
        ]
        entries += [
            {"name": name, "size": size, "type": "file", "mtime": float(mtime)}
            for name, size, mtime in objects
        ]
        entries.sort(key=lambda e: str(e["name"]))
        return entries

    def _fsspec_target(self, key: str) -> tuple[AbstractFileSystem, str] | None:
        """The fsspec filesystem and full path behind the first replica, when
        it is served by the fsspec fallback."""
        root = self.replicas[0]
        scheme = root.split("://", 1)[0].lower()
        if scheme in NATIVE_SCHEMES or scheme == "file":
            return None
        found = _fsspec.instance_of(root)
        if found is not None:
            fs, prefix = found
        else:
            fs = fsspec.filesystem(scheme, **self._storage_options)
            prefix = fs._strip_protocol(root)
        prefix = prefix.rstrip("/")
        return fs, f"{prefix}/{key}" if prefix else key

    # -- reads (Rust, GIL released) -----------------------------------------

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        return self._storage.cat_file(self._key(path), start, end)

    def cat_ranges(
        self,
        paths: list[str],
        starts: int | list[int | None] | None,
        ends: int | list[int | None] | None,
        max_gap: int | None = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list[bytes | BaseException]:
        if on_error not in ("return", "raise"):
            raise ValueError(f"on_error must be 'return' or 'raise', got {on_error!r}")
        n = len(paths)
        starts_l = list(starts) if isinstance(starts, list) else [starts] * n
        ends_l = list(ends) if isinstance(ends, list) else [ends] * n
        keys = self._keys(paths)
        out = self._storage.cat_ranges(keys, starts_l, ends_l)
        if on_error == "raise":
            for item in out:
                if isinstance(item, BaseException):
                    raise item
        return out

    def stream(
        self,
        paths_or_plan: str | Iterable[PlanEntry],
        *,
        chunk_bytes: int | None = None,
        depth: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> _core.ChunkStream:
        """Prefetches whole files (``"path"``) or ranges (``(path, offset,
        length)``) in order, as zero-copy :class:`feedline.Chunk` buffers of at
        most ``chunk_bytes`` each, keeping ``depth`` reads in flight. A list is
        planned whole; any other iterable (a generator, even an endless one) is
        taken 4,096 entries at a time, and ``len()`` of that stream is unknown."""
        entries: Iterable[PlanEntry] = (
            [paths_or_plan] if isinstance(paths_or_plan, str) else paths_or_plan
        )
        # The plan is read in Rust (a Python loop over 100,000 entries costs
        # more than streaming them); `_key` runs once per distinct path.
        return self._storage.stream(
            entries,
            self._key,
            # `is None`, not `or`: an explicit 0 is an error, not "default".
            _positive_int("chunk_bytes", self.chunk_bytes if chunk_bytes is None else chunk_bytes),
            _positive_int("depth", self.depth if depth is None else depth),
            memory_budget_bytes,
        )

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if mode in READ_MODES:
            return FeedlineFile(self, path)
        if mode in WRITE_MODES or mode.rstrip("b") in {"w", "a", "x"}:
            if self._first_replica_is_url:
                raise NotImplementedError(
                    f"cannot open {path!r} with mode {mode!r}: feedline only reads URL replicas"
                )
            return self._local.open(self._local_path(path), mode, **kwargs)
        raise ValueError(
            f"unsupported mode {mode!r}; feedline reads with 'rb' and writes through fsspec"
        )


def _rebuild(config: dict[str, Any]) -> FileSystem:
    """Unpickles a :class:`FileSystem` from its configuration."""
    replicas = config.pop("replicas")
    return FileSystem(replicas, **config)


def _replica_root(replica: Replica) -> str:
    """The root string the core opens for one replica."""
    if isinstance(replica, AbstractFileSystem):
        return _fsspec.register_instance(replica)
    if (
        isinstance(replica, tuple)
        and len(replica) == 2
        and isinstance(replica[0], AbstractFileSystem)
        and isinstance(replica[1], str)
    ):
        return _fsspec.register_instance(replica[0], replica[1])
    if isinstance(replica, str | os.PathLike):
        root = os.fspath(replica)
        if not isinstance(root, str):
            raise TypeError(f"replica must be a str path or URL, got {replica!r}")
        return root
    raise TypeError(
        f"a replica is a path, a URL, an fsspec filesystem or (filesystem, root); got {replica!r}"
    )


def _redact_url(root: str) -> str:
    """``root`` without userinfo or query (where credentials hide)."""
    if not _URL_RE.match(root):
        return root
    parts = urllib.parse.urlsplit(root)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class FeedlineFile(io.RawIOBase):
    """A read-only binary file whose reads run in Rust: readahead through the
    prefetcher on sequential access, exact reads on random access, parallel
    reads straight into large buffers."""

    def __init__(self, fs: FileSystem, path: str) -> None:
        super().__init__()
        self.fs = fs
        self.path = path
        self._reader = fs._storage.open_reader(
            fs._key(path), fs.chunk_bytes, fs.depth, fs.direct_bytes
        )
        self.size = self._reader.size
        self.mode = "rb"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        self._check_open()
        with memoryview(buffer) as view:
            if view.ndim != 1 or view.itemsize != 1:
                with view.cast("B") as flat:
                    return self._reader.readinto(flat)
            return self._reader.readinto(view)

    def readinto1(self, buffer: Buffer) -> int:
        return self.readinto(buffer)

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        # More than any file holds means "to the end" (the core counts in i64).
        return self._reader.read(-1 if size is None else min(size, sys.maxsize))

    def readall(self) -> bytes:
        return self.read(-1)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._reader.tell() + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}; use 0, 1 or 2")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target >= 1 << 64:
            raise ValueError(f"seek position {target} is out of range: positions are below 2**64")
        return self._reader.seek(target)

    def tell(self) -> int:
        self._check_open()
        return self._reader.tell()

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def __repr__(self) -> str:
        return f"<FeedlineFile {self.path!r} size={self.size}>"


def open(
    urlpath: str | os.PathLike[str],
    mode: str = "rb",
    *,
    replicas: Sequence[str | os.PathLike[str]] | None = None,
    **kwargs: Any,
) -> OpenFile:
    """Drop-in for ``fsspec.open``: ``with feedline.open(path) as f`` gives a
    binary file read through feedline. Write and append modes go to fsspec
    unchanged, so checkpoint writes keep working."""
    path = os.fspath(urlpath)
    if mode in READ_MODES or mode in TEXT_READ_MODES:
        fs_kwargs = {
            k: kwargs.pop(k)
            for k in (
                "chunk_bytes",
                "depth",
                "direct_bytes",
                "storage_options",
                "concurrency",
                *ROUTING_OPTIONS,
            )
            if k in kwargs
        }
        fs = FileSystem(replicas=replicas, **fs_kwargs)
        return OpenFile(fs, FileSystem._strip_protocol(path), mode=mode, **kwargs)
    if mode in WRITE_MODES:
        of: OpenFile = fsspec.open(path, mode, **kwargs)
        return of
    raise ValueError(
        f"unsupported mode {mode!r}; use 'rb'/'r' to read, or 'wb'/'ab'/'xb'/'w'/'a'/'x'"
    )
