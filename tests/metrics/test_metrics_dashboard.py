"""docs/grafana-dashboard.json reads only metrics the model defines, under
their exported names, and shows what operators watch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import feedline.metrics as fm

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
# What prometheus_client writes for a histogram besides its name.
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in exprs(v)]
    return []


def exported_names() -> set[str]:
    names = set()
    for d in fm.DEFINITIONS:
        if d["kind"] == "histogram":
            names.update(d["name"] + s for s in HISTOGRAM_SERIES)
        else:
            names.add(d["name"])
    return names


def test_every_expr_names_only_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    found = exprs(dashboard)
    assert len(found) >= 8
    known = exported_names()
    used = set()
    for expr in found:
        names = set(re.findall(r"\bfeedline_[a-z0-9_]+", expr))
        assert names, f"an expr that reads no feedline metric: {expr}"
        assert names <= known, f"undefined metric(s) {sorted(names - known)} in {expr}"
        used |= names
    for must in [
        "feedline_stream_stall_seconds_total",
        "feedline_read_seconds_bucket",
        "feedline_hedges_won_total",
        "feedline_cache_hits_total",
        "feedline_cache_misses_total",
    ]:
        assert must in used, must
    annotations = exprs(dashboard["annotations"])
    assert any("feedline_fault_active" in e for e in annotations)
