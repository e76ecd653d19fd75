"""Ranks x workers under real torchrun (gloo, CPU): every row exactly once per
epoch, exact resume after a SIGKILLed rank, elastic resume onto another world
size, and job-wide figures gathered over the process group and over files.

Every delivered batch is checked against the source rows by SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from parquet_data import write_dataset

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch built without distributed", allow_module_level=True)

SCRIPT = Path(__file__).with_name("rank_reader.py")
ROWS = 1200
TORCHRUN_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ranks")
    # 24 row groups of 50 rows: 6 per shard at 2 ranks x 2 workers.
    write_dataset(root, files=3, rows_per_file=400, row_group_rows=50, columns=2)
    return str(root / "*.parquet")


@pytest.fixture(scope="module")
def source(dataset: str) -> dict[str, np.ndarray]:
    """The dataset's columns, indexed by row_id."""
    table = pq.read_table(sorted(Path(dataset).parent.glob("*.parquet")))
    order = np.argsort(table.column("row_id").to_numpy())
    return {name: table.column(name).to_numpy()[order] for name in table.column_names}


def expected_sha256(source: dict[str, np.ndarray], ids: list[int]) -> str:
    h = hashlib.sha256()
    for name in sorted(source):
        h.update(name.encode())
        h.update(np.ascontiguousarray(source[name][ids]).tobytes())
    return h.hexdigest()


def torchrun(nproc: int, out: Path, **args: Any) -> tuple[int, list[list[dict[str, Any]]]]:
    """Runs rank_reader.py as ``nproc`` ranks; (exit status, batches per rank)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        str(SCRIPT),
        json.dumps({"out": str(out), "batch_rows": 32, "seed": 5} | args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    finally:
        # torchrun, its ranks and their DataLoader workers share the session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ranks = []
    for r in range(nproc):
        path = out / f"rank-{r}.json"
        if not path.exists():
            raise AssertionError(f"rank {r} wrote nothing:\n{log.decode(errors='replace')}")
        ranks.append(json.loads(path.read_text()))
    return proc.returncode, ranks


def check_bytes(source: dict[str, np.ndarray], ranks: list[list[dict[str, Any]]]) -> list[int]:
    """Every batch's bytes equal the source rows; returns all ids delivered."""
    ids: list[int] = []
    for batches in ranks:
        for batch in batches:
            assert batch["sha256"] == expected_sha256(source, batch["ids"])
            ids += batch["ids"]
    return ids


def assert_exactly_once(ids: list[int]) -> None:
    twice = [i for i, n in Counter(ids).items() if n > 1]
    missing = sorted(set(range(ROWS)) - set(ids))
    assert not twice and not missing, f"twice: {twice[:10]}, missing: {missing[:10]}"
    assert len(ids) == ROWS


@pytest.fixture(scope="module")
def full_run(
    dataset: str, source: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[list[dict[str, Any]]], Path]:
    out = tmp_path_factory.mktemp("full")
    rc, ranks = torchrun(2, out, dataset=dataset, workers=2, figures=str(out / "figures"))
    assert rc == 0
    return ranks, out


@pytest.fixture(scope="module")
def killed_run(
    dataset: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[list[dict[str, Any]]], str]:
    """2 ranks x 2 workers: checkpoint after step 3, then rank 1 is SIGKILLed."""
    out = tmp_path_factory.mktemp("killed")
    checkpoint = str(out / "state.pt")
    rc, heads = torchrun(
        2, out, dataset=dataset, workers=2, stop_after=3, checkpoint=checkpoint, kill_rank=1
    )
    assert rc != 0, "torchrun must report the killed rank"
    assert [len(h) for h in heads] == [3, 3]
    return heads, checkpoint


def test_two_ranks_two_workers_deliver_every_row_once(
    full_run: tuple[list[list[dict[str, Any]]], Path], source: dict[str, np.ndarray]
) -> None:
    ranks, _ = full_run
    assert all(ranks), "each rank got batches"
    assert_exactly_once(check_bytes(source, ranks))


def test_job_figures_over_the_group_equal_those_over_files(
    full_run: tuple[list[list[dict[str, Any]]], Path],
) -> None:
    ranks, out = full_run
    per_rank = [json.loads((out / f"figures-{r}.json").read_text()) for r in range(2)]
    over_group, over_files = per_rank[0]
    assert per_rank[1] == per_rank[0], "every rank holds the same job figures"
    assert over_group == over_files
    assert over_group["ranks"] == 2
    assert over_group["steps"] == over_group["wait"]["count"] == sum(len(b) for b in ranks)
    assert over_group["counters"]["batches"] == sum(len(b) for b in ranks)
    assert over_group["slowest_rank"]["rank"] in (0, 1)
    assert 0 < over_group["wait"]["p50_ms"] <= over_group["wait"]["p99.9_ms"]


def test_sigkilled_rank_resumes_bit_identical(
    dataset: str,
    full_run: tuple[list[list[dict[str, Any]]], Path],
    killed_run: tuple[list[list[dict[str, Any]]], str],
    source: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    full, _ = full_run
    heads, checkpoint = killed_run
    rc, tails = torchrun(2, tmp_path, dataset=dataset, workers=2, resume=checkpoint)
    assert rc == 0
    check_bytes(source, tails)
    for rank in range(2):
        got = [b["sha256"] for b in heads[rank] + tails[rank]]
        assert got == [b["sha256"] for b in full[rank]], f"rank {rank} diverged"


def test_elastic_resume_two_ranks_to_three(
    dataset: str,
    killed_run: tuple[list[list[dict[str, Any]]], str],
    source: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    heads, checkpoint = killed_run
    rc, tails = torchrun(3, tmp_path, dataset=dataset, workers=1, resume=checkpoint)
    assert rc == 0
    assert all(tails), "each new rank got a share"
    assert_exactly_once(check_bytes(source, heads) + check_bytes(source, tails))


def test_elastic_resume_four_ranks_to_two(
    dataset: str, source: dict[str, np.ndarray], tmp_path: Path
) -> None:
    checkpoint = str(tmp_path / "state.pt")
    rc, heads = torchrun(
        4,
        tmp_path / "killed",
        dataset=dataset,
        workers=1,
        stop_after=2,
        checkpoint=checkpoint,
        kill_rank=3,
    )
    assert rc != 0
    rc, tails = torchrun(2, tmp_path / "resumed", dataset=dataset, workers=2, resume=checkpoint)
    assert rc == 0
    assert_exactly_once(check_bytes(source, heads) + check_bytes(source, tails))
