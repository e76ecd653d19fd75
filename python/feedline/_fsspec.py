"""The Python side of the fsspec fallback store: turns a replica root that
no native backend serves (``memory://x``, a registered fsspec filesystem
instance) into ``(filesystem, path prefix, name)`` for the Rust callback
store. Reads through it hold the GIL, so they are slower than the native
stores; use them for protocols feedline does not speak natively."""

from __future__ import annotations

import datetime
import itertools
import json
import threading
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

#: Scheme of roots that name a filesystem instance handed to FileSystem.
INSTANCE_SCHEME = "fsspec-instance"

_lock = threading.Lock()
_counter = itertools.count()
_instances: dict[str, AbstractFileSystem] = {}


def register_instance(fs: AbstractFileSystem, root: str = "") -> str:
    """A replica root string naming ``fs`` (and a path inside it)."""
    if not isinstance(fs, AbstractFileSystem):
        raise TypeError(f"expected an fsspec filesystem, got {fs!r}")
    with _lock:
        token = str(next(_counter))
        _instances[token] = fs
    # The root follows the first "/" verbatim (an absolute local root keeps
    # its leading slash).
    return f"{INSTANCE_SCHEME}://{token}/{root}"


def release_instances(roots: list[str]) -> None:
    """Forgets the filesystems that ``roots`` name (those not registered are
    ignored). Called when the :class:`feedline.FileSystem` that registered
    them goes away: the registry must not keep every filesystem ever handed
    over alive (the open store holds its own reference)."""
    prefix = f"{INSTANCE_SCHEME}://"
    with _lock:
        for root in roots:
            if root.startswith(prefix):
                _instances.pop(root[len(prefix) :].partition("/")[0], None)


def registered_count() -> int:
    """How many filesystems the registry holds now."""
    with _lock:
        return len(_instances)


def instance_of(root: str) -> tuple[AbstractFileSystem, str] | None:
    """The instance and path a registered root names, or None."""
    prefix = f"{INSTANCE_SCHEME}://"
    if not root.startswith(prefix):
        return None
    token, _, path = root[len(prefix) :].partition("/")
    fs = _instances.get(token)
    if fs is None:
        raise ValueError(f"replica {root!r} names no registered fsspec filesystem")
    return fs, path


def open_replica(root: str, options_json: str) -> tuple[AbstractFileSystem, str, str]:
    """``(fs, prefix, name)`` for ``root``; called from Rust."""
    found = instance_of(root)
    if found is not None:
        fs, path = found
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return fs, path.rstrip("/"), f"fsspec:{protocol}://{path}"
    protocol, sep, _ = root.partition("://")
    if not sep:
        raise ValueError(f"replica {root!r} is not a URL")
    options: dict[str, Any] = json.loads(options_json)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        raise ValueError(f"unknown protocol {protocol!r} in replica {root!r}: {e}") from None
    fs = cls(**options)
    prefix = cls._strip_protocol(root).rstrip("/")
    return fs, prefix, f"fsspec:{root.rstrip('/')}"


#: ``(name, is_dir, size, modified_unix_ns, created_unix_ns, version)``: one
#: fsspec info dict in the shape the Rust fallback store converts.
Entry = tuple[str, bool, int, int | None, int | None, str | None]

# fsspec implementations name the same facts differently.
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "modified", "updated", "mtime_ns")
_CREATED_KEYS = ("created", "creation_time", "timeCreated", "ctime")
_VERSION_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash")


def _unix_ns(value: Any) -> int | None:
    """Nanoseconds since the epoch from a float/int (seconds), a datetime or
    an ISO string; None when the value is none of those."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value * 1_000_000_000
    if isinstance(value, float):
        # A float of seconds holds about microseconds at today's epoch.
        return round(value * 1_000_000) * 1000
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp() * 1_000_000) * 1000
    return None


def _first(info: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((info[k] for k in keys if info.get(k) is not None), None)


def entry(info: dict[str, Any]) -> Entry:
    """One fsspec info dict as an :data:`Entry`; called from Rust."""
    modified = _unix_ns(_first(info, _MODIFIED_KEYS))
    created = _unix_ns(_first(info, _CREATED_KEYS))
    version = _first(info, _VERSION_KEYS)
    is_dir = info.get("type") == "directory"
    return (
        str(info["name"]),
        is_dir,
        0 if is_dir else int(info.get("size") or 0),
        modified,
        created if created is not None else modified,
        None if version is None else str(version),
    )


def listing(fs: AbstractFileSystem, path: str) -> list[Entry]:
    """What lies directly under ``path`` (not ``path`` itself: a file lists
    empty, as in the other stores); called from Rust."""
    found: list[dict[str, Any]] = fs.ls(path, detail=True)
    itself = fs._strip_protocol(path).rstrip("/")
    entries = (entry({**info, "name": fs._strip_protocol(str(info["name"]))}) for info in found)
    return [e for e in entries if e[0].rstrip("/") != itself]
