"""The nginx replica rig itself: start, range reads, stop/kill/pause, cleanup."""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from feedline.testing import NginxReplicas


def _get(
    url: str, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_replicas_serve_ranges_and_clean_up(tmp_path: Path, nginx_replicas) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(100_000)
    (tmp_path / "blob").write_bytes(data)
    r = nginx_replicas(tmp_path, 3)
    assert len(r.urls) == 3 and len(set(r.urls)) == 3
    assert all(p > 0 for p in r.pids)
    for url in r.urls:
        assert _get(url, "/blob") == (200, data)
        status, body = _get(url, "/blob", {"Range": "bytes=10-19"})
        assert (status, body) == (206, data[10:20])
        assert _get(url, "/missing")[0] == 404
        assert _get(url, "/__feedline_500")[0] == 500
        assert _get(url, "/__feedline_forbidden/x")[0] == 403
    base = r._base
    r.close()
    assert base is not None and not os.path.exists(base)


def test_kill_refuses_pause_hangs_resume_answers(tmp_path: Path, nginx_replicas) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f").write_bytes(b"x" * 10)
    r = nginx_replicas(tmp_path, 2)
    r.pause(0)
    with pytest.raises(OSError):  # socket.timeout: accepted, never answered
        _get(r.url(0), "/f", timeout=0.3)
    r.resume(0)
    assert _get(r.url(0), "/f") == (200, b"x" * 10)
    r.kill(1)
    assert r.pids[1] == 0
    with pytest.raises(ConnectionRefusedError):
        _get(r.url(1), "/f")
    r.start(1)
    assert _get(r.url(1), "/f") == (200, b"x" * 10)
    r.stop(0)
    with pytest.raises(ConnectionRefusedError):
        _get(r.url(0), "/f")


def test_cleanup_on_failure_and_bad_arguments(tmp_path: Path, nginx_bin: str) -> None:
    del nginx_bin
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), NginxReplicas(tmp_path, 2) as r:
        pids = r.pids
        raise RuntimeError("boom")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ValueError, match="not a directory"):
        NginxReplicas(tmp_path / "nope", 1)
    with pytest.raises(ValueError, match="n must be"):
        NginxReplicas(tmp_path, 0)
