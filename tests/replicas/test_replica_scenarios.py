"""The replica-set acceptance scenarios at test size, with faults injected
in-process by ``feedline.chaos``: a spiky replica under hedging, a dead
replica (ejected, then readmitted), a corrupting replica under a manifest,
and every replica down. Full-size figures: benches/test_replicas_bench.py."""

from __future__ import annotations

import time
from pathlib import Path

import feedline
import pytest
from feedline import _core
from feedline.chaos import Chaos, Fixed

OBJ_BYTES = 64 * 1024


def make_replicas(
    tmp_path: Path, objects: int, *, differ: bool = False
) -> tuple[list[str], list[str]]:
    """Three roots with the same `objects` keys (different bytes per root
    with `differ`)."""
    roots, keys = [], [f"shard/obj-{i:04}.bin" for i in range(objects)]
    for r in range(3):
        root = tmp_path / f"replica-{r}"
        (root / "shard").mkdir(parents=True)
        for i, key in enumerate(keys):
            seed = (i * 7 + (r * 101 if differ else 0)) % 251
            (root / key).write_bytes(
                bytes((j + seed) % 256 for j in range(256)) * (OBJ_BYTES // 256)
            )
        roots.append(str(root))
    return roots, keys


def expected(root: str, key: str) -> bytes:
    return Path(root, key).read_bytes()


def test_spiky_replica_is_hedged_around(tmp_path: Path) -> None:
    roots, keys = make_replicas(tmp_path, 60)
    fs = feedline.FileSystem(
        replicas=roots,
        hedge_after_ms="p95",
        chaos={1: Chaos(spike_probability=0.05, spike_ms=200, seed=11)},
    )
    want = {k: expected(roots[0], k) for k in keys}
    for _ in range(5):
        for key in keys:
            assert fs.cat_file(key) == want[key]
    stats = fs.stats()
    spiky = stats["replicas"][1]
    spikes = fs.fault_stats()[1]["injected"]["spikes"]
    assert stats["read_errors"] == 0
    assert spikes > 0
    # Spikes after the 20-sample warm-up are hedged, and the hedge wins
    # (the spike is 200 ms; the other replicas answer in microseconds).
    hedges_won = sum(r["hedges_won"] for r in stats["replicas"])
    assert hedges_won >= 1, stats
    # The spiking attempt lost the race and was cancelled.
    assert spiky["cancelled"] >= 1, spiky
    assert stats["extra_request_ratio"] <= 0.25, stats


def test_a_hedged_read_is_never_a_mix_of_two_replicas(tmp_path: Path) -> None:
    # Replicas hold different bytes under the same keys; both are spiky so
    # primaries and hedges each win some races.
    roots, keys = make_replicas(tmp_path, 8, differ=True)
    spiky = Chaos(latency=Fixed(1), spike_probability=0.3, spike_ms=40, seed=5)
    fs = feedline.FileSystem(
        replicas=roots,
        hedge_after_ms=5,
        retry_budget_floor_per_s=1000,
        chaos={0: spiky, 1: spiky, 2: spiky},
    )
    copies = {k: [expected(r, k) for r in roots] for k in keys}
    sources = set()
    for _ in range(4):
        for key in keys:
            got = fs.cat_file(key, 1000, 1000 + 20_000)
            whole = [i for i, c in enumerate(copies[key]) if c[1000:21_000] == got]
            assert len(whole) == 1, f"{key}: a mix of replicas"
            sources.add(whole[0])
    for chunk in fs.stream(keys, chunk_bytes=16 * 1024):
        data = bytes(chunk)
        off = chunk.offset
        assert sum(c[off : off + len(data)] == data for c in copies[chunk.path]) == 1
    stats = fs.stats()
    assert sum(r["hedges_won"] for r in stats["replicas"]) > 0, stats
    assert len(sources) >= 2


def test_dead_replica_is_ejected_then_readmitted_with_no_errors(tmp_path: Path) -> None:
    roots, keys = make_replicas(tmp_path, 30)
    order = _core.Rendezvous(roots)
    dead = order.preference_list(keys[0])[0]
    # Dead from 0.3 s to 1.3 s after the filesystem is built.
    fs = feedline.FileSystem(
        replicas=roots,
        eject_after_failures=5,
        base_ejection_ms=200,
        chaos={dead: Chaos(outages=[(0.3, 1.3)])},
    )
    want = {k: expected(roots[0], k) for k in keys}
    errors_at_ejection = None
    readmitted_bytes = None
    deadline = time.monotonic() + 20
    i = 0
    while time.monotonic() < deadline:
        key = keys[i % len(keys)]
        i += 1
        assert fs.cat_file(key, 0, 4096) == want[key][:4096]
        s = fs.stats()["replicas"][dead]
        if errors_at_ejection is None and s["ejections"] == 1:
            errors_at_ejection = s["errors"]
        if s["readmissions"] >= 1 and readmitted_bytes is None:
            readmitted_bytes = s["bytes"]
        if readmitted_bytes is not None and s["bytes"] > readmitted_bytes + 4096:
            break
        time.sleep(0.002)
    stats = fs.stats()
    s = stats["replicas"][dead]
    assert stats["read_errors"] == 0
    assert errors_at_ejection == 5, s
    assert s["readmissions"] >= 1, s
    assert not s["ejected"]
    assert readmitted_bytes is not None and s["bytes"] > readmitted_bytes, "serves again"


def test_corrupting_replica_is_healed_by_the_others(tmp_path: Path) -> None:
    roots, keys = make_replicas(tmp_path, 40)
    manifest = feedline.write_manifest(roots[0], block_bytes=16 * 1024)
    fs = feedline.FileSystem(
        replicas=roots,
        manifest=manifest,
        retry_budget_floor_per_s=1000,
        chaos={2: Chaos(corrupt_rate=0.2, seed=3)},
    )
    want = [expected(roots[0], k) for k in keys]
    for _ in range(3):
        got = fs.cat_ranges(keys, [0] * len(keys), [None] * len(keys))
        assert got == want
        assert b"".join(bytes(c) for c in fs.stream(keys, chunk_bytes=16 * 1024)) == b"".join(want)
    stats = fs.stats()
    corruptions = fs.fault_stats()[2]["injected"]["corruptions"]
    assert corruptions > 0
    assert stats["replicas"][2]["checksum_mismatches"] == corruptions
    assert stats["read_errors"] == 0


@pytest.mark.parametrize("fault", ["outage", "stall"])
def test_all_down_raises_replicas_unavailable_within_the_deadline(
    tmp_path: Path, fault: str
) -> None:
    roots, keys = make_replicas(tmp_path, 2)
    chaos = Chaos(outages=[(0, 3600)]) if fault == "outage" else Chaos(stall_rate=1.0)
    fs = feedline.FileSystem(
        replicas=roots,
        timeout_ms=100,
        deadline_ms=500,
        chaos={i: chaos for i in range(3)},
    )
    start = time.monotonic()
    with pytest.raises(feedline.ReplicasUnavailable) as info:
        fs.cat_file(keys[0])
    # Behaviour: the read gave up (a stalled replica never answers).
    assert time.monotonic() - start < 30
    for root in roots:
        assert root in str(info.value)
    [err] = fs.cat_ranges([keys[0]], [0], [10])
    assert isinstance(err, feedline.ReplicasUnavailable)
