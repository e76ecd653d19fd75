"""In-process checks of the rank layer: the remainder policy, elastic
redealing over many layouts, job-wide figures that merge HDR buckets exactly,
and the errors on bad input. (torchrun end to end: test_ranks.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feedline._core import LatencyHistogram
from feedline.distributed import RankFigures, find_rank, gather_figures, job_figures
from parquet_data import write_dataset

torch = pytest.importorskip("torch")

from feedline.torch import ParquetDataset, ResumableLoader  # noqa: E402

ROWS = 1250


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("resume")
    # 25 row groups of 50 rows: a remainder for every even layout.
    write_dataset(root, files=1, rows_per_file=ROWS, row_group_rows=50, columns=1)
    return str(root / "*.parquet")


def make(dataset: str, rank: int, world: int, **kwargs: Any) -> ParquetDataset:
    return ParquetDataset(
        dataset,
        batch_rows=32,
        shuffle=True,
        seed=9,
        rank=rank,
        world_size=world,
        shuffle_buffer_rows=150,
        **kwargs,
    )


def ids(batches: list[Any]) -> list[int]:
    return [int(i) for b in batches for i in b["row_id"]]


@pytest.mark.parametrize("remainder", ["keep", "drop", "pad"])
def test_remainder_policy(dataset: str, remainder: str) -> None:
    per_rank = [ids(list(make(dataset, r, 2, remainder=remainder))) for r in range(2)]
    counts = Counter(i for got in per_rank for i in got)
    if remainder == "keep":
        assert sorted(counts) == list(range(ROWS)) and set(counts.values()) == {1}
        assert sorted(len(g) for g in per_rank) == [600, 650]
    elif remainder == "drop":
        assert [len(g) for g in per_rank] == [600, 600]
        assert set(counts.values()) == {1} and len(counts) == ROWS - 50
    else:
        assert [len(g) for g in per_rank] == [650, 650]
        assert len(counts) == ROWS and sorted(counts.values()).count(2) == 50


def loader_states(dataset: str, world: int, stops: list[int]) -> tuple[list[int], dict[str, Any]]:
    """Rows the ranks of ``world`` delivered before stopping at ``stops[r]``
    batches, and the job state they would have gathered."""
    delivered: list[int] = []
    ranks = []
    for rank in range(world):
        loader = ResumableLoader(make(dataset, rank, world))
        loader.set_epoch(2)
        for step, batch in enumerate(loader, start=1):
            delivered += [int(i) for i in batch["row_id"]]
            if step == stops[rank]:
                break
        ranks += loader.job_state()["ranks"]
    return delivered, {"version": 1, "world_size": world, "ranks": ranks}


@pytest.mark.parametrize(
    ("old", "stops", "new"), [(2, [3, 5], 3), (3, [1, 0, 7], 2), (2, [9, 1], 1), (1, [4], 4)]
)
def test_elastic_resume_delivers_the_rest_once(
    dataset: str, old: int, stops: list[int], new: int
) -> None:
    delivered, state = loader_states(dataset, old, stops)
    for rank in range(new):
        loader = ResumableLoader(make(dataset, rank, new))
        loader.load_state_dict(state)
        loader.set_epoch(2)
        delivered += ids(list(loader))
    assert Counter(delivered) == Counter(range(ROWS))


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 2-core machines
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_an_elastic_resume_is_exact(dataset: str, workers: int) -> None:
    _, elastic = loader_states(dataset, 2, [3, 4])

    def resumed(rank: int, state: dict[str, Any]) -> ResumableLoader:
        context = "fork" if workers else None
        loader = ResumableLoader(
            make(dataset, rank, 3), num_workers=workers, multiprocessing_context=context
        )
        loader.load_state_dict(state)
        return loader

    full = [ids(list(resumed(rank, elastic))) for rank in range(3)]
    heads, ranks = [], []
    for rank in range(3):
        loader = resumed(rank, elastic)
        it = iter(loader)
        heads.append(ids([next(it) for _ in range(rank + 1)]))
        ranks += json.loads(loader.state_dict()["job_state"])["ranks"]
    job = {"version": 1, "world_size": 3, "ranks": ranks}
    for rank in range(3):
        assert heads[rank] + ids(list(resumed(rank, job))) == full[rank]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_torch_distributed_checkpoint_keeps_an_elastic_plan(dataset: str, tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    _, elastic = loader_states(dataset, 2, [3, 4])
    first = ResumableLoader(make(dataset, 0, 1))
    first.load_state_dict(elastic)  # 2 ranks -> 1: its state now carries a plan
    again = ResumableLoader(make(dataset, 0, 1))
    again.load_state_dict(elastic)
    whole = ids(list(again))
    it = iter(first)
    head = ids([next(it), next(it)])
    dcp.save({"loader": first}, checkpoint_id=str(tmp_path))
    fresh = ResumableLoader(make(dataset, 0, 1))  # its own state has no plan
    dcp.load({"loader": fresh}, checkpoint_id=str(tmp_path))
    assert head + ids(list(fresh)) == whole


def test_job_state_errors(dataset: str) -> None:
    loader = ResumableLoader(make(dataset, 0, 2))
    with pytest.raises(ValueError, match="not a ResumableLoader state"):
        loader.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="holds 1 of 2 ranks"):
        loader.load_state_dict({"version": 1, "world_size": 2, "ranks": [{}]})
    partial = {"rank": 0, "num_workers": 2, "workers": [{"worker": 0}]}
    with pytest.raises(ValueError, match=r"no worker state for old shard\(s\) \[1, 3\]"):
        loader.load_state_dict(
            {"version": 1, "world_size": 2, "ranks": [partial, partial | {"rank": 1}]}
        )
    with pytest.raises(ValueError, match=r"ranks \[1, 1\], not 0..1"):
        loader.load_state_dict({"version": 1, "world_size": 2, "ranks": [{"rank": 1}] * 2})
    with pytest.raises(ValueError, match="remainder must be one of"):
        make(dataset, 0, 1, remainder="spill")
    with pytest.raises(ValueError, match="leave batch_size out"):
        ResumableLoader(make(dataset, 0, 1), batch_size=4)


def test_merged_percentiles_equal_the_pooled_ones() -> None:
    rng = np.random.default_rng(3)
    pooled, pooled_reads = LatencyHistogram(), LatencyHistogram()
    ranks = []
    for rank in range(4):
        # Each rank its own tail, so the job's p99.9 is no single rank's.
        waits_s = rng.lognormal(-6 + rank * 0.5, 1.0 + rank * 0.3, size=5000)
        figures = RankFigures(rank=rank, duration_s=10.0 + rank)
        for wait_s in waits_s:
            figures.record_step(wait_s=float(wait_s), compute_s=0.001)
            pooled.record_us(round(float(wait_s) * 1e6))
        reads_us = rng.integers(50, 400_000 * (rank + 1), size=3000).tolist()
        figures.histograms["read"] = LatencyHistogram()
        figures.histograms["read"].record_many_us(reads_us)
        pooled_reads.record_many_us(reads_us)
        ranks.append(RankFigures.from_json(figures.to_json()))  # as shipped between ranks
    job = job_figures(ranks)
    for name, p in (("p50_ms", 50.0), ("p99_ms", 99.0), ("p99.9_ms", 99.9)):
        assert job["wait"][name] == pooled.percentile_ms(p)
        assert job["latency"]["read"][name] == pooled_reads.percentile_ms(p)
    assert job["wait"]["p99.9_ms"] not in [r.wait.percentile_ms(99.9) for r in ranks]
    assert job["slowest_rank"]["rank"] == 3
    assert job["au"] == pytest.approx(4 * 5000 * 0.001 / (4 * 13.0))
    assert job["stall_s"] == pytest.approx(sum(r.stall_s for r in ranks))


def test_storage_read_latencies_travel_as_the_cores_histogram(tmp_path: Path) -> None:
    import feedline

    for i in range(40):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * 4096)
    fs = feedline.FileSystem()
    for i in range(40):
        assert fs.cat_file(str(tmp_path / f"f{i}")) == bytes([i]) * 4096
    figures = RankFigures()
    figures.record_storage(fs)
    stats = fs.stats()
    read = RankFigures.from_json(figures.to_json()).histograms["read"]
    assert read.count == stats["latency"]["count"] >= 40
    assert read.summary() == stats["latency"]
    assert [(r["name"], r["requests"]) for r in figures.replicas] == [
        (r["name"], r["requests"]) for r in stats["replicas"]
    ]
    job = job_figures([figures, RankFigures.from_json(figures.to_json())])
    assert job["latency"]["read"]["count"] == 2 * read.count
    assert job["latency"]["read"]["p99.9_ms"] == read.percentile_ms(99.9)


def test_slowest_replica_is_named() -> None:
    a, b = RankFigures(rank=0), RankFigures(rank=1)
    a.replicas = [{"name": "http://r0", "latency": {"p99.9_ms": 4.0}}]
    b.replicas = [
        {"name": "http://r0", "latency": {"p99.9_ms": 3.0}},
        {"name": "http://r1", "latency": {"p99.9_ms": 250.0}},
    ]
    assert job_figures([a, b])["slowest_replica"] == {
        "replica": "http://r1",
        "rank": 1,
        "p99.9_ms": 250.0,
    }


def test_gathering_through_files_between_processes(tmp_path: Path) -> None:
    # Rank 1 is a separate process; this one is rank 0.
    code = (
        "import json,sys;from feedline.distributed import *;"
        "f=RankFigures(rank=1,duration_s=2.0);f.record_step(0.5,1.0);"
        "print(json.dumps(job_figures(gather_figures(f,sys.argv[1],timeout_s=30))))"
    )
    env = {"RANK": "1", "WORLD_SIZE": "2", "PATH": "/usr/bin:/bin"}
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", "0")
            mp.setenv("WORLD_SIZE", "2")
            assert find_rank() is not None
            mine = RankFigures(rank=0, duration_s=1.0)
            mine.record_step(0.25, 0.5)
            job = job_figures(gather_figures(mine, tmp_path, timeout_s=30))
        out, _ = other.communicate(timeout=30)
    finally:
        other.kill()
        other.wait()
    assert json.loads(out) == job
    assert job["steps"] == 2 and job["slowest_rank"]["rank"] == 1
    assert job["au"] == pytest.approx(1.5 / (2 * 2.0))


def test_gathering_names_the_ranks_that_never_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(TimeoutError, match=r"ranks \[1, 2\] wrote no figures"):
        gather_figures(RankFigures(), tmp_path, timeout_s=0.2)
    with pytest.raises(ValueError, match="pass a directory"):
        gather_figures(RankFigures())
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        find_rank()


def test_histogram_bytes_refuse_garbage() -> None:
    with pytest.raises(ValueError, match="not a feedline latency histogram"):
        LatencyHistogram.from_bytes(b"garbage")
