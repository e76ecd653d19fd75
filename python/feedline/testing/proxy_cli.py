"""``feedline proxy``: the fault proxy in front of any TCP service.

    feedline proxy --listen 127.0.0.1:9000 --upstream 127.0.0.1:8080 \\
        --latency-ms 5 --jitter-ms 2 \\
        --toxic latency:name=spike,direction=upstream,latency_ms=100,toxicity=0.05
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from feedline._core import FaultProxy


def parse_toxic(spec: str, index: int) -> tuple[str, str, str, dict[str, float]]:
    """``KIND[:key=value,...]`` -> (name, kind, direction, params); ``name``
    and ``direction`` are keys too, everything else is a numeric parameter."""
    kind, _, rest = spec.partition(":")
    if not kind:
        raise ValueError(f"--toxic {spec!r}: expected KIND[:key=value,...]")
    name, direction = f"{kind}-{index}", "downstream"
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--toxic {spec!r}: {item!r} is not key=value")
        if key == "name":
            name = value
        elif key == "direction":
            direction = value
        else:
            try:
                params[key] = float(value)
            except ValueError:
                raise ValueError(f"--toxic {spec!r}: {key}={value!r} is not a number") from None
    return name, kind, direction, params


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "proxy",
        help="run the TCP fault proxy (latency, jitter, bandwidth, resets...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--upstream", required=True, help="host:port to forward to")
    p.add_argument("--listen", default="127.0.0.1:0", help="ip:port (default 127.0.0.1:0)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay per chunk")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform around latency")
    p.add_argument("--bandwidth-bytes-per-s", type=int, default=None, help="rate cap")
    p.add_argument(
        "--direction",
        choices=("upstream", "downstream"),
        default="downstream",
        help="direction of the --latency/--bandwidth shortcuts (default downstream)",
    )
    p.add_argument(
        "--toxic",
        action="append",
        default=[],
        metavar="KIND[:key=value,...]",
        help="any toxic, repeatable: latency, bandwidth, slicer, timeout, reset_peer, "
        "slow_close, limit_data (keys: name, direction, the kind's parameters, toxicity)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for jitter and toxicity draws")
    p.add_argument("--allow-non-loopback", action="store_true", help="listen beyond loopback")
    p.add_argument("--duration-s", type=float, default=None, help="exit after this long")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        toxics = [parse_toxic(spec, i) for i, spec in enumerate(args.toxic)]
        proxy = FaultProxy(
            args.upstream,
            args.listen,
            seed=args.seed,
            allow_non_loopback=args.allow_non_loopback,
        )
    except ValueError as e:
        print(f"feedline proxy: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    with proxy:
        try:
            if args.latency_ms or args.jitter_ms:
                proxy.add_toxic(
                    "latency", "latency", args.direction,
                    latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                )  # fmt: skip
            if args.bandwidth_bytes_per_s is not None:
                proxy.add_toxic(
                    "bandwidth", "bandwidth", args.direction,
                    bytes_per_s=args.bandwidth_bytes_per_s,
                )  # fmt: skip
            for name, kind, direction, params in toxics:
                proxy.add_toxic(name, kind, direction, **params)
        except ValueError as e:
            print(f"feedline proxy: {e}", file=sys.stderr)
            return 2
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        names = ", ".join(f"{t['name']} ({t['kind']}, {t['direction']})" for t in proxy.toxics())
        print(
            f"feedline proxy: listening on {proxy.address} -> {proxy.upstream}; "
            f"toxics: {names or 'none'}",
            flush=True,
        )
        stop.wait(args.duration_s)
        stats = proxy.stats()
        print(
            f"feedline proxy: stopped after {stats['connections_accepted']} connections, "
            f"{stats['bytes_upstream']} bytes up, {stats['bytes_downstream']} bytes down",
            flush=True,
        )
    return 0


@contextlib.contextmanager
def proxy_processes(
    upstreams: list[str], toxics: list[list[str]], *, duration_s: float = 3600
) -> Iterator[list[tuple[int, str]]]:
    """One ``feedline proxy`` process per upstream (``host:port``) with the
    given ``--toxic`` specs; yields (pid, URL) per upstream, in order, and
    stops them all on exit. A process of its own keeps the proxy's work off
    the runtime (and the GIL) of any client under test, as in production."""
    procs: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for i, (upstream, extra) in enumerate(zip(upstreams, toxics, strict=True)):
            cmd = [*_CLI, "proxy", "--upstream", upstream, "--seed", str(i)]
            cmd += ["--duration-s", str(duration_s)]
            for spec in extra:
                cmd += ["--toxic", spec]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "listening on " not in line:
                raise RuntimeError(f"feedline proxy did not start: {line!r}")
            urls.append("http://" + line.split("listening on ")[1].split()[0])
        yield [(p.pid, u) for p, u in zip(procs, urls, strict=True)]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)


_CLI = [sys.executable, "-c", "import sys; from feedline.cli import main; sys.exit(main())"]
