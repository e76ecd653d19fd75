"""What the slowest reads of a traced run had in common (see
``FileSystem.trace_reads``): how each was hedged or why not, who won, and
where the time went (the hedge delay, a wait for a budget token, the hedge
itself). Benches print this beside their percentiles and dump the trace."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any


def slowest(trace: list[dict[str, Any]], share: float) -> list[dict[str, Any]]:
    """The slowest ``share`` of the traced reads (at least one)."""
    ordered = sorted(trace, key=lambda t: t["end_us"] - t["start_us"], reverse=True)
    return ordered[: max(1, round(len(ordered) * share))]


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) / 1e3, 2) if values else float("nan")


def tail_causes(trace: list[dict[str, Any]], share: float = 0.002) -> dict[str, Any]:
    """For the slowest ``share`` of reads: counts by hedge note and winner,
    and medians of the latency, the hedge delay, the wait for a token, the
    time from the hedge to the end, and attempts already in flight. Sizes
    (HEADs) are left out: they are not in the read percentiles either."""
    trace = [t for t in trace if t["kind"] != "size"]
    if not trace:
        return {}
    tail = slowest(trace, share)
    sent = [t for t in tail if t["hedge_sent_us"] is not None]
    hedged = [t for t in trace if t["hedge"] == "sent"]
    return {
        "reads": len(trace),
        "tail_reads": len(tail),
        "tail_ms": _median_ms([t["end_us"] - t["start_us"] for t in tail]),
        "hedge": dict(Counter(t["hedge"] for t in tail)),
        "winner": dict(Counter(t["winner"] for t in tail)),
        "hedge_delay_ms": _median_ms([t["hedge_delay_us"] for t in tail]),
        "budget_wait_ms": _median_ms([t["budget_wait_us"] for t in tail]),
        "hedge_to_end_ms": _median_ms([t["end_us"] - t["hedge_sent_us"] for t in sent]),
        "in_flight": statistics.median(t["in_flight"] for t in tail),
        "hedged_share_all": round(len(hedged) / len(trace), 4),
        "budget_refusals_all": sum(t["hedge"] == "budget" for t in trace),
    }


def dump(name: str, trace: list[dict[str, Any]]) -> Path:
    """Writes the trace as JSON under ``FEEDLINE_BENCH_OUT`` (bench-out)."""
    out = Path(os.environ.get("FEEDLINE_BENCH_OUT", "bench-out"))
    out.mkdir(exist_ok=True)
    path = out / f"trace-{name}.json"
    path.write_text(json.dumps(trace))
    return path
