"""Output of a bench run: the live display, the side-by-side table (ratios to
the first system), the JSON file and the PNG plots."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from feedline.bench.metrics import Recorder

#: Rows of the final table: (label, dotted path, format, lower is better).
ROWS: tuple[tuple[str, str, str, bool | None], ...] = (
    ("AU (compute / total)", "au", "{:.3f}", False),
    ("data stall (s)", "stall_s", "{:.2f}", True),
    ("time to first batch (ms)", "first_batch_ms", "{:.1f}", True),
    ("samples/s", "samples_per_s", "{:.0f}", False),
    ("MB/s", "mb_per_s", "{:.1f}", False),
    ("read p50 (ms)", "latency.p50_ms", "{:.2f}", True),
    ("read p90 (ms)", "latency.p90_ms", "{:.2f}", True),
    ("read p99 (ms)", "latency.p99_ms", "{:.2f}", True),
    ("read p99.9 (ms)", "latency.p99.9_ms", "{:.2f}", True),
    ("read max (ms)", "latency.max_ms", "{:.1f}", True),
    ("CO-corrected p99 (ms)", "latency_co.p99_ms", "{:.2f}", True),
    ("CO-corrected p99.9 (ms)", "latency_co.p99.9_ms", "{:.2f}", True),
    ("errors reaching consumer", "errors", "{:.0f}", True),
    ("retries", "retries", "{:.0f}", None),
    ("hedges sent / won", "hedges", "{}", None),
    ("ejections", "ejections", "{:.0f}", None),
    ("extra requests / read", "extra_request_ratio", "{:.3f}", None),
    ("bytes verified (MB)", "verified_mb", "{:.1f}", None),
    ("manifest mismatches", "mismatches", "{:.0f}", True),
    ("peak RSS (MB)", "peak_rss_mb", "{:.0f}", True),
)


def _value(result: dict[str, Any], path: str) -> Any:
    if path == "hedges":
        sent, won = result.get("hedges_sent"), result.get("hedges_won")
        return None if sent is None else f"{sent} / {won}"
    if path == "verified_mb":
        v = result.get("verified_bytes")
        return None if v is None else v / 1e6
    head, _, rest = path.partition(".")
    value = result.get(head)
    if rest:
        return value.get(rest) if isinstance(value, dict) else None
    return value


def compare(name: str, mine: Any, theirs: Any, lower_is_better: bool | None) -> str:
    """How `name`'s figure compares with another system's, worded the same
    way on every row whatever the figure's direction: "feedline better by
    1.35x", "feedline worse by 2.10x", "same"; empty where a figure has no
    better direction or a side has no number."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (mine, theirs))
    if lower_is_better is None or not numbers:
        return ""
    if mine == theirs:
        return "same"
    better = mine < theirs if lower_is_better else mine > theirs
    word = "better" if better else "worse"
    low, high = sorted((abs(mine), abs(theirs)))
    if low == 0 or (mine < 0) != (theirs < 0):
        return f"{name} {word}"
    return f"{name} {word} by {high / low:.2f}x"


