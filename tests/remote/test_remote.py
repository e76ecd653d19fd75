"""Remote replicas over HTTP: real nginx, every byte checked against the
files on disk; bad input mapped to clear Python errors."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import feedline
import fsspec
import pytest
from feedline import _fsspec
from feedline.testing import NginxReplicas
from fsspec.implementations.local import LocalFileSystem

pytestmark = pytest.mark.nginx

SIZES = [0, 1, 7, 4095, 4096, 65_537, 1 << 20, (3 << 20) + 11]


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, bytes]:
    """Files of awkward sizes, plus a subdirectory; returns key -> bytes."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    files: dict[str, bytes] = {}
    for i, size in enumerate(SIZES):
        key = f"f{i}.bin" if i % 2 else f"sub/f{i}.bin"
        data = os.urandom(size)
        (root / key).write_bytes(data)
        files[key] = data
    return files


@pytest.fixture
def data_root(tmp_path: Path, dataset: dict[str, bytes]) -> Path:
    del dataset
    return tmp_path / "data"


@pytest.fixture
def one(data_root: Path, nginx_replicas: Callable[..., NginxReplicas]) -> Iterator[NginxReplicas]:
    yield nginx_replicas(data_root, 1)


def test_cat_file_slices_and_ranges_over_http(
    one: NginxReplicas, dataset: dict[str, bytes]
) -> None:
    fs = feedline.FileSystem([one.urls[0]])
    for key, data in dataset.items():
        assert fs.cat_file(key) == data, key
        assert fs.cat_file("/" + key, 1, 5) == data[1:5]
        assert fs.cat_file(key, -3) == data[-3:]
        assert fs.info(key)["size"] == len(data)
        assert fs.size(key) == len(data)
        assert fs.exists(key)
    assert not fs.exists("nope.bin")
    keys = list(dataset)
    got = fs.cat_ranges(keys, None, None)
    assert got == [dataset[k] for k in keys]


def test_cat_ranges_coalesces_small_adjacent_ranges(
    one: NginxReplicas, dataset: dict[str, bytes]
) -> None:
    fs = feedline.FileSystem([one.urls[0]])
    key = "sub/f6.bin"  # 1 MiB
    data = dataset[key]
    # Adjacent, overlapping, gapped and far-apart ranges, out of order.
    spans = [(i * 1000, i * 1000 + 900) for i in range(300)]
    spans += [(5, 10), (5, 10), (0, len(data)), (len(data) - 1, len(data)), (500_000, 900_000)]
    spans.reverse()
    got = fs.cat_ranges([key] * len(spans), [s for s, _ in spans], [e for _, e in spans])
    assert got == [data[s:e] for s, e in spans]


def test_stream_and_open_over_http(one: NginxReplicas, dataset: dict[str, bytes]) -> None:
    fs = feedline.FileSystem([one.urls[0]], chunk_bytes=64 << 10, depth=4)
    keys = list(dataset)
    joined = b"".join(bytes(c) for c in fs.stream(keys))
    assert joined == b"".join(dataset[k] for k in keys)
    key = "f7.bin"
    with fs.open(key, "rb") as f:
        assert f.read(10) == dataset[key][:10]
        f.seek(1 << 20)
        assert f.read(100) == dataset[key][1 << 20 : (1 << 20) + 100]
        f.seek(0)
        assert f.read() == dataset[key]


def test_http_errors_map_to_python_errors(one: NginxReplicas, data_root: Path) -> None:
    fs = feedline.FileSystem([one.urls[0]])
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        fs.cat_file("missing.bin")
    with pytest.raises(PermissionError):
        fs.cat_file("__feedline_forbidden/x")
    if os.geteuid() != 0:  # root reads a chmod 000 file anyway
        (data_root / "locked").write_bytes(b"x")
        (data_root / "locked").chmod(0)
        with pytest.raises(PermissionError):
            fs.cat_file("locked")
    with pytest.raises(OSError, match="500"):
        fs.cat_file("__feedline_500")


def test_object_shrinking_mid_read_is_short_read_never_short_data(
    one: NginxReplicas, data_root: Path, dataset: dict[str, bytes]
) -> None:
    fs = feedline.FileSystem([one.urls[0]], chunk_bytes=4096, depth=1)
    key = "f7.bin"
    f = fs.open(key, "rb")
    try:
        assert f.read(10) == dataset[key][:10]
        # Truncate behind the reader's back: nginx now answers 416 past the
        # end and a clipped 206 inside it. Neither may come back as data.
        os.truncate(data_root / key, 100)
        f.seek(1 << 20)
        with pytest.raises(feedline.ShortReadError):
            f.read(4096)
        f.seek(50)
        with pytest.raises(feedline.ShortReadError):
            f.read(4096 * 3)
    finally:
        f.close()


