"""Scenario validation: every bad input gives a clear error naming the file,
the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from feedline.bench import scenario as sc
from feedline.bench.runner import check_runnable

SCENARIOS = Path(__file__).resolve().parents[2] / "benches" / "scenarios"


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_embedded_default_and_shipped_scenarios_parse() -> None:
    d = sc.default()
    assert d.name == "default"
    assert d.systems == ("feedline", "fsspec")
    assert {f.index for f in d.faults} == {1}
    assert [e.action for e in d.events] == ["kill"]
    files = sorted(SCENARIOS.glob("*.toml"))
    assert {f.stem for f in files} >= {
        "dlio_resnet50_like",
        "spiky_replica",
        "dead_replica",
        "lossy_network",
    }
    for f in files:
        sc.load(f)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    p = write(tmp_path, "[workload]\nreader = 4\n")
    with pytest.raises(sc.ScenarioError) as e:
        sc.load(p)
    msg = str(e.value)
    assert str(p) in msg and "[workload]" in msg
    assert "unknown key 'reader'" in msg and "did you mean 'readers'?" in msg


def test_unknown_top_level_table_suggests(tmp_path: Path) -> None:
    with pytest.raises(sc.ScenarioError, match=r"unknown key 'workloads'.*did you mean 'workload'"):
        sc.load(write(tmp_path, "[workloads]\nreaders = 4\n"))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '[workload]\nreaders = "four"\n',
            r"\[workload\] readers: expected an integer >= 1, got str 'four'",
        ),
        ("[workload]\nbatch_size = 2.5\n", r"batch_size: expected an integer >= 1, got float 2.5"),
        ("seed = true\n", r"seed: expected an integer >= 0"),
        ('systems = "feedline"\n', r"systems: expected a non-empty list"),
        ("[replicas]\ncount = [3]\n", r"\[replicas\] count: expected an integer"),
        ("workload = 3\n", r"workload: expected a table, got int"),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(sc.ScenarioError, match=pattern):
        sc.load(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[workload]\nsteps = 0\n", r"steps: expected an integer >= 1, got 0"),
        ("[workload]\nreaders = -2\n", r"readers: expected an integer >= 1, got -2"),
        (
            '[workload]\ncompute = { distribution = "fixed", ms = 0 }\n',
            r"\[workload.compute\] ms: expected a number > 0, got 0",
        ),
        (
            '[workload]\ncompute = { distribution = "normal", mean_ms = -5, stdev_ms = 1 }\n',
            r"mean_ms: expected a number > 0, got -5",
        ),
        ('[load]\nduration_s = "0s"\n', r"duration_s: expected a duration > 0, got '0s'"),
        ('[load]\nduration_s = "-3s"\n', r"duration_s: expected a duration"),
        ('[load]\nmode = "open"\nrate_per_s = -10\n', r"rate_per_s: expected a number > 0"),
        (
            '[[faults.event]]\nat = "-1s"\naction = "kill"\nreplica = 0\n',
            r"at: expected a duration >= 0, got '-1s'",
        ),
        (
            '[[faults.event]]\nat = "5s"\nuntil = "2s"\naction = "stop"\nreplica = 0\n',
            r"until: must come after at",
        ),
    ],
)
def test_zero_or_negative_durations(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(sc.ScenarioError, match=pattern):
        sc.load(write(tmp_path, text))


@pytest.mark.parametrize("bad", ["0", "-1", "100.5", "1000", "nan"])
def test_percentiles_outside_0_100(tmp_path: Path, bad: str) -> None:
    with pytest.raises(sc.ScenarioError, match=r"percentiles: percentile .* is outside \(0, 100\]"):
        sc.load(write(tmp_path, f"percentiles = [50, {bad}]\n"))


def test_percentile_100_is_allowed(tmp_path: Path) -> None:
    assert sc.load(write(tmp_path, "percentiles = [50, 100]\n")).percentiles == (50.0, 100.0)


def test_fault_on_a_replica_that_does_not_exist(tmp_path: Path) -> None:
    text = "[replicas]\ncount = 3\n[[faults.replica]]\nindex = 3\nerror_rate = 0.1\n"
    with pytest.raises(
        sc.ScenarioError, match=r"index: replica 3 does not exist: this scenario has 3"
    ):
        sc.load(write(tmp_path, text))
    text = '[replicas]\ncount = 2\n[[faults.event]]\nat = "1s"\naction = "kill"\nreplica = 5\n'
    with pytest.raises(sc.ScenarioError, match=r"replica: replica 5 does not exist"):
        sc.load(write(tmp_path, text))


def test_chaos_values_out_of_range(tmp_path: Path) -> None:
    text = "[[faults.replica]]\nindex = 0\nspike_probability = 1.5\nspike_ms = 10\n"
    with pytest.raises(
        sc.ScenarioError, match=r"spike_probability is a probability .* \[0, 1\], got 1.5"
    ):
        sc.load(write(tmp_path, text))
    # Values that used to pass the check and then panic or overflow when run.
    text = "[[faults.replica]]\nindex = 0\nspike_probability = 0.5\nspike_ms = 1e300\n"
    with pytest.raises(sc.ScenarioError, match=r"spike_ms must be a number from 0 to 60000"):
        sc.load(write(tmp_path, text))


def test_faults_and_feedline_tables_take_the_core_options(tmp_path: Path) -> None:
    text = "[[faults.replica]]\nindex = 0\neror_rate = 0.1\n"
    with pytest.raises(sc.ScenarioError, match=r"'eror_rate' in chaos; did you mean 'error_rate'"):
        sc.load(write(tmp_path, text))
    text = '[feedline]\nhedge_after_ms = "p95"\ndepth = 4\ntimeout_ms = 250\n'
    scenario = sc.load(write(tmp_path, text))
    assert scenario.feedline == {"hedge_after_ms": "p95", "depth": 4, "timeout_ms": 250}
    for bad, needle in [
        ("hedge_afer_ms = 20", "did you mean 'hedge_after_ms'"),
        ('hedge_after_ms = "p1e1"', "got 'p1e1'"),
        ("deadline_ms = 1e23", "deadline_ms must be"),
        ('replicas = ["/x"]', "replicas: is set by the bench"),
    ]:
        with pytest.raises(sc.ScenarioError, match=rf"\[feedline\].*{needle}"):
            sc.load(write(tmp_path, f"[feedline]\n{bad}\n"))


def test_sla_on_unknown_metric(tmp_path: Path) -> None:
    with pytest.raises(
        sc.ScenarioError, match=r"SLA on unknown metric 'p99_msec'.*did you mean 'p99_ms'"
    ):
        sc.load(write(tmp_path, "[sla]\np99_msec = 50\n"))


def test_unknown_system_name(tmp_path: Path) -> None:
    with pytest.raises(sc.ScenarioError, match=r"unknown system 'fspec'.*did you mean 'fsspec'"):
        sc.load(write(tmp_path, 'systems = ["feedline", "fspec"]\n'))


def test_dataset_path_without_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(
        sc.ScenarioError, match=r"\[dataset\] manifest: missing: dataset path .* needs a manifest"
    ):
        sc.load(write(tmp_path, '[dataset]\npath = "data"\n'))


def test_dataset_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(sc.ScenarioError, match=r"is not a directory"):
        sc.load(write(tmp_path, '[dataset]\npath = "nope"\nmanifest = "m.json"\n'))


def test_root_needing_scenario_without_root_names_the_part() -> None:
    lossy = sc.load(SCENARIOS / "lossy_network.toml")
    with pytest.raises(sc.NeedsRootError) as e:
        check_runnable(lossy, is_root=False)
    msg = str(e.value)
    assert "needs root" in msg
    assert 'kind = "netns"' in msg and "action = 'loss'" in msg
    # Local scenarios never need root.
    sc.default().check_requirements(is_root=False)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(sc.ScenarioError, match=r"not valid TOML"):
        sc.load(write(tmp_path, "[workload\n"))


def test_missing_file() -> None:
    with pytest.raises(sc.ScenarioError, match=r"scenario file not found"):
        sc.load("/nonexistent/x.toml")


def test_open_loop_needs_a_rate(tmp_path: Path) -> None:
    with pytest.raises(sc.ScenarioError, match=r"rate_per_s: missing"):
        sc.load(write(tmp_path, '[load]\nmode = "open"\n'))


def test_unknown_enum_value_suggests(tmp_path: Path) -> None:
    with pytest.raises(
        sc.ScenarioError, match=r"access: unknown value 'shufled'.*did you mean 'shuffled'"
    ):
        sc.load(write(tmp_path, '[workload]\naccess = "shufled"\n'))
