"""The ``feedline`` command. Each subcommand lives in its own module and adds
itself with ``register(subparsers)``; this file only wires them up."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from feedline import __version__
    from feedline.bench import cli as bench_cli

    parser = argparse.ArgumentParser(
        prog="feedline",
        description="feedline: the data path between storage and the GPU.",
    )
    parser.add_argument("--version", action="version", version=f"feedline {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    code: int = func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
