"""Validation of replica-routing options, shared by ``FileSystem`` and
``feedline.open``. The Rust core validates again; checking here gives
errors that name the Python argument as it was written."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

#: How the router picks among a key's healthy replicas.
POLICIES = ("affinity", "p2c")

#: Routing keyword arguments accepted by ``FileSystem`` and ``feedline.open``.
ROUTING_OPTIONS = (
    "weights",
    "policy",
    "load_factor",
    "hedge_after_ms",
    "timeout_ms",
    "deadline_ms",
    "eject_after_failures",
    "base_ejection_ms",
    "max_ejection_ms",
    "retry_budget_ratio",
    "retry_budget_floor_per_s",
    "backoff_base_ms",
    "backoff_max_ms",
)

_PERCENTILE = re.compile(r"^p(\d+(\.\d+)?)$")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(
    name: str, value: object, *, above: float | None = None, least: float | None = None
) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if above is not None and v <= above:
        raise ValueError(f"{name} must be above {above:g}, got {value!r}")
    if least is not None and v < least:
        raise ValueError(f"{name} must be at least {least:g}, got {value!r}")
    return v


def _is_url(root: str) -> bool:
    return "://" in root


def check_replicas(replicas: Sequence[str | os.PathLike[str]] | None) -> list[str]:
    """The replica roots as strings: a non-empty list of distinct, existing
    directories (URLs are left to their backends)."""
    if replicas is None:
        return []
    if isinstance(replicas, str | bytes | os.PathLike):
        raise TypeError(f"replicas must be a list of roots, got the single value {replicas!r}")
    roots = [os.fspath(r) for r in replicas]
    if not roots:
        raise ValueError("replicas must name at least one root, got []")
    seen: dict[str, str] = {}
    for root in roots:
        if not isinstance(root, str) or not root:
            raise ValueError(f"a replica root must be a non-empty path, got {root!r}")
        key = root if _is_url(root) else os.path.realpath(root)
        if key in seen:
            raise ValueError(f"replica {root!r} is listed twice (same as {seen[key]!r})")
        seen[key] = root
        if not _is_url(root) and not os.path.isdir(root):
            what = "is not a directory" if os.path.exists(root) else "does not exist"
            raise ValueError(f"replica root {root!r} {what}")
    return roots


def routing_config(replicas: list[str], **options: Any) -> dict[str, Any]:
    """The routing part of the storage configuration (JSON-ready), with
    every value checked. Options left at ``None`` take the core's defaults."""
    unknown = set(options) - set(ROUTING_OPTIONS)
    if unknown:
        raise TypeError(f"unknown routing option(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    weights = options.get("weights")
    if weights is not None:
        if not replicas:
            raise ValueError("weights need replicas")
        if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a list of numbers, got {weights!r}")
        if len(weights) != len(replicas):
            raise ValueError(
                f"weights must have one entry per replica: {len(weights)} weights "
                f"for {len(replicas)} replicas"
            )
        out["weights"] = [
            _number(f"weight of replica {root!r}", w, above=0.0)
            for root, w in zip(replicas, weights, strict=True)
        ]
    policy = options.get("policy")
    if policy is not None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        out["policy"] = policy
    hedge = options.get("hedge_after_ms")
    if hedge is not None:
        if isinstance(hedge, str):
            m = _PERCENTILE.match(hedge)
            if not m or not 0 < float(m.group(1)) < 100:
                raise ValueError(
                    f"hedge_after_ms must be milliseconds above 0 or a percentile like 'p95', "
                    f"got {hedge!r}"
                )
            out["hedge_after_ms"] = hedge
        else:
            out["hedge_after_ms"] = _number("hedge_after_ms", hedge, above=0.0)
    for name in ("timeout_ms", "deadline_ms", "base_ejection_ms", "max_ejection_ms"):
        if options.get(name) is not None:
            out[name] = _number(name, options[name], above=0.0)
    load_factor = options.get("load_factor")
    if load_factor is not None:
        out["load_factor"] = _number("load_factor", load_factor, above=1.0)
    eject = options.get("eject_after_failures")
    if eject is not None:
        if isinstance(eject, bool) or not isinstance(eject, int):
            raise TypeError(f"eject_after_failures must be an int, got {eject!r}")
        if eject < 1:
            raise ValueError(f"eject_after_failures must be at least 1, got {eject}")
        out["eject_after_failures"] = eject
    for name in (
        "retry_budget_ratio",
        "retry_budget_floor_per_s",
        "backoff_base_ms",
        "backoff_max_ms",
    ):
        if options.get(name) is not None:
            out[name] = _number(name, options[name], least=0.0)
    return out
