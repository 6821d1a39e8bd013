"""The feature store's ledger: the input listing and the manifest parts, all plain Parquet.

* ``manifest/listing.parquet`` (written by the driver): one row per input image, ``image_id`` dense from 0
  and ``uri``. ``image_id`` is the row of every array, so a re-run maps each image to the same row. The
  listing only ever grows at the end: known URIs keep their ids and new ones get the next ids.
* ``manifest/parts/part-<unit>.parquet`` (one object per work unit, written after the unit's array data):
  one row per image of the unit with :data:`MANIFEST_SCHEMA`. An image counts as done only when a ledger
  object holds a row for it. A retried unit has the same ``<unit>`` name and overwrites its own part.
* ``manifest/parts/compact-<time>-<tag>.parquet`` (written by the driver, :mod:`.ledger`): parts folded
  together, same columns, one row per image. The job folds as it goes, so the folder stays small.

Several objects may hold the same ``image_id`` (a retried failure, or a unit retried with other rows): the
row with ``status == "ok"`` wins, then the latest ``written_at``. See ``docs/store.md``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["MANIFEST_SCHEMA", "LISTING_FILE", "PARTS_DIR", "ImageRecord",
           "unit_id", "records_table", "parquet_bytes", "put_atomic", "write_part",
           "ledger_paths", "read_tables", "read_manifest", "latest_per_image", "status_per_row"]

_log = logging.getLogger(__name__)

LISTING_FILE = "manifest/listing.parquet"
PARTS_DIR = "manifest/parts"

#: Longest ``error`` text kept; a traceback's tail rarely helps more than its first lines.
MAX_ERROR = 2000

STATUS_OK = "ok"
STATUS_FAILED = "failed"
#: A row's state as :meth:`FeatureStore.row_status` codes it (int8, one per store row): no ledger entry yet, an ok
#: entry, only failed entries. The ledger itself stores the strings above.
ROW_PENDING, ROW_OK, ROW_FAILED = 0, 1, 2

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("seconds", pa.float64()),
    pa.field("losses", pa.map_(pa.string(), pa.float64())),
    pa.field("stats", pa.map_(pa.string(), pa.float64())),
    pa.field("unit", pa.string(), nullable=False),
    pa.field("worker", pa.string()),
    pa.field("written_at", pa.timestamp("ms", tz="UTC"), nullable=False),
])


@dataclass
class ImageRecord:
    """What stage 1 reports for one image; becomes one manifest row.

    Attributes:
        image_id: the image's id in the listing, which is also its row in every array.
        uri: where the image came from (filled from the listing when omitted).
        status: ``"ok"`` (arrays written) or ``"failed"`` (no array data; ``error`` says why).
        width, height: the original image size in pixels.
        seconds: time spent on the image.
        losses: final loss values by name.
        stats: any other scalars (residual norm statistics, step counts, ...).
    """

    image_id: int
    uri: str | None = None
    status: str = STATUS_OK
    error: str | None = None
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_id = int(self.image_id)
        if self.status not in (STATUS_OK, STATUS_FAILED):
            raise ValueError(f"image {self.image_id}: status must be 'ok' or 'failed', got {self.status!r}")
        if self.status == STATUS_FAILED and not self.error:
            self.error = "unknown error"
        if self.error is not None and len(str(self.error)) > MAX_ERROR:
            self.error = str(self.error)[:MAX_ERROR - 3] + "..."

    @classmethod
    def coerce(cls, value: ImageRecord | Mapping[str, Any]) -> ImageRecord:
        """Build from a dict; unknown numeric keys go to ``stats`` so stage 1 can report new scalars freely."""
        if isinstance(value, ImageRecord):
            return replace(value, losses=dict(value.losses), stats=dict(value.stats))  # never edit the caller's
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in value.items() if k in known}
        if "image_id" not in kwargs and "row" in value:
            kwargs["image_id"] = value["row"]
        stats = dict(kwargs.pop("stats", None) or {})
        for key, v in value.items():
            if key in known or key == "row":
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                stats[key] = float(v)
            else:
                raise ValueError(f"record field {key!r} is not a manifest column and not a number; "
                                 f"columns are {sorted(known)}")
        return cls(**kwargs, stats=stats)


def _floats(d: Mapping[str, Any] | None) -> list[tuple[str, float]] | None:
    if not d:
        return None
    return [(str(k), float(v)) for k, v in d.items()]


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def unit_id(image_ids: Sequence[int]) -> str:
    """Deterministic name of a work unit: first id, count and a hash of all ids.

    The same rows always give the same name, so a retried unit overwrites its own manifest part.
    """
    ids = np.asarray(sorted(int(i) for i in image_ids), dtype="<i8")
    digest = hashlib.sha1(ids.tobytes()).hexdigest()[:10]
    return f"{int(ids[0]):012d}-{len(ids):06d}-{digest}"


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def records_table(records: Sequence[ImageRecord], unit: str) -> pa.Table:
    """Manifest rows for ``records`` of one unit, with :data:`MANIFEST_SCHEMA`."""
    now = datetime.now(timezone.utc)
    columns = {
        "image_id": [r.image_id for r in records],
        "row": [r.image_id for r in records],
        "uri": [r.uri for r in records],
        "status": [r.status for r in records],
        "error": [r.error for r in records],
        "width": [_opt_int(r.width) for r in records],
        "height": [_opt_int(r.height) for r in records],
        "seconds": [None if r.seconds is None else float(r.seconds) for r in records],
        "losses": [_floats(r.losses) for r in records],
        "stats": [_floats(r.stats) for r in records],
        "unit": [unit] * len(records),
        "worker": [_worker()] * len(records),
        "written_at": [now] * len(records),
    }
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as one zstd-compressed Parquet file in memory, for :func:`put_atomic`."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one object so readers see all of it or nothing.

    An object-store PUT is atomic by itself; on a local disk the bytes go to a temporary name first and are
    renamed into place.
    """
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if {"file", "local"} & set(protocols):
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"  # hidden: Parquet dataset readers skip dot files
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_part(fs: fsspec.AbstractFileSystem, root: str, records: Sequence[ImageRecord], unit: str) -> str:
    """Write the manifest part of one unit; returns its path. Call only after the unit's data is written."""
    path = f"{root}/{PARTS_DIR}/part-{unit}.parquet"
    put_atomic(fs, path, parquet_bytes(records_table(records, unit)))
    return path


