"""``feedline.FileSystem`` (an fsspec filesystem), its file object, and
``feedline.open``, the drop-in for ``fsspec.open``."""

from __future__ import annotations

import datetime
import io
import os
import posixpath
import re
import shutil
import sys
import urllib.parse
import weakref
from collections.abc import Iterable, Mapping, Sequence
from glob import has_magic
from typing import TYPE_CHECKING, Any, TypeAlias

import fsspec
from fsspec.core import OpenFile
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from fsspec.spec import AbstractFileSystem

try:
    # The marker that makes `url_to_fs("feedline::/abs")` hand this
    # filesystem "/abs" as its path (fsspec >= 2025.10); on older fsspec the
    # inner path still arrives as `fo`.
    from fsspec.implementations.chained import ChainedFileSystem as _ChainBase
except ImportError:  # pragma: no cover - older fsspec
    _ChainBase = AbstractFileSystem

from feedline import _core, _fsspec
from feedline._core import Chaos, Prefetch
from feedline.cache import NodeCache

if TYPE_CHECKING:
    from typing_extensions import Buffer

MiB = 1 << 20

#: Manifest block: divides the default chunk, so streams verify in place.
DEFAULT_MANIFEST_BLOCK_BYTES = 1 * MiB

PlanEntry = str | tuple[str, int, int]
#: A replica: a local directory, a URL (``http://``, ``s3://``, ``gs://``,
#: ``az://``, or any fsspec protocol), a :class:`feedline.Replica` (a URL with
#: its own storage options and weight), or an fsspec filesystem instance
#: (optionally with a root path inside it).
Replica: TypeAlias = (
    "str | os.PathLike[str] | _core.Replica | AbstractFileSystem | tuple[AbstractFileSystem, str]"
)

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

READ_MODES = frozenset({"rb"})
WRITE_MODES = frozenset({"wb", "ab", "xb", "w", "a", "x", "wt", "at", "xt"})
TEXT_READ_MODES = frozenset({"r", "rt"})


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


#: Keyword arguments that fsspec's own ``AbstractFileSystem`` takes: passed
#: on to it. Every other keyword argument is a feedline option.
FSSPEC_OPTIONS = frozenset(
    {
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "skip_instance_cache",
        "asynchronous",
        "loop",
    }
)

#: Every option ``FileSystem`` and ``feedline.open`` take, flat or as a
#: section (``routing=feedline.Routing(...)``); the names come from the core.
OPTION_NAMES = frozenset(_core.option_names())


def _check_option_names(options: Mapping[str, Any]) -> None:
    """Unknown keyword arguments are a TypeError naming the nearest known
    option: a typo must not silently turn a feature off."""
    known = sorted(OPTION_NAMES | FSSPEC_OPTIONS)
    for name in options:
        if name not in OPTION_NAMES:
            near = _core.nearest_option(name, known)
            hint = f"; did you mean {near!r}?" if near else ""
            raise TypeError(f"unknown option {name!r}{hint}")


def _chaos_by_index(
    replicas: list[str], chaos: Mapping[int | str | os.PathLike[str], Chaos]
) -> dict[str, Chaos]:
    """``{replica index or root: Chaos}`` -> ``{"index": Chaos}`` (the core
    checks the specs and the indices)."""
    if not isinstance(chaos, Mapping):
        raise TypeError(f"chaos must map a replica index or root to a Chaos, got {chaos!r}")
    roots = {os.path.abspath(r): i for i, r in enumerate(replicas)}
    out: dict[str, Chaos] = {}
    for key, spec in chaos.items():
        if not isinstance(spec, Chaos):
            raise TypeError(f"chaos[{key!r}] must be a feedline.Chaos, got {spec!r}")
        if isinstance(key, bool) or not isinstance(key, int | str | os.PathLike):
            raise TypeError(f"chaos key must be a replica index or root, got {key!r}")
        index = key if isinstance(key, int) else roots.get(os.path.abspath(os.fspath(key)))
        if index is None:
            raise ValueError(f"chaos names replica root {key!r}, which is not in {replicas!r}")
        if str(index) in out:
            raise ValueError(f"chaos names replica {index} twice (as {key!r})")
        out[str(index)] = spec
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


