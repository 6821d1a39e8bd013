"""Writing chunk objects directly: a chunk of an uncompressed store array is the image's array, raw bytes in C
order (``docs/store.md``), so a unit's chunks are written as plain objects, concurrently, without zarr's codec
pipeline (which copies each chunk and scans it for the fill value).

Only arrays whose metadata say exactly that are written this way (one image per chunk, the ``bytes`` codec and
nothing else, the default ``/`` chunk keys); anything else (zstd, sharding, big-endian) goes through zarr.
A local chunk is written to a temporary file and renamed into place, as zarr's own ``LocalStore`` does, so a
reader never sees half a chunk; an object store's PUT is atomic. What a unit commits is unchanged: chunks
first, manifest part last (:mod:`.writer`).

A local chunk also reaches the disk before it is renamed (``fdatasync``), and its pages then leave the page
cache (``POSIX_FADV_DONTNEED``):

* a unit's manifest part is written after its chunks, so after a power cut a committed part never names a chunk
  the disk did not get (renaming a new file orders nothing; the kernel may write the part first);
* a job writes each chunk once and does not read it back, and a store is far larger than memory: cached chunks
  would only push the inputs and everything else out of the cache. Dropped pages are reused by the next
  chunks, where fresh page cache costs the kernel ~2.7 ms per MB on a virtual machine whose host reclaims free
  memory (0.4 ms once reused; ``docs/feed.md``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

__all__ = ["DirectChunkWriter", "WRITE_THREADS"]

_log = logging.getLogger(__name__)

#: Chunk objects in flight per writer: enough to hide object-store latency, few enough to bound memory.
WRITE_THREADS = 8


def _raw_chunks(array: Any) -> str | None:
    """Why ``array`` (a zarr v3 array) cannot take raw chunk objects, or ``None`` when it can."""
    meta = array.metadata
    codecs = getattr(meta, "codecs", None)
    if codecs is None:
        return "not a Zarr v3 array"
    if len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
        return f"codecs {codecs}"
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if endian not in (None, "little"):
        return f"{endian}-endian chunks"
    encoding = meta.chunk_key_encoding
    if type(encoding).__name__ != "DefaultChunkKeyEncoding" or encoding.separator != "/":
        return f"chunk keys {encoding}"
    chunk = tuple(getattr(meta.chunk_grid, "chunk_shape", ()))
    if chunk != (1, *array.shape[1:]):
        return f"chunks {chunk} are not one image of {array.shape}"
    return None


def _sync_and_drop(fd: int) -> None:
    """The file's data on disk, then its pages out of the page cache (where the system has the calls)."""
    getattr(os, "fdatasync", os.fsync)(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class DirectChunkWriter:
    """Writes whole per-image chunks of a store's arrays as objects, ``threads`` at a time.

    Build it with :meth:`for_store` (``None`` when some array needs zarr's codecs).
    """

    def __init__(self, fs: Any, root: str, dtypes: Mapping[str, np.dtype], *, threads: int = WRITE_THREADS):
        self.fs = fs
        self.root = root.rstrip("/")
        self.dtypes = {name: np.dtype(d).newbyteorder("<") for name, d in dtypes.items()}
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.local = protocol in ("file", "local")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dvt-chunks")

    @classmethod
    def for_store(cls, store: Any, *, threads: int = WRITE_THREADS) -> DirectChunkWriter | None:
        """A writer for ``store`` (a :class:`pipeline.store.FeatureStore`), or ``None`` with the reason logged."""
        dtypes = {}
        for name, array in store.zarr_arrays.items():
            why = _raw_chunks(array)
            if why is not None:
                _log.debug("%s: array %r is written through zarr (%s)", store.url, name, why)
                return None
            dtypes[name] = array.dtype
        return cls(store.fs, store.root, dtypes, threads=threads)

    def key(self, name: str, row: int, ndim: int) -> str:
        return f"{self.root}/{name}/c/{row}" + "/0" * (ndim - 1)

    def write(self, ids: np.ndarray, data: Mapping[str, np.ndarray]) -> None:
        """Write row ``ids[j]`` of every array from ``data[name][j]``, all concurrently; raises the first error
        after every write has ended (a failed chunk fails the unit: the caller writes no manifest part)."""
        jobs = []
        for name, values in data.items():
            values = np.ascontiguousarray(values, dtype=self.dtypes[name])
            for j, row in enumerate(np.asarray(ids, dtype=np.int64)):
                jobs.append(self._pool.submit(self._put, self.key(name, int(row), values.ndim), values[j]))
        wait(jobs)
        for job in jobs:
            job.result()

    def _put(self, path: str, value: np.ndarray) -> None:
        if not self.local:
            self.fs.pipe_file(path, value.tobytes())
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(value).cast("B"))
                f.flush()
                _sync_and_drop(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True)
