"""Ratios of the local read benchmarks (median against median), read from a
pytest-benchmark JSON file.

    python benches/report.py bench-out/pytest-benchmark.json

Every group names its subject and its baselines by test name; a ratio above
1 means feedline was faster. Goals are printed, never
adjusted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Comparison:
    group: str
    subject: str
    baseline: str
    goal: float
    what: str


COMPARISONS = [
    Comparison(
        "P1",
        "test_p1_feedline_readinto",
        "test_p1_builtin_readinto",
        0.95,
        "1 GiB sequential readinto vs builtin open(buffering=0)",
    ),
    Comparison(
        "P1",
        "test_p1_feedline_readinto",
        "test_p1_fsspec_read",
        15.0,
        "1 GiB sequential readinto vs fsspec.open().read()",
    ),
    Comparison(
        "P2",
        "test_p2_feedline_cat_ranges",
        "test_p2_pread_loop",
        2.0,
        "random 4 KiB ranges: FileSystem.cat_ranges vs os.pread loop",
    ),
    Comparison(
        "P2",
        "test_p2_feedline_cat_ranges",
        "test_p2_fsspec_cat_ranges",
        30.0,
        "random 4 KiB ranges: FileSystem.cat_ranges vs fsspec local cat_ranges",
    ),
    Comparison(
        "P3",
        "test_p3_feedline_stream_numpy",
        "test_p3_builtin_readinto_numpy",
        1.0,
        "1 MiB files to numpy: zero-copy stream vs builtin readinto loop",
    ),
    Comparison(
        "P7",
        "test_p7_feedline_chunk_iteration",
        "test_p7_queue_handoff",
        5.0,
        "chunk hand-off to Python: ChunkStream vs queue.Queue",
    ),
]


def medians(data: dict[str, Any]) -> dict[str, tuple[float, dict[str, Any]]]:
    out = {}
    for bench in data.get("benchmarks", []):
        name = bench["name"].split("[")[0]
        out[name] = (bench["stats"]["median"], bench.get("extra_info", {}))
    return out


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    found = medians(data)
    result = []
    for c in COMPARISONS:
        if c.subject not in found or c.baseline not in found:
            continue
        subject_s, info = found[c.subject]
        baseline_s, base_info = found[c.baseline]
        ratio = baseline_s / subject_s
        result.append(
            {
                "group": c.group,
                "what": c.what,
                "feedline_median_s": subject_s,
                "baseline_median_s": baseline_s,
                "feedline_rate": info.get("rate"),
                "baseline_rate": base_info.get("rate"),
                "ratio": ratio,
                "goal": c.goal,
                "met": ratio >= c.goal,
            }
        )
    return result


def format_table(table: list[dict[str, Any]]) -> str:
    lines = [
        "| | comparison | feedline (median) | baseline (median) | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        f_rate = r["feedline_rate"] or f"{r['feedline_median_s'] * 1e3:.1f} ms"
        b_rate = r["baseline_rate"] or f"{r['baseline_median_s'] * 1e3:.1f} ms"
        mark = "" if r["met"] else " (missed)"
        lines.append(
            f"| {r['group']} | {r['what']} | {f_rate} | {b_rate} | "
            f"**{r['ratio']:.2f}x**{mark} | ≥ {r['goal']:g}x |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        data = json.load(f)
    table = rows(data)
    if not table:
        print("no local read benchmark pairs in", argv[1])
        return 0
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
