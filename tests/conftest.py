"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from feedline.testing.nginx import NginxReplicas, nginx_binary


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    """The nginx binary. Missing: skip locally, fail in CI (CI must run the
    HTTP tests; `make test` installs nginx as root)."""
    binary = nginx_binary()
    if binary is None:
        reason = "nginx is not installed (apt-get install nginx, or run `make system-deps` as root)"
        if _in_ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return binary


@pytest.fixture
def nginx_replicas(nginx_bin: str) -> Iterator[Callable[..., NginxReplicas]]:
    """``start(root_dir, n=3, **kwargs)`` -> running :class:`NginxReplicas`,
    all stopped and cleaned up when the test ends (also on failure)."""
    del nginx_bin
    with ExitStack() as stack:

        def start(root_dir: str | os.PathLike[str], n: int = 3, **kwargs: Any) -> NginxReplicas:
            return stack.enter_context(NginxReplicas(root_dir, n, **kwargs))

        yield start
