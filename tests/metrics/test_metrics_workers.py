"""The Prometheus endpoint during a run with DataLoader workers (fork,
spawn, forkserver) over a spiky replica, and with ranks on one node: each
worker's requests, hedges and exposed stall are counted once, a dead
worker's counts survive, and OpenTelemetry's in-memory reader sees the same
figures."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feedline
import feedline.metrics as fm
import pytest

torch = pytest.importorskip("torch")
prometheus_parser = pytest.importorskip("prometheus_client.parser")
pytest.importorskip("opentelemetry.sdk.metrics")

from metrics_workload import WorkerReads, local_figures, make_replicas, read_share  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[fm.MetricsServer]:
    monkeypatch.setenv(fm.DIR_ENV, str(tmp_path / "metrics"))
    monkeypatch.setenv(fm.FLUSH_ENV, "0.2")
    with fm.serve(port=0) as s:
        yield s


def scrape(server: fm.MetricsServer) -> dict[str, float]:
    """Every sample of the endpoint, parsed by prometheus_client, summed over
    label sets (`name{label=value}` kept too for per-replica figures)."""
    text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if s.labels:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def run_loader(
    tmp_path: Path, context: str, server: fm.MetricsServer
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The workers' reports, and a scrape taken while the run goes on
    (after the first worker reported, before the loader finished)."""
    roots, keys = make_replicas(tmp_path / "data", 40)
    loader = DataLoader(
        WorkerReads(roots, keys),
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
    )
    reports, during = [], {}
    for report in loader:
        if not reports:
            during = scrape(server)
        reports.append(report)
    return reports, during


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_workers_requests_hedges_and_stall_are_counted_once(
    tmp_path: Path, server: fm.MetricsServer, context: str
) -> None:
    # The parent reads before forking: a forked worker must not report the
    # parent's figures again.
    roots, keys = make_replicas(tmp_path / "parent", 10)
    parent = read_share(roots, keys, keys)
    assert parent["reads"] > 0
    before = scrape(server)
    if context == "forkserver":
        # A forkserver an earlier test started kept that test's environment
        # (no metrics directory, or another one): its workers would report
        # elsewhere. Start afresh, as a job does that calls serve() first.
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # type: ignore[attr-defined]
    reports, during = run_loader(tmp_path, context, server)
    assert len(reports) == 2 and len({r["pid"] for r in reports}) == 2
    assert all(r["pid"] != os.getpid() for r in reports)
    after = scrape(server)
    mine = local_figures()
    workers = [r["figures"] for r in reports]

    def everyone(name: str) -> float:
        return mine.get(name, 0.0) + sum(w.get(name, 0.0) for w in workers)

    # Each worker's own stats() and its core figures agree...
    for r in reports:
        assert r["figures"]["feedline_reads_total"] == r["reads"]
        assert r["figures"]["feedline_hedges_won_total"] == r["hedges_won"]
        assert r["figures"]["feedline_hedges_sent_total"] == r["hedges_sent"]
        stall = r["figures"]["feedline_stream_stall_seconds_total"]
        assert 0 < stall <= r["python_waited_s"]
    assert sum(r["hedges_won"] for r in reports) >= 1, reports
    # ...and the endpoint counts every process once: this one live, the
    # workers (exited by now) from their last files.
    for name in [
        "feedline_reads_total",
        "feedline_hedges_sent_total",
        "feedline_hedges_won_total",
        "feedline_stream_stalls_total",
        "feedline_stream_chunks_total",
        "feedline_read_seconds_count",
    ]:
        assert after[name] == pytest.approx(everyone(name))
        assert before.get(name, 0.0) <= during.get(name, 0.0) <= after[name], name
    assert after["feedline_stream_stall_seconds_total"] == pytest.approx(
        everyone("feedline_stream_stall_seconds_total"), rel=1e-9
    )
    worker_reads = sum(r["reads"] for r in reports)
    assert after["feedline_reads_total"] - mine["feedline_reads_total"] == worker_reads
    # Per-replica requests by outcome add up to what the workers sent.
    sent = sum(r["requests"] for r in reports) + mine.get("feedline_replica_requests_total", 0)
    assert after["feedline_replica_requests_total"] == pytest.approx(sent)
    # Exited workers have nothing in flight.
    assert after.get("feedline_replica_in_flight", 0) == 0
    # The same figures through OpenTelemetry's SDK and its in-memory reader.
    otel = read_otel()
    assert otel["feedline_reads"] == after["feedline_reads_total"]
    assert otel["feedline_hedges_won"] == after["feedline_hedges_won_total"]
    assert otel["feedline_stream_stall_seconds"] == pytest.approx(
        after["feedline_stream_stall_seconds_total"]
    )
    assert otel["feedline_read_seconds_count"] == after["feedline_read_seconds_count"]


