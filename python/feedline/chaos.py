"""In-process fault injection: make a replica slow, spiky, lossy, stalling,
down or corrupting, deterministically from a seed.

``FileSystem(replicas=[...], chaos={0: Chaos(...)})`` injects the faults in
Rust, in a store wrapper below the replica router (so hedging, failover and
verification see them as a real sick node). :class:`ChaosFileSystem` applies
the *same* fault sequence to any fsspec filesystem, for baselines.

Request ``n`` of a replica draws its fate from ``(seed, n)`` alone: the same
seed gives the same faults to the same requests, whatever the concurrency.
Only reads draw a fate; a ``size``/``info`` call sees outages only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from feedline import _core
from feedline._core import Chaos

__all__ = [
    "Chaos",
    "ChaosFileSystem",
    "FaultSampler",
    "Fixed",
    "LogNormal",
    "Normal",
    "Pareto",
    "Uniform",
]


def _non_negative(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


# The latency distributions are plain values; ``Chaos`` (in Rust) checks them
# with the rest of the spec, through their ``to_dict``.


@dataclass(frozen=True)
class Fixed:
    """Every read takes ``ms`` milliseconds."""

    ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "ms": self.ms}


@dataclass(frozen=True)
class Uniform:
    """Uniform between ``low_ms`` and ``high_ms``."""

    low_ms: float
    high_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "uniform", "low_ms": self.low_ms, "high_ms": self.high_ms}


@dataclass(frozen=True)
class Normal:
    """Normal around ``mean_ms``; draws below zero count as zero."""

    mean_ms: float
    stdev_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "normal", "mean_ms": self.mean_ms, "stdev_ms": self.stdev_ms}


@dataclass(frozen=True)
class LogNormal:
    """Log-normal with median ``median_ms`` and log-space spread ``sigma``
    (the usual shape of service latency)."""

    median_ms: float
    sigma: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "lognormal", "median_ms": self.median_ms, "sigma": self.sigma}


@dataclass(frozen=True)
class Pareto:
    """Pareto from ``scale_ms`` up, tail index ``shape`` (smaller = heavier;
    one draw is capped at 60 s, stalls are the way to hang)."""

    scale_ms: float
    shape: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "pareto", "scale_ms": self.scale_ms, "shape": self.shape}


Latency = Fixed | Uniform | Normal | LogNormal | Pareto


class FaultSampler(Protocol):
    """Where a :class:`ChaosFileSystem` draws each request's fate from."""

    def next(self, nbytes: int) -> tuple[float, str, int | None]:
        """The next request's ``(delay_ms, kind, corrupt_at)``: ``kind`` is
        ``"ok"``, ``"error"``, ``"outage"`` or ``"stall"``; ``corrupt_at`` the
        index of the byte to flip in the ``nbytes`` read, or ``None``."""
        ...

    def stats(self) -> dict[str, int]:
        """How many of each fault this sampler has drawn."""
        ...


class ChaosFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Any fsspec filesystem with the faults of ``chaos`` applied to its
    reads, in Python, drawing from the same Rust sampler as
    ``FileSystem(chaos=...)`` so both see the same fault sequence for a seed.

    Each ``cat_file`` and each block a file object fetches is one request.
    Latency and spikes sleep; errors and outages raise ``OSError``;
    corruption flips one byte. A stall hangs for ``stall_s`` and then raises
    ``TimeoutError``, standing in for a client's read timeout (plain fsspec
    cannot cancel a hung read).

    ``sampler`` (a :class:`FaultSampler`, by default one drawing from
    ``chaos``) is public and may be replaced: several filesystems that must
    share one fault sequence per replica (readers in different processes)
    each get a sampler that asks the one owner of that sequence.
    """

    protocol = ("chaos",)
    cachable = False

    def __init__(
        self,
        fs: AbstractFileSystem,
        chaos: Chaos,
        *,
        stall_s: float = 30.0,
        sampler: FaultSampler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(chaos, Chaos):
            raise TypeError(f"chaos must be a feedline.chaos.Chaos, got {chaos!r}")
        _non_negative("ChaosFileSystem", "stall_s", stall_s)
        self.fs = fs
        self.chaos = chaos
        self.stall_s = float(stall_s)
        self.sampler: FaultSampler = _core.ChaosSampler(chaos) if sampler is None else sampler

    def fault_stats(self) -> dict[str, int]:
        """How many of each fault were injected so far: the same fields as
        ``FileSystem.fault_stats()[i]["injected"]``."""
        return self.sampler.stats()

    def _apply(self, path: str, nbytes: int) -> int | None:
        """Draws the next request's fate; sleeps or raises as it says, and
        returns the index of the byte to corrupt after the read, if any."""
        delay_ms, kind, corrupt_at = self.sampler.next(nbytes)
        if kind == "outage":
            raise OSError(f"chaos: injected outage reading {path!r}")
        if kind == "stall":
            time.sleep(self.stall_s)
            raise TimeoutError(
                f"chaos: injected stall reading {path!r} (gave up after {self.stall_s} s)"
            )
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        if kind == "error":
            raise OSError(f"chaos: injected error reading {path!r}")
        return corrupt_at

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        if start is not None and end is not None and start >= 0 and end >= 0:
            # No stat: over HTTP that would be an extra request per read.
            nbytes = max(0, end - start)
        else:
            size = int(self.fs.size(path))
            lo, hi = slice(start, end).indices(size)[:2]
            nbytes = max(0, hi - lo)
        corrupt_at = self._apply(path, nbytes)
        data: bytes = self.fs.cat_file(path, start=start, end=end, **kwargs)
        if corrupt_at is not None and corrupt_at < len(data):
            flipped = bytearray(data)
            flipped[corrupt_at] ^= 0xFF
            data = bytes(flipped)
        return data

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        info: dict[str, Any] = self.fs.info(path, **kwargs)
        return info

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        out: list[Any] = self.fs.ls(path, detail=detail, **kwargs)
        return out

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if mode != "rb":
            raise ValueError(f"ChaosFileSystem is read-only; got mode {mode!r}")
        return _ChaosFile(
            self,
            path,
            mode=mode,
            block_size=block_size or "default",
            cache_options=cache_options,
            **kwargs,
        )


class _ChaosFile(AbstractBufferedFile):  # type: ignore[misc]
    """fsspec's buffered file; every block it fetches is one chaos request."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        data: bytes = self.fs.cat_file(self.path, start, end)
        return data
