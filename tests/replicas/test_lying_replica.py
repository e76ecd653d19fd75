"""A replica that lies about sizes, on every read path, against real
servers: an HTTP proxy in front of nginx that rewrites the
``Content-Length`` of its HEAD answers (and, for the consistent liar, the
total in its ranged GETs' ``Content-Range`` too), with no manifest.

The disagreement is that replica's fault: every path returns the stored
bytes (never short or padded data), and the liar is named in the stats
(``size_disagreements``) and ejected."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
import pytest
from feedline import FileSystem
from feedline._core import Rendezvous
from feedline_helpers import READ_PATHS, lead_to_first_replica

KEYS = 10
SIZE = 48 * 1024
# Far above a round trip, far below the pytest timeout.
DEADLINE_MS = 4000


def _lie(key: str, size: int) -> int:
    """The wrong size the liar gives: smaller for some keys (reads planned
    on it would be short), larger for the others (padded or failed)."""
    return size - 1000 if len(key) % 2 else size + 1000


@contextlib.contextmanager
def lying_proxy(upstream_port: int, consistent: bool = False) -> Iterator[tuple[str, list[int]]]:
    """A threaded HTTP/1.1 proxy to ``127.0.0.1:upstream_port`` that lies
    about every object's size in HEAD answers; with ``consistent``, also in
    the total of its 206 answers' ``Content-Range`` (its bytes stay true).
    Yields its URL and a one-item list counting the HEADs it lied to."""
    heads = [0]
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self, method: str) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=10)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(method, self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                key = self.path.lstrip("/")
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    lname = name.lower()
                    if lname in ("connection", "keep-alive", "transfer-encoding", "server", "date"):
                        continue
                    if lname == "content-length" and method == "HEAD" and resp.status == 200:
                        value = str(_lie(key, int(value)))
                        with lock:
                            heads[0] += 1
                    if lname == "content-range" and consistent:
                        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value)
                        if m:
                            total = _lie(key, int(m[3]))
                            value = f"bytes {m[1]}-{m[2]}/{total}"
                    self.send_header(name, value)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)
            finally:
                conn.close()

        def do_GET(self) -> None:
            self._forward("GET")

        def do_HEAD(self) -> None:
            self._forward("HEAD")

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", heads
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, bytes]:
    data = {}
    for i in range(KEYS):
        body = os.urandom(SIZE)
        name = f"k{i}.bin" if i % 2 else f"key{i}.bin"
        (tmp_path / name).write_bytes(body)
        data[name] = body
    return data


@pytest.mark.parametrize("honest", [1, 2])
@pytest.mark.parametrize("path", list(READ_PATHS))
def test_a_replica_whose_head_lies_about_sizes_is_outvoted_and_ejected(
    path: str, honest: int, dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    nginx = nginx_replicas(tmp_path, honest + 1)
    upstream = int(nginx.url(0).rsplit(":", 1)[1])
    with lying_proxy(upstream) as (liar, heads):
        replicas = [liar, *nginx.urls[1:]]
        lead_to_first_replica(dataset, tmp_path, replicas, SIZE)
        fs = FileSystem(replicas, deadline_ms=DEADLINE_MS, skip_instance_cache=True)
        READ_PATHS[path](fs, dataset)
        stats = fs.stats()
    assert stats["read_errors"] == 0, stats
    assert all(r["size_disagreements"] == 0 for r in stats["replicas"][1:]), stats
    if path == "whole":
        # A whole object's size comes with its bytes (one ranged GET): no
        # HEAD is asked, so there is no lie to catch.
        return
    assert heads[0] >= 1, "the liar was never asked for a size"
    liar_stats = stats["replicas"][0]
    assert liar_stats["size_disagreements"] >= 1, liar_stats
    assert liar_stats["ejections"] >= 1, liar_stats


def test_two_replicas_that_disagree_consistently_fail_naming_both(
    dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    # The liar's HEAD and its GETs' totals agree with each other: with one
    # other replica there is no majority, and no size to trust. The read
    # fails naming both claims; it never returns short or padded bytes.
    nginx = nginx_replicas(tmp_path, 2)
    upstream = int(nginx.url(0).rsplit(":", 1)[1])
    with lying_proxy(upstream, consistent=True) as (liar, heads):
        replicas = [liar, nginx.url(1)]
        lead_to_first_replica(dataset, tmp_path, replicas, SIZE)
        fs = FileSystem(replicas, deadline_ms=DEADLINE_MS, skip_instance_cache=True)
        key = next(k for k in dataset if Rendezvous(replicas).preference_list(k)[0] == 0)
        with pytest.raises(feedline.ReplicasUnavailable) as caught:
            fs.cat_file(key, 500)
        text = str(caught.value)
        assert "disagree" in text and str(SIZE) in text and str(_lie(key, SIZE)) in text, text
        assert heads[0] >= 1


def test_with_a_third_replica_the_consistent_liar_is_outvoted(
    dataset: dict[str, bytes], nginx_replicas: Any, tmp_path: Path
) -> None:
    nginx = nginx_replicas(tmp_path, 3)
    upstream = int(nginx.url(0).rsplit(":", 1)[1])
    with lying_proxy(upstream, consistent=True) as (liar, _):
        replicas = [liar, *nginx.urls[1:]]
        lead_to_first_replica(dataset, tmp_path, replicas, SIZE)
        fs = FileSystem(replicas, deadline_ms=DEADLINE_MS, skip_instance_cache=True)
        READ_PATHS["to_the_end"](fs, dataset)
        READ_PATHS["stream"](fs, dataset)
        stats = fs.stats()
    assert stats["read_errors"] == 0, stats
    assert stats["replicas"][0]["size_disagreements"] >= 1, stats
    assert all(r["size_disagreements"] == 0 for r in stats["replicas"][1:]), stats


def test_parquet_stream_reads_every_row_past_a_lying_replica(
    nginx_replicas: Any, tmp_path: Path
) -> None:
    # Footers are read from the end, which the size places: a wrong size is
    # a footer read at the wrong offset.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from feedline import arrow
    from parquet_data import write_dataset

    paths = write_dataset(tmp_path, files=8, rows_per_file=120, row_group_rows=40, columns=2)
    nginx = nginx_replicas(tmp_path, 2)
    upstream = int(nginx.url(0).rsplit(":", 1)[1])
    keys = [p.name for p in paths]
    with lying_proxy(upstream) as (liar, heads):
        fs = FileSystem([liar, nginx.url(1)], deadline_ms=DEADLINE_MS, skip_instance_cache=True)
        arrow._FOOTER_CACHE.clear()
        stream = arrow.ParquetStream(keys, fs=fs, columns=["row_id", "c1"], batch_rows=50)
        assert stream._sizes == [p.stat().st_size for p in paths]
        got = pa.Table.from_batches(list(stream))
        stats = fs.stats()
    want = pa.concat_tables(pq.read_table(p, columns=["row_id", "c1"]) for p in paths)
    assert got.equals(want)
    assert heads[0] >= 1 and stats["read_errors"] == 0, stats
    # Every size asks both replicas (first choice and second opinion).
    assert stats["replicas"][0]["size_disagreements"] >= 1, stats
