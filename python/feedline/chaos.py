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

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from feedline import _core

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


def _number(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}.{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    return v


def _non_negative(owner: str, name: str, value: object) -> None:
    if _number(owner, name, value) < 0:
        raise ValueError(f"{owner}.{name} must be >= 0, got {value!r}")


def _positive(owner: str, name: str, value: object) -> None:
    if _number(owner, name, value) <= 0:
        raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


def _probability(owner: str, name: str, value: object) -> None:
    v = _number(owner, name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(
            f"{owner}.{name} is a probability and must be within [0, 1], got {value!r}"
        )


@dataclass(frozen=True)
class Fixed:
    """Every read takes ``ms`` milliseconds."""

    ms: float

    def __post_init__(self) -> None:
        _non_negative("Fixed", "ms", self.ms)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "ms": self.ms}


@dataclass(frozen=True)
class Uniform:
    """Uniform between ``low_ms`` and ``high_ms``."""

    low_ms: float
    high_ms: float

    def __post_init__(self) -> None:
        _non_negative("Uniform", "low_ms", self.low_ms)
        _non_negative("Uniform", "high_ms", self.high_ms)
        if self.low_ms > self.high_ms:
            raise ValueError(
                f"Uniform.low_ms ({self.low_ms!r}) must not exceed high_ms ({self.high_ms!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "uniform", "low_ms": self.low_ms, "high_ms": self.high_ms}


@dataclass(frozen=True)
class Normal:
    """Normal around ``mean_ms``; draws below zero count as zero."""

    mean_ms: float
    stdev_ms: float

    def __post_init__(self) -> None:
        _non_negative("Normal", "mean_ms", self.mean_ms)
        _non_negative("Normal", "stdev_ms", self.stdev_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "normal", "mean_ms": self.mean_ms, "stdev_ms": self.stdev_ms}


@dataclass(frozen=True)
class LogNormal:
    """Log-normal with median ``median_ms`` and log-space spread ``sigma``
    (the usual shape of service latency)."""

    median_ms: float
    sigma: float

    def __post_init__(self) -> None:
        _positive("LogNormal", "median_ms", self.median_ms)
        _non_negative("LogNormal", "sigma", self.sigma)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "lognormal", "median_ms": self.median_ms, "sigma": self.sigma}


@dataclass(frozen=True)
class Pareto:
    """Pareto from ``scale_ms`` up, tail index ``shape`` (smaller = heavier;
    one draw is capped at 60 s, stalls are the way to hang)."""

    scale_ms: float
    shape: float

    def __post_init__(self) -> None:
        _positive("Pareto", "scale_ms", self.scale_ms)
        _positive("Pareto", "shape", self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "pareto", "scale_ms": self.scale_ms, "shape": self.shape}


Latency = Fixed | Uniform | Normal | LogNormal | Pareto


@dataclass(frozen=True)
class Chaos:
    """Faults injected into one replica's reads.

    * ``latency``: base latency of every read (a distribution above).
    * ``spike_probability``, ``spike_ms``: a read is delayed by an extra
      ``spike_ms`` with this probability.
    * ``error_rate``: a read fails with a retryable ``OSError`` naming the
      replica and "injected" (after its latency, like a server's error reply).
    * ``stall_rate``: a read never completes until cancelled (by a hedge, a
      timeout, or a closed stream).
    * ``outages``: ``(start_s, end_s)`` windows, measured from when the
      filesystem was built, in which every request is refused at once.
    * ``fail_after_requests``: reads from this number on are refused (the
      replica dies after serving that many).
    * ``bandwidth_bytes_per_s``: the replica's link; a read's bytes take
      ``nbytes / bandwidth`` seconds, queued behind earlier reads.
    * ``corrupt_rate``: a successful read has one byte flipped.
    * ``seed``: the same seed gives the same faults to the same requests.
    """

    latency: Latency | None = None
    spike_probability: float = 0.0
    spike_ms: float = 0.0
    error_rate: float = 0.0
    stall_rate: float = 0.0
    outages: tuple[tuple[float, float], ...] = field(default=())
    fail_after_requests: int | None = None
    bandwidth_bytes_per_s: float | None = None
    corrupt_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latency is not None and not isinstance(
            self.latency, Fixed | Uniform | Normal | LogNormal | Pareto
        ):
            raise TypeError(
                "Chaos.latency must be Fixed, Uniform, Normal, LogNormal or Pareto, "
                f"got {self.latency!r}"
            )
        for name in ("spike_probability", "error_rate", "stall_rate", "corrupt_rate"):
            _probability("Chaos", name, getattr(self, name))
        _non_negative("Chaos", "spike_ms", self.spike_ms)
        if isinstance(self.outages, str | bytes) or not hasattr(self.outages, "__iter__"):
            raise TypeError(f"Chaos.outages must be (start_s, end_s) pairs, got {self.outages!r}")
        windows = []
        for window in self.outages:
            if not isinstance(window, tuple | list) or len(window) != 2:
                raise ValueError(f"Chaos.outages entry must be (start_s, end_s), got {window!r}")
            start_s = _number("Chaos", "outages start_s", window[0])
            end_s = _number("Chaos", "outages end_s", window[1])
            if not 0 <= start_s < end_s:
                raise ValueError(
                    f"Chaos.outages entry {tuple(window)!r} must satisfy 0 <= start_s < end_s"
                )
            windows.append((start_s, end_s))
        # Lists are accepted for convenience and frozen into tuples.
        object.__setattr__(self, "outages", tuple(windows))
        if self.fail_after_requests is not None and (
            isinstance(self.fail_after_requests, bool)
            or not isinstance(self.fail_after_requests, int)
            or self.fail_after_requests < 0
        ):
            raise ValueError(
                f"Chaos.fail_after_requests must be an int >= 0, got {self.fail_after_requests!r}"
            )
        if self.bandwidth_bytes_per_s is not None:
            _positive("Chaos", "bandwidth_bytes_per_s", self.bandwidth_bytes_per_s)
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 1 << 64
        ):
            raise ValueError(f"Chaos.seed must be an int in [0, 2**64), got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency": None if self.latency is None else self.latency.to_dict(),
            "spike_probability": self.spike_probability,
            "spike_ms": self.spike_ms,
            "error_rate": self.error_rate,
            "stall_rate": self.stall_rate,
            "outages": [list(w) for w in self.outages],
            "fail_after_requests": self.fail_after_requests,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "corrupt_rate": self.corrupt_rate,
            "seed": self.seed,
        }

    def to_json(self) -> str:
        """The JSON the Rust core's ``ChaosSpec`` reads."""
        return json.dumps(self.to_dict())


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
        self.sampler: FaultSampler = (
            _core.ChaosSampler(chaos.to_json()) if sampler is None else sampler
        )

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
