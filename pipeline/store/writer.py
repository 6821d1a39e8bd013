"""Committing work units: :class:`UnitWriter` and the implementation of :meth:`FeatureStore.write_unit`.

A unit's array data is validated (shapes, finiteness) and written first, its manifest part last: the part is
the commit record, so a writer killed in between leaves chunks nobody trusts. Chunks of uncompressed arrays are
written as plain objects, concurrently (:mod:`.direct`); other arrays through zarr.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .manifest import STATUS_FAILED, STATUS_OK, ImageRecord, unit_id, write_part
from ..io.storage import storage_errors
from .compact import encode
from .direct import DirectChunkWriter
from .errors import StoreError, StoreMismatchError
from .handle import StoreHandle
from .inventory import shape_text

__all__ = ["UnitWriter", "direct_writer", "write_unit"]

_log = logging.getLogger(__package__)


class UnitWriter:
    """Collects one work unit image by image; :meth:`commit` (or leaving the ``with`` block) writes it.

    Nothing is written before the commit, and nothing at all if the block raises, so a unit is all or nothing.

    Example::

        with store.unit() as unit:
            for image in batch:
                try:
                    out = fit(image)
                    unit.add({"image_id": image.id, "seconds": out.seconds}, raw=out.raw, clean=out.clean)
                except Exception as e:
                    unit.fail(image.id, repr(e))
    """

    def __init__(self, store: StoreHandle):
        self.store = store
        self.records: list[ImageRecord] = []
        self.zarr_arrays: dict[str, list[np.ndarray]] = {name: [] for name in store.layout.arrays}
        self.unit_id: str | None = None

    def add(self, record: ImageRecord | Mapping[str, Any] | int, **arrays: Any) -> None:
        """One finished image: its record and one ``(gh, gw, C)`` entry per array of the store."""
        rec = ImageRecord.coerce({"image_id": record} if isinstance(record, (int, np.integer)) else record)
        if rec.status != STATUS_OK:
            raise ValueError("use fail() for failed images")
        if set(arrays) != set(self.zarr_arrays):
            raise ValueError(f"image {rec.image_id}: got arrays {sorted(arrays)}, the store holds {sorted(self.zarr_arrays)}")
        self.records.append(rec)
        for name, value in arrays.items():
            self.zarr_arrays[name].append(_to_numpy(value, self.store.layout.dtype))

    def fail(self, record: ImageRecord | Mapping[str, Any] | int, error: str) -> None:
        """One image that could not be processed; recorded with ``status="failed"`` and no array data."""
        base = {"image_id": record} if isinstance(record, (int, np.integer)) else record
        rec = ImageRecord.coerce(base)
        rec.status, rec.error = STATUS_FAILED, str(error)
        self.records.append(rec)

    def commit(self) -> str | None:
        if not self.records:
            return None
        arrays = {n: _rows(v) for n, v in self.zarr_arrays.items() if v}
        self.unit_id = self.store.write_unit(self.records, arrays)
        return self.unit_id

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()


def write_unit(store: StoreHandle, records: Sequence[ImageRecord | Mapping[str, Any]],
               arrays: Mapping[str, Any] | None = None) -> str:
    """:meth:`FeatureStore.write_unit` (see there): array data of the unit's ``ok`` images, then its part."""
    if store.mode != "r+":
        raise StoreError(f"{store.url} is open read-only; open it with mode='r+' to write")
    recs = [ImageRecord.coerce(r) for r in records]
    if not recs:
        raise ValueError("a unit needs at least one record")
    ids = np.array([r.image_id for r in recs], dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ValueError(f"a unit lists an image twice: {uniq[counts > 1].tolist()}")
    out = ids[(ids < 0) | (ids >= store.num_rows)]
    if len(out):
        raise ValueError(f"image ids {out[:5].tolist()} are outside the store's {store.num_rows} rows: grow the "
                         f"listing on the driver (FeatureStore.create) before the run")
    data = _unit_arrays(store, recs, arrays or {})
    if store.layout.compact and data:
        data = encode(store, data)  # validated features in, the arrays a compact store keeps out
    if any(r.uri is None for r in recs):
        uris = store.listing()["uri"]
        for r in recs:
            r.uri = r.uri if r.uri is not None else uris[r.image_id].as_py()
    ok_ids = np.array([r.image_id for r in recs if r.status == STATUS_OK], dtype=np.int64)
    name = unit_id(ids.tolist())
    with storage_errors(store.url):
        if len(ok_ids):
            direct = direct_writer(store)
            if direct is not None:
                direct.write(ok_ids, data)
            else:
                store.write_rows(ok_ids, data)
        write_part(store.fs, store.root, recs, name)
    store.refresh()
    return name


def direct_writer(store: StoreHandle) -> DirectChunkWriter | None:
    """The store's :class:`DirectChunkWriter` (made once per open store), or ``None`` if its arrays need zarr."""
    cache = store.__dict__
    if "_direct_writer" not in cache:
        cache["_direct_writer"] = DirectChunkWriter.for_store(store)
    return cache["_direct_writer"]


def _unit_arrays(store: StoreHandle, recs: list[ImageRecord], arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validated ``(n_ok, gh, gw, C)`` arrays; images with non-finite values become failed records."""
    layout = store.layout
    ok_idx = [i for i, r in enumerate(recs) if r.status == STATUS_OK]
    if not ok_idx:
        return {}
    unknown = set(arrays) - set(layout.arrays)
    missing = set(layout.arrays) - set(arrays)
    if unknown or missing:
        raise ValueError(f"{store.url} holds arrays {list(layout.arrays)}; got {sorted(arrays)}")
    out = {}
    for name in layout.arrays:
        a = _to_numpy(arrays[name], layout.dtype)
        if a.ndim == 4 and len(a) == len(recs) and len(recs) != len(ok_idx):
            a = a[ok_idx]
        if a.shape != (len(ok_idx), *layout.array_shape(name)):
            raise StoreMismatchError(
                f"array {name!r}: got shape {a.shape} for {len(ok_idx)} ok images of {len(recs)}; the store "
                f"{store.url} holds {layout.array_shape(name)} per image (backbone {layout.backbone}, grid "
                f"{shape_text(layout.grid)}, {layout.channels} channels)")
        out[name] = a
    finite = np.ones(len(ok_idx), dtype=bool)
    for name, a in out.items():
        bad = _nonfinite_rows(a)
        for j in np.flatnonzero(bad & finite):
            rec = recs[ok_idx[j]]
            rec.status, rec.error = STATUS_FAILED, f"non-finite values in {name!r} (in {layout.dtype})"
            _log.warning("image %d: %s; recorded as failed", rec.image_id, rec.error)
        finite &= ~bad
    return out if finite.all() else {name: a[finite] for name, a in out.items()}


def _nonfinite_rows(a: np.ndarray) -> np.ndarray:
    """Per image: does it hold inf or NaN? Tests exponent bits one image at a time (~8x isfinite on float16)."""
    uint, top = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}[a.itemsize]
    bits = a.reshape(len(a), -1).view(uint)
    buf = np.empty(bits.shape[1], dtype=uint)
    magnitude = uint(np.iinfo(uint).max >> 1)  # all bits but the sign
    return np.array([np.bitwise_and(row, magnitude, out=buf).max() >= top for row in bits], dtype=bool)


def _rows(values: list[np.ndarray]) -> np.ndarray:
    """``np.stack(values)``, without the copy when the values are consecutive rows of one array already (a worker's
    batch result split per image, the usual case): a unit's arrays are megabytes per image."""
    first = values[0]
    step = first.nbytes
    start = first.__array_interface__["data"][0]
    same = all(v.dtype == first.dtype and v.shape == first.shape and v.flags.c_contiguous for v in values)
    if not same or any(v.__array_interface__["data"][0] != start + j * step for j, v in enumerate(values)):
        return np.stack(values)
    # The values keep their memory alive while the writer holds them; the view lives no longer than the commit.
    return np.lib.stride_tricks.as_strided(first, shape=(len(values), *first.shape),
                                           strides=(step, *first.strides), writeable=False)


def _to_numpy(x: Any, dtype: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().to("cpu")
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    with np.errstate(over="ignore"):  # overflow to inf is caught by the finiteness check of write_unit
        return np.ascontiguousarray(np.asarray(x), dtype=dtype)
