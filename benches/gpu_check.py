"""GPU check for ``feedline.torch.to_device`` (one short run, well under 3 min).

    python benches/gpu_check.py [--batches 24] [--batch-mib 64]

Prints one JSON object:

- ``h2d_plain_gib_per_s``: a plain ``copy_`` from an already pinned tensor to
  the GPU, the ceiling for host-to-device bytes;
- ``feeder_gib_per_s``: ``to_device`` over the same bytes starting from
  ordinary (pageable) numpy arrays, staging into pinned buffers included;
- ``feeder_pinned_gib_per_s``: ``to_device`` over already pinned tensors;
- ``overlap``: with a compute kernel run on each batch, the copy of batch n+1
  (side stream, CUDA events) must run while batch n computes:
  ``overlapped_pairs`` counts the batches whose copy interval intersects the
  previous batch's compute interval, and ``wall_ms`` is compared with the
  copy-only and compute-only times.

Without CUDA it prints ``{"skipped": "no CUDA"}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

# The compute kernel: LOOPS matmuls of SIDE x SIDE on a slice of column c0.
SIDE = 1024
LOOPS = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-mib", type=int, default=64)
    parser.add_argument("--columns", type=int, default=8)
    args = parser.parse_args(argv)
    if args.batch_mib * (1 << 20) // args.columns // 4 < SIDE * SIDE:
        parser.error(f"--batch-mib too small: a column needs {SIDE * SIDE} float32 values")
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "torch is not installed"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA"}))
        return 0
    from feedline.torch import to_device

    dev = torch.device("cuda")
    per_col = args.batch_mib * (1 << 20) // args.columns // 4  # float32 elements
    rng = np.random.default_rng(0)
    source = [rng.random(per_col, dtype=np.float32) for _ in range(args.columns)]
    batches = [
        {f"c{c}": source[(c + b) % args.columns] for c in range(args.columns)}
        for b in range(args.batches)
    ]
    nbytes = args.batches * args.columns * per_col * 4
    gib = nbytes / (1 << 30)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "batches": args.batches,
        "batch_mib": args.batch_mib,
        "bytes": nbytes,
    }

    # Plain pinned copy_: one pinned tensor per column, copied every batch.
    pinned = [torch.from_numpy(a).pin_memory() for a in source]
    dst = [torch.empty(per_col, dtype=torch.float32, device=dev) for _ in source]
    for d, p in zip(dst, pinned, strict=True):  # warm-up
        d.copy_(p, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for b in range(args.batches):
        for c in range(args.columns):
            dst[c].copy_(pinned[(c + b) % args.columns], non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    result["h2d_plain_gib_per_s"] = gib / (start.elapsed_time(end) / 1000)

    def feed(compute: bool) -> tuple[float, list[Any], list[Any]]:
        copies: list[Any] = []
        computes: list[Any] = []
        weights = torch.randn(SIDE, SIDE, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in to_device(iter(batches), dev, events=copies):
            if compute:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                x = batch["c0"][: SIDE * SIDE].view(SIDE, SIDE)
                for _ in range(LOOPS):
                    x = torch.tanh(x @ weights)
                e.record()
                computes.append((s, e))
        torch.cuda.synchronize()
        return time.perf_counter() - t0, copies, computes

    feed(False)  # warm-up: pinned pool, allocator
    copy_s, _, _ = feed(False)
    result["feeder_gib_per_s"] = gib / copy_s
    result["feeder_vs_plain"] = result["feeder_gib_per_s"] / result["h2d_plain_gib_per_s"]

    # Batches already pinned (as DataLoader(pin_memory=True) hands them over).
    pinned_batches = [
        {f"c{c}": pinned[(c + b) % args.columns] for c in range(args.columns)}
        for b in range(args.batches)
    ]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in to_device(iter(pinned_batches), dev):
        pass
    torch.cuda.synchronize()
    result["feeder_pinned_gib_per_s"] = gib / (time.perf_counter() - t0)
    result["feeder_pinned_vs_plain"] = (
        result["feeder_pinned_gib_per_s"] / result["h2d_plain_gib_per_s"]
    )

    # Compute alone, on resident data, for the same batches.
    weights = torch.randn(SIDE, SIDE, device=dev)
    resident = torch.from_numpy(source[0][: SIDE * SIDE]).to(dev).view(SIDE, SIDE)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        x = resident
        for _ in range(LOOPS):
            x = torch.tanh(x @ weights)
    torch.cuda.synchronize()
    compute_s = time.perf_counter() - t0

    both_s, copies, computes = feed(True)
    origin = copies[0][0]
    overlapped = 0
    for n in range(1, len(computes)):
        # Copy of batch n vs compute of batch n-1, on one time axis.
        c_start, c_end = (origin.elapsed_time(ev) for ev in copies[n])
        k_start, k_end = (origin.elapsed_time(ev) for ev in computes[n - 1])
        if c_start < k_end and k_start < c_end:
            overlapped += 1
    result["overlap"] = {
        "copy_only_ms": copy_s * 1000,
        "compute_only_ms": compute_s * 1000,
        "wall_ms": both_s * 1000,
        "hidden_fraction": max(0.0, (copy_s + compute_s - both_s) / min(copy_s, compute_s)),
        "overlapped_pairs": overlapped,
        "pairs": len(computes) - 1,
    }
    result["overlap_proven"] = overlapped > 0 and both_s < copy_s + compute_s
    print(json.dumps(result, indent=2))
    return 0 if result["overlap_proven"] else 1


if __name__ == "__main__":
    sys.exit(main())
