"""Fixtures shared by the feedline test suite."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from feedline_helpers import pattern, prefetch_threads, wait_for


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
