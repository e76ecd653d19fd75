"""Optional dependencies ("extras"): a command that needs one says which
``pip install`` brings it, instead of failing with a traceback. The extras
and their packages are read from the installed package's metadata, so they
are declared once, in pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class MissingExtraError(ImportError):
    """A command needs packages of an extra that is not installed."""


def packages(extra: str) -> list[str]:
    """The distributions the extra ``extra`` of feedline declares; empty
    when feedline's metadata is not installed (a source checkout)."""
    try:
        requires = importlib.metadata.requires("feedline") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found = []
    for requirement in requires:
        marker = _EXTRA_MARKER.search(requirement)
        name = _NAME.match(requirement)
        if marker and name and marker.group(1) == extra:
            found.append(name.group(1))
    return found


def missing(extra: str) -> list[str]:
    """The extra's distributions whose module does not import here."""
    return [
        dist
        for dist in packages(extra)
        if importlib.util.find_spec(dist.lower().replace("-", "_")) is None
    ]


def require(extra: str, command: str) -> None:
    """Raises :class:`MissingExtraError` naming the install command when
    ``command`` cannot run without the extra ``extra``."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{command} needs {', '.join(absent)} (the {extra!r} extra): "
            f"pip install 'feedline[{extra}]'"
        )
