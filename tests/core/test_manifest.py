"""Verified bytes: `feedline.write_manifest` and `FileSystem(manifest=...)`."""

from __future__ import annotations

import json
from pathlib import Path

import feedline
import pytest
from feedline.chaos import Chaos

BLOCK = 4096


@pytest.fixture()
def replica(tmp_path: Path) -> Path:
    root = tmp_path / "replica"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(i * 7 % 256 for i in range(3 * BLOCK + 100)))
    (root / "sub" / "b.bin").write_bytes(b"hello world" * 100)
    (root / "empty").write_bytes(b"")
    return root


def test_write_manifest_round_trip(replica: Path) -> None:
    path = feedline.write_manifest(replica, block_bytes=BLOCK)
    assert path == str(replica / ".feedline-manifest.json")
    doc = json.loads(Path(path).read_text())
    assert doc["version"] == 1 and doc["block_bytes"] == BLOCK
    assert set(doc["objects"]) == {"a.bin", "sub/b.bin", "empty"}
    a = doc["objects"]["a.bin"]
    assert a["size"] == 3 * BLOCK + 100 and len(a["crc32c"]) == 4
    assert all(len(c) == 8 and int(c, 16) >= 0 for c in a["crc32c"])
    assert doc["objects"]["empty"] == {"size": 0, "crc32c": []}

    total = 3 * BLOCK + 100 + 1100
    for manifest in (path, doc):
        fs = feedline.FileSystem(replicas=[replica], manifest=manifest)
        assert fs.cat_file("a.bin") == (replica / "a.bin").read_bytes()
        assert fs.cat_file("sub/b.bin", 3, 8) == b"lo wo"
        with fs.open("a.bin", "rb") as f:
            f.seek(BLOCK - 2)
            assert f.read(4) == (replica / "a.bin").read_bytes()[BLOCK - 2 : BLOCK + 2]
        stats = fs.fault_stats()[0]
        assert stats["checksum_mismatches"] == 0
        assert stats["verified_bytes"] >= total
        assert stats["injected"] is None

    other = feedline.write_manifest(replica, block_bytes=1 << 20, path=replica.parent / "m.json")
    assert json.loads(Path(other).read_text())["objects"]["a.bin"]["crc32c"].__len__() == 1


def test_changed_file_on_disk_is_a_mismatch(replica: Path) -> None:
    path = feedline.write_manifest(replica, block_bytes=BLOCK)
    data = bytearray((replica / "a.bin").read_bytes())
    data[BLOCK + 5] ^= 1
    (replica / "a.bin").write_bytes(bytes(data))
    fs = feedline.FileSystem(replicas=[replica], manifest=path)
    assert fs.cat_file("a.bin", 0, BLOCK) == bytes(data[:BLOCK])
    with pytest.raises(feedline.ChecksumMismatch, match=r"a\.bin"):
        fs.cat_file("a.bin", BLOCK + 10, BLOCK + 20)
    assert fs.fault_stats()[0]["checksum_mismatches"] == 1


def test_corrupting_replica_never_delivers_bad_bytes(replica: Path) -> None:
    path = feedline.write_manifest(replica, block_bytes=BLOCK)
    fs = feedline.FileSystem(
        replicas=[replica], manifest=path, chaos={0: Chaos(corrupt_rate=1.0, seed=4)}
    )
    with pytest.raises(feedline.ChecksumMismatch):
        fs.cat_file("a.bin")
    out = fs.cat_ranges(["a.bin", "sub/b.bin"], [0, 5], [10, 50])
    assert all(isinstance(x, feedline.ChecksumMismatch) for x in out)
    with pytest.raises(feedline.ChecksumMismatch), fs.open("a.bin", "rb") as f:
        f.read()
    with (
        pytest.raises(feedline.ChecksumMismatch),
        fs.stream(["a.bin"], chunk_bytes=BLOCK, depth=2) as stream,
    ):
        for _ in stream:
            pass
    stats = fs.fault_stats()[0]
    assert stats["checksum_mismatches"] == stats["injected"]["corruptions"] > 0
    assert issubclass(feedline.ChecksumMismatch, OSError)


def test_partial_corruption_is_caught_per_read(replica: Path) -> None:
    path = feedline.write_manifest(replica, block_bytes=BLOCK)
    fs = feedline.FileSystem(
        replicas=[replica], manifest=path, chaos={0: Chaos(corrupt_rate=0.3, seed=8)}
    )
    want = (replica / "a.bin").read_bytes()
    out = fs.cat_ranges(["a.bin"] * 100, 0, BLOCK)
    bad = [x for x in out if isinstance(x, BaseException)]
    assert all(isinstance(x, feedline.ChecksumMismatch) for x in bad)
    assert all(x == want[:BLOCK] for x in out if isinstance(x, bytes))
    stats = fs.fault_stats()[0]
    assert len(bad) == stats["injected"]["corruptions"] == stats["checksum_mismatches"]
    assert 10 < len(bad) < 60


def _manifest(objects: object, **top: object) -> dict[str, object]:
    return {"version": 1, "block_bytes": BLOCK, "objects": objects, **top}


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [
        (_manifest({"ghost.bin": {"size": 0, "crc32c": []}}), "ghost.bin"),
        (_manifest({"a.bin": {"size": -1, "crc32c": []}}), 'size of "a.bin"'),
        (_manifest({"a.bin": {"size": 5, "crc32c": ["zz"]}}), "zz"),
        (_manifest({"a.bin": {"size": 5, "crc32c": ["0123456789"]}}), "0123456789"),
        (_manifest({"a.bin": {"size": 9000, "crc32c": ["00000000"]}}), "needs 3"),
        (_manifest({}, version=2), "version"),
        (_manifest({}, block_bytes=0), "block_bytes"),
    ],
)
def test_bad_manifests_are_refused_at_construction(
    replica: Path, manifest: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        feedline.FileSystem(replicas=[replica], manifest=manifest)


def test_missing_manifest_file_and_unlisted_keys(replica: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        feedline.FileSystem(replicas=[replica], manifest=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        feedline.FileSystem(replicas=[replica], manifest=bad)
    with pytest.raises(TypeError, match="manifest"):
        feedline.FileSystem(replicas=[replica], manifest=5)  # type: ignore[arg-type]
    fs = feedline.FileSystem(
        replicas=[replica], manifest=_manifest({"empty": {"size": 0, "crc32c": []}})
    )
    with pytest.raises(ValueError, match="not in the manifest"):
        fs.cat_file("a.bin")
    with pytest.raises(ValueError, match="block_bytes"):
        feedline.write_manifest(replica, block_bytes=0)
    with pytest.raises(ValueError, match="does not exist"):
        feedline.write_manifest(tmp_path / "nowhere")
