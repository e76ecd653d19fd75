"""Shared pytest fixtures."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from feedline.testing.nginx import NginxReplicas, nginx_binary
from feedline_helpers import pattern, prefetch_threads, wait_for


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


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., tuple[str, bytes]]:
    def make(name: str = "data.bin", size: int = 100_000, seed: int = 0) -> tuple[str, bytes]:
        data = pattern(size, seed)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return os.fspath(path), data

    return make


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    """Fails the test if it leaves a prefetch thread running."""
    gc.collect()
    before = prefetch_threads()
    yield None
    gc.collect()
    assert wait_for(lambda: prefetch_threads() <= before), (
        f"{prefetch_threads() - before} feedline-prefetch thread(s) outlived the test"
    )