def _reference(systems: list[dict[str, Any]]) -> int:
    """The system the comparison columns speak for: feedline when it ran."""
    names = [s["system"] for s in systems]
    return names.index("feedline") if "feedline" in names else 0


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table (plain strings), then one
    comparison column per other system (see :func:`compare`)."""
    systems = [s for s in report["systems"] if s.get("status") != "skipped"]
    ref = _reference(systems)
    ref_name = systems[ref]["system"] if systems else ""
    others = [i for i in range(len(systems)) if i != ref]
    header = ["figure"] + [s["system"] for s in systems]
    header += [f"{ref_name} vs {systems[i]['system']}" for i in others]
    rows: list[list[str]] = []
    for label, path, fmt, lower in ROWS:
        values = [_value(s, path) for s in systems]
        if all(v is None for v in values):
            continue
        row = [label]
        for s, v in zip(systems, values, strict=True):
            text = "-" if v is None else fmt.format(v)
            stats = (s.get("repeat") or {}).get(path)
            if stats:
                text += f" ± {stats['stdev']:.2g}"
                if stats["flagged"]:
                    text += " (!)"
            row.append(text)
        row += [compare(ref_name, values[ref], values[i], lower) for i in others]
        rows.append(row)
    sla_names = sorted({k for s in systems for k in (s.get("sla") or {})})
    for metric in sla_names:
        row = [f"SLA {metric}"]
        for s in systems:
            v = (s.get("sla") or {}).get(metric)
            if v is None or v["pass"] is None:
                row.append("n/a")
            else:
                row.append("pass" if v["pass"] else "FAIL")
        row += [""] * (len(systems) - 1)
        rows.append(row)
    return header, rows


def render_table(report: dict[str, Any], console: Any | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    sc = report["scenario"]
    title = f"feedline bench: {sc['name']}" + (
        "  (PARTIAL: interrupted)" if report["partial"] else ""
    )
    header, rows = table_rows(report)
    table = Table(title=title, caption=_caption(report))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in report.get("notes", []):
        console.print(f"[yellow]note[/] {escape(note)}")
    for s in report["systems"]:
        for note in s.get("notes", []):
            console.print(f"[yellow]note[/] {s['system']}: {escape(note)}")
        for ex in s.get("error_examples", [])[:2]:
            console.print(f"[red]error[/] {s['system']}: {escape(ex)}")
    flagged = [
        f"{s['system']} {fig}"
        for s in report["systems"]
        for fig, st in (s.get("repeat") or {}).items()
        if st["flagged"]
    ]
    if flagged:
        console.print(
            f"[yellow]spread > 5% across {report['repeat']} runs:[/] " + ", ".join(flagged)
        )


#: Columns of the per-rank table: (label, dotted path, format).
RANK_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("AU", "au", "{:.3f}"),
    ("stall (s)", "stall_s", "{:.2f}"),
    ("samples", "samples", "{:.0f}"),
    ("p50 (ms)", "latency.p50_ms", "{:.2f}"),
    ("p99 (ms)", "latency.p99_ms", "{:.2f}"),
    ("p99.9 (ms)", "latency.p99.9_ms", "{:.2f}"),
    ("errors", "errors", "{:.0f}"),
    ("mismatches", "mismatches", "{:.0f}"),
    ("duration (s)", "duration_s", "{:.2f}"),
)


def rank_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-rank table: each rank, then the job."""
    header = ["system", "rank", "node"] + [label for label, _, _ in RANK_COLUMNS]
    rows: list[list[str]] = []
    for s in report["systems"]:
        if s.get("status") == "skipped":
            continue
        for r in s.get("ranks", []):
            rows.append([s["system"], str(r["rank"]), str(r["node"]), *_cells(r)])
        slowest = s.get("slowest_rank") or {}
        rows.append([s["system"], "job", f"slowest: rank {slowest.get('rank', '-')}", *_cells(s)])
    return header, rows


def _cells(result: dict[str, Any]) -> list[str]:
    cells = []
    for _, path, fmt in RANK_COLUMNS:
        v = _value(result, path)
        cells.append("-" if v is None else fmt.format(v))
    return cells


