"""``feedline bench [SCENARIO.toml] [--json PATH] [--report DIR] [--repeat N]
[--nproc N [--nnodes 2] [--workers W] [--link-loss NODE:PERCENT]]``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import replace
from typing import Any

from feedline import _extras
from feedline.bench import report as _report
from feedline.bench import runner
from feedline.bench import scenario as _scenario


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run an end-to-end data-path benchmark under faults",
        description=(
            "Runs a scenario (TOML; the embedded default with no argument): a generated "
            "dataset on replicas with injected faults, read by each system side by side "
            "through an emulated training loop. Prints latency percentiles, AU, stall "
            "time, throughput and verified bytes per system."
        ),
    )
    p.add_argument("scenario", nargs="?", help="scenario file (default: the embedded one)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (schema_version 1)")
    p.add_argument("--report", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="run N times, mean ± stdev")
    p.add_argument(
        "--systems", metavar="A,B", help="override the scenario's systems (comma-separated)"
    )
    p.add_argument("--steps", type=int, metavar="N", help="override [workload] steps")
    p.add_argument("--no-progress", action="store_true", help="no live display")
    p.add_argument(
        "--fail-on-sla", action="store_true", help="exit 1 when a system misses the scenario's SLA"
    )
    p.add_argument(
        "--check", action="store_true", help="validate the scenario and exit without running"
    )
    # Parsed here, not by argparse: a bad value is one line naming it.
    p.add_argument(
        "--nproc",
        metavar="N",
        help="run as N ranks per node through torch.distributed.run (gloo, CPU)",
    )
    p.add_argument(
        "--nnodes",
        metavar="1|2",
        help="with --nproc: 2 runs two nodes as network namespaces joined over TCP (root)",
    )
    p.add_argument(
        "--workers",
        metavar="W",
        help="with --nproc: DataLoader worker processes per rank (default: [torch_dataloader])",
    )
    p.add_argument(
        "--link-loss",
        action="append",
        metavar="NODE:PERCENT",
        help="with --nnodes 2: drop PERCENT%% of the packets on the link to NODE (repeatable)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve feedline's Prometheus metrics on 127.0.0.1:N while the scenario runs",
    )
    p.set_defaults(func=run_command, run=run_command)


def _int_flag(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 10)
    except ValueError:
        raise _scenario.ScenarioError(f"{flag} must be an integer, got {value!r}") from None


def _link_loss(values: list[str] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for value in values or []:
        node, sep, percent = value.partition(":")
        try:
            index, share = int(node, 10), float(percent)
        except ValueError:
            index, share = -1, -1.0
        if not sep or index not in (0, 1) or not 0 <= share <= 100:
            raise _scenario.ScenarioError(
                f"--link-loss must be NODE:PERCENT with NODE 0 or 1 and PERCENT in [0, 100], "
                f"got {value!r}"
            )
        out[index] = share
    return out


def _layout(args: argparse.Namespace, sc: _scenario.Scenario) -> dict[str, Any] | None:
    """``--nproc`` and friends checked; None without ``--nproc``."""
    from feedline.bench import ranks

    nproc = _int_flag("--nproc", args.nproc)
    nnodes = _int_flag("--nnodes", args.nnodes)
    workers = _int_flag("--workers", args.workers)
    if nproc is None:
        used = [f for f, v in (("--nnodes", nnodes), ("--workers", workers)) if v is not None]
        if args.link_loss:
            used.append("--link-loss")
        if used:
            raise _scenario.ScenarioError(f"{', '.join(used)} needs --nproc")
        return None
    nnodes = 1 if nnodes is None else nnodes
    workers = sc.torch_dataloader.workers if workers is None else workers
    ranks.check_layout(nproc, nnodes, workers)
    ranks.check_scenario(sc)
    if args.repeat != 1:
        raise _scenario.ScenarioError("--repeat is not supported with --nproc: run it again")
    loss = _link_loss(args.link_loss)
    if loss and nnodes != 2:
        raise _scenario.ScenarioError("--link-loss needs --nnodes 2 (a link to each node)")
    if nnodes == 2:
        from feedline.bench.nodes import check_support

        check_support()
    return {"nproc": nproc, "nnodes": nnodes, "workers": workers, "link_loss": loss}


def _apply_overrides(sc: _scenario.Scenario, args: argparse.Namespace) -> _scenario.Scenario:
    if args.systems:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
        raw_check = {"systems": names}
        _scenario.parse({**raw_check}, source="--systems")  # same validation, same messages
        sc = replace(sc, systems=tuple(names))
        _scenario.check_systems_fit_load(sc)
    if args.steps is not None:
        if args.steps < 1:
            raise _scenario.ScenarioError(f"--steps must be at least 1, got {args.steps}")
        sc = replace(sc, workload=replace(sc.workload, steps=args.steps, epochs=None))
    return sc


def _run_ranks(
    sc: _scenario.Scenario, layout: dict[str, Any], stop: threading.Event, err: Any
) -> dict[str, Any]:
    from feedline.bench import ranks

    def done(result: dict[str, Any]) -> None:
        au = result.get("au")
        err.print(
            f"  {result['system']}: {result['status']}"
            + (f", job AU {au:.3f}" if isinstance(au, float) else "")
        )

    return ranks.run(sc, stop=stop, on_system_done=done, **layout)


def run_command(args: argparse.Namespace) -> int:
    _extras.require("bench", "feedline bench")
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped or captured: do not squeeze the side-by-side table to 80 columns.
        console = Console(width=160)
    err = Console(stderr=True)
    try:
        sc = _scenario.load(args.scenario) if args.scenario else _scenario.default()
        sc = _apply_overrides(sc, args)
        if args.repeat < 1:
            raise _scenario.ScenarioError(f"--repeat must be at least 1, got {args.repeat}")
        runner.check_runnable(sc)
        layout = _layout(args, sc)
    except (_scenario.ScenarioError, _scenario.NeedsRootError) as exc:
        # Plain print: messages name TOML tables ("[workload]"), not markup.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        console.print(f"{sc.source}: ok ({sc.name}: {', '.join(sc.systems)})")
        return 0

    metrics_server = None
    if args.metrics_port is not None:
        import feedline.metrics

        try:
            metrics_server = feedline.metrics.serve(port=args.metrics_port)
        except (ValueError, OSError, ImportError) as exc:
            print(f"error: --metrics-port: {exc}", file=sys.stderr)
            return 2
        err.print(f"serving metrics at {metrics_server.url}", markup=False)
    try:
        return _run_and_report(sc, layout, args, console, err)
    finally:
        if metrics_server is not None:
            metrics_server.close()


def _run_and_report(
    sc: _scenario.Scenario,
    layout: dict[str, Any] | None,
    args: argparse.Namespace,
    console: Any,
    err: Any,
) -> int:
    stop = threading.Event()
    interrupts = 0

    def on_sigint(signum: int, frame: Any) -> None:
        # First Ctrl-C: stop measuring, write partial results, clean up.
        # Second: the default behaviour (abort now).
        nonlocal interrupts
        interrupts += 1
        stop.set()
        if interrupts > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        err.print("[yellow]interrupted: finishing in-flight reads, writing partial results[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    err.print(f"feedline bench {sc.name}: {sc.description or sc.source}", markup=False)
    live = None if args.no_progress or not err.is_terminal else _report.LiveProgress()
    try:
        if layout is not None:
            try:
                rep = _run_ranks(sc, layout, stop, err)
            except (RuntimeError, _scenario.ScenarioError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        elif live is not None:
            with live:
                rep = runner.run(sc, repeat=args.repeat, progress=live.update, stop=stop)
        else:

            def done(result: dict[str, Any]) -> None:
                au = result.get("au")
                err.print(
                    f"  {result['system']}: {result['status']}"
                    + (f", AU {au:.3f}" if isinstance(au, float) else "")
                )

            rep = runner.run(sc, repeat=args.repeat, stop=stop, on_system_done=done)
    finally:
        signal.signal(signal.SIGINT, previous)
    _report.render_table(rep, console)
    if layout is not None:
        _report.render_ranks(rep, console)
    if args.json:
        _report.write_json(rep, args.json)
        err.print(f"wrote {args.json}")
    if args.report:
        for path in _report.write_plots(rep, args.report):
            err.print(f"wrote {path}")
    if rep["partial"]:
        return 130
    failed = [s["system"] for s in rep["systems"] if s.get("sla_pass") is False]
    if failed:
        err.print(f"SLA missed by: {', '.join(failed)}")
        if args.fail_on_sla:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(0)
