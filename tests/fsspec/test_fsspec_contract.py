"""The fsspec contract, checked with the third-party clients that rely on
it: duckdb (``register_filesystem`` needs ``modified``), zarr (chained
``feedline::/abs`` URLs, mappers, ``FsspecStore``), fsspec's caching layers
(``blockcache::``, ``CachingFileSystem``), and plain fsspec calls
(trailing slashes, recursive ``get``, writes, pickled open files)."""

from __future__ import annotations

import datetime
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import feedline
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feedline.testing import NginxReplicas
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

duckdb = pytest.importorskip("duckdb")
zarr = pytest.importorskip("zarr")


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _stat_utc(path: Path) -> datetime.datetime:
    """The file's mtime to the nearest microsecond, from its nanoseconds."""
    return EPOCH + datetime.timedelta(microseconds=(path.stat().st_mtime_ns + 500) // 1000)


@pytest.fixture
def replicas(tmp_path: Path) -> list[Path]:
    """Two local replicas of the same tree: top-level files, a
    subdirectory and hive-partitioned Parquet."""
    roots = [tmp_path / "replica-0", tmp_path / "replica-1"]
    for root in roots:
        for i in range(3):
            table = pa.table({"a": list(range(i * 10, i * 10 + 10)), "s": [f"x{i}"] * 10})
            (root / "flat").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / "flat" / f"part-{i}.parquet")
        for year, month, values in ((2024, 1, [1, 2]), (2025, 2, [3])):
            part = root / "hive" / f"year={year}" / f"month={month}"
            part.mkdir(parents=True)
            pq.write_table(pa.table({"v": values}), part / "p.parquet")
        (root / "sub" / "deeper").mkdir(parents=True)
        (root / "sub" / "f.bin").write_bytes(b"sub-f")
        (root / "sub" / "deeper" / "g.bin").write_bytes(b"deeper-g")
    return roots


# -- modified() / created() / info, every kind of replica -------------------


