"""Reading shard members' bytes: a Ray Data step that opens each shard of its batch once (see :mod:`.shards`).

A tar batch is one ranged read per run of nearby members, a Parquet batch one read of the image column of the row
groups it touches; the rows come out with the columns :func:`pipeline.io.listing.fetch_bytes` emits (``image_id``,
``uri``, ``bytes``, ``error``), so the rest of an image job does not know where its bytes came from.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import filesystem

from .shards import MEMBER_GAP_BYTES, SHARD_READ_ROWS, shard_kind

__all__ = ["read_blocks", "read_shard_members"]

_log = logging.getLogger(__name__)


def read_blocks(rows: pa.Table, max_rows: int = SHARD_READ_ROWS) -> list[pa.Table]:
    """``rows`` (with :data:`INDEX_COLUMNS`, in shard order) cut where the shard or Parquet row group changes and
    every ``max_rows`` rows of a tar, so no read task spans two shards and each opens its shard once; a Parquet row
    group's rows stay in one task (its image column is read whole)."""
    shards = rows["shard"].to_pylist()
    groups = rows["shard_group"].to_pylist()
    blocks, start = [], 0
    for i in range(1, len(shards) + 1):
        end = i == len(shards) or shards[i] != shards[start] or groups[i] != groups[start]
        if end or (groups[start] in (-1, None) and i - start >= max_rows):
            blocks.append(rows.slice(start, i - start))
            start = i
    return blocks


def read_shard_members(batch: dict[str, np.ndarray], image_column: str = "jpg") -> dict[str, np.ndarray]:
    """Ray Data step: the bytes of a batch of indexed rows (``image_id``, ``uri`` and :data:`INDEX_COLUMNS`).

    Each shard of the batch is opened once: tar members are read with one ranged read from the first member to
    the last, Parquet rows with one read of the image column per row group. Returns the columns
    :func:`pipeline.io.listing.fetch_bytes` does (``image_id``, ``uri``, ``bytes``, ``error``); an unusable member
    or an unreadable shard gives its rows an ``error``, never an exception.
    """
    n = len(batch["image_id"])
    data: list[bytes] = [b""] * n
    errors: list[str] = [str(e) if e else "" for e in batch["shard_error"]]
    shards: dict[str, list[int]] = {}
    loose = []  # rows of a store that also lists loose files: fetched by URI
    for i, shard in enumerate(batch["shard"]):
        if shard is None or shard != shard or shard == "":
            loose.append(i)
        elif not errors[i]:
            shards.setdefault(str(shard), []).append(i)
    if loose:
        from .listing import fetch_bytes

        fetched = fetch_bytes({"uri": np.asarray([batch["uri"][i] for i in loose], dtype=object)})
        for j, i in enumerate(loose):
            data[i], errors[i] = fetched["bytes"][j], str(fetched["error"][j])
    for shard, rows in shards.items():
        try:
            if shard_kind(shard) == "tar":
                _read_tar_rows(shard, rows, batch, data, errors)
            else:
                _read_parquet_rows(shard, rows, batch, data, errors, image_column)
        except Exception as e:  # noqa: BLE001 - an unreadable shard fails its rows, not the job
            for i in rows:
                if not errors[i]:
                    errors[i] = f"cannot read shard {shard}: {type(e).__name__}: {e}"
    for i in range(n):
        if not errors[i] and not data[i]:
            errors[i] = "empty image bytes"
    return {"image_id": np.asarray(batch["image_id"], dtype=np.int64), "uri": np.asarray(batch["uri"], dtype=object),
            "bytes": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}


def _read_tar_rows(shard: str, rows: list[int], batch: dict[str, np.ndarray], data: list[bytes],
                   errors: list[str]) -> None:
    """The members of ``rows`` with one ranged read per run of members less than :data:`MEMBER_GAP_BYTES` apart (a block of
    consecutive members is one read; members left between finished ones are read over, not fetched apart)."""
    members = sorted((int(batch["shard_offset"][i]), int(batch["shard_size"][i]), i) for i in rows)
    fs, path = filesystem(shard)
    run: list[tuple[int, int, int]] = []

    def read(run: list[tuple[int, int, int]]) -> None:
        start, end = run[0][0], max(o + s for o, s, _ in run)
        span = fs.cat_file(path, start=start, end=end)
        for offset, size, i in run:
            piece = span[offset - start:offset - start + size]
            if len(piece) < size:
                errors[i] = f"member cut off: {len(piece)} of {size} bytes readable"
            else:
                data[i] = piece

    for member in members:
        if run and member[0] - max(o + s for o, s, _ in run) > MEMBER_GAP_BYTES:
            read(run)
            run = []
        run.append(member)
    if run:
        read(run)


def _read_parquet_rows(shard: str, rows: list[int], batch: dict[str, np.ndarray], data: list[bytes],
                       errors: list[str], image_column: str) -> None:
    fs, path = filesystem(shard)
    by_group: dict[int, list[int]] = {}
    for i in rows:
        by_group.setdefault(int(batch["shard_group"][i]), []).append(i)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for group, members in by_group.items():
            column = pf.read_row_group(group, columns=[image_column])[image_column]
            taken = pc.take(column, pa.array([int(batch["shard_offset"][i]) for i in members], pa.int64()))
            for i, value in zip(members, taken.to_pylist()):
                if value is None:
                    errors[i] = f"row has no image ({image_column} is null)"
                else:
                    data[i] = value
