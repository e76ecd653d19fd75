"""fsspec's own conformance suites (``fsspec.tests.abstract``, shipped in
the fsspec wheel) against ``FileSystem()`` (local paths as given) and
``FileSystem(replicas=[...])`` (two local replicas: every write lands in
both, every read is routed).

fsspec ships no abstract suite for ``mv`` (``fsspec/tests/abstract/mv.py``
holds tests of the local filesystem only); ``mv`` is fsspec's copy then
rm, and tests/test_fsspec_contract.py checks it on both kinds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)


class Target:
    """A FileSystem and the path the suites work under; for replicas, also
    the roots, so each test can check that the replicas agree."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.roots: list[Path] = []
        if kind == "local":
            self.fs = feedline.FileSystem()
            self.path = str(tmp / "remote")
            os.makedirs(self.path)
        else:
            self.roots = [tmp / "replica-0", tmp / "replica-1"]
            for root in self.roots:
                root.mkdir()
            self.fs = feedline.FileSystem([str(r) for r in self.roots])
            # Keys are relative to the replica roots; the suites' scenarios
            # live under one top-level directory of the replica set.
            self.path = "suite"

    def assert_replicas_agree(self) -> None:
        if not self.roots:
            return
        trees = [
            sorted(
                (str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
                for p in root.rglob("*")
            )
            for root in self.roots
        ]
        assert trees[0] == trees[1], "the replicas hold different trees after a write"


class FeedlineFixtures(AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture(params=["local", "replicas"])
    def target(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
        target = Target(request.param, tmp_path)
        yield target
        target.assert_replicas_agree()

    @pytest.fixture
    def fs(self, target: Target) -> feedline.FileSystem:
        return target.fs

    @pytest.fixture
    def fs_path(self, target: Target) -> str:
        return target.path

    @pytest.fixture
    def fs_join(self) -> Any:
        return os.path.join


class TestFeedlineGet(FeedlineFixtures, AbstractGetTests):  # type: ignore[misc]
    pass


class TestFeedlineOpen(FeedlineFixtures, AbstractOpenTests):  # type: ignore[misc]
    pass


class TestFeedlineCopy(FeedlineFixtures, AbstractCopyTests):  # type: ignore[misc]
    pass


class TestFeedlinePut(FeedlineFixtures, AbstractPutTests):  # type: ignore[misc]
    pass


class TestFeedlinePipe(FeedlineFixtures, AbstractPipeTests):  # type: ignore[misc]
    pass
