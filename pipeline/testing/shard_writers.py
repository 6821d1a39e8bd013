"""Writing small shards in img2dataset's layouts, for tests and benchmarks.

* WebDataset: ``NNNNN.tar`` holding ``KEY.jpg``, ``KEY.json`` (``key``, ``url``, ``caption``) and ``KEY.txt``
  (the caption) per image.
* Parquet: one row per image with columns ``key``, ``url``, ``caption`` and ``jpg`` (the encoded bytes).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..io.storage import filesystem

__all__ = ["ShardItem", "jpeg_bytes", "make_items", "tar_bytes", "parquet_bytes", "write_shard"]


@dataclass
class ShardItem:
    """One image of a shard; ``image`` ``None`` leaves the key without an image member (tar) or null (Parquet)."""

    key: str
    image: bytes | None
    url: str = ""
    caption: str = ""


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A small, random, valid JPEG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_items(shard: int, count: int, size: int = 32) -> list[ShardItem]:
    """``count`` images with img2dataset-style keys (``SSSSSIIII``) for shard number ``shard``."""
    return [ShardItem(key=f"{shard:05d}{i:04d}", image=jpeg_bytes(shard * 10_000 + i, size),
                      url=f"https://example.com/{shard}/{i}.jpg", caption=f"image {i} of shard {shard}")
            for i in range(count)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(items: Sequence[ShardItem]) -> bytes:
    """A WebDataset tar of ``items`` (``KEY.jpg``, ``KEY.json``, ``KEY.txt``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for item in items:
            if item.image is not None:
                _add(tar, f"{item.key}.jpg", item.image)
            _add(tar, f"{item.key}.json",
                 json.dumps({"key": item.key, "url": item.url, "caption": item.caption}).encode())
            _add(tar, f"{item.key}.txt", item.caption.encode())
    return buf.getvalue()


def parquet_bytes(items: Sequence[ShardItem], row_group_size: int | None = None) -> bytes:
    """A Parquet file of ``items`` with columns ``key``, ``url``, ``caption``, ``jpg``."""
    table = pa.table({"key": [i.key for i in items], "url": [i.url for i in items],
                      "caption": [i.caption for i in items], "jpg": pa.array([i.image for i in items], pa.binary())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_shard(url: str, items: Sequence[ShardItem], **kwargs) -> str:
    """Write ``items`` as a shard at ``url`` (any fsspec URL; ``.tar`` or ``.parquet``); returns ``url``."""
    data = tar_bytes(items) if url.endswith(".tar") else parquet_bytes(items, **kwargs)
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if "://" not in url:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
    return url
