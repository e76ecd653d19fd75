"""One training process for the node-cache tests: a torch DataLoader whose
workers (``fork`` or ``spawn``) read every object of a dataset, several times
over, through one cached ``feedline.FileSystem``; every byte is checked
against the CRC32C the parent passes in. Prints the cache's figures as JSON.

``python cache_reader.py CONFIG_JSON``: ``{"replicas", "cache", "objects":
{key: crc}, "workers", "context", "rounds"}``."""

from __future__ import annotations

import json
import sys
from typing import Any

import feedline
import torch
from feedline import _core
from torch.utils.data import DataLoader, Dataset


class Objects(Dataset):  # type: ignore[type-arg]
    def __init__(self, fs: feedline.FileSystem, keys: list[str], rounds: int) -> None:
        self.fs = fs
        self.keys = keys
        self.rounds = rounds

    def __len__(self) -> int:
        return len(self.keys) * self.rounds

    def __getitem__(self, i: int) -> tuple[str, int]:
        key = self.keys[i % len(self.keys)]
        return key, _core.crc32c(self.fs.cat_file(key))


def main(config: dict[str, Any]) -> None:
    fs = feedline.FileSystem(config["replicas"], hedge_after_ms=None, **config["cache"])
    keys = sorted(config["objects"])
    loader = DataLoader(
        Objects(fs, keys, config["rounds"]),
        batch_size=None,
        shuffle=True,
        num_workers=config["workers"],
        multiprocessing_context=config["context"],
        generator=torch.Generator().manual_seed(config.get("seed", 0)),
    )
    read = 0
    for key, crc in loader:
        if crc != config["objects"][key]:
            raise SystemExit(f"{key}: crc32c {crc:#x}, expected {config['objects'][key]:#x}")
        read += 1
    assert fs.cache is not None
    print(json.dumps({"read": read, "stats": fs.cache.stats()}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
