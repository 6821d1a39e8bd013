"""Folding the manifest while a job runs, so the ledger a reader lists and reads stays small.

Workers commit one ``part-<unit>.parquet`` per work unit (:mod:`.manifest`). Left alone, a store of N images
holds N/16 parts and every resume, ``dvt store info`` and ``todo()`` reads them all. The driver folds them
instead: it merges parts into ``compact-*.parquet`` objects in the same folder (same columns, one row per
image, deduplicated) and then deletes the parts it merged.

Why it is safe beside running workers:

* During a run the driver folds only the parts of units whose status rows it has received: those tasks are
  over, so no writer touches those objects again. Parts of units still running are never read or deleted.
* The merged object is written (atomically) before any input is deleted, and only inputs that were read are
  deleted. A fold killed between the two leaves rows twice, which readers' deduplication absorbs; it never
  leaves a row nowhere.
* Only the job holding the store's lease folds, so two folds never race. At the start and the end of a run
  (no worker running) the driver folds everything in the folder: parts of a crashed run, parts written by
  another program, older ``compact-*`` objects.

Merged objects form a binary-counter stack: a new fold is merged with the one below while that one is not
larger, so a run keeps O(log N) objects and rewrites each row O(log N) times; the end of a run leaves one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fsspec
import pyarrow as pa

from .manifest import (PARTS_DIR, is_compact, latest_per_image, ledger_paths, parquet_bytes, put_atomic, read_tables,
                       unit_id)

__all__ = ["FOLD_EVERY", "LedgerFolder", "fold", "fold_all", "compact_parts", "part_path"]

_log = logging.getLogger(__name__)

#: Finished units between two folds during a run (256 units of 16 images: 4,096 manifest rows per fold).
FOLD_EVERY = 256
#: Parts read at once when folding a whole ledger.
FOLD_BATCH = 4096


def part_path(root: str, ids: Sequence[int]) -> str:
    """Where the unit of ``ids`` commits its manifest part (the name :func:`.manifest.write_part` uses)."""
    return f"{root}/{PARTS_DIR}/part-{unit_id(ids)}.parquet"


def fold(fs: fsspec.AbstractFileSystem, root: str, paths: Sequence[str]) -> tuple[str | None, int, int]:
    """Merge the ledger objects ``paths`` into one new ``compact-*.parquet``; delete the inputs that were read.

    Inputs that are gone (already folded) are skipped; inputs that are not valid Parquet are left in place (with
    the warning :func:`.manifest.read_tables` gives) for a person to look at. Returns (new object or None when
    nothing was read, its rows, inputs merged).
    """
    tables, read = read_tables(fs, list(paths))
    if not read:
        return None, 0, 0
    table = latest_per_image(pa.concat_tables(tables))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    out = f"{root}/{PARTS_DIR}/compact-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    put_atomic(fs, out, parquet_bytes(table))  # the merged rows exist before any input goes
    fs.rm(read)
    fs.invalidate_cache(f"{root}/{PARTS_DIR}")
    return out, table.num_rows, len(read)


def fold_all(fs: fsspec.AbstractFileSystem, root: str, batch: int = FOLD_BATCH) -> tuple[str | None, int, int]:
    """Fold every object of the ledger into one (driver only, no worker running). A ledger that is already one
    object is left as it is. Returns what :func:`fold` returns, the existing object when there was nothing to do.

    Many parts (a crashed run's, an older store's) are folded ``batch`` at a time first, then the batches
    together: thousands of tiny tables held at once cost far more memory than their rows.
    """
    paths = ledger_paths(fs, root)
    if len(paths) <= 1:
        rows = -1 if paths else 0  # unknown without reading it; LedgerFolder reads nothing it does not need
        return (paths[0] if paths else None), rows, 0
    merged, made = 0, 0
    if len(paths) > batch:
        compacts = [p for p in paths if is_compact(p)]
        parts = [p for p in paths if not is_compact(p)]
        for start in range(0, len(parts), batch):
            out, _, n = fold(fs, root, parts[start:start + batch])
            merged, made = merged + n, made + (out is not None)
            compacts += [out] if out else []
        paths = compacts
    out, rows, n = fold(fs, root, paths)
    return out, rows, merged + n - made  # objects of the ledger merged, not counting this fold's own batches


def compact_parts(fs: fsspec.AbstractFileSystem, root: str) -> tuple[int, str | None]:
    """``dvt store compact``: every ledger object folded into one (driver only, the store's lease held). Returns
    (objects merged, path of the new object), ``(0, None)`` when the ledger already was one object."""
    path, _, merged = fold_all(fs, root)
    return (merged, path) if merged else (0, None)


@dataclass
class LedgerFolder:
    """The driver's folding of one run: :meth:`start` before workers start, :meth:`add` for each finished unit,
    :meth:`finish` after the last one.

    Attributes:
        fs, root: the store's filesystem and path.
        every: finished units between two folds.
    """

    fs: fsspec.AbstractFileSystem
    root: str
    every: int = FOLD_EVERY
    pending: list[str] = field(default_factory=list)
    stack: list[tuple[str, int]] = field(default_factory=list)
    folds: int = 0

    def start(self) -> None:
        """Fold whatever an earlier run or another program left unfolded (no worker may be running)."""
        path, rows, merged = fold_all(self.fs, self.root)
        if merged:
            _log.info("ledger of %s: folded %d objects left by earlier runs into one (%d images)", self.root,
                      merged, rows)
        # An object whose size is unknown (not read) counts as large: later folds merge into it only at the end.
        self.stack = [] if path is None else [(path, rows if rows >= 0 else 1 << 62)]

    def add(self, ids: Sequence[int]) -> None:
        """The unit of ``ids`` finished (its status rows reached the driver): fold once ``every`` are waiting."""
        self.pending.append(part_path(self.root, ids))
        if len(self.pending) >= self.every:
            self.fold_pending()

    def fold_pending(self) -> None:
        """Fold the waiting parts, then merge down the stack while the object below is not larger."""
        if not self.pending:
            return
        path, rows, _ = fold(self.fs, self.root, self.pending)
        self.pending = []
        if path is None:
            return
        self.folds += 1
        self.stack.append((path, rows))
        while len(self.stack) >= 2 and self.stack[-2][1] <= self.stack[-1][1]:
            (below, _), (top, _) = self.stack[-2], self.stack[-1]
            merged, n, _ = fold(self.fs, self.root, [below, top])
            self.stack[-2:] = [(merged, n)] if merged else []

    def finish(self) -> None:
        """Fold everything into one object (all workers done): also parts of units whose rows never arrived."""
        self.pending = []
        path, rows, merged = fold_all(self.fs, self.root)
        self.stack = [] if path is None else [(path, rows)]
        if merged:
            _log.info("ledger of %s: %d objects folded into one (%d images)", self.root, merged, rows)