def ledger_paths(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every object of the ledger (``part-*`` and ``compact-*`` Parquet under ``manifest/parts``), sorted."""
    # Always a fresh listing: s3fs caches directory listings per filesystem instance, and other processes
    # (the workers) add parts all the time.
    fs.invalidate_cache(f"{root}/{PARTS_DIR}")
    try:
        paths = fs.find(f"{root}/{PARTS_DIR}")
    except FileNotFoundError:
        return []
    names = (p.rsplit("/", 1)[-1] for p in paths)
    return sorted(p for p, name in zip(paths, names)
                  if name.endswith(".parquet") and name.startswith(("part-", "compact-")))


def _schema(columns: Sequence[str] | None) -> pa.Schema:
    if columns is None:
        return MANIFEST_SCHEMA
    unknown = set(columns) - set(MANIFEST_SCHEMA.names)
    if unknown:
        raise ValueError(f"the manifest has no column {sorted(unknown)}; it has {MANIFEST_SCHEMA.names}")
    return pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])


def is_compact(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith("compact-")


def read_tables(fs: fsspec.AbstractFileSystem, paths: list[str],
                columns: Sequence[str] | None = None) -> tuple[list[pa.Table], list[str]]:
    """The ledger objects ``paths`` as tables of ``columns`` (all by default), and the paths that were read.

    Parts (small) are fetched in one concurrent batch; ``compact-*`` objects are opened and only the asked
    columns' byte ranges read. An object that vanished since it was listed (folded meanwhile) is skipped
    quietly; one that is not valid Parquet (only possible if something other than this package wrote it) is
    skipped with a warning: its images are simply not done. Any other read error (storage unavailable) is
    raised, since a manifest with holes would send finished images to be done again.
    """
    schema = _schema(columns)
    cols = None if columns is None else list(columns)
    tables: list[pa.Table] = []
    read: list[str] = []

    def parse(path: str, source: object) -> None:
        try:
            table = pq.read_table(source, columns=cols)
            tables.append(table.select(schema.names).cast(schema))
            read.append(path)
        except (pa.ArrowException, ValueError, KeyError) as e:
            _log.warning("manifest object %s is not valid Parquet of the manifest's columns (%s); its images count "
                         "as not done", path, e)

    parts = [p for p in paths if not is_compact(p)]
    for path in paths:
        if not is_compact(path):
            continue
        try:
            with fs.open(path, "rb") as f:
                parse(path, f)
        except FileNotFoundError:
            continue
    if parts:
        blobs = fs.cat(parts, on_error="return")
        for path in parts:
            blob = blobs.get(path) if isinstance(blobs, dict) else blobs
            if isinstance(blob, FileNotFoundError):
                continue
            if isinstance(blob, BaseException):
                raise blob
            if blob is None:
                _log.warning("manifest part %s could not be read; its images count as not done", path)
                continue
            parse(path, pa.BufferReader(blob))
    return tables, read


def read_manifest(fs: fsspec.AbstractFileSystem, root: str, *, dedup: bool = True,
                  columns: Sequence[str] | None = None) -> pa.Table:
    """Union of every ledger object, deduplicated per image by default (see :func:`read_tables` for errors).

    ``columns`` keeps only those (deduplication also reads ``image_id``, ``status`` and ``written_at``, and
    returns only ``columns``): a step that needs a status per image reads two columns, not all thirteen.
    """
    need = None
    if columns is not None:
        need = list(dict.fromkeys([*columns, *(("image_id", "status", "written_at") if dedup else ())]))
    tables, _ = read_tables(fs, ledger_paths(fs, root), need)
    table = pa.concat_tables(tables) if tables else _schema(need).empty_table()
    if dedup:
        table = latest_per_image(table)
    return table if columns is None else table.select(list(columns))


def latest_per_image(table: pa.Table) -> pa.Table:
    """One row per ``image_id``: ``ok`` beats ``failed``, then the latest ``written_at`` wins. Sorted by id."""
    if table.num_rows == 0:
        return table
    ids = table["image_id"].to_numpy()
    ok = (table["status"].to_numpy(zero_copy_only=False) == STATUS_OK).astype(np.int8)
    when = table["written_at"].cast(pa.int64()).to_numpy()
    order = np.lexsort((-when, -ok, ids))  # last key is primary
    sorted_ids = ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return table.take(pa.array(order[first]))


def status_per_row(table: pa.Table, num_rows: int) -> np.ndarray:
    """Per row of a store of ``num_rows``: ``ROW_PENDING``, ``ROW_OK`` or ``ROW_FAILED``, from undeduplicated ledger rows with
    ``image_id`` and ``status`` (``ok`` wins over any ``failed`` row of the same image, as in deduplication)."""
    status = np.full(num_rows, ROW_PENDING, dtype=np.int8)
    if table.num_rows == 0:
        return status
    ids = table["image_id"].to_numpy()
    ok = table["status"].to_numpy(zero_copy_only=False) == STATUS_OK
    keep = ids < num_rows  # rows a driver added after this store was opened are not ours to judge
    status[ids[keep & ~ok]] = ROW_FAILED
    status[ids[keep & ok]] = ROW_OK
    return status
