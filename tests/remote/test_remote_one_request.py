"""Whole-object reads over HTTP take one request per object: the size comes
with the bytes (``Range: bytes=0-``, total from ``Content-Range``) or from the
manifest, never from a HEAD first. Counted in real nginx access logs; every
byte checked; a stopped (SIGSTOP) replica is a gray failure the caller never
sees."""

from __future__ import annotations

import concurrent.futures
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import feedline
import pytest
from feedline.testing import NginxReplicas
from test_remote import LyingServer

pytestmark = pytest.mark.nginx

#: `combined` log lines: `... "GET /key HTTP/1.1" 206 1234 ...`.
REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


def _logged(
    root: Path, log: Path, n: int, nginx_replicas: Callable[..., NginxReplicas]
) -> list[str]:
    """``n`` replicas of ``root`` that append every request to ``log``."""
    replicas = nginx_replicas(root, n, extra_config=f"        access_log {log} combined;\n")
    return list(replicas.urls)


#: Path of the request `_mark` sends to replica ``i``.
MARK = "/__feedline_mark_{}"


def _mark(log: Path, urls: list[str]) -> None:
    """Puts a marker line from every replica in ``log`` after the requests
    so far. nginx writes a request's line when it finishes the request, which
    can be after the client has its response, so truncating the log after
    ``FileSystem(...)`` returns races a late line in; one worker per replica
    logs a request before it reads the next, so a replica's marker follows
    all its earlier lines."""
    for i, url in enumerate(urls):
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url.rstrip("/") + MARK.format(i), timeout=10)
    deadline = time.monotonic() + 10
    wanted = {MARK.format(i) for i in range(len(urls))}
    while wanted - {path for _, path, _ in _lines(log)}:
        assert time.monotonic() < deadline, f"markers {wanted} not logged in 10 s"
        time.sleep(0.01)


def _lines(log: Path) -> list[tuple[str, str, int]]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        m = REQUEST_LINE.search(line)
        assert m, line
        out.append((m.group(1), m.group(2), int(m.group(3))))
    return out


