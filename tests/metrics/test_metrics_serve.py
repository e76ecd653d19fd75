"""feedline.metrics.serve: loopback by default, clear refusals, and the
definitions table that exporters and docs are generated from."""

from __future__ import annotations

import gc
import os
import socket
import urllib.request
from pathlib import Path

import feedline
import feedline.metrics as fm
import pytest

pytest.importorskip("prometheus_client")


@pytest.fixture(autouse=True)
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fm.DIR_ENV, str(tmp_path / "metrics"))


@pytest.fixture(autouse=True)
def no_forkserver_yet() -> None:
    """A forkserver an earlier test started would make serve() warn (its
    workers cannot report here): each test starts as a job does, before any."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # type: ignore[attr-defined]


def test_serve_binds_loopback_by_default_and_serves_the_defined_metrics(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"z" * 8192)
    fs = feedline.FileSystem(skip_instance_cache=True)
    assert fs.cat_file(str(tmp_path / "a.bin")) == b"z" * 8192
    with fm.serve(port=0) as server:
        assert server.addr == "127.0.0.1"
        assert server._server.server_address[0] == "127.0.0.1"
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    helps = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    assert helps == {d["name"] for d in fm.DEFINITIONS}
    assert "feedline_reads_total " in text
    assert 'feedline_read_seconds_bucket{le="+Inf",replica="file://"}' in text


@pytest.mark.parametrize("port", [-1, 65536, 70000, "9464", 1.5, True, None])
def test_bad_ports_are_refused_naming_the_value(port: object) -> None:
    with pytest.raises(ValueError, match="port must be an integer") as info:
        fm.serve(port=port)  # type: ignore[arg-type]
    assert repr(port) in str(info.value)


def test_a_port_in_use_is_an_oserror_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            fm.serve(port=port)


def test_snapshot_text_names_only_defined_metrics(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"q" * 4096)
    feedline.FileSystem(skip_instance_cache=True).cat_file(str(tmp_path / "b.bin"))
    text = fm.snapshot()
    names = {line.split("{")[0].split()[0] for line in text.splitlines()}
    assert "feedline_reads_total" in names
    assert names <= {d["name"] for d in fm.DEFINITIONS}
    assert "p99.9=" in text


def test_a_node_cache_reports_its_counters_and_a_stats_reset_does_not_lower_them(
    tmp_path: Path,
) -> None:
    cache = [d["name"] for d in fm.DEFINITIONS if d["name"].startswith("feedline_cache_")]
    assert "feedline_cache_hits_total" in cache and "feedline_cache_misses_total" in cache
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"c" * 10_000)

    def value(name: str) -> float:
        return sum(s["value"] for s in fm.snapshot_dict().get(name, []))

    before = {n: value(n) for n in cache}
    fs = feedline.FileSystem(
        [str(tmp_path / "d")],
        cache_dir=str(tmp_path / "cache"),
        cache_bytes=1 << 30,
        skip_instance_cache=True,
    )
    assert fs.cat_file("a.bin") == fs.cat_file("a.bin") == b"c" * 10_000
    assert set(cache) <= set(fm.snapshot_dict())
    grew = {n: value(n) - before[n] for n in cache}
    assert grew["feedline_cache_misses_total"] == grew["feedline_cache_fills_total"] == 1
    assert grew["feedline_cache_hits_total"] == 1
    assert grew["feedline_cache_fetched_bytes_total"] == 10_000
    assert fs.cache is not None and fs.cache.stats(reset=True)["hits"] == 1
    assert fs.cache.stats()["hits"] == 0
    assert value("feedline_cache_hits_total") - before["feedline_cache_hits_total"] == 1
    # A dropped filesystem's cache keeps what it counted: _totals never go back.
    del fs
    gc.collect()
    assert {n: value(n) - before[n] for n in cache if n.endswith("_total")} == {
        n: v for n, v in grew.items() if n.endswith("_total")
    }


def test_docs_table_is_generated_from_the_definitions() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    begin, end = "<!-- metrics-table:begin -->\n", "<!-- metrics-table:end -->"
    table = docs.split(begin)[1].split(end)[0]
    assert table == fm.definitions_table(), (
        "docs/metrics.md is stale: regenerate its table with "
        "python -c 'import feedline.metrics as m; print(m.definitions_table(), end=\"\")'"
    )


def test_readme_list_is_generated_from_the_definitions() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    begin, end = "<!-- metrics-list:begin -->\n", "<!-- metrics-list:end -->"
    listed = readme.split(begin)[1].split(end)[0]
    assert listed == fm.definitions_list(), (
        "README.md is stale: regenerate its list with "
        "python -c 'import feedline.metrics as m; print(m.definitions_list(), end=\"\")'"
    )


def test_serve_warns_when_a_forkserver_started_before_the_directory_was_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    monkeypatch.delenv(fm.DIR_ENV, raising=False)
    worker = multiprocessing.get_context("forkserver").Process(target=os.getpid)
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0
    with pytest.warns(RuntimeWarning, match="forkserver started before FEEDLINE_METRICS_DIR"):
        server = fm.serve(port=0, directory=tmp_path / "m")
    server.close()
