"""Shared pytest fixtures."""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
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


@dataclass(frozen=True)
class S3Server:
    """A local S3 API endpoint and credentials it accepts."""

    endpoint: str
    key: str = "AKIAFEEDLINETEST"
    secret: str = "feedline-test-secret"
    region: str = "us-east-1"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
        )

    def options(self) -> dict[str, Any]:
        """fsspec-style ``storage_options`` for ``feedline.FileSystem``."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a loopback port for the session; stopped (and
    killed if it will not stop) at the end, also on failure. Missing moto:
    skip locally, fail in CI (`make test` installs it)."""
    if importlib.util.find_spec("moto") is None:
        reason = "moto is not installed (pip install -r requirements-dev.txt)"
        if _in_ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
