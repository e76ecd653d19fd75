"""Smoke test of the installed wheel, run by `make wheel-smoke` with the
interpreter of a fresh virtualenv holding only the wheel and its declared
dependencies (not collected by pytest: it must not see the source tree).

Checks that the package comes from the wheel (the abi3 extension), then
open, stream and cat_ranges over two local replicas, byte for byte."""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile

import feedline
from feedline import _core


def main() -> int:
    site = sysconfig.get_paths()["purelib"]
    assert feedline.__file__.startswith(site), f"feedline imported from {feedline.__file__}"
    assert _core.__file__.endswith(".abi3.so"), f"not the abi3 extension: {_core.__file__}"
    with tempfile.TemporaryDirectory(prefix="feedline-wheel-") as tmp:
        roots = [os.path.join(tmp, f"replica-{i}") for i in range(2)]
        files = {f"shard/{i}.bin": os.urandom(100_000 + i * 4097) for i in range(8)}
        for root in roots:
            for key, data in files.items():
                os.makedirs(os.path.join(root, "shard"), exist_ok=True)
                with open(os.path.join(root, key), "wb") as f:
                    f.write(data)
        keys = sorted(files)
        with feedline.open(keys[0], replicas=roots) as f:
            assert f.read() == files[keys[0]], "open: bytes differ"
        fs = feedline.FileSystem(replicas=roots)
        streamed = b"".join(bytes(chunk) for chunk in fs.stream(keys, chunk_bytes=16 << 10))
        assert streamed == b"".join(files[k] for k in keys), "stream: bytes differ"
        starts = [i * 1000 for i in range(len(keys))]
        ends = [s + 5000 for s in starts]
        got = fs.cat_ranges(keys, starts, ends)
        want = [files[k][s:e] for k, s, e in zip(keys, starts, ends, strict=True)]
        assert got == want, "cat_ranges: bytes differ"
        assert fs.stats()["reads"] > 0
    print(
        f"wheel smoke ok: feedline {feedline.__version__} from {os.path.dirname(feedline.__file__)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
