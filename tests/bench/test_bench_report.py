"""End to end: the default scenario scaled down, through the CLI, with the
JSON report (schema_version 1), the plots and --repeat."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import feedline
import pytest
from feedline.bench import runner
from feedline.bench import scenario as sc
from feedline.bench.metrics import Recorder
from feedline.bench.report import compare, table_rows, write_plots
from feedline.bench.systems import has_module
from feedline.cli import main
from feedline_helpers import interrupt_bench

SMALL = """
name = "small"
seed = 4
systems = ["feedline", "fsspec", "fsspec-readahead", "torch-dataloader", "obstore"]
[dataset]
objects = 48
size_bytes = 8192
size_distribution = "uniform"
size_min_bytes = 4096
size_max_bytes = 12288
[replicas]
count = 3
[[faults.replica]]
index = 1
spike_probability = 0.1
spike_ms = 5
[[faults.event]]
at = "0.2s"
action = "kill"
replica = 2
[workload]
readers = 2
batch_size = 4
steps = 30
compute = { distribution = "fixed", ms = 2 }
[sla]
mismatches_max = 0
p99_ms = 10000
"""

#: Top-level keys every report has (docs/bench-json.md).
TOP_KEYS = {
    "metrics",
    "schema_version",
    "feedline_version",
    "started_at",
    "elapsed_s",
    "host",
    "partial",
    "notes",
    "scenario",
    "dataset_bytes",
    "fault_windows",
    "repeat",
    "systems",
    "runs",
}
SYSTEM_KEYS = {
    "system",
    "status",
    "notes",
    "duration_s",
    "steps",
    "samples",
    "bytes",
    "first_batch_ms",
    "samples_per_s",
    "mb_per_s",
    "stall_s",
    "compute_s",
    "au",
    "au_per_epoch",
    "cache",
    "latency",
    "latency_co",
    "errors",
    "error_examples",
    "verified_bytes",
    "mismatches",
    "peak_rss_mb",
    "timeline",
    "requests",
    "retries",
    "hedges_sent",
    "hedges_won",
    "ejections",
    "replica_stats",
    "extra_request_ratio",
    "sla",
    "sla_pass",
    "system_info",
}


def test_cli_end_to_end_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scen = tmp_path / "small.toml"
    scen.write_text(SMALL, encoding="utf-8")
    out = tmp_path / "out.json"
    plots = tmp_path / "plots"
    code = main(["bench", str(scen), "--json", str(out), "--report", str(plots), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "feedline bench: small" in printed and "feedline vs fsspec" in printed
    rep = json.loads(out.read_text())
    assert rep["schema_version"] == 1
    assert set(rep) == TOP_KEYS
    # The options and faults as the core read them, defaults filled in.
    assert rep["scenario"]["feedline"]["routing"] == feedline.Routing().to_dict()
    assert (
        rep["scenario"]["faults"]["1"]
        == feedline.Chaos(spike_probability=0.1, spike_ms=5).to_dict()
    )
    assert rep["partial"] is False and rep["repeat"] == 1
    by_name = {s["system"]: s for s in rep["systems"]}
    assert list(by_name) == list(sc.loads(SMALL).systems)
    names = ["feedline", "fsspec", "fsspec-readahead"]
    if has_module("torch"):
        names.append("torch-dataloader")
    else:
        assert by_name["torch-dataloader"]["status"] == "skipped"
    for name in names:
        s = by_name[name]
        assert set(s) == SYSTEM_KEYS, name
        assert s["status"] == "ok"
        assert s["steps"] == 30 and s["samples"] + s["errors"] == 120
        # Every delivered byte was checked against the manifest.
        assert s["verified_bytes"] == s["bytes"] and s["mismatches"] == 0
        assert set(s["latency"]["percentiles_ms"]) == {"50", "90", "99", "99.9"}
        assert s["latency_co"] is None  # closed loop
        assert s["sla"]["mismatches_max"]["pass"] is True
    assert by_name["obstore"]["status"] == "skipped"
    assert any("obstore" in n for n in by_name["obstore"]["notes"])
    assert rep["fault_windows"][0]["start_s"] == pytest.approx(0.2)
    # The final metrics snapshot counts the feedline system's reads.
    (reads,) = rep["metrics"]["feedline_reads_total"]
    assert reads["value"] >= by_name["feedline"]["samples"]
    # Fault windows are exported for dashboards, all closed once the run ends.
    faults = rep["metrics"]["feedline_fault_active"]
    # (Process totals: windows of earlier runs in this process may be there too.)
    shown = {f["labels"]["fault"]: f["value"] for f in faults}
    assert {w["label"] for w in rep["fault_windows"]} <= set(shown)
    assert all(v == 0 for v in shown.values())
    for name in ("latency_cdf.png", "throughput.png", "au.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# fsspec's MMapCache leaves its cache file's descriptor to the garbage
# collector (fsspec's leak, not the harness's): collect it inside this test.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fsspec_blockcache_system_runs() -> None:
    import gc

    scenario = sc.override(sc.loads(SMALL), systems=("fsspec-blockcache",))
    rep = runner.run(scenario)
    s = rep["systems"][0]
    gc.collect()
    assert s["status"] == "ok" and s["bytes"] > 0
    # Every delivered sample is either verified or counted as a mismatch
    # (fsspec's blockcache can deliver wrong bytes once a replica dies:
    # exactly what the harness's CRC32C check is there to catch).
    assert s["verified_bytes"] + s["mismatches"] * 12288 >= s["bytes"]


def test_repeat_reports_mean_stdev_and_spread() -> None:
    scenario = sc.override(sc.loads(SMALL), systems=("fsspec", "fsspec-readahead"))
    rep = runner.run(scenario, repeat=2)
    assert rep["repeat"] == 2 and len(rep["runs"]) == 2
    stats = rep["systems"][0]["repeat"]
    au = stats["au"]
    assert au["min"] <= au["mean"] <= au["max"] and au["stdev"] >= 0
    assert au["flagged"] == (au["spread"] > 0.05)
    header, rows = table_rows(rep)
    assert header[:3] == ["figure", "fsspec", "fsspec-readahead"]
    assert any("±" in cell for row in rows for cell in row)


def test_open_loop_reports_both_latencies(tmp_path: Path) -> None:
    # torch-dataloader runs a closed loop only (tests/bench/test_bench_torch.py).
    text = SMALL.replace(', "torch-dataloader"', "").replace(
        "[sla]", '[load]\nmode = "open"\nrate_per_s = 400\n[sla]'
    )
    scenario = sc.override(sc.loads(text), systems=("fsspec",))
    rep = runner.run(scenario)
    s = rep["systems"][0]
    assert s["latency_co"]["count"] == s["latency"]["count"] > 0
    for p, v in s["latency"]["percentiles_ms"].items():
        assert s["latency_co"]["percentiles_ms"][p] >= v
    write_plots(rep, tmp_path)


def test_a_stop_request_writes_partial_results() -> None:
    scenario = sc.loads(SMALL.replace("steps = 30", "steps = 20000"))
    stop = threading.Event()

    def progress(name: str, rec: Recorder, total: int) -> None:
        if len(rec.steps) >= 3:
            stop.set()

    rep = runner.run(
        sc.override(scenario, systems=("fsspec", "feedline")), stop=stop, progress=progress
    )
    assert rep["partial"] is True
    assert len(rep["systems"]) == 1  # feedline never started
    assert rep["systems"][0]["status"] == "partial"
    assert 3 <= rep["systems"][0]["steps"] < 20000


def test_ctrl_c_in_the_cli_writes_partial_json(tmp_path: Path) -> None:
    scen = tmp_path / "long.toml"
    scen.write_text(SMALL.replace("steps = 30", "steps = 20000"), encoding="utf-8")
    out = tmp_path / "partial.json"
    returncode, stdout, stderr = interrupt_bench(scen, out, "fsspec", after_s=1.0)
    assert returncode == 130, stderr
    rep = json.loads(out.read_text())
    assert rep["partial"] is True and rep["systems"][0]["steps"] > 0
    assert "PARTIAL" in stdout


def test_unknown_system_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--systems", "feedline,fspec", "--no-progress"]) == 2
    assert "unknown system 'fspec'" in capsys.readouterr().err


def test_root_scenario_without_root_is_a_clear_cli_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # simulate a non-root user
    lossy = Path(__file__).resolve().parents[2] / "benches" / "scenarios" / "lossy_network.toml"
    assert main(["bench", str(lossy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "netns" in err


def test_live_display_renders_running_figures() -> None:
    from feedline.bench.report import LiveProgress
    from rich.console import Console

    rec = Recorder()
    for _ in range(5):
        rec.record_read(latency_s=0.002, end_s=0.5, nbytes=100, ok=True, verified=True)
    rec.record_read(latency_s=0.002, end_s=1.5, nbytes=100, ok=True, verified=True)
    live = LiveProgress()
    live.update("fsspec", rec, 10)
    console = Console(record=True, width=100)
    console.print(live._render())
    text = console.export_text()
    assert "fsspec" in text and "running p99 ms" in text and "0/10" in text


def test_the_comparison_column_reads_the_same_way_on_every_row() -> None:
    # AU (higher is better) and p99.9 (lower is better), both won by feedline:
    # one wording, whatever the direction. feedline is listed second.
    report = {
        "systems": [
            {"system": "fsspec", "au": 0.666, "stall_s": 2.0, "latency": {"p99.9_ms": 91.6}},
            {"system": "feedline", "au": 0.9, "stall_s": 4.0, "latency": {"p99.9_ms": 10.0}},
        ]
    }
    header, rows = table_rows(report)
    assert header == ["figure", "fsspec", "feedline", "feedline vs fsspec"]
    by_label = {row[0]: row[-1] for row in rows}
    assert by_label["AU (compute / total)"] == "feedline better by 1.35x"
    assert by_label["read p99.9 (ms)"] == "feedline better by 9.16x"
    assert by_label["data stall (s)"] == "feedline worse by 2.00x"
    assert compare("feedline", 3, 3, True) == "same"
    assert compare("feedline", 0, 5, True) == "feedline better"
    assert compare("feedline", 5, 5, None) == ""
    assert compare("feedline", None, 5, False) == ""


def test_metrics_port_serves_live_metrics_while_a_scenario_runs(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    scen = tmp_path / "long.toml"
    scen.write_text(SMALL.replace("steps = 30", "steps = 400"), encoding="utf-8")
    out = tmp_path / "out.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = "import sys; from feedline.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["bench", str(scen), "--systems", "feedline", "--no-progress", "--json", str(out)]
    env = {**os.environ, "FEEDLINE_METRICS_DIR": str(tmp_path / "metrics")}
    proc = subprocess.Popen(
        [sys.executable, "-c", cli, *args, "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        live_reads = 0.0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not live_reads:
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
                continue
            for line in text.splitlines():
                if line.startswith("feedline_reads_total "):
                    live_reads = float(line.split()[1])
            time.sleep(0.05)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert live_reads > 0, "no reads seen at the endpoint while the scenario ran"
    (final,) = json.loads(out.read_text())["metrics"]["feedline_reads_total"]
    assert final["value"] >= live_reads


def test_a_bad_metrics_port_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--metrics-port", "70000", "--no-progress"]) == 2
    assert "--metrics-port: port must be an integer" in capsys.readouterr().err