def read_otel() -> dict[str, float]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        fm.otel(provider)
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    assert data is not None
    out: dict[str, float] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    if "quantile" in point.attributes:
                        continue
                    out[metric.name] = out.get(metric.name, 0.0) + point.value
    return out


def _read_and_die(roots: list[str], keys: list[str], conn: Any) -> None:
    report = read_share(roots, keys, keys)
    fm.flush()
    conn.send(report)
    conn.close()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_killed_worker_keeps_what_it_wrote(tmp_path: Path, server: fm.MetricsServer) -> None:
    roots, keys = make_replicas(tmp_path / "data", 8)
    before = scrape(server)
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    worker = ctx.Process(target=_read_and_die, args=(roots, keys, child_end))
    worker.start()
    report = parent_end.recv()
    worker.join(timeout=60)
    assert worker.exitcode == -signal.SIGKILL
    after = scrape(server)
    assert after["feedline_reads_total"] - before["feedline_reads_total"] == report["reads"]
    assert (
        after["feedline_stream_chunks_total"] - before.get("feedline_stream_chunks_total", 0)
        == report["figures"]["feedline_stream_chunks_total"]
    )
    # A dead process's gauges are not shown (it runs no stream any more).
    assert after.get("feedline_streams", 0) == 0


RANK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from metrics_workload import make_replicas, read_share
from pathlib import Path
roots, keys = make_replicas(Path(sys.argv[2]), 6)
report = read_share(roots, keys, keys)
print(json.dumps({k: report[k] for k in ("reads", "hedges_won")}))
"""


@pytest.mark.timeout(120)
def test_ranks_on_one_node_reach_one_endpoint(tmp_path: Path, server: fm.MetricsServer) -> None:
    import json
    import subprocess
    import sys

    before = scrape(server)
    env = {**os.environ}  # FEEDLINE_METRICS_DIR: each rank writes its file there at exit
    here = str(Path(__file__).parent)
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, here, str(tmp_path / f"rank-{r}")],
            env={**env, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
        )
        for r in range(2)
    ]
    reports = []
    for p in ranks:
        out, _ = p.communicate(timeout=90)
        assert p.returncode == 0
        reports.append(json.loads(out))
    after = scrape(server)
    assert after["feedline_reads_total"] - before.get("feedline_reads_total", 0) == sum(
        r["reads"] for r in reports
    )
    assert after["feedline_hedges_won_total"] - before.get("feedline_hedges_won_total", 0) == sum(
        r["hedges_won"] for r in reports
    )


def test_exited_processes_are_folded_into_one_file_without_loss(
    tmp_path: Path, server: fm.MetricsServer
) -> None:
    roots, keys = make_replicas(tmp_path / "data", 4)
    before = scrape(server)
    ctx = multiprocessing.get_context("fork")
    reads = 0
    for _ in range(3):
        parent_end, child_end = ctx.Pipe()
        worker = ctx.Process(target=_read_and_die, args=(roots, keys, child_end))
        worker.start()
        reads += parent_end.recv()["reads"]
        worker.join(timeout=60)
    for _ in range(2):  # the first scrape folds, the second reads the folded file
        after = scrape(server)
        assert after["feedline_reads_total"] - before["feedline_reads_total"] == reads
    files = sorted(p.name for p in server.directory.glob("*.json"))
    assert fm.RETIRED in files
    assert len(files) <= 2, files  # retired.json and this process's own


def _one_read(path: str, conn: Any) -> None:
    fs = feedline.FileSystem(skip_instance_cache=True)
    conn.send(len(fs.cat_file(path)))
    conn.close()


@pytest.mark.timeout(120)
def test_forking_while_another_thread_reads_never_hangs_the_child(tmp_path: Path) -> None:
    # The child forgets its parent's figures at fork: a lock some parent
    # thread held then must not hang it.
    path = tmp_path / "x.bin"
    path.write_bytes(b"r" * 4096)
    fs = feedline.FileSystem(skip_instance_cache=True)
    stop = threading.Event()

    def read_forever() -> None:
        while not stop.is_set():
            fs.cat_file(str(path))
            fs.stats(reset=True)

    reader = threading.Thread(target=read_forever)
    reader.start()
    ctx = multiprocessing.get_context("fork")
    try:
        for _ in range(20):
            parent_end, child_end = ctx.Pipe()
            child = ctx.Process(target=_one_read, args=(str(path), child_end))
            child.start()
            assert parent_end.poll(30), "a forked child hung"
            assert parent_end.recv() == 4096
            child.join(timeout=30)
            assert child.exitcode == 0
    finally:
        stop.set()
        reader.join(timeout=30)
