"""ParquetDataset under a real torch DataLoader (fork, spawn, forkserver,
persistent workers, pin_memory) and the to_device feeder's CPU path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from parquet_data import write_dataset

if os.environ.get("CI") == "true":
    import torch  # CI installs torch: these tests must run there
else:
    torch = pytest.importorskip("torch")

from feedline.torch import ParquetDataset, to_device
from torch.utils.data import DataLoader

ROWS = 1200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("pq")
    # 24 row groups: enough for 2 ranks x 3 workers to all get some.
    write_dataset(root, files=3, rows_per_file=400, row_group_rows=50, columns=3)
    return str(root / "*.parquet")


def ids_of(loader: DataLoader[Any]) -> list[int]:
    return [int(i) for batch in loader for i in batch["row_id"]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 2-core machines
def test_two_ranks_three_workers_see_every_row_once(dataset: str) -> None:
    seen: list[int] = []
    for rank in range(2):
        ds = ParquetDataset(dataset, batch_rows=32, shuffle=True, seed=7, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=3, multiprocessing_context="fork")
        got = ids_of(loader)
        assert got, f"rank {rank} got nothing"
        seen += got
    assert len(seen) == ROWS
    assert sorted(seen) == list(range(ROWS))


# Each spawned worker imports torch afresh (seconds): few workers keep it quick.
@pytest.mark.parametrize(("context", "workers"), [("spawn", 2), ("forkserver", 1)])
def test_workers_under_spawn_and_forkserver(dataset: str, context: str, workers: int) -> None:
    ds = ParquetDataset(dataset, batch_rows=100)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=context)
    batches = list(loader)
    assert all(isinstance(b["c0"], torch.Tensor) for b in batches)
    assert sorted(int(i) for b in batches for i in b["row_id"]) == list(range(ROWS))


def test_persistent_workers_take_a_new_epoch_each_pass(dataset: str) -> None:
    ds = ParquetDataset(dataset, batch_rows=64, shuffle=True, seed=1)
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    first, second = ids_of(loader), ids_of(loader)
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != second


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_pin_memory(dataset: str) -> None:
    ds = ParquetDataset(dataset, batch_rows=128)
    loader = DataLoader(ds, batch_size=None, num_workers=2, pin_memory=True)
    batches = list(loader)
    # Pinned when CUDA exists; without it DataLoader warns and skips pinning.
    assert sorted(int(i) for b in batches for i in b["row_id"]) == list(range(ROWS))
    if torch.cuda.is_available():
        assert batches[0]["c0"].is_pinned()


def test_torch_format_shares_arrow_memory(dataset: str) -> None:
    ds = ParquetDataset(dataset, batch_rows=50, columns=["row_id", "c1"])
    batch = next(iter(ds))
    assert set(batch) == {"row_id", "c1"}
    assert batch["row_id"].dtype == torch.int64
    assert batch["row_id"].tolist() == list(range(50))


def test_resume_in_process(dataset: str) -> None:
    def make() -> ParquetDataset:
        return ParquetDataset(dataset, batch_rows=40, shuffle=True, seed=2, format="numpy")

    full = [b["row_id"].tolist() for b in make()]
    ds = make()
    it = iter(ds)
    head = [next(it)["row_id"].tolist() for _ in range(4)]
    state = ds.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [b["row_id"].tolist() for b in resumed] == full


def test_to_device_cpu_is_a_no_copy_pass_through(dataset: str) -> None:
    ds = ParquetDataset(dataset, batch_rows=100, format="numpy")
    src = list(ds)
    out = list(to_device(iter(src), "cpu"))
    assert len(out) == len(src)
    for a, b in zip(src, out, strict=True):
        assert b["c0"].device.type == "cpu"
        # Same memory, not a copy.
        assert b["c0"].data_ptr() == a["c0"].__array_interface__["data"][0]
        np.testing.assert_array_equal(b["row_id"].numpy(), a["row_id"])


def test_to_device_default_and_errors() -> None:
    batches = [{"x": np.arange(4), "name": np.array(["a", "b", "c", "d"], dtype=object)}]
    if not torch.cuda.is_available():
        (out,) = to_device(batches)  # no CUDA: stays on the CPU
        assert out["x"].device.type == "cpu"
        assert out["name"] is batches[0]["name"]
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            to_device(batches, "cuda")
    with pytest.raises(ValueError, match="depth"):
        to_device(batches, "cpu", depth=1)
    with pytest.raises(TypeError, match="dicts of arrays"):
        list(to_device([[1, 2]], "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_cuda_matches_source(dataset: str) -> None:
    ds = ParquetDataset(dataset, batch_rows=100, format="numpy")
    src = list(ds)
    events: list[Any] = []
    out = list(to_device(iter(src), "cuda", events=events))
    assert len(events) == len(src)
    for a, b in zip(src, out, strict=True):
        assert b["c0"].is_cuda
        np.testing.assert_array_equal(b["c0"].cpu().numpy(), a["c0"])


def test_torch_distributed_wins_over_the_environment(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ds = ParquetDataset(dataset, batch_rows=100, format="numpy")
        assert sorted(int(i) for b in ds for i in b["row_id"]) == list(range(ROWS))
    finally:
        dist.destroy_process_group()
    # Without it, the environment's rank 1 of 3 reads a third.
    ds = ParquetDataset(dataset, batch_rows=100, format="numpy")
    assert len([i for b in ds for i in b["row_id"]]) < ROWS


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize(("first", "second"), [(3, 7), (22, 1)])
def test_loader_resume_with_workers_continues_exactly(
    dataset: str, first: int, second: int
) -> None:
    # 24 row groups of 50 rows over 5 workers: 5,5,5,5,4 batches of 50, so
    # the last worker runs dry first and the round-robin skips it.
    def run(state: dict[str, Any] | None, stop: int | None) -> tuple[list[Any], Any]:
        ds = ParquetDataset(dataset, batch_rows=50, shuffle=True, seed=4)
        ds.set_epoch(3)
        if state is not None:
            ds.load_state_dict(state)
        loader = DataLoader(ds, batch_size=None, num_workers=5, multiprocessing_context="fork")
        got = []
        for batch in loader:
            got.append(batch["row_id"].tolist())
            if len(got) == stop:
                break
        return got, ds.loader_state_dict(len(got), num_workers=5) if stop else None

    full, _ = run(None, None)
    assert len(full) == 24
    head, state = run(None, first)
    middle, state = run(state, second)  # a resumed run checkpointed again
    tail, _ = run(state, None)
    assert head + middle + tail == full
