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


def _directives(conf: str, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Every value each directive in ``names`` takes in ``conf``, comments skipped."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for line in conf.splitlines():
        words = line.split("#", 1)[0].replace(";", " ").split()
        if len(words) == 2 and words[0] in found:
            found[words[0]].append(words[1])
    return found


def _assert_no_nagle_behind_sendfile(conf: str) -> None:
    # With sendfile and tcp_nopush on, nginx turns TCP_NODELAY off to cork a
    # response and uncorks with Nagle on: the tail of a response of 1-2 MSS
    # then waits for the client's delayed ACK (~40 ms on Linux) whenever a
    # kept-alive connection is out of quick-ACK mode -- a stall of the rig
    # that every ranged-read test and bench would measure as the client's.
    d = _directives(conf, ("sendfile", "tcp_nopush", "tcp_nodelay"))
    assert d["sendfile"], conf
    if "on" in d["sendfile"]:
        assert "on" not in d["tcp_nopush"], d
    assert "off" not in d["tcp_nodelay"], d


def test_rig_nginx_sends_a_response_tail_without_waiting_for_an_ack(
    tmp_path: Path,
    nginx_replicas,  # type: ignore[no-untyped-def]
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    r = nginx_replicas(tmp_path, 1)
    conf = Path(r._replicas[0].prefix, "nginx.conf").read_text(encoding="utf-8")
    _assert_no_nagle_behind_sendfile(conf)
    assert _get(r.url(0), "/f") == (200, b"x")  # nginx accepted that config


def test_netns_rig_nginx_sends_a_response_tail_without_waiting_for_an_ack() -> None:
    from feedline.testing import netns

    _assert_no_nagle_behind_sendfile(netns.nginx_config("/w", "10.0.0.1", 80, "/r"))
