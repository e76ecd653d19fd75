"""Fleet routing, simulated: 1,000 clients x 16 replicas through feedline's
router on a virtual clock (``rust/core/src/route/fleet.rs``), two replicas
dying and coming back, against a ketama ring (``uhashring``) on the same
trace in the same run. Prints the tables and draws docs/fleet_routing.svg.

Run: ``.venv/bin/python benches/fleet_routing.py`` (``--clients 100`` for a
quick look; `--runs FILE` keeps the runs, and re-plots from them when the
file exists). The simulation is seeded: the figures repeat run to run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = [
    "cargo",
    "run",
    "--quiet",
    "--release",
    "-p",
    "feedline-core",
    "--example",
    "fleet_routing",
    "--",
]
# (title, flags): per-client routers (each process its own, as feedline
# runs today) and one router seeing every client's reads (a node-level
# router or proxy: the fleet's load in one view).
WORKLOADS = [
    ("training epochs, per-client routers", ["--popularity", "shuffled"]),
    ("hot shards (Zipf 0.8), per-client routers", ["--popularity", "zipf:0.8"]),
    ("hot shards (Zipf 0.8), one shared router", ["--popularity", "zipf:0.8", "--shared"]),
]


def example(*args: str) -> str:
    return subprocess.run(
        [*EXAMPLE, *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def ketama_placement(described: dict[str, Any], path: Path) -> None:
    """Writes "home degraded" per object: the ring's node with every replica
    up, and with the outage's replicas removed from the ring."""
    from uhashring import HashRing

    names: list[str] = described["names"]
    dead = set(described["spec"]["outage"]["replicas"])
    index = {name: i for i, name in enumerate(names)}
    full = HashRing(nodes=names)
    degraded = HashRing(nodes=[n for i, n in enumerate(names) if i not in dead])
    lines = (
        f"{index[full.get_node(k)]} {index[degraded.get_node(k)]}\n" for k in described["keys"]
    )
    path.write_text("".join(lines))


def per_second(
    run: dict[str, Any], spec: dict[str, Any]
) -> tuple[list[float], list[float], list[float]]:
    """Per second: time, peak/mean in-flight over the live replicas, affinity."""
    per = max(1, 1000 // spec["window_ms"])
    outage = spec["outage"]
    times, ratios, affinity = [], [], []
    windows = run["windows"]
    for start in range(0, len(windows) - per + 1, per):
        chunk = windows[start : start + per]
        t_ms = start * spec["window_ms"]
        down = set(outage["replicas"]) if outage["down_ms"] <= t_ms < outage["up_ms"] else set()
        busy = [
            sum(w["busy_ms"][r] for w in chunk) for r in range(spec["replicas"]) if r not in down
        ]
        reads = sum(w["reads"] for w in chunk)
        times.append(t_ms / 1000)
        ratios.append(max(busy) / (sum(busy) / len(busy)) if sum(busy) else 0.0)
        affinity.append(100 * sum(w["kept"] for w in chunk) / reads if reads else 0.0)
    return times, ratios, affinity


def plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "feedline"
    fig, axes = plt.subplots(
        2, len(results), figsize=(6 * len(results), 7), sharex=True, squeeze=False
    )
    for col, (title, doc) in enumerate(results.items()):
        spec = doc["spec"]
        outage = spec["outage"]
        for run in doc["runs"]:
            t, ratio, affinity = per_second(run, spec)
            axes[0][col].plot(t, ratio, label=run["name"], linewidth=1.2)
            axes[1][col].plot(t, affinity, label=run["name"], linewidth=1.2)
        for row in (0, 1):
            ax = axes[row][col]
            ax.axvspan(
                outage["down_ms"] / 1000,
                outage["up_ms"] / 1000,
                color="grey",
                alpha=0.15,
                linewidth=0,
            )
            ax.grid(alpha=0.3)
        axes[0][col].axhline(1.25, color="black", linestyle=":", linewidth=1)
        axes[1][col].axhline(90, color="black", linestyle=":", linewidth=1)
        axes[0][col].set_title(
            f"{title}, {spec['clients']} x {spec['in_flight']} in flight\n"
            f"(grey: replicas {outage['replicas']} down)",
            fontsize=10,
        )
        axes[0][col].set_ylabel("peak / mean reads in flight (live replicas, 1 s)")
        axes[1][col].set_ylabel("reads that kept their affinity (%)")
        axes[1][col].set_xlabel("virtual time (s)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{spec['replicas']} replicas, feedline's router on a virtual clock vs ketama")
    fig.tight_layout()
    if out.suffix == ".svg":
        fig.savefig(out, metadata={"Date": None})
    else:
        fig.savefig(out, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "fleet_routing.svg")
    parser.add_argument("--runs", type=Path, help="JSON of the runs: written, or read to re-plot")
    args = parser.parse_args()
    if args.runs and args.runs.exists():
        plot(json.loads(args.runs.read_text()), args.plot)
        return 0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for title, flags in WORKLOADS:
            common = ["--clients", str(args.clients), *flags]
            described = json.loads(example(*common, "--describe"))
            ring = Path(tmp) / "ketama.txt"
            ketama_placement(described, ring)
            out = Path(tmp) / "runs.json"
            print(example(*common, "--ketama", str(ring), "--json", str(out)))
            results[title] = json.loads(out.read_text())
    if args.runs:
        args.runs.write_text(json.dumps(results))
    plot(results, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
