"""s3:// replicas against a real S3 API server (moto's, on loopback):
SigV4-signed reads, listing (``ls``/``info``/``glob``/``find``) with keys
relative to the replica root, failover of a listing, and a ParquetStream
that expands a glob in the bucket. Every byte compared with what was put."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import feedline
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3Server
from feedline.arrow import ParquetStream

BUCKET = "feedline-s3-test"

#: Keys under the replica root `s3://BUCKET/data`, and one beside it whose
#: name starts with the root's ("database/...") that must never show.
OBJECTS = {
    "train/a.bin": os.urandom(70_000),
    "train/b.bin": os.urandom(1),
    "train/sub/c.bin": os.urandom(300_000),
    "val/d.bin": b"",
}


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> Iterator[Any]:
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    for key, data in OBJECTS.items():
        client.put_object(Bucket=BUCKET, Key=f"data/{key}", Body=data)
    client.put_object(Bucket=BUCKET, Key="database/not-mine.bin", Body=b"x")
    yield client
    listed = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    for obj in listed:
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


@pytest.fixture
def fs(s3_server: S3Server, bucket: Any) -> feedline.FileSystem:
    del bucket
    return feedline.FileSystem([f"s3://{BUCKET}/data"], storage_options=s3_server.options())


def test_signed_reads_return_every_byte(fs: feedline.FileSystem) -> None:
    keys = list(OBJECTS)
    assert [fs.cat_file(k) for k in keys] == list(OBJECTS.values())
    assert fs.cat_ranges(keys, None, None) == list(OBJECTS.values())
    assert fs.cat_file("train/sub/c.bin", 1000, 5000) == OBJECTS["train/sub/c.bin"][1000:5000]
    streamed = b"".join(bytes(c) for c in fs.stream(keys, chunk_bytes=64 << 10))
    assert streamed == b"".join(OBJECTS.values())
    with pytest.raises(FileNotFoundError):
        fs.cat_file("train/missing.bin")


def test_ls_lists_keys_relative_to_the_replica_root(fs: feedline.FileSystem) -> None:
    assert fs.ls("", detail=False) == ["train", "val"]
    assert fs.ls("train", detail=False) == ["train/a.bin", "train/b.bin", "train/sub"]
    assert fs.ls("/train/", detail=False) == fs.ls("train", detail=False)
    detail = {e["name"]: e for e in fs.ls("train")}
    assert detail["train/a.bin"]["size"] == len(OBJECTS["train/a.bin"])
    assert detail["train/a.bin"]["type"] == "file"
    assert detail["train/sub"]["type"] == "directory"
    # A file lists as itself; nothing at all is FileNotFoundError.
    [entry] = fs.ls("val/d.bin")
    assert {k: entry[k] for k in ("name", "size", "type")} == {
        "name": "val/d.bin",
        "size": 0,
        "type": "file",
    }
    # Object metadata: last-modified and the ETag (S3's is the MD5 of the bytes).
    assert entry["mtime"] > 0 and entry["version"] == '"d41d8cd98f00b204e9800998ecf8427e"'

    with pytest.raises(FileNotFoundError):
        fs.ls("nothing/here")


def test_info_glob_find_walk_see_prefixes_as_directories(fs: feedline.FileSystem) -> None:
    assert fs.info("train") == {"name": "train", "size": 0, "type": "directory"}
    assert fs.info("train/a.bin")["size"] == len(OBJECTS["train/a.bin"])
    assert fs.isdir("train/sub") and fs.isfile("train/b.bin")
    assert not fs.exists("train/nope") and not fs.isdir("nope")
    assert fs.glob("train/*.bin") == ["train/a.bin", "train/b.bin"]
    assert sorted(fs.glob("**/*.bin")) == sorted(OBJECTS)
    assert sorted(fs.find("")) == sorted(OBJECTS)
    assert fs.du("train") == sum(len(v) for k, v in OBJECTS.items() if k.startswith("train/"))


def test_listing_fails_over_a_replica_that_lacks_the_bucket(
    s3_server: S3Server, bucket: Any
) -> None:
    del bucket
    fs = feedline.FileSystem(
        ["s3://feedline-no-such-bucket/data", f"s3://{BUCKET}/data"],
        storage_options=s3_server.options(),
    )
    assert fs.ls("train", detail=False) == ["train/a.bin", "train/b.bin", "train/sub"]
    assert fs.cat_file("train/a.bin") == OBJECTS["train/a.bin"]
    alone = feedline.FileSystem(
        ["s3://feedline-no-such-bucket/data"], storage_options=s3_server.options()
    )
    with pytest.raises(FileNotFoundError):
        alone.ls("train")


def test_parquet_stream_expands_a_glob_in_the_bucket(
    s3_server: S3Server, bucket: Any, fs: feedline.FileSystem
) -> None:
    tables = []
    for i in range(3):
        table = pa.table({"id": pa.array(range(i * 1000, (i + 1) * 1000)), "x": [float(i)] * 1000})
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=250)
        bucket.put_object(Bucket=BUCKET, Key=f"data/pq/part-{i}.parquet", Body=sink.getvalue())
        tables.append(table)
    stream = ParquetStream("pq/part-*.parquet", fs=fs, batch_rows=400)
    assert stream.paths == [f"pq/part-{i}.parquet" for i in range(3)]
    got = pa.Table.from_batches(list(stream))
    assert got.equals(pa.concat_tables(tables))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        ParquetStream("pq/none-*.parquet", fs=fs)


def test_each_replica_takes_its_own_endpoint(s3_server: S3Server, bucket: Any) -> None:
    """Two replicas with one bucket URL on different endpoints: each opens
    with its own options over the shared ones (here the first endpoint is
    dead, so every read must fail over to the second, and the stats say so)."""
    del bucket
    good = s3_server.options()
    dead = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}}
    url = f"s3://{BUCKET}/data"
    fs = feedline.FileSystem(
        # Weighted so that every key asks the dead endpoint first.
        [
            feedline.Replica(url, storage_options=dead, weight=1000),
            feedline.Replica(url, storage_options={}, weight=0.001),
        ],
        storage_options=good,
        deadline_ms=10_000,
    )
    keys = list(OBJECTS)
    assert [fs.cat_file(k) for k in keys] == list(OBJECTS.values())
    first, second = fs.stats()["replicas"]
    assert first["errors"] > 0 and first["bytes"] == 0
    assert second["bytes"] == sum(len(v) for v in OBJECTS.values())
    # Only the replica's own options: the shared ones point nowhere.
    alone = feedline.FileSystem([feedline.Replica(url, storage_options=good)], storage_options=dead)
    assert alone.cat_file("train/a.bin") == OBJECTS["train/a.bin"]


def test_listing_and_info_pass_a_silent_endpoint(s3_server: S3Server, bucket: Any) -> None:
    """One replica's endpoint accepts connections and never answers (gray
    failure): listing (``ls``, ``find``, ``glob``) and ``info`` of objects
    and prefixes still answer from the other, after a hedge delay, never the
    deadline (a call that waited on the silent one would fail with it)."""
    import socket

    del bucket
    url = f"s3://{BUCKET}/data"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        quiet = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        fs = feedline.FileSystem(
            # Weighted so that the silent endpoint is every key's first choice.
            [
                feedline.Replica(url, storage_options=quiet, weight=1000),
                feedline.Replica(url, storage_options={}, weight=0.001),
            ],
            storage_options=s3_server.options(),
            deadline_ms=4000,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        for _ in range(3):
            assert fs.ls("train", detail=False) == [
                "train/a.bin",
                "train/b.bin",
                "train/sub",
            ]
            assert sorted(fs.find("train")) == ["train/a.bin", "train/b.bin", "train/sub/c.bin"]
            assert fs.glob("val/*") == ["val/d.bin"]
            assert fs.info("train/sub/c.bin")["size"] == len(OBJECTS["train/sub/c.bin"])
            assert fs.info("train")["type"] == "directory"
        stats = fs.stats()
    # The routed calls (info) took the silent endpoint out.
    assert stats["replicas"][0]["ejections"] >= 1, stats
