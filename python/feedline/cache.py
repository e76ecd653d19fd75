"""``fs.cache``: the node cache of a :class:`feedline.FileSystem` opened with
``cache_dir=...`` (see the guide's "Node cache" section). The cache itself
lives in the Rust core; this is its handle: figures, clearing, warm-up."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from feedline import _core

#: Blocks a warm-up asks for at once (each a read of ``cache_block_bytes``).
WARM_BATCH = 8


class NodeCache:
    """The node cache as one filesystem sees it."""

    def __init__(
        self, storage: _core.Storage, block_bytes: int, key_of: Callable[[str], str]
    ) -> None:
        self._storage = storage
        self._block_bytes = block_bytes
        self._key_of = key_of

    def stats(self, reset: bool = False) -> _core.CacheStats:
        """Hits, misses, bytes from the cache and from the replicas, fills,
        single-flight waits, evictions, corrupt blocks, bypasses: this
        process's counters (``reset`` clears them); ``resident_*``: what the
        node's cache holds now."""
        stats = self._storage.cache_stats(reset)
        assert stats is not None, "a NodeCache exists only with the cache on"
        return stats

    def clear(self) -> None:
        """Removes every cached block, for every process sharing the
        directory."""
        self._storage.cache_clear()

    def warm(self, plan_or_paths: Iterable[Any]) -> Future[int]:
        """Fills the cache with the given paths (whole objects) or plan
        entries (``(path, offset, length)``) in the background, block by
        block through the core (blocks already cached cost a local read;
        missing ones are fetched once for the node). Returns a future of the
        bytes of the blocks warmed; a read that fails fails the future."""
        spans = [_span(entry) for entry in plan_or_paths]
        done: Future[int] = Future()
        done.set_running_or_notify_cancel()

        def run() -> None:
            try:
                done.set_result(self._warm(spans))
            except BaseException as e:  # the caller sees it through the future
                done.set_exception(e)

        threading.Thread(target=run, name="feedline-cache-warm", daemon=True).start()
        return done

    def _warm(self, spans: list[tuple[str, int, int | None]]) -> int:
        keys: list[str] = []
        starts: list[int | None] = []
        ends: list[int | None] = []
        for path, offset, length in spans:
            # Whole blocks: the cache fills whole blocks anyway.
            key = self._key_of(path)
            size = self._storage.size(key)
            end = size if length is None else min(offset + length, size)
            first = offset - offset % self._block_bytes
            for start in range(first, end, self._block_bytes):
                keys.append(key)
                starts.append(start)
                ends.append(min(start + self._block_bytes, size))
        warmed = 0
        for i in range(0, len(keys), WARM_BATCH):
            batch = slice(i, i + WARM_BATCH)
            for item in self._storage.cat_ranges(keys[batch], starts[batch], ends[batch]):
                if isinstance(item, BaseException):
                    raise item
                warmed += len(item)
        return warmed


def _span(entry: Any) -> tuple[str, int, int | None]:
    if isinstance(entry, str | os.PathLike):
        return (os.fspath(entry), 0, None)
    if isinstance(entry, tuple) and len(entry) == 3:
        path, offset, length = entry
        return (os.fspath(path), int(offset), int(length))
    raise TypeError(f"warm takes paths or (path, offset, length) entries, got {entry!r}")
