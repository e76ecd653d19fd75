"""The ``feedline`` command. Each subcommand lives in its own module with a
``register(subparsers)`` that adds its parser and sets ``run``; adding one
is one line in ``_SUBCOMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules with `register(subparsers)`; imported lazily so `feedline proxy`
# does not pay for the bench harness's imports and vice versa.
_SUBCOMMANDS = ("feedline.bench.cli", "feedline.testing.proxy_cli")


def main(argv: Sequence[str] | None = None) -> int:
    from feedline import __version__

    parser = argparse.ArgumentParser(prog="feedline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"feedline {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    args = parser.parse_args(argv)
    from feedline._extras import MissingExtraError

    try:
        return int(args.run(args) or 0)
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