def render_ranks(report: dict[str, Any], console: Any | None = None) -> None:
    """Per-rank rows and the job row of a ``--nproc`` run; the job's AU is
    compute over the slowest rank's duration (MLPerf Storage), its
    percentiles pool every rank's reads."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    layout = report["ranks"]
    table = Table(
        title=f"{layout['nnodes']} node(s) x {layout['nproc']} rank(s) x "
        f"{layout['workers']} worker(s)",
        caption="job: AU = compute over the slowest rank's duration; percentiles pooled",
    )
    header, rows = rank_rows(report)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for s in report["systems"]:
        rep = s.get("slowest_replica")
        if rep:
            console.print(
                f"{s['system']}: slowest replica {escape(str(rep['replica']))} "
                f"(p99.9 {rep['p99.9_ms']:.2f} ms, seen by rank {rep['rank']})"
            )
        d = s.get("delivery")
        if d:
            console.print(
                f"{s['system']}: {d['delivered']} of {d['planned']} planned samples delivered, "
                f"{d['duplicates']} twice, {d['missing']} missing"
            )


def _caption(report: dict[str, Any]) -> str:
    sc = report["scenario"]
    w = sc["workload"]
    parts = [
        f"{sc['dataset']['objects']} objects, {report['dataset_bytes'] / 1e6:.0f} MB",
        f"{sc['replicas']['count']} {sc['replicas']['kind']} replicas",
        f"{w['readers']} readers, batch {w['batch_size']}, {w['access']}",
        f"compute {w['compute']}",
        f"{sc['load']['mode']} loop",
    ]
    if report["repeat"] > 1:
        parts.append(f"mean ± stdev of {report['repeat']} runs")
    return "; ".join(parts)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, p)


def _json_default(value: Any) -> Any:
    return repr(value)


# -- plots ----------------------------------------------------------------------


def write_plots(report: dict[str, Any], directory: str | os.PathLike[str]) -> list[str]:
    """latency_cdf.png, throughput.png, au.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    systems = [s for s in report["systems"] if s.get("status") != "skipped"]
    written: list[str] = []

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for s in systems:
        cdf = (s.get("latency") or {}).get("cdf_ms") or []
        if cdf:
            ax.plot([max(ms, 1e-3) for _, ms in cdf], [p / 100 for p, _ in cdf], label=s["system"])
        co = (s.get("latency_co") or {}).get("cdf_ms") or []
        if co:
            ax.plot(
                [max(ms, 1e-3) for _, ms in co],
                [p / 100 for p, _ in co],
                linestyle="--",
                label=f"{s['system']} (CO-corrected)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("read latency (ms, log scale)")
    ax.set_ylabel("fraction of reads")
    ax.set_title(f"Read latency CDF: {report['scenario']['name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    written.append(str(out / "latency_cdf.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    longest = 0.0
    for s in systems:
        tl = s.get("timeline") or []
        longest = max(longest, float(len(tl)))
        ax.plot([p["t_s"] + 0.5 for p in tl], [p["mb_per_s"] for p in tl], label=s["system"])
    shown = 0
    for w in report.get("fault_windows", []):
        end = longest if w["end_s"] is None else min(w["end_s"], longest)
        if w["start_s"] >= end:
            continue  # the run ended before this fault began
        ax.axvspan(
            w["start_s"],
            end,
            color="red",
            alpha=0.12,
            label="fault window" if shown == 0 else None,
        )
        ax.text(
            w["start_s"],
            0.02,
            " " + w["label"],
            fontsize=8,
            va="bottom",
            color="darkred",
            transform=ax.get_xaxis_transform(),
        )
        shown += 1
    ax.set_xlabel("time since start of the system's run (s)")
    ax.set_ylabel("MB/s delivered")
    ax.set_title("Throughput per second (fault windows shaded)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    written.append(str(out / "throughput.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    names = [s["system"] for s in systems]
    aus = [s.get("au") or 0.0 for s in systems]
    errs = [((s.get("repeat") or {}).get("au") or {}).get("stdev", 0.0) for s in systems]
    bars = ax.bar(
        names, aus, yerr=errs, color=["#2a9d8f", "#e76f51", "#264653", "#f4a261"][: len(names)]
    )
    for bar, au in zip(bars, aus, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, au + 0.01, f"{au:.3f}", ha="center")
    au_min = report["scenario"]["sla"].get("au_min")
    if au_min is not None:
        ax.axhline(au_min, color="black", linestyle=":", label=f"SLA au_min {au_min}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("AU = compute time / total time")
    ax.set_title("Accelerator utilization (first step excluded)")
    written.append(str(out / "au.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


# -- live display ---------------------------------------------------------------


class LiveProgress:
    """A rich live line per system: steps, samples/s, MB/s, running p99, errors."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self._rows: dict[str, dict[str, float]] = {}
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()
        self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=4)

    def _render(self) -> Any:
        from rich.table import Table

        t = Table(box=None, pad_edge=False)
        for col in ("system", "step", "samples/s", "MB/s", "running p99 ms", "errors"):
            t.add_column(col, justify="right")
        with self._lock:
            for name, r in self._rows.items():
                t.add_row(
                    name,
                    f"{int(r['steps'])}/{self._totals[name]}",
                    f"{r['samples_per_s']:.0f}",
                    f"{r['mb_per_s']:.1f}",
                    f"{r['p99_ms']:.2f}",
                    f"{int(r['errors'])}",
                )
        return t

    def update(self, name: str, rec: Recorder, total_steps: int) -> None:
        snap = rec.running()
        with self._lock:
            self._rows[name] = snap
            self._totals[name] = total_steps

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)
