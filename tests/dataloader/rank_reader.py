"""One rank of a torchrun job for tests/test_ranks.py: reads a ParquetDataset
through a ResumableLoader and writes, per batch, its row ids and a SHA-256
of its bytes to ``out/rank-N.json``.

argv[1] is a JSON object: ``dataset``, ``out``, ``workers``, ``batch_rows``,
``seed``, ``remainder``; optional ``resume`` (a state file to load),
``stop_after`` (steps; then every rank checkpoints into ``checkpoint`` and
rank ``kill_rank`` SIGKILLs itself while the others wait to be torn down),
``figures`` (a directory: also gather job figures through files).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from feedline.distributed import RankFigures, gather_figures, job_figures
from feedline.torch import ParquetDataset, ResumableLoader


def digest(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(batch):
        h.update(name.encode())
        h.update(np.ascontiguousarray(batch[name].numpy()).tobytes())
    return h.hexdigest()


def main() -> None:
    args = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args["out"])
    ds = ParquetDataset(
        args["dataset"],
        batch_rows=args["batch_rows"],
        shuffle=True,
        seed=args["seed"],
        remainder=args.get("remainder", "keep"),
        shuffle_buffer_rows=120,
    )
    loader = ResumableLoader(
        ds, num_workers=args["workers"], multiprocessing_context="fork", timeout=60
    )
    loader.set_epoch(1)
    if "resume" in args:
        loader.load_state_dict(torch.load(args["resume"], weights_only=False))
        loader.set_epoch(1)  # a training loop does this; it must not undo the resume
    figures = RankFigures.here()
    batches = []
    t0 = last = time.perf_counter()
    for step, batch in enumerate(loader, start=1):
        now = time.perf_counter()
        batches.append({"ids": batch["row_id"].tolist(), "sha256": digest(batch)})
        figures.record_step(wait_s=now - last, compute_s=0.0)
        last = time.perf_counter()
        if step == args.get("stop_after"):
            state = loader.state_dict()  # a collective: every rank gathers
            (out / f"rank-{rank}.json").write_text(json.dumps(batches))
            if rank == 0:
                torch.save(state, args["checkpoint"] + ".tmp")
                os.replace(args["checkpoint"] + ".tmp", args["checkpoint"])
            dist.barrier()
            if rank == args["kill_rank"]:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # torchrun's agent tears this rank down
            raise SystemExit(1)
    figures.duration_s = time.perf_counter() - t0
    figures.counters = {"batches": len(batches)}
    (out / f"rank-{rank}.json").write_text(json.dumps(batches))
    if "figures" in args:
        over_group = job_figures(gather_figures(figures))
        dist.destroy_process_group()  # the file path must work without a group
        over_files = job_figures(gather_figures(figures, args["figures"]))
        (out / f"figures-{rank}.json").write_text(json.dumps([over_group, over_files]))
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