def _requests(log: Path) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request logged after the last marker."""
    lines = _lines(log)
    marks = [i for i, (_, path, _) in enumerate(lines) if path.startswith(MARK.format(""))]
    return lines[marks[-1] + 1 :] if marks else lines


def _dataset(root: Path, n: int) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        key = f"obj{i:03d}.bin"
        data = os.urandom(1 + (i * 48_611) % 400_000)
        (root / key).write_bytes(data)
        files[key] = data
    return files


def test_whole_object_read_is_one_get_per_object(
    tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    files = _dataset(tmp_path / "data", 24)
    (tmp_path / "data" / "empty.bin").write_bytes(b"")
    log = tmp_path / "access.log"
    urls = _logged(tmp_path / "data", log, 3, nginx_replicas)
    fs = feedline.FileSystem(urls)
    _mark(log, urls)  # construction probes each root (one HEAD /)
    for key, data in files.items():
        assert fs.cat_file(key) == data, key
    got = fs.cat_ranges(list(files), None, None)
    assert got == list(files.values())
    requests = _requests(log)
    assert [(m, p) for m, p, _ in requests if m != "GET"] == [], "no HEAD before a GET"
    per_key = Counter(path for _, path, _ in requests)
    assert per_key == Counter({f"/{k}": 2 for k in files}), "one request per read"
    assert {status for _, _, status in requests} == {206}
    # An empty object has no byte 0: nginx answers 200, then a plain GET.
    assert fs.cat_file("empty.bin") == b""
    assert fs.stats()["read_errors"] == 0


def test_manifest_sizes_mean_no_stats_for_reads_or_streams(
    tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    root = tmp_path / "data"
    files = _dataset(root, 12)
    manifest = feedline.write_manifest(root, block_bytes=64 << 10, path=tmp_path / "m.json")
    log = tmp_path / "access.log"
    urls = _logged(root, log, 2, nginx_replicas)
    fs = feedline.FileSystem(urls, manifest=manifest)
    _mark(log, urls)  # construction probes roots and checks the keys (HEADs)
    for key, data in files.items():
        assert fs.cat_file(key) == data
    assert fs.cat_ranges(list(files), None, None) == list(files.values())
    streamed = [bytes(c) for c in fs.stream(list(files), chunk_bytes=1 << 20)]
    assert streamed == list(files.values())
    requests = _requests(log)
    assert [(m, p) for m, p, _ in requests if m != "GET"] == []
    assert len(requests) == 3 * len(files)
    verified = sum(s["verified_bytes"] for s in fs.fault_stats())
    assert verified >= 3 * sum(len(d) for d in files.values())


@pytest.mark.parametrize("n", [1, 2])
def test_info_is_one_request_per_replica_asked(
    n: int, tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    """``info`` is one routed HEAD; with two network replicas the second
    replica confirms the size with one HEAD of its own (asked at the same
    time), so a replica that lies about sizes is outvoted."""
    files = _dataset(tmp_path / "data", 12)
    log = tmp_path / "access.log"
    urls = _logged(tmp_path / "data", log, n, nginx_replicas)
    fs = feedline.FileSystem(urls)
    _mark(log, urls)  # construction's requests are in the log before this
    before = len(_lines(log))
    for key, data in files.items():
        info = fs.info(key)
        assert (info["size"], info["type"]) == (len(data), "file")
    _mark(log, urls)  # each replica's lines so far come before its marker
    requests = [r for r in _lines(log)[before:] if not r[1].startswith(MARK.format(""))]
    per_key = Counter((m, p) for m, p, _ in requests)
    assert per_key == Counter({("HEAD", f"/{k}"): n for k in files}), requests


@pytest.mark.parametrize("mode", ["short", "wrong-range", "wrong-total"])
def test_lying_whole_object_is_retried_elsewhere_never_short(
    mode: str, tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    """A short body or a wrong Content-Range is caught on the one-GET path;
    a consistent lie about the total (a smaller object, well formed) only a
    manifest can catch, and with one it is."""
    data = os.urandom(300_000)
    keys = [f"obj{i}" for i in range(8)]
    root = tmp_path / "data"
    root.mkdir()
    for key in keys:
        (root / key).write_bytes(data)
    real = nginx_replicas(root, 1)
    liar = LyingServer(data, mode, max_requests=2000)
    try:
        options: dict[str, object] = {"retry_budget_floor_per_s": 1000.0}
        if mode == "wrong-total":
            options["manifest"] = feedline.write_manifest(
                root, block_bytes=64 << 10, path=tmp_path / "m.json"
            )
        fs = feedline.FileSystem([liar.url, real.urls[0]], **options)  # type: ignore[arg-type]
        before = liar.requests
        for key in keys:
            assert fs.cat_file(key) == data
        assert fs.cat_ranges(keys, None, None) == [data] * len(keys)
        assert fs.stats()["read_errors"] == 0
        assert liar.requests > before, "the liar was asked and its answers refused"
    finally:
        liar.close()


def test_sigstopped_replica_is_a_gray_failure_the_caller_never_sees(
    tmp_path: Path, nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    """SIGSTOP one of three replicas mid-run: every read still returns the
    right bytes, none waits past its deadline, and the stopped replica's
    reads were hedged away (and it was ejected for losing them)."""
    files = _dataset(tmp_path / "data", 30)
    replicas = nginx_replicas(tmp_path / "data", 3)
    deadline_ms = 10_000.0
    fs = feedline.FileSystem(replicas.urls, hedge_after_ms=20, deadline_ms=deadline_ms)
    keys = list(files)
    stopped = 1
    latencies: list[float] = []
    errors: list[str] = []

    def read(key: str) -> None:
        t = time.perf_counter()
        try:
            ok = fs.cat_file(key) == files[key]
        except OSError as e:
            errors.append(f"{key}: {e!r}")
            return
        latencies.append(time.perf_counter() - t)
        if not ok:
            errors.append(f"{key}: wrong bytes")

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(read, keys))  # before
            replicas.pause(stopped)
            for _ in range(4):  # after: every key, so the stopped one's too
                list(pool.map(read, keys))
    finally:
        replicas.resume(stopped)
    assert errors == []
    assert len(latencies) == 5 * len(keys)
    assert max(latencies) * 1000 < deadline_ms
    stats = fs.stats()
    gray = stats["replicas"][stopped]
    assert gray["cancelled"] > 0, gray  # its attempts were abandoned ...
    assert sum(r["hedges_won"] for r in stats["replicas"]) > 0  # ... for hedges
    assert gray["ejections"] >= 1 and gray["errors"] == 0, gray
    assert stats["read_errors"] == 0