def test_modified_and_created_on_local_paths_and_local_replicas(replicas: list[Path]) -> None:
    path = replicas[1] / "sub" / "f.bin"
    plain = feedline.FileSystem()
    assert plain.modified(str(path)) == _stat_utc(path)
    ctime = EPOCH + datetime.timedelta(microseconds=(path.stat().st_ctime_ns + 500) // 1000)
    assert plain.created(str(path)) == ctime
    # As fsspec's local filesystem says (it goes through a float of seconds).
    local = LocalFileSystem()
    for method in ("modified", "created"):
        ours, theirs = getattr(plain, method)(str(path)), getattr(local, method)(str(path))
        assert abs(ours - theirs) <= datetime.timedelta(microseconds=1)
    info = plain.info(str(path))
    assert info["mtime"] == pytest.approx(path.stat().st_mtime)
    assert info["type"] == "file" and info["size"] == 5
    # A lagging replica lacks the key: the next one answers, with its time.
    (replicas[0] / "sub" / "f.bin").unlink()
    fs = feedline.FileSystem([str(r) for r in replicas])
    assert fs.modified("sub/f.bin") == _stat_utc(path)
    assert fs.info("sub")["type"] == "directory"
    with pytest.raises(FileNotFoundError):
        fs.modified("sub/missing.bin")
    # The version changes when the bytes do (fsspec caches key on ukey).
    before = fs.ukey("sub/f.bin")
    path.write_bytes(b"sub-f, rewritten")
    assert fs.ukey("sub/f.bin") != before


def test_info_and_ls_through_an_fsspec_filesystem_replica(replicas: list[Path]) -> None:
    fs = feedline.FileSystem([(LocalFileSystem(), str(replicas[0]))])
    # fsspec's local info gives mtime as a float of seconds: about 0.24 us
    # of precision today, so the microsecond may round either way.
    mtime = _stat_utc(replicas[0] / "sub" / "f.bin")
    assert abs(fs.modified("sub/f.bin") - mtime) <= datetime.timedelta(microseconds=1)
    assert fs.ls("sub", detail=False) == ["sub/deeper", "sub/f.bin"]
    assert fs.ls("sub/f.bin", detail=False) == ["sub/f.bin"]
    assert fs.info("sub/deeper")["type"] == "directory"
    memory = MemoryFileSystem()
    memory.pipe("/contract-mem/a.bin", b"abc")
    try:
        mem = feedline.FileSystem(["memory://contract-mem"])
        assert mem.info("a.bin")["size"] == 3
        assert mem.ls("", detail=False) == ["a.bin"]
    finally:
        memory.rm("/contract-mem", recursive=True)


@pytest.mark.nginx
def test_modified_and_version_over_http_replicas(
    replicas: list[Path], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    served = nginx_replicas(replicas[0], 2)
    fs = feedline.FileSystem(served.urls)
    path = replicas[0] / "sub" / "f.bin"
    # HTTP's Last-Modified has whole seconds.
    whole = EPOCH + datetime.timedelta(seconds=path.stat().st_mtime_ns // 1_000_000_000)
    assert fs.modified("sub/f.bin") == whole
    info = fs.info("sub/f.bin")
    assert info["size"] == 5 and info["version"].startswith('"')  # nginx's ETag
    with pytest.raises(NotImplementedError, match="HTTP has no listing API"):
        fs.ls("sub")
    # duckdb reads a single Parquet object over HTTP replicas too.
    con = duckdb.connect()
    con.register_filesystem(fs)
    got = con.sql("select sum(a) from read_parquet('feedline://flat/part-1.parquet')").fetchall()
    assert got == [(sum(range(10, 20)),)]


def test_modified_and_etag_on_s3(s3_server: Any) -> None:
    client = s3_server.client()
    bucket = "feedline-contract"
    client.create_bucket(Bucket=bucket)
    try:
        client.put_object(Bucket=bucket, Key="data/a.bin", Body=b"hello")
        head = client.head_object(Bucket=bucket, Key="data/a.bin")
        fs = feedline.FileSystem([f"s3://{bucket}/data"], storage_options=s3_server.options())
        assert fs.modified("a.bin") == head["LastModified"]
        assert fs.created("a.bin") == head["LastModified"]
        assert fs.info("a.bin")["version"] == head["ETag"]
        with pytest.raises(NotImplementedError, match="writes only to local replicas"):
            fs.pipe_file("b.bin", b"x")
    finally:
        for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)


# -- duckdb --------------------------------------------------------------------


QUERIES = {
    "single": ("select * from read_parquet('{}/flat/part-1.parquet') order by a", {}),
    "glob": ("select * from read_parquet('{}/flat/*.parquet') order by a", {}),
    "hive": (
        "select * from read_parquet('{}/hive/**/*.parquet', hive_partitioning=true) order by v",
        {},
    ),
}


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_duckdb_reads_parquet_through_feedline_as_directly(
    replicas: list[Path], query: str
) -> None:
    sql, _ = QUERIES[query]
    direct = duckdb.connect().sql(sql.format(replicas[0])).fetchall()
    assert direct, "the direct read found no rows"
    con = duckdb.connect()
    con.register_filesystem(feedline.FileSystem())
    assert con.sql(sql.format(f"feedline://{replicas[0]}")).fetchall() == direct
    routed = feedline.FileSystem([str(r) for r in replicas])
    con = duckdb.connect()
    con.register_filesystem(routed)
    assert con.sql(sql.format("feedline:/")).fetchall() == direct
    assert routed.stats()["reads"] > 0, "duckdb did not read through the router"


# -- chained URLs and zarr -----------------------------------------------------


def test_chained_urls_resolve_like_triple_slash_and_local_relative(
    replicas: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = str(replicas[0] / "sub")
    assert fsspec.core.url_to_fs(f"feedline::{d}")[1] == d
    assert fsspec.core.url_to_fs(f"feedline:///{d.lstrip('/')}")[1] == d
    monkeypatch.chdir(replicas[0])
    # Relative: against the cwd, as fsspec's local filesystem does.
    rel = "sub/f.bin"
    assert (
        fsspec.core.url_to_fs(f"feedline::{rel}")[1]
        == fsspec.core.url_to_fs(f"simplecache::{rel}")[1]
    )
    files = fsspec.open_files(f"feedline::{d}/*.bin")
    assert [f.path for f in files] == [f"{d}/f.bin"]
    with files[0] as f:
        assert f.read() == b"sub-f"
    assert sorted(fsspec.get_mapper(f"feedline::{d}")) == ["deeper/g.bin", "f.bin"]


@pytest.fixture
def zarr_groups(tmp_path: Path) -> Iterator[tuple[Path, np.ndarray]]:
    data = np.arange(2000, dtype="int32").reshape(20, 100)
    with warnings.catch_warnings():
        # Consolidated metadata is not (yet) in the v3 spec; zarr says so.
        warnings.simplefilter("ignore", UserWarning)
        for fmt in (2, 3):
            where = str(tmp_path / f"v{fmt}.zarr")
            group = zarr.open_group(where, mode="w", zarr_format=fmt)
            array = group.create_array("x", shape=data.shape, chunks=(5, 50), dtype="int32")
            array[:] = data
            group.attrs["origin"] = "feedline-test"
            zarr.consolidate_metadata(where, zarr_format=fmt)
    yield tmp_path, data


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_reads_through_chained_feedline_urls_and_never_writes_the_cwd(
    zarr_groups: tuple[Path, np.ndarray], fmt: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, data = zarr_groups
    cwd = base / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    url = f"feedline::{base}/v{fmt}.zarr"
    mapper = fsspec.get_mapper(url)
    assert isinstance(mapper.fs, feedline.FileSystem)
    group = zarr.open_group(mapper, mode="r", zarr_format=fmt, use_consolidated=True)
    assert (group["x"][:] == data).all()
    assert group.attrs["origin"] == "feedline-test"
    store = zarr.storage.FsspecStore.from_url(url, read_only=True)
    assert (zarr.open_group(store, mode="r")["x"][5:15, 20:80] == data[5:15, 20:80]).all()
    # zarr's default mode "a" on an existing group: opens it, writes nothing.
    opened = zarr.open(mapper)
    assert (opened["x"][:] == data).all()
    # On a new path it creates the group there (writes go to local paths).
    created = zarr.open_group(fsspec.get_mapper(f"feedline::{base}/new-v{fmt}.zarr"), mode="a")
    created.attrs["made"] = fmt
    assert zarr.open_group(str(base / f"new-v{fmt}.zarr"), mode="r").attrs["made"] == fmt
    assert list(cwd.iterdir()) == [], "zarr wrote into the current directory"


# -- fsspec's caching layers ---------------------------------------------------


# fsspec's MMapCache opens its cache file and never closes it (the mmap keeps
# the mapping): a ResourceWarning from fsspec's own code at garbage collection.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_blockcache_and_caching_filesystem_serve_repeat_reads_from_the_cache(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    of = fsspec.open(
        f"blockcache::feedline://{path}", blockcache={"cache_storage": str(tmp_path / "c1")}
    )
    with of as f:
        assert f.read() == data
    inner = of.fs.fs
    assert isinstance(inner, feedline.FileSystem)
    reads = inner.stats()["reads"]
    assert reads > 0
    with of as f:
        f.seek(1000)
        assert f.read(5000) == data[1000:6000]
    assert inner.stats()["reads"] == reads, "the second read did not come from the cache"

    fs = feedline.FileSystem(chunk_bytes=1 << 20)
    cached = CachingFileSystem(fs=fs, cache_storage=str(tmp_path / "c2"))
    with cached.open(str(path)) as f:
        assert f.blocksize == 1 << 20 and f.size == len(data)
        assert f.read(100) == data[:100]
        f.seek(2 << 20)
        assert f.read() == data[2 << 20 :]
    reads = fs.stats()["reads"]
    with cached.open(str(path)) as f:
        buf = bytearray(10)
        f.seek(5)
        assert f.readinto(buf) == 10 and bytes(buf) == data[5:15]
        assert f.read(50) == data[15:65]
    assert fs.stats()["reads"] == reads


def test_a_cache_fetching_block_after_block_keeps_the_rust_read_ahead(tmp_path: Path) -> None:
    # CachingFileSystem sends its misses to cat_ranges (parallel, in Rust);
    # caches with one fetcher (fsspec's BlockCache, as AbstractBufferedFile
    # uses it) call the file's `_fetch_range`, which reads through the same
    # reader: block after block is sequential to it, so it reads ahead.
    data = os.urandom(4 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with feedline.FileSystem(chunk_bytes=256 << 10).open(str(path)) as f:
        cache = fsspec.caching.BlockCache(f.blocksize, f._fetch_range, f.size, maxblocks=4)
        assert cache._fetch(0, 1000) == data[:1000]
        assert (
            cache._fetch(f.blocksize, 2 * f.blocksize + 10)
            == data[f.blocksize : 2 * f.blocksize + 10]
        )
        assert f._reader.reading_ahead
        assert cache._fetch(3 << 20, 4 << 20) == data[3 << 20 :]


# -- paths ---------------------------------------------------------------------


def test_trailing_slashes_normalise_like_fsspecs_local_filesystem(replicas: list[Path]) -> None:
    local, fs = LocalFileSystem(), feedline.FileSystem()
    d = f"{replicas[0]}/sub/"
    assert fs.find(d, withdirs=True) == local.find(d, withdirs=True)
    assert fs.glob(f"{d}**") == local.glob(f"{d}**")
    assert list(fs.walk(d)) == list(local.walk(d))
    assert fs.expand_path(d, recursive=True) == local.expand_path(d, recursive=True)
    assert fs._strip_protocol(d) == d.rstrip("/") and fs._strip_protocol("/") == "/"
    routed = feedline.FileSystem([str(r) for r in replicas])
    assert routed.find("/sub/", withdirs=True) == [
        "sub",
        "sub/deeper",
        "sub/deeper/g.bin",
        "sub/f.bin",
    ]
    assert routed.glob("sub/**") == routed.find("sub", withdirs=True)


def test_recursive_get_of_a_top_level_replica_directory_keeps_its_name(
    replicas: list[Path], tmp_path: Path
) -> None:
    fs = feedline.FileSystem([str(r) for r in replicas])
    existing = tmp_path / "existing"
    existing.mkdir()
    fs.get("sub", str(existing), recursive=True)
    assert (existing / "sub" / "f.bin").read_bytes() == b"sub-f"
    assert (existing / "sub" / "deeper" / "g.bin").read_bytes() == b"deeper-g"
    fs.get("sub/", str(tmp_path / "contents"), recursive=True)
    assert (tmp_path / "contents" / "f.bin").read_bytes() == b"sub-f"
    fs.copy("sub", "flat", recursive=True)
    for root in replicas:
        assert (root / "flat" / "sub" / "f.bin").read_bytes() == b"sub-f"


# -- writes --------------------------------------------------------------------


def test_writes_on_local_paths_create_parents_and_never_do_nothing(
    tmp_path: Path,
) -> None:
    target = tmp_path / "new" / "dir" / "ckpt.pt"
    with fsspec.open(f"feedline://{target}", "wb") as f:
        f.write(b"checkpoint")
    assert target.read_bytes() == b"checkpoint"
    fs = feedline.FileSystem()
    fs.makedirs(str(tmp_path / "a" / "b"), exist_ok=True)
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(FileExistsError):
        fs.makedirs(str(tmp_path / "a" / "b"))
    fs.mkdir(str(tmp_path / "c"))
    assert (tmp_path / "c").is_dir()
    fs.mv(str(target), str(tmp_path / "c" / "moved.pt"))
    assert not target.exists() and (tmp_path / "c" / "moved.pt").read_bytes() == b"checkpoint"
    with pytest.raises(IsADirectoryError):
        fs.rm(str(tmp_path / "c"))
    fs.rm(str(tmp_path / "c"), recursive=True)
    assert not (tmp_path / "c").exists()


def test_writes_on_local_replicas_land_in_every_replica(
    replicas: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = feedline.FileSystem([str(r) for r in replicas])
    with fs.open("ckpt/step-1/model.pt", "wb") as f:
        f.write(b"weights")
    fs.makedirs("logs/run-1", exist_ok=True)
    fs.mv("sub/f.bin", "moved/f.bin")
    for root in replicas:
        assert (root / "ckpt" / "step-1" / "model.pt").read_bytes() == b"weights"
        assert (root / "logs" / "run-1").is_dir()
        assert (root / "moved" / "f.bin").read_bytes() == b"sub-f"
        assert not (root / "sub" / "f.bin").exists()
    # A relative chained URL names a key in every replica (and fsspec's
    # parent directories for it are keys too, not paths under the cwd).
    cwd = replicas[0].parent / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    roots = [str(r) for r in replicas]
    with fsspec.open("feedline::ckpt/step-2/model.pt", "wb", feedline={"replicas": roots}) as f:
        f.write(b"step 2")
    with fsspec.open("feedline::ckpt/step-2/model.pt", "rb", feedline={"replicas": roots}) as f:
        assert f.read() == b"step 2"
    for root in replicas:
        assert (root / "ckpt" / "step-2" / "model.pt").read_bytes() == b"step 2"
        assert sorted(p.name for p in root.iterdir()) == [
            "ckpt",
            "flat",
            "hive",
            "logs",
            "moved",
            "sub",
        ]
    assert list(cwd.iterdir()) == []
    for escaping in ("../outside.bin", "sub/../../outside.bin"):
        with pytest.raises(ValueError, match="escapes the replica root"):
            fs.pipe_file(escaping, b"x")
    assert not (replicas[0].parent / "outside.bin").exists()


def test_writes_to_remote_replicas_are_refused_with_the_reason() -> None:
    memory = MemoryFileSystem()
    memory.pipe("/contract-ro/a.bin", b"abc")
    try:
        for fs in (
            feedline.FileSystem(["http://127.0.0.1:1/data"]),
            feedline.FileSystem(["memory://contract-ro"]),
        ):
            for write in (
                lambda fs=fs: fs.open("x.bin", "wb"),
                lambda fs=fs: fs.makedirs("d", exist_ok=True),
                lambda fs=fs: fs.mkdir("d"),
                lambda fs=fs: fs.rm("a.bin"),
            ):
                with pytest.raises(NotImplementedError, match="writes only to local replicas"):
                    write()
        assert memory.cat("/contract-ro/a.bin") == b"abc"
    finally:
        memory.rm("/contract-ro", recursive=True)


# -- pickling open files -------------------------------------------------------


def test_open_files_pickle_and_reopen_at_their_position(replicas: list[Path]) -> None:
    fs = feedline.FileSystem([str(r) for r in replicas], chunk_bytes=4096)
    with fs.open("sub/deeper/g.bin") as f:
        assert f.read(3) == b"dee"
        clone = pickle.loads(pickle.dumps(f))
        try:
            assert clone.tell() == 3 and clone.read() == b"per-g"
            assert clone.fs.replicas == fs.replicas
        finally:
            clone.close()
        assert f.read() == b"per-g"
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(f)
    plain = feedline.FileSystem().open(str(replicas[0] / "sub" / "f.bin"))
    plain.seek(4)
    with pickle.loads(pickle.dumps(plain)) as again:
        assert again.read() == b"f"
    plain.close()
