"""Packaging: a command that needs an extra names the pip install that
brings it. (The wheel itself is built, installed into a fresh virtualenv
and used there by `make wheel-smoke`, part of `make test`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib
from feedline import _extras

ROOT = Path(__file__).resolve().parents[2]


def test_the_extras_are_read_from_the_package_metadata() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra, requirements in declared["optional-dependencies"].items():
        names = [r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements]
        assert _extras.packages(extra) == names, extra


def test_bench_without_its_extra_says_what_to_install_not_a_traceback() -> None:
    # The interpreter cannot import rich (a None entry in sys.modules is
    # Python's "this module is absent"), as in a virtualenv without it.
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from feedline.cli import main\n"
        "raise SystemExit(main(['bench', '--check']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done
    assert "pip install 'feedline[bench]'" in done.stderr and "rich" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
