"""The input listing: which images a job covers, each with a dense integer ``image_id``.

The ``image_id`` is an image's position in the listing. It names the image's row in every feature store
and is the resume key, so a listing is made once per store and reused by every re-run (adding files to a
folder later never shifts existing rows). Sources, all as fsspec URLs or local paths:

* a folder or an object-store prefix (``s3://bucket/images/``): every image file below it, sorted (files without
  an extension are included when their first bytes are an image's; the rest are skipped, with a count logged);
* a glob (``/data/**/*.jpg``, ``s3://bucket/*/*.png``): the matches, sorted;
* a list file: ``.txt`` (one URI per line, ``#`` comments), ``.csv`` (column ``uri``, ``url``, ``path``
  or ``image``, else the first column) or ``.parquet`` (same column names), in file order.
Relative entries of a list file are resolved against the list file's own folder.

:func:`fetch_bytes` is the jobs' first Ray Data step: the listed images' bytes.
"""

from __future__ import annotations

import collections
import csv
import io
import logging
import posixpath
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import filesystem, with_protocol

__all__ = ["IMAGE_EXTENSIONS", "LISTING_SCHEMA", "ListingError", "iter_uris", "list_uris", "read_listing", "write_listing",
           "fetch_bytes"]

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
LISTING_SCHEMA = pa.schema([("image_id", pa.int64()), ("uri", pa.string())])
_URI_COLUMNS = ("uri", "url", "path", "image", "file")
_BATCH = 65_536


class ListingError(ValueError):
    """The image source cannot be listed; the message says what to pass instead."""


def _is_image(path: str) -> bool:
    return posixpath.splitext(path.lower())[1] in IMAGE_EXTENSIONS


#: Leading bytes of the formats Pillow decodes, for files without an extension.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"P5", b"P6")


def _looks_like_image(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _folder_images(fs, found: list[str], source: str) -> list[str]:
    """The images among a folder's files: known extensions, and files without one whose first bytes are an
    image's. Everything else is skipped and counted in one log line, so nothing disappears silently."""
    images, skipped = [], collections.Counter()
    for path in found:
        name = posixpath.basename(path)
        ext = posixpath.splitext(name.lower())[1]
        if ext in IMAGE_EXTENSIONS:
            images.append(path)
        elif not ext and not name.startswith("."):
            try:
                with fs.open(path, "rb") as f:
                    head = f.read(16)
            except OSError:
                head = b""
            if _looks_like_image(head):
                images.append(path)
            else:
                skipped["no extension, not an image"] += 1
        else:
            skipped[ext or "hidden file"] += 1
    if skipped:
        _log.info("%s: skipped %d files that are not images (%s); list files explicitly to include others", source,
                  sum(skipped.values()), ", ".join(f"{n} x {what}" for what, n in skipped.most_common(5)))
    return images


def _resolve(entry: str, base: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return posixpath.normpath(posixpath.join(base, entry)) if "://" in base else str((Path(base) / entry).resolve())


def _iter_list_file(source: str) -> Iterator[str]:
    fs, path = filesystem(source)
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    suffix = posixpath.splitext(path.lower())[1]
    if suffix == ".parquet":
        names = pq.read_schema(fs.open(path, "rb")).names
        column = next((c for c in _URI_COLUMNS if c in names), None)
        if column is None:
            raise ListingError(f"{source} has no column named one of {_URI_COLUMNS}; found {names}.")
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=[column], batch_size=_BATCH):
                yield from (_resolve(u, base) for u in batch.column(0).to_pylist() if u)
        return
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        if suffix == ".csv":
            reader = csv.reader(f)
            header = next(reader, [])
            lowered = [h.strip().lower() for h in header]
            column = next((lowered.index(c) for c in _URI_COLUMNS if c in lowered), None)
            if column is None:  # no header we know: the first column holds URIs, header row included
                column = 0
                if header and header[0].strip():
                    yield _resolve(header[0].strip(), base)
            for row in reader:
                if len(row) > column and row[column].strip():
                    yield _resolve(row[column].strip(), base)
        else:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _resolve(line, base)


def iter_uris(source: str) -> Iterator[str]:
    """Yield the image URIs of ``source`` (see module docstring) in listing order."""
    source = str(source)
    if any(ch in source for ch in "*?["):
        fs, _ = filesystem(source)
        matches = sorted(p for p in fs.glob(source.split("://", 1)[-1]) if _is_image(p))
        if not matches:
            raise ListingError(f"No image files match {source}.")
        yield from (with_protocol(fs, p) for p in matches)
        return
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise ListingError(f"Image source {source} does not exist: pass a folder, an s3:// prefix, a glob, "
                           "or a .txt/.csv/.parquet list of image URIs.")
    if fs.isdir(path):
        found = _folder_images(fs, sorted(fs.find(path)), source)
        if not found:
            raise ListingError(f"{source} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        yield from (with_protocol(fs, p) for p in found)
        return
    if _is_image(path):
        yield with_protocol(fs, path)
        return
    yield from _iter_list_file(source)


def write_listing(source: str, dest: str, limit: int | None = None) -> int:
    """List ``source`` into a Parquet file at ``dest`` (any fsspec URL) in bounded batches; returns the count."""
    fs, path = filesystem(dest)
    count = 0
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, LISTING_SCHEMA) as writer:
        batch: list[str] = []

        def flush() -> None:
            nonlocal count, batch
            if batch:
                ids = pa.array(range(count, count + len(batch)), pa.int64())
                writer.write_table(pa.Table.from_arrays([ids, pa.array(batch, pa.string())], schema=LISTING_SCHEMA))
                count += len(batch)
                batch = []

        for uri in iter_uris(source):
            if limit is not None and count + len(batch) >= limit:
                break
            batch.append(uri)
            if len(batch) >= _BATCH:
                flush()
        flush()
    if count == 0:
        raise ListingError(f"{source} lists no images.")
    _log.info("listed %d images from %s into %s", count, source, dest)
    return count


def list_uris(images: str, limit: int | None = None) -> list[str]:
    """The URIs of an image listing (folder, glob, prefix or list file), the first ``limit`` only if given."""
    uris: list[str] = []
    for uri in iter_uris(images):
        if limit is not None and len(uris) >= limit:
            break
        uris.append(uri)
    return uris


def read_listing(url: str) -> pa.Table:
    """The listing written by :func:`write_listing`."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, schema=LISTING_SCHEMA)


def fetch_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data step: read each ``uri``'s bytes through fsspec; unreadable ones get an ``error`` instead of
    stopping the job. This module imports no torch, so the many small fetch tasks stay small processes."""
    data, errors = [], []
    for uri in batch["uri"]:
        try:
            fs, path = filesystem(str(uri))
            data.append(fs.cat_file(path))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - any read failure is this image's failure
            data.append(b"")
            errors.append(f"cannot read {uri}: {type(e).__name__}: {e}")
    return {**batch, "bytes": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}
