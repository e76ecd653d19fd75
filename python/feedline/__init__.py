"""feedline: the data path between storage and the GPU.

Replace ``fsspec.open`` with :func:`feedline.open` (or use
:class:`feedline.FileSystem`, an fsspec filesystem) and a Rust core reads
ahead into a bounded ring of zero-copy buffers.
"""

from feedline import chaos, metrics
from feedline._core import (
    Cache,
    Chaos,
    ChecksumMismatch,
    Chunk,
    ChunkStream,
    Prefetch,
    Replica,
    ReplicasUnavailable,
    Routing,
    ShortReadError,
    __version__,
)
from feedline.fs import FeedlineFile, FileSystem, open, write_manifest

__all__ = [
    "Cache",
    "Chaos",
    "ChecksumMismatch",
    "Chunk",
    "ChunkStream",
    "FeedlineFile",
    "FileSystem",
    "Prefetch",
    "Replica",
    "ReplicasUnavailable",
    "Routing",
    "ShortReadError",
    "__version__",
    "chaos",
    "metrics",
    "open",
    "write_manifest",
]
