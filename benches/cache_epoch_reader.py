"""One training process for the P11b bench: a torch DataLoader whose workers
read every object once (shuffled by ``seed``) through ``system``:
``feedline`` (the node cache over the replicas) or fsspec's ``blockcache`` /
``filecache`` over HTTP, all sharing one cache directory across processes.

``python cache_epoch_reader.py CONFIG_JSON``: ``{"system", "urls", "keys",
"cache_dir", "workers", "seed"}``; prints the bytes read."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def open_system(config: dict[str, Any]) -> Any:
    if config["system"] == "feedline":
        import feedline

        return feedline.FileSystem(
            config["urls"],
            hedge_after_ms=None,
            cache_dir=config["cache_dir"],
            cache_bytes=1 << 40,
        )
    import fsspec

    return fsspec.filesystem(
        config["system"], target_protocol="http", cache_storage=config["cache_dir"]
    )


class Objects(Dataset):  # type: ignore[type-arg]
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.fs: Any = None

    def __len__(self) -> int:
        return len(self.config["keys"])

    def __getitem__(self, i: int) -> int:
        if self.fs is None:
            self.fs = open_system(self.config)
        key = self.config["keys"][i]
        if self.config["system"] == "feedline":
            return len(self.fs.cat_file(key))
        with self.fs.open(f"{self.config['urls'][0]}/{key}", "rb") as f:
            return len(f.read())


def main(config: dict[str, Any]) -> None:
    loader = DataLoader(
        Objects(config),
        batch_size=None,
        shuffle=True,
        num_workers=config["workers"],
        multiprocessing_context="fork",
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    print(sum(loader))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