def test_bad_urls_and_unknown_protocols(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http://"):
        feedline.FileSystem(["http://"])
    with pytest.raises(ValueError, match="nosuchproto"):
        feedline.FileSystem(["nosuchproto://bucket/x"])
    with pytest.raises(ValueError, match="bogus_option"):
        feedline.FileSystem(["http://127.0.0.1:9/"], storage_options={"bogus_option": 1})
    with pytest.raises(TypeError, match="storage_options"):
        feedline.FileSystem(["http://127.0.0.1:9/"], storage_options="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="replica"):
        feedline.FileSystem([42])  # type: ignore[list-item]
    del tmp_path


def test_refused_connection_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on `port` now: connection refused, fast.
    fs = feedline.FileSystem([f"http://127.0.0.1:{port}"])
    with pytest.raises(OSError, match=str(port)):
        fs.cat_file("x")


def test_s3_protocol_against_nginx_as_endpoint(
    one: NginxReplicas, data_root: Path, dataset: dict[str, bytes]
) -> None:
    """s3:// with fsspec-style options, path-style, anonymous: nginx serves
    GET /bucket/key like an S3 endpoint would (real object_store S3 client)."""
    bucket = data_root / "bkt"
    bucket.mkdir()
    (bucket / "obj").write_bytes(dataset["f7.bin"])
    fs = feedline.FileSystem(
        ["s3://bkt"],
        storage_options={
            "anon": True,
            "client_kwargs": {"endpoint_url": one.urls[0], "region_name": "us-east-1"},
        },
    )
    assert fs.cat_file("obj") == dataset["f7.bin"]
    assert fs.cat_file("obj", 3, 9) == dataset["f7.bin"][3:9]


def test_credentials_never_shown(one: NginxReplicas, dataset: dict[str, bytes]) -> None:
    secret = "Sup3rS3cretValue"
    url = one.urls[0].replace("http://", f"http://alice:{secret}pw@")
    opts = {"headers": {"Authorization": f"Bearer {secret}tok"}}
    fs = feedline.FileSystem([url], storage_options=opts)
    assert fs.cat_file("f1.bin") == dataset["f1.bin"]
    shown = [repr(fs), str(fs), json.dumps(fs.stats())]
    for bad in ("missing", "__feedline_500", "__feedline_forbidden/x"):
        with pytest.raises(OSError) as e:
            fs.cat_file(bad)
        shown.append(str(e.value))
        shown.append(repr(e.value))
    s3 = feedline.FileSystem(
        ["s3://bkt"],
        storage_options={
            "key": "AKIAFEEDLINETEST",
            "secret": secret,
            "endpoint_url": "http://127.0.0.1:9",
        },
    )
    with pytest.raises(OSError) as e:
        s3.cat_file("x")
    shown += [str(e.value), repr(s3), json.dumps(s3.stats())]
    with pytest.raises(ValueError) as ve:
        feedline.FileSystem([url], storage_options={"secret": secret, "nonsense": 1})
    shown.append(str(ve.value))
    for text in shown:
        assert secret not in text, text
    # Pickling must carry them (a spawned worker needs to authenticate).
    assert pickle.loads(pickle.dumps(fs)).cat_file("f1.bin") == dataset["f1.bin"]


def test_fsspec_fallback_memory_and_instances(tmp_path: Path, dataset: dict[str, bytes]) -> None:
    mem = fsspec.filesystem("memory")
    root = f"/feedline-test-{os.getpid()}-{id(tmp_path)}"
    try:
        for key, data in dataset.items():
            mem.pipe_file(f"{root}/{key}", data)
        for fs in (
            feedline.FileSystem([f"memory://{root}"]),
            feedline.FileSystem([(mem, root)]),
            feedline.FileSystem([(fsspec.filesystem("file"), str(tmp_path / "data"))]),
        ):
            keys = list(dataset)
            assert fs.cat_ranges(keys, None, None) == [dataset[k] for k in keys]
            assert fs.cat_file("sub/f6.bin", 10, 20) == dataset["sub/f6.bin"][10:20]
            assert b"".join(bytes(c) for c in fs.stream(keys, chunk_bytes=100_000)) == b"".join(
                dataset[k] for k in keys
            )
            assert fs.info("f1.bin")["size"] == 1
            with pytest.raises(FileNotFoundError):
                fs.cat_file("nope")
            with fs.open("f7.bin", "rb") as f:
                assert f.read() == dataset["f7.bin"]
            assert pickle.loads(pickle.dumps(fs)).cat_file("f1.bin") == dataset["f1.bin"]
        # Names come back as keys relative to the replica root.
        top = sorted({k.split("/")[0] for k in dataset})
        assert sorted(feedline.FileSystem([f"memory://{root}"]).ls("", detail=False)) == top
    finally:
        mem.rm(root, recursive=True)


def test_handed_over_filesystem_is_released_with_its_filesystem(tmp_path: Path) -> None:
    """A filesystem object given as a replica is registered (as an
    ``fsspec-instance://N/`` root) only as long as the FileSystem that uses
    it: dropping that FileSystem, or a constructor that rejects its
    arguments, leaves the registry as it was and frees the object."""
    (tmp_path / "a.bin").write_bytes(b"abc")
    inner = LocalFileSystem(skip_instance_cache=True)
    inner_alive = weakref.ref(inner)
    fs = feedline.FileSystem([(inner, str(tmp_path))])
    assert fs.cat_file("a.bin") == b"abc"
    # Its own entry, not a global count: other tests' filesystems come and
    # go with the garbage collector while this one runs.
    root = fs.replicas[0]
    assert _fsspec.instance_of(root) is not None
    del fs, inner
    gc.collect()
    with pytest.raises(ValueError, match="names no registered fsspec filesystem"):
        _fsspec.instance_of(root)
    assert inner_alive() is None

    rejected = LocalFileSystem(skip_instance_cache=True)
    rejected_alive = weakref.ref(rejected)
    with pytest.raises(ValueError, match="weights"):
        feedline.FileSystem([(rejected, str(tmp_path))], weights=[1.0, 2.0])
    del rejected
    gc.collect()
    assert rejected_alive() is None


def test_ls_on_http_replica_says_why_not(one: NginxReplicas) -> None:
    fs = feedline.FileSystem([one.urls[0]])
    with pytest.raises(NotImplementedError, match="listing"):
        fs.ls("")
    with pytest.raises(NotImplementedError):
        fs.open("new", "wb")


# -- a broken replica: lies in Content-Length / Content-Range ---------------


class LyingServer:
    """A tiny HTTP server that answers every request for a known object with
    headers promising the asked-for range but a body that is short (or a
    Content-Range for another range), then closes. Bounded: it serves at most
    `max_requests` connections and stops on close()."""

    def __init__(self, data: bytes, mode: str, max_requests: int = 200) -> None:
        self.data = data
        self.mode = mode
        self.max_requests = max_requests
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and self.requests < self.max_requests:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2.0)
                with contextlib.suppress(OSError):
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        raw = b""
        while b"\r\n\r\n" not in raw and len(raw) < 65536:
            piece = conn.recv(4096)
            if not piece:
                return
            raw += piece
        self.requests += 1
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        method = head.split(" ", 1)[0]
        total = len(self.data)
        start, end = 0, total - 1
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "range":
                a, _, b = value.strip().removeprefix("bytes=").partition("-")
                # `bytes=0-` (a whole object, size unknown) has no end.
                start, end = int(a), min(int(b) if b else total - 1, total - 1)
        body = self.data[start : end + 1]
        if method == "HEAD":
            conn.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n".encode()
            )
            return
        if self.mode == "short":
            # Promise the whole range, send half, close.
            header = (
                f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                f"Content-Range: bytes {start}-{end}/{total}\r\nConnection: close\r\n\r\n"
            )
            conn.sendall(header.encode() + body[: len(body) // 2])
        elif self.mode == "wrong-total":
            # A consistent lie: the first half of the range, labelled as
            # the whole of a smaller object. Only a manifest can tell.
            cut = body[: max(1, len(body) // 2)]
            header = (
                f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(cut)}\r\n"
                f"Content-Range: bytes {start}-{start + len(cut) - 1}/{start + len(cut)}\r\n"
                "Connection: close\r\n\r\n"
            )
            conn.sendall(header.encode() + cut)
        else:  # "wrong-range": the bytes of another range, labelled as such
            shifted = self.data[start + 1 : end + 2]
            header = (
                f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(shifted)}\r\n"
                f"Content-Range: bytes {start + 1}-{start + len(shifted)}/{total}\r\n"
                "Connection: close\r\n\r\n"
            )
            conn.sendall(header.encode() + shifted)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("mode", ["short", "wrong-range"])
def test_lying_server_alone_is_an_error_never_short_data(mode: str) -> None:
    data = os.urandom(300_000)
    server = LyingServer(data, mode)
    try:
        fs = feedline.FileSystem([server.url])
        with pytest.raises(OSError):
            fs.cat_file("obj", 1000, 200_000)
        with pytest.raises(OSError):  # a whole object: one GET, same checks
            fs.cat_file("obj")
        for r in fs.cat_ranges(["obj"] * 2, None, None):
            assert isinstance(r, OSError), r
        for r in fs.cat_ranges(["obj"] * 3, [0, 10, 5000], [100, 20_000, 100_000]):
            assert isinstance(r, OSError), r
    finally:
        server.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_url_root_with_path_and_escaping_keys(
    tmp_path: Path, dataset: dict[str, bytes], nginx_replicas: Callable[..., NginxReplicas]
) -> None:
    r = nginx_replicas(tmp_path, 1)  # serves the parent of data/
    for root in (f"{r.urls[0]}/data", f"{r.urls[0]}/data/"):
        fs = feedline.FileSystem([root])
        assert fs.cat_file("sub/f6.bin") == dataset["sub/f6.bin"]
        assert fs.cat_file("/f1.bin") == dataset["f1.bin"]
        with pytest.raises(ValueError, match=r"\.\."):
            fs.cat_file("sub/../../data/f1.bin")
