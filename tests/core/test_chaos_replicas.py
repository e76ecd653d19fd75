"""Chaos and verification under the replica router: a corrupting replica
heals from the others, a stalling one is cut off by timeouts, and when no
replica has good bytes the read fails loudly."""

from __future__ import annotations

from pathlib import Path

import feedline
import pytest
from feedline.chaos import Chaos

BLOCK = 4096
FILES = 24
FILE_BYTES = 4 * BLOCK


def payload(i: int) -> bytes:
    return bytes((i * 131 + j * 7) % 256 for j in range(FILE_BYTES))


@pytest.fixture()
def replicas(tmp_path: Path) -> tuple[list[Path], str]:
    roots = []
    for r in range(3):
        root = tmp_path / f"r{r}"
        root.mkdir()
        for i in range(FILES):
            (root / f"f{i:02d}.bin").write_bytes(payload(i))
        roots.append(root)
    manifest = feedline.write_manifest(roots[0], block_bytes=BLOCK, path=tmp_path / "m.json")
    return roots, manifest


def test_corrupting_replica_heals_from_the_others(replicas: tuple[list[Path], str]) -> None:
    roots, manifest = replicas
    fs = feedline.FileSystem(
        replicas=roots, manifest=manifest, chaos={1: Chaos(corrupt_rate=0.2, seed=21)}
    )
    keys = [f"f{i:02d}.bin" for i in range(FILES)]
    for _ in range(3):
        for i, key in enumerate(keys):
            assert fs.cat_file(key) == payload(i)
        out = fs.cat_ranges(keys, 0, BLOCK)
        assert out == [payload(i)[:BLOCK] for i in range(FILES)]
        with fs.stream(keys, chunk_bytes=BLOCK, depth=4) as stream:
            got = b"".join(bytes(c) for c in stream)
        assert got == b"".join(payload(i) for i in range(FILES))
    faults = fs.fault_stats()
    corrupted = faults[1]["injected"]["corruptions"]
    assert corrupted > 0, "replica 1 was never read; the test proves nothing"
    assert faults[1]["checksum_mismatches"] == corrupted
    assert faults[0]["checksum_mismatches"] == faults[2]["checksum_mismatches"] == 0
    # The router counted each one as that replica's error.
    routed = fs.stats()["replicas"]
    assert routed[1]["checksum_mismatches"] == corrupted
    assert routed[0]["checksum_mismatches"] == routed[2]["checksum_mismatches"] == 0


def test_no_good_replica_fails_loudly(replicas: tuple[list[Path], str]) -> None:
    roots, manifest = replicas
    fs = feedline.FileSystem(
        replicas=roots,
        manifest=manifest,
        chaos={i: Chaos(corrupt_rate=1.0, seed=i) for i in range(3)},
        deadline_ms=5_000,
    )
    with pytest.raises(OSError, match="checksum mismatch") as info:
        fs.cat_file("f00.bin")
    assert isinstance(info.value, feedline.ReplicasUnavailable | feedline.ChecksumMismatch)


def test_stalling_replica_is_cut_off_by_the_per_try_timeout(
    replicas: tuple[list[Path], str],
) -> None:
    roots, _ = replicas
    fs = feedline.FileSystem(
        replicas=roots, chaos={0: Chaos(stall_rate=1.0)}, timeout_ms=100, deadline_ms=10_000
    )
    for i in range(FILES):
        assert fs.cat_file(f"f{i:02d}.bin", 0, 100) == payload(i)[:100]
    assert fs.fault_stats()[0]["injected"]["stalls"] > 0


def test_replica_in_an_outage_window_is_routed_around(replicas: tuple[list[Path], str]) -> None:
    roots, _ = replicas
    fs = feedline.FileSystem(
        replicas=roots, chaos={str(roots[2]): Chaos(outages=[(0, 3600)])}, deadline_ms=10_000
    )
    for i in range(FILES):
        assert fs.cat_file(f"f{i:02d}.bin") == payload(i)
    stats = fs.fault_stats()
    assert stats[2]["injected"]["outage_rejections"] > 0
    assert stats[0]["injected"] is None