class FileSystem(_ChainBase):  # type: ignore[misc]
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
        chaos: Mapping[int | str | os.PathLike[str], Chaos] | None = None,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fo: str | None = None,
        **options: Any,
    ) -> None:
        """``options`` are feedline's (``hedge_after_ms=20``, ``depth=4``,
        ``routing=feedline.Routing(...)``, ...: see docs/configuration.md)
        and fsspec's own (``skip_instance_cache``, ...)."""
        super().__init__(**{k: options.pop(k) for k in list(options) if k in FSSPEC_OPTIONS})
        _check_option_names(options)
        if target_protocol not in (None, "file", "local"):
            raise ValueError(
                f"feedline:: cannot chain onto protocol {target_protocol!r} yet; local paths only"
            )
        del target_options
        # What the filesystem is rebuilt from when pickled (spawn/forkserver
        # workers): configuration, never threads, handles or connections.
        self._init_config: dict[str, Any] = {
            "replicas": list(replicas) if replicas is not None else None,
            "chaos": chaos,
            "fo": fo,
            **options,
        }
        # In a chained URL ("feedline::/data/x") fsspec hands the inner path
        # over as `fo` and asks this filesystem for that path (or, before
        # ChainedFileSystem, for "").
        self._fo = self._strip_protocol(fo) if fo else None
        #: With replicas a key is relative to each root, but fsspec's local
        #: layer made a relative chained key ("feedline::shard/x") absolute
        #: against the cwd: paths under that cwd prefix (the key, and the
        #: parents fsspec derives from it for writes) take it back off.
        self._cwd_prefix: str | None = None
        if self._fo and replicas:
            cwd = os.getcwd().rstrip(os.sep) + os.sep
            if self._fo.startswith(cwd):
                self._cwd_prefix = cwd
        entries = _replica_entries(replicas)
        self.replicas = [e.url if isinstance(e, _core.Replica) else e for e in entries]
        # The registry entries live as long as this filesystem (also when
        # the rest of __init__ rejects the configuration).
        weakref.finalize(self, _fsspec.release_instances, list(self.replicas))
        # Where writes go: every replica, when all are local directories
        # (replicas must hold the same bytes); no replicas: the path itself.
        local_roots = [_local_root(r) for r in self.replicas] if self.replicas else [""]
        self._write_roots: list[str] | None = (
            None if None in local_roots else [r for r in local_roots if r is not None]
        )
        config: dict[str, Any] = {**options, "replicas": entries}
        if chaos:
            config["chaos"] = _chaos_by_index(self.replicas, chaos)
        if "manifest" in config:
            config["manifest"] = _manifest_config(config["manifest"])
        self._storage = _core.Storage(config)
        self._storage_options: dict[str, Any] = dict(options.get("storage_options") or {})
        #: How streams and file objects read ahead (defaults filled in).
        self.prefetch = Prefetch(**self._storage.config()["prefetch"])
        cache = self._storage.config()["cache"]
        #: The node cache (``cache_dir=...``): ``stats()``, ``clear()``,
        #: ``warm(paths)``; ``None`` when the cache is off.
        self.cache: NodeCache | None = (
            None
            if cache["cache_dir"] is None
            else NodeCache(self._storage, cache["cache_block_bytes"], self._key)
        )
        # Writes create parent directories, as writing a key does on an
        # object store and as `fsspec.open(..., "wb")` does.
        self._local = LocalFileSystem(auto_mkdir=True)

    @property
    def config(self) -> dict[str, Any]:
        """The configuration in force, every default filled in, credentials
        redacted (what the bench's report prints)."""
        config: dict[str, Any] = self._storage.config()
        return config

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

    # -- paths -------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        """The path without ``feedline://`` (or ``file://``) and, as in
        fsspec's local filesystem, without a trailing slash."""
        path = os.fspath(path)
        for prefix in ("feedline::", "feedline://", "feedline:"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
                break
        if path.startswith("file://"):
            path = path[len("file://") :]
        if len(path) > 1:
            path = path.rstrip("/") or "/"
        return path

    def _key(self, path: str) -> str:
        path = self._strip_protocol(path)
        if not path and self._fo:
            path = self._fo
        if self.replicas:
            if self._cwd_prefix and path.startswith(self._cwd_prefix):
                path = path[len(self._cwd_prefix) :]
            return path.lstrip("/")
        return os.path.abspath(path) if path else path

    def _keys(self, paths: Sequence[str]) -> list[str]:
        """`_key` of each path, resolving each distinct path once."""
        memo: dict[str, str] = {}
        return [memo.get(p) or memo.setdefault(p, self._key(p)) for p in paths]

    def _write_paths(self, path: str) -> list[str]:
        """The local path of ``path`` in each replica (the path itself
        without replicas): writes go to all of them, so replicas keep
        holding the same bytes."""
        if self._write_roots is None:
            shown = [_redact_url(r) for r in self.replicas]
            raise NotImplementedError(
                f"cannot write {path!r}: feedline writes only to local replicas, and "
                f"{shown!r} are not all local directories; write with the store's own "
                "client (obstore, s3fs) and read back through feedline"
            )
        key = self._key(path)
        if not self.replicas:
            return [key]
        rel = posixpath.normpath(key or ".")
        if rel == ".." or rel.startswith("../"):
            # As reads refuse it (the core's local store).
            raise ValueError(f"key {key!r} escapes the replica root")
        return [os.path.join(root, rel) for root in self._write_roots]

    # -- metadata -------------------------------------------------------------
    # Through the core for every kind of replica: the first replica that has
    # the path answers, "not found" only when none does.

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return _entry(self._storage.info(self._key(path)))

    def modified(self, path: str) -> datetime.datetime:
        """Last modification (local mtime, object-store ``Last-Modified``),
        timezone-aware UTC."""
        return _utc(self._storage.info(self._key(path)).modified_unix_ns, "modification", path)

    def created(self, path: str) -> datetime.datetime:
        """Creation (a local file's inode change time, as fsspec's local
        filesystem reports it; an object's last write on object stores)."""
        return _utc(self._storage.info(self._key(path)).created_unix_ns, "creation", path)

    def ukey(self, path: str) -> str:
        """Changes whenever the bytes may have (ETag, version id, or a local
        file's inode, mtime and size); fsspec's caches key on it."""
        meta = self._storage.info(self._key(path))
        return meta.version or f"{meta.key}:{meta.size}:{meta.modified_unix_ns}"

    def size(self, path: str) -> int | None:
        # What reads see, routed like a read (hedged, failed over): `stat`
        # says 0 for `/proc` files that hold bytes, and FIFOs or devices
        # (refused by reads) must not look empty. A directory or prefix has
        # no size of its own: its info says what it is.
        try:
            return self._storage.size(self._key(path))
        except (FileNotFoundError, IsADirectoryError):
            info = self.info(path)
            if info["type"] != "directory":
                raise
            size: int | None = info.get("size")
            return size

    # -- routing figures ------------------------------------------------------

    def stats(self, reset: bool = False) -> _core.Stats:
        """Read figures: ``reads``, ``read_errors``, ``bytes``,
        ``extra_request_ratio`` (retries + hedges per read), ``latency``
        (end to end, ms percentiles) and ``replicas``: per replica
        ``requests``, ``bytes``, ``errors``, ``retries``, ``hedges_sent``,
        ``hedges_won``, ``ejections``, ``checksum_mismatches``, ``latency``
        (``p50_ms``, ``p90_ms``, ``p99_ms``, ``p99.9_ms``, ``max_ms``), ...
        ``reset=True`` clears them after reading (the adaptive hedge delay
        keeps the latencies from before the reset until new ones come in)."""
        return self._storage.stats(reset)

    def trace_reads(self, capacity: int) -> None:
        """Records how the next ``capacity`` reads were routed (0 stops and
        drops the record); :meth:`take_trace` hands them over. Off by
        default: for finding where a latency tail comes from."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self._storage.trace_reads(min(capacity, 1 << 32))

    def take_trace(self) -> list[dict[str, Any]]:
        """The reads traced since :meth:`trace_reads` (or the last call),
        each a dict: ``key``, ``kind`` (``"range"``, ``"object"``, ``"size"``),
        ``replica`` (an index into ``stats()["replicas"]``),
        ``start_us`` and ``end_us`` (since tracing started), ``hedge``
        (``"sent"``, ``"delay_not_reached"``, ``"budget"``: no retry token above
        the failover reserve, ``"no_replica"``, ``"off"``), ``hedge_delay_us``,
        ``hedge_sent_us``, ``hedge_replica``, ``budget_wait_us``, ``in_flight``
        (attempts already on the replica) and ``winner`` (``"primary"``,
        ``"hedge"``, ``"retry"``, ``"failed"``)."""
        return self._storage.take_trace()

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        key = self._key(path)
        objects, prefixes = self._storage.ls(key)
        entries = [{"name": name, "size": 0, "type": "directory"} for name in prefixes]
        entries += [_entry(meta) for meta in objects]
        if not entries and key not in ("", "/"):
            # A file lists as itself, as in fsspec (an object store lists a
            # file's key as empty; an empty directory stays empty).
            meta = self._storage.info(key)
            if meta.kind == "file":
                entries = [_entry(meta)]
        entries.sort(key=lambda e: str(e["name"]))
        return entries if detail else [e["name"] for e in entries]

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        found = super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        if not self.replicas:
            return found
        # fsspec names the starting directory as the caller spelled it
        # ("/sub"); every other name is a key ("sub/f.bin").
        if detail:
            return {k.lstrip("/"): {**v, "name": k.lstrip("/")} for k, v in found.items()}
        return [name.lstrip("/") for name in found]

    def get(self, rpath: Any, lpath: Any, recursive: bool = False, **kwargs: Any) -> None:
        if self._top_level_dir(rpath, recursive) and os.path.isdir(lpath):
            lpath = os.path.join(lpath, self._key(rpath))
        super().get(rpath, lpath, recursive, **kwargs)

    def copy(self, path1: Any, path2: Any, recursive: bool = False, **kwargs: Any) -> None:
        if self._top_level_dir(path1, recursive) and isinstance(path2, str) and self.isdir(path2):
            path2 = posixpath.join(path2, self._key(path1))
        super().copy(path1, path2, recursive, **kwargs)

    def _top_level_dir(self, source: Any, recursive: bool) -> bool:
        """Whether ``source`` names a top-level replica directory ("sub")
        copied recursively. fsspec keeps the part of the source after its
        last "/" when the destination exists, and a top-level key has none:
        it would flatten ``sub`` into the destination. Naming the
        destination ``dest/sub`` keeps it."""
        if not (self.replicas and recursive and isinstance(source, str)):
            return False
        if source.endswith("/") or has_magic(source):
            return False
        key = self._key(source)
        return bool(key) and "/" not in key and self.isdir(key)

    # -- writes (local replicas: to every one, through fsspec's local fs) ---

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        for target in self._write_paths(path):
            self._local.mkdir(target, create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        for target in self._write_paths(path):
            self._local.makedirs(target, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        for target in self._write_paths(path):
            self._local.rmdir(target)

    def rm_file(self, path: str) -> None:
        for target in self._write_paths(path):
            self._local.rm_file(target)

    def rm(
        self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None
    ) -> None:
        paths = [path] if isinstance(path, str) else list(path)
        expanded = self.expand_path(paths, recursive=recursive, maxdepth=maxdepth)
        # Deepest first, so directories are empty when their turn comes.
        for one in sorted(expanded, key=lambda p: p.count("/"), reverse=True):
            for target in self._write_paths(one):
                if os.path.isdir(target) and not os.path.islink(target):
                    if not recursive:
                        raise IsADirectoryError(
                            21, f"{one!r} is a directory; pass recursive=True", one
                        )
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.remove(target)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        for source, target in zip(self._write_paths(path1), self._write_paths(path2), strict=True):
            self._local.cp_file(source, target, **kwargs)

    def put_file(self, lpath: str, rpath: str, callback: Any = None, **kwargs: Any) -> None:
        for target in self._write_paths(rpath):
            self._local.put_file(lpath, target, **kwargs)

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
        overrides = {
            "chunk_bytes": chunk_bytes,
            "depth": depth,
            "memory_budget_bytes": memory_budget_bytes,
        }
        return self._storage.stream(entries, self._key, overrides)

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
            targets = self._write_paths(path)
            kwargs.pop("size", None)
            for target in targets:
                self._local.makedirs(self._local._parent(target), exist_ok=True)
            return _ReplicatedWrite(targets, mode, autocommit=autocommit, fs=self._local, **kwargs)
        raise ValueError(
            f"unsupported mode {mode!r}; feedline reads with 'rb' and writes through fsspec"
        )


def _rebuild(config: dict[str, Any]) -> FileSystem:
    """Unpickles a :class:`FileSystem` from its configuration."""
    replicas = config.pop("replicas")
    return FileSystem(replicas, **config)


def _replica_entries(replicas: Sequence[Replica] | None) -> list[str | _core.Replica]:
    """What the core opens for each replica: a root string, or a
    :class:`feedline.Replica` with its own options."""
    if replicas is None:
        return []
    if isinstance(replicas, str | bytes | os.PathLike):
        raise TypeError(f"replicas must be a list of roots, got the single value {replicas!r}")
    if isinstance(replicas, Mapping) or not isinstance(replicas, Iterable):
        raise TypeError(f"replicas must be a list of roots, got {replicas!r}")
    entries: list[str | _core.Replica] = []
    try:
        for r in replicas:
            entries.append(r if isinstance(r, _core.Replica) else _replica_root(r))
    except BaseException:
        # Filesystems handed over before the bad entry are not kept alive.
        _fsspec.release_instances([e for e in entries if isinstance(e, str)])
        raise
    if not entries:
        raise ValueError("replicas must name at least one root, got []")
    return entries


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
        "a replica is a path, a URL, a feedline.Replica, an fsspec filesystem or "
        f"(filesystem, root); got {replica!r}"
    )


def _local_root(replica: str) -> str | None:
    """The directory of a local replica root; None for any other kind."""
    if replica.startswith("file://"):
        return replica[len("file://") :]
    return None if _URL_RE.match(replica) else replica


def _entry(meta: _core.ObjectMeta) -> dict[str, Any]:
    """An fsspec info dict: ``name``, ``size``, ``type``, and where the
    backend says, ``mtime`` and ``created`` (seconds since the epoch, as in
    fsspec's local filesystem) and ``version`` (ETag or the like)."""
    entry: dict[str, Any] = {"name": meta.key, "size": meta.size, "type": meta.kind}
    if meta.modified_unix_ns is not None:
        entry["mtime"] = meta.modified_unix_ns / 1e9
    if meta.created_unix_ns is not None:
        entry["created"] = meta.created_unix_ns / 1e9
    if meta.version is not None:
        entry["version"] = meta.version
    return entry


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _utc(unix_ns: int | None, what: str, path: str) -> datetime.datetime:
    if unix_ns is None:
        raise NotImplementedError(f"the replica of {path!r} does not report its {what} time")
    # Integer arithmetic to the nearest microsecond (a float of seconds
    # since the epoch has no nanoseconds left to round).
    return _EPOCH + datetime.timedelta(microseconds=(unix_ns + 500) // 1000)


class _ReplicatedWrite(LocalFileOpener):  # type: ignore[misc]
    """A local file written in the first replica and copied to the others
    when it closes (a local write needs no atomicity across replicas beyond
    what a reader of one replica sees)."""

    def __init__(self, paths: list[str], mode: str, **kwargs: Any) -> None:
        self._copies = paths[1:]
        super().__init__(paths[0], mode, **kwargs)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.autocommit:
            self._replicate()

    def commit(self) -> None:
        super().commit()
        self._replicate()

    def __exit__(self, *exc_info: object) -> None:
        # fsspec's local file closes its inner file on exit, not itself.
        self._incontext = False
        if exc_info[0] is None:
            self.close()
        else:
            self.f.close()

    def _replicate(self) -> None:
        for target in self._copies:
            shutil.copyfile(self.path, target)


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
        self._reader = fs._storage.open_reader(fs._key(path))
        self.size = self._reader.size
        self.mode = "rb"
        #: What fsspec's caching layers (``blockcache::``,
        #: ``CachingFileSystem``) expect of a file: their block size, and a
        #: ``cache`` they install whose misses come back to `_fetch_range`.
        self.blocksize: int = fs.prefetch.chunk_bytes
        self.cache: Any = None

    def _fetch_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``: a caching layer's miss. Through the same
        reader, so block after block keeps the Rust read-ahead going."""
        self._reader.seek(start)
        return self._reader.read(max(0, end - start))

    def __reduce__(self) -> tuple[Any, ...]:
        # As fsspec's local files: the filesystem (its configuration), the
        # path and the position; unpickling reopens there.
        if self.closed:
            raise ValueError(f"cannot pickle closed file {self.path!r}")
        return (_reopen, (self.fs, self.path, self.tell()))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        self._check_open()
        if self.cache is not None:
            return self._readinto_cached(buffer)
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
        n = -1 if size is None else min(size, sys.maxsize)
        if self.cache is not None:
            return self._read_cached(n)
        return self._reader.read(n)

    def _read_cached(self, size: int) -> bytes:
        """A read through the installed cache; the position is the reader's
        (the cache's misses move it, so it is set back after)."""
        start = self._reader.tell()
        end = self.size if size < 0 else min(self.size, start + size)
        data: bytes = self.cache._fetch(start, end) if end > start else b""
        self._reader.seek(start + len(data))
        return data

    def _readinto_cached(self, buffer: Buffer) -> int:
        with memoryview(buffer) as view, view.cast("B") as flat:
            data = self._read_cached(len(flat))
            flat[: len(data)] = data
            return len(data)

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
            self.cache = None
        super().close()

    @property
    def closed(self) -> bool:
        return bool(io.RawIOBase.closed.__get__(self))

    @closed.setter
    def closed(self, value: bool) -> None:
        # fsspec's caching layers mark a file closed after closing it (as
        # `AbstractBufferedFile.closed` allows); only closing is possible.
        if not value:
            raise ValueError(f"cannot reopen {self.path!r} by setting closed=False")
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def __repr__(self) -> str:
        return f"<FeedlineFile {self.path!r} size={self.size}>"


def _reopen(fs: FileSystem, path: str, position: int) -> FeedlineFile:
    """Unpickles a :class:`FeedlineFile`: opened again at ``position``."""
    f = FeedlineFile(fs, path)
    f.seek(position)
    return f


#: What ``fsspec.core.OpenFile`` itself takes besides the filesystem and path.
_OPEN_FILE_OPTIONS = frozenset({"compression", "encoding", "errors", "newline"})


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
        fs_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_NAMES or k == "chaos"}
        _check_option_names({k: v for k, v in kwargs.items() if k not in _OPEN_FILE_OPTIONS})
        fs = FileSystem(replicas=replicas, **fs_kwargs)
        return OpenFile(fs, FileSystem._strip_protocol(path), mode=mode, **kwargs)
    if mode in WRITE_MODES:
        of: OpenFile = fsspec.open(path, mode, **kwargs)
        return of
    raise ValueError(
        f"unsupported mode {mode!r}; use 'rb'/'r' to read, or 'wb'/'ab'/'xb'/'w'/'a'/'x'"
    )
