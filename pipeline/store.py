"""Feature store: per-image ViT feature maps in a Zarr v3 group, with a Parquet ledger beside them.

Every job reads and writes features through :class:`FeatureStore`, opened from a local path, ``file://``,
``s3://`` or ``memory://`` URL. The layout is plain Zarr v3 + Parquet so it stays readable without this
package (full description in ``docs/store.md``)::

    <url>/zarr.json                       group; attributes: format, backbone, block, sizes, stage-1 config
    <url>/raw/, <url>/clean/, [artifact/] arrays (image, y, x, channel), one image per chunk, NaN = unwritten
    <url>/manifest/listing.parquet        image_id -> uri (image_id is the array row), written by the driver
    <url>/manifest/parts/part-<unit>.parquet   one per work unit, written after its data: the commit record

Commit protocol: the driver creates all metadata (:meth:`FeatureStore.create`); workers open with
``mode="r+"`` and write whole chunks of their own rows only, then one manifest part per unit. An image is
done only when a part lists it, so a writer killed mid-unit leaves chunks nobody trusts and a resume
rewrites them. Object PUTs are atomic, so no reader ever sees a torn part.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from . import __version__
from .manifest import (LISTING_FILE, PARTS_DIR, STATUS_FAILED, STATUS_OK, ImageRecord, compact_parts,
                       extend_listing, put_atomic, read_manifest, unit_id, write_part)
from .storage import filesystem, missing_bucket, storage_errors, strip_protocol, zarr_location

if TYPE_CHECKING:
    import ray.data

__all__ = ["FORMAT", "FORMAT_VERSION", "DIMS", "StoreLayout", "FeatureStore", "UnitWriter", "StoreInfo",
           "StoreError", "StoreNotFoundError", "StoreMismatchError", "ImageRecord"]

_log = logging.getLogger(__name__)

FORMAT = "dvt-feature-store"
FORMAT_VERSION = 1
DIMS = ("image", "y", "x", "channel")
DESCRIPTIONS = {
    "raw": "backbone features as computed, artifacts included",
    "clean": "denoised features (stage-1 neural field F)",
    "artifact": "position-dependent artifact term (stage-1 G)",
}
_IO_THREADS = 16


class StoreError(Exception):
    """A feature store cannot be used as asked; the message says why and what to do."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The URL holds no feature store (or an unfinished one)."""


class StoreMismatchError(StoreError, ValueError):
    """The store was written with another configuration than the one in use."""


# --------------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class StoreLayout:
    """What a store holds and which run settings it must match.

    Attributes:
        backbone: backbone name (timm name or ``package.module:factory``).
        block: transformer block the features come from (non-negative index).
        input_size: ``(height, width)`` in pixels the backbone sees.
        patch_size, stride: ViT patch size and stride in pixels.
        grid: feature grid ``(gh, gw)``.
        channels: feature channels ``C``.
        dtype: ``"float16"`` (default, half the bytes) or ``"float32"``.
        arrays: array names; ``raw`` and ``clean`` always, ``artifact`` and more optionally.
        compressor: ``None`` (chunk object = raw little-endian bytes) or ``"zstd"``.
        stage1: the stage-1 configuration, recorded as given (JSON-serialisable).
    """

    backbone: str
    block: int
    input_size: tuple[int, int]
    patch_size: int
    stride: int
    grid: tuple[int, int]
    channels: int
    dtype: str = "float16"
    arrays: tuple[str, ...] = ("raw", "clean")
    compressor: str | None = None
    stage1: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    #: Settings that decide what the numbers in the arrays mean; never mixed within one store.
    GEOMETRY = ("backbone", "block", "input_size", "patch_size", "stride", "grid", "channels")

    def __post_init__(self) -> None:
        size = self.input_size if isinstance(self.input_size, Sequence) else (self.input_size, self.input_size)
        object.__setattr__(self, "input_size", tuple(int(v) for v in size))
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        object.__setattr__(self, "arrays", tuple(self.arrays))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "stage1", _jsonable(self.stage1))
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype}")
        if not {"raw", "clean"} <= set(self.arrays) or len(set(self.arrays)) != len(self.arrays):
            raise ValueError(f"arrays must name 'raw' and 'clean' once each, got {self.arrays}")
        bad = [a for a in self.arrays if not a.isidentifier() or a == "manifest"]
        if bad:
            raise ValueError(f"array names must be identifiers other than 'manifest': {bad}")
        if self.compressor not in (None, "zstd"):
            raise ValueError(f"compressor must be None or 'zstd', got {self.compressor!r}")

    @classmethod
    def from_backbone(cls, backbone: Any, input_size: int | tuple[int, int], **kwargs: Any) -> StoreLayout:
        """Layout for a :class:`pipeline.backbone.Backbone` fed ``input_size`` pixels."""
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        p, s = backbone.patch_size, backbone.stride
        return cls(backbone=backbone.name, block=backbone.block, input_size=(h, w), patch_size=p, stride=s,
                   grid=((h - p) // s + 1, (w - p) // s + 1), channels=backbone.embed_dim, **kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image's entry in every array: ``(gh, gw, C)``."""
        return (*self.grid, self.channels)

    @property
    def image_nbytes(self) -> int:
        """Bytes of one image in one array (one chunk, before compression)."""
        return math.prod(self.image_shape) * np.dtype(self.dtype).itemsize

    def geometry(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in self.GEOMETRY}

    def to_attrs(self) -> dict[str, Any]:
        d = _jsonable(asdict(self))
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreLayout:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in attrs.items() if k in names})


def _jsonable(value: Any) -> Any:
    """JSON round trip: tuples become lists, numpy scalars plain numbers, so comparisons are stable."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if hasattr(v, "__dataclass_fields__"):
        return asdict(v)
    return str(v)


def _describe_diff(ours: Mapping[str, Any], theirs: Mapping[str, Any], keys: Sequence[str]) -> str:
    return "; ".join(f"{k}: store has {ours.get(k)!r}, expected {theirs.get(k)!r}" for k in keys)


def _geometry_diff(store: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [k for k in expected if _jsonable(store.get(k)) != _jsonable(expected[k])]


# --------------------------------------------------------------------------------------------------- store

@dataclass
class StoreInfo:
    """Summary of a store for ``dvt store info``."""

    url: str
    attrs: dict[str, Any]
    arrays: dict[str, dict[str, Any]]
    listed: int
    ok: int
    failed: int
    pending: int
    failures: list[tuple[str, int]]
    manifest_parts: int
    size_bytes: int | None = None
    objects: int | None = None

    def format(self) -> str:
        a = self.attrs
        lines = [
            f"DVT feature store {self.url} (format {a.get('format_version')}, written by dvt {a.get('package_version')})",
            f"  images:   {self.listed} listed, {self.ok} ok, {self.failed} failed, {self.pending} pending",
            f"  features: {a.get('backbone')} block {a.get('block')}, input {_x(a.get('input_size'))}, "
            f"patch {a.get('patch_size')} stride {a.get('stride')}, grid {_x(a.get('grid'))} x {a.get('channels')} "
            f"channels, {a.get('dtype')}",
        ]
        for name, arr in self.arrays.items():
            lines.append(f"  array {name:9s} shape {tuple(arr['shape'])} {arr['dtype']} chunks {tuple(arr['chunks'])}"
                         f" compressor {arr['compressor']}")
        size = "size not measured" if self.size_bytes is None else \
            f"{_human(self.size_bytes)} in {self.objects} objects"
        lines.append(f"  storage:  {size}, {self.manifest_parts} manifest parts")
        if self.failures:
            lines.append("  failures:")
            lines += [f"    {n:6d} x {reason}" for reason, n in self.failures]
        lines.append(f"  stage1:   {json.dumps(a.get('stage1', {}), sort_keys=True)}")
        return "\n".join(lines)


def _x(v: Any) -> str:
    return "x".join(str(i) for i in v) if isinstance(v, (list, tuple)) else str(v)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _nonfinite_rows(a: np.ndarray) -> np.ndarray:
    """Per image: does it hold inf or NaN? Tests exponent bits one image at a time (~8x isfinite on float16)."""
    uint, top = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}[a.itemsize]
    bits = a.reshape(len(a), -1).view(uint)
    buf = np.empty(bits.shape[1], dtype=uint)
    magnitude = uint(np.iinfo(uint).max >> 1)  # all bits but the sign
    return np.array([np.bitwise_and(row, magnitude, out=buf).max() >= top for row in bits], dtype=bool)


def _to_numpy(x: Any, dtype: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().to("cpu")
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    with np.errstate(over="ignore"):  # overflow to inf is caught by the finiteness check of write_unit
        return np.ascontiguousarray(np.asarray(x), dtype=dtype)


class FeatureStore:
    """A feature store at a URL. Use :meth:`create` (driver) or :meth:`open` (workers and readers).

    ``image_id`` (from the listing) is the row of every array, so "rows" and "image ids" are the same numbers.
    """

    def __init__(self, url: str, group: zarr.Group, mode: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.mode = mode
        self._options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, **self._options)
        self.root = self.root.rstrip("/")
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.layout = StoreLayout.from_attrs(self.attrs)
        self.num_rows = int(self.attrs["num_rows"])
        # Workers only write chunks they fill completely, never the fill value: skip zarr's per-chunk
        # "is it all NaN?" scan (slow on float16) by declaring empty chunks worth writing.
        self._arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in self.layout.arrays}
        for name, arr in self._arrays.items():
            if arr.shape != (self.num_rows, *self.layout.image_shape):
                raise StoreError(f"{self.url}: array {name!r} has shape {arr.shape}, the store's attributes say "
                                 f"{(self.num_rows, *self.layout.image_shape)}; an append was interrupted: run "
                                 f"FeatureStore.create again with the same listing.")
        self._listing: pa.Table | None = None
        self._manifest: pa.Table | None = None
        self._status: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, mode={self.mode!r}, rows={self.num_rows})"

    def __reduce__(self) -> tuple:
        """Pickles as its URL: a copy sent to a Ray task or actor reopens the store there."""
        return _reopen, (self.url, self.mode, self._options)

    def close(self) -> None:
        """Stop the I/O threads (they also end with the process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_rows

    # ------------------------------------------------------------------------------------------ open/create
    @classmethod
    def open(cls, url: str, mode: str = "r", *, expect: StoreLayout | Mapping[str, Any] | None = None,
             storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open an existing store for reading (``"r"``) or for writing units (``"r+"``).

        Args:
            expect: a layout (or some of its geometry fields) the store must match; a mismatch raises
                :class:`StoreMismatchError` naming both sides.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        url = str(url)
        attrs = _read_attrs(url, storage_options)
        if attrs is None:
            _raise_missing(url, storage_options)
        _check_format(url, attrs)
        if expect is not None:
            expected = expect.geometry() if isinstance(expect, StoreLayout) else _jsonable(dict(expect))
            diff = _geometry_diff(attrs, expected)
            if diff:
                raise StoreMismatchError(f"{url} was written with other feature settings than expected: "
                                         f"{_describe_diff(attrs, expected, diff)}. Use a store made with the same "
                                         f"backbone settings, or another URL.")
        loc, so = zarr_location(url, **dict(storage_options or {}))
        with storage_errors(url):
            group = zarr.open_group(loc, mode=mode, storage_options=so)
            return cls(url, group, mode, storage_options)

    @classmethod
    def create(cls, url: str, layout: StoreLayout, listing: pa.Table | Sequence[str], *, overwrite: bool = False,
               allow_config_change: bool = False, storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """Create a store, or prepare an existing one for another run. Driver only, with no writer running.

        On an existing store with the same geometry this appends: the listing grows at the end (known images keep
        their rows; arrays are resized here, never by workers) and finished images stay done.

        Args:
            layout: what the store holds.
            listing: a table with dense ``image_id`` and ``uri`` (:func:`pipeline.listing.read_listing`), or URIs
                (ids in the order given).
            overwrite: delete an existing store (of any configuration) and start empty.
            allow_config_change: append even though ``layout.stage1`` differs from the store's; the previous
                configuration is kept in the ``history`` attribute. Geometry changes are never appended.
        """
        url = str(url).rstrip("/")
        fs, root = filesystem(url, **dict(storage_options or {}))
        root = root.rstrip("/")
        attrs = _read_attrs(url, storage_options)
        with storage_errors(url):
            if attrs is not None and attrs.get("format") == FORMAT and not attrs.get("creating") and not overwrite:
                return cls._append(url, attrs, layout, listing, allow_config_change, storage_options)
            if attrs is None or attrs.get("format") != FORMAT:
                if _has_objects(fs, root):
                    raise StoreError(f"{url} already holds data that is not a DVT feature store; refusing to "
                                     f"write there. Pick another URL or remove it yourself.")
            elif overwrite:
                _log.warning("overwriting the feature store at %s", url)
            if _has_objects(fs, root):
                fs.rm(root, recursive=True)
            table = extend_listing(None, listing)
            return cls._initialise(url, fs, root, layout, table, storage_options)

    @classmethod
    def _initialise(cls, url: str, fs: Any, root: str, layout: StoreLayout, listing: pa.Table,
                    storage_options: Mapping[str, Any] | None) -> FeatureStore:
        loc, so = zarr_location(url, **dict(storage_options or {}))
        group = zarr.open_group(loc, mode="w", storage_options=so, attributes={"format": FORMAT, "creating": True})
        n = listing.num_rows
        compressors = None if layout.compressor is None else zarr.codecs.ZstdCodec(level=1)
        for name in layout.arrays:
            group.create_array(
                name, shape=(n, *layout.image_shape), chunks=(1, *layout.image_shape), dtype=layout.dtype,
                fill_value=float("nan"), dimension_names=DIMS, compressors=compressors,
                attributes={"description": DESCRIPTIONS.get(name, name)})
        group.create_group("manifest", attributes={"description": "Parquet ledger, not Zarr: listing.parquet and "
                                                                  "parts/part-*.parquet; see docs/store.md"})
        put_atomic(fs, f"{root}/{LISTING_FILE}", _parquet_bytes(listing))
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
                 "created": now, "updated": now, "num_rows": n, "dims": list(DIMS), "history": [],
                 **layout.to_attrs()}
        group.attrs.put(attrs)  # replaces the "creating" marker last: the store is usable from here on
        _log.info("created feature store %s: %d images, arrays %s, %s per image per array", url, n,
                  ",".join(layout.arrays), _human(layout.image_nbytes))
        return cls(url, zarr.open_group(loc, mode="r+", storage_options=so), "r+", storage_options)

    @classmethod
    def _append(cls, url: str, attrs: dict[str, Any], layout: StoreLayout, listing: pa.Table | Sequence[str],
                allow_config_change: bool, storage_options: Mapping[str, Any] | None) -> FeatureStore:
        _check_format(url, attrs)
        theirs = layout.to_attrs()
        keys = [*StoreLayout.GEOMETRY, "dtype", "arrays"]
        diff = [k for k in keys if _jsonable(attrs.get(k)) != theirs[k]]
        if diff:
            raise StoreMismatchError(
                f"{url} holds features made with other settings: {_describe_diff(attrs, theirs, diff)}. Write to "
                f"another URL, or pass overwrite=True (--overwrite) to delete the store and start again.")
        store = cls.open(url, "r+", storage_options=storage_options)
        new_attrs: dict[str, Any] = {}
        if _jsonable(attrs.get("stage1", {})) != theirs["stage1"]:
            if not allow_config_change:
                raise StoreMismatchError(
                    f"{url} was written with another stage-1 configuration: store has "
                    f"{json.dumps(attrs.get('stage1'), sort_keys=True)}, this run "
                    f"{json.dumps(theirs['stage1'], sort_keys=True)}. Pass allow_config_change=True "
                    f"(--allow-config-change) to add to it anyway, or use another URL.")
            _log.warning("%s: stage-1 configuration changes; the previous one is kept in 'history'", url)
            new_attrs["history"] = [*attrs.get("history", []),
                                    {"until": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     "stage1": attrs.get("stage1")}]
            new_attrs["stage1"] = theirs["stage1"]
        old = store.listing()
        table = extend_listing(old, listing)
        if table.num_rows != old.num_rows:
            n = table.num_rows
            _log.info("%s: listing grows from %d to %d images; resizing arrays", url, old.num_rows, n)
            for arr in store._arrays.values():  # metadata only: existing chunk objects keep their keys
                arr.resize((n, *layout.image_shape))
            put_atomic(store.fs, f"{store.root}/{LISTING_FILE}", _parquet_bytes(table))
            new_attrs["num_rows"] = n
        if new_attrs:
            new_attrs["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            loc, so = zarr_location(url, **dict(storage_options or {}))
            group = zarr.open_group(loc, mode="r+", storage_options=so)
            group.attrs.update(new_attrs)
            store = cls(url, group, "r+", storage_options)
        return store

    # ------------------------------------------------------------------------------------------ ledger
    def listing(self) -> pa.Table:
        """The input listing: ``image_id`` (= row) and ``uri``, sorted by id. Cached."""
        if self._listing is None:
            with storage_errors(self.url):
                self._listing = pq.read_table(pa.BufferReader(self.fs.cat_file(f"{self.root}/{LISTING_FILE}")))
        return self._listing

    def manifest(self, refresh: bool = False) -> pa.Table:
        """One manifest row per finished image (ok or failed), sorted by ``image_id``. Cached until ``refresh``."""
        if self._manifest is None or refresh:
            with storage_errors(self.url):
                self._manifest = read_manifest(self.fs, self.root)
            self._status = None
        return self._manifest

    def refresh(self) -> FeatureStore:
        """Forget the cached manifest, so the next read sees units committed since."""
        self._manifest = self._status = None
        return self

    def _row_status(self) -> np.ndarray:
        """Per row: 0 pending, 1 ok, 2 failed (cached with the manifest)."""
        m = self.manifest()
        if self._status is None:
            status = np.zeros(self.num_rows, dtype=np.int8)
            ids = m["image_id"].to_numpy()
            code = np.where(pc.equal(m["status"], STATUS_OK).to_numpy(zero_copy_only=False), 1, 2).astype(np.int8)
            keep = ids < self.num_rows  # rows a driver added after this store was opened are not ours to judge
            status[ids[keep]] = code[keep]
            self._status = status
        return self._status

    def update_attrs(self, **attrs: Any) -> None:
        """Merge JSON-serialisable ``attrs`` into the group attributes (driver only, e.g. a run's summary)."""
        if self.mode != "r+":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")
        loc, so = zarr_location(self.url, **self._options)
        with storage_errors(self.url):
            zarr.open_group(loc, mode="r+", storage_options=so).attrs.update(_jsonable(attrs))
        self.attrs.update(_jsonable(attrs))

    def ids(self, status: str = STATUS_OK) -> np.ndarray:
        """Sorted image ids whose manifest status is ``status`` (``"ok"`` or ``"failed"``)."""
        if status not in (STATUS_OK, STATUS_FAILED):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        return np.flatnonzero(self._row_status() == (1 if status == STATUS_OK else 2))

    def todo(self, retry_failed: bool = False) -> np.ndarray:
        """Ids a run still has to process: listed images without a manifest entry (and failed ones on request)."""
        status = self._row_status()
        return np.flatnonzero(status != 1 if retry_failed else status == 0)

    # ------------------------------------------------------------------------------------------ writing
    def unit(self) -> UnitWriter:
        """A :class:`UnitWriter` collecting one work unit image by image."""
        return UnitWriter(self)

    def write_unit(self, records: Sequence[ImageRecord | Mapping[str, Any]],
                   arrays: Mapping[str, Any] | None = None) -> str:
        """Commit one work unit: array data of its ``ok`` images first, then its manifest part.

        Args:
            records: one per image of the unit (:class:`ImageRecord` or dict with the same keys). The unit owns
                exactly these rows; no other unit may hold any of them.
            arrays: every array of the layout, each ``(n, gh, gw, C)`` numpy or torch, where ``n`` is either the
                number of records (rows of failed records are ignored) or the number of ``ok`` records.

        Returns:
            The unit id (the manifest part is ``manifest/parts/part-<unit id>.parquet``).
        """
        if self.mode != "r+":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")
        recs = [ImageRecord.coerce(r) for r in records]
        if not recs:
            raise ValueError("a unit needs at least one record")
        ids = np.array([r.image_id for r in recs], dtype=np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            raise ValueError(f"a unit lists an image twice: {uniq[counts > 1].tolist()}")
        out = ids[(ids < 0) | (ids >= self.num_rows)]
        if len(out):
            raise ValueError(f"image ids {out[:5].tolist()} are outside the store's {self.num_rows} rows: grow the "
                             f"listing on the driver (FeatureStore.create) before the run")
        data = self._unit_arrays(recs, arrays or {})
        if any(r.uri is None for r in recs):
            uris = self.listing()["uri"]
            for r in recs:
                r.uri = r.uri if r.uri is not None else uris[r.image_id].as_py()
        ok_ids = np.array([r.image_id for r in recs if r.status == STATUS_OK], dtype=np.int64)
        name = unit_id(ids.tolist())
        with storage_errors(self.url):
            if len(ok_ids):
                self._write_rows(ok_ids, data)
            write_part(self.fs, self.root, recs, name)
        self.refresh()
        return name

    def _unit_arrays(self, recs: list[ImageRecord], arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validated ``(n_ok, gh, gw, C)`` arrays; images with non-finite values become failed records."""
        ok_idx = [i for i, r in enumerate(recs) if r.status == STATUS_OK]
        if not ok_idx:
            return {}
        unknown = set(arrays) - set(self.layout.arrays)
        missing = set(self.layout.arrays) - set(arrays)
        if unknown or missing:
            raise ValueError(f"{self.url} holds arrays {list(self.layout.arrays)}; got {sorted(arrays)}")
        out = {}
        for name in self.layout.arrays:
            a = _to_numpy(arrays[name], self.layout.dtype)
            if a.ndim == 4 and len(a) == len(recs) and len(recs) != len(ok_idx):
                a = a[ok_idx]
            if a.shape != (len(ok_idx), *self.layout.image_shape):
                raise StoreMismatchError(
                    f"array {name!r}: got shape {a.shape} for {len(ok_idx)} ok images of {len(recs)}; the store "
                    f"{self.url} holds {self.layout.image_shape} per image (backbone {self.layout.backbone}, grid "
                    f"{_x(self.layout.grid)}, {self.layout.channels} channels)")
            out[name] = a
        finite = np.ones(len(ok_idx), dtype=bool)
        for name, a in out.items():
            bad = _nonfinite_rows(a)
            for j in np.flatnonzero(bad & finite):
                rec = recs[ok_idx[j]]
                rec.status, rec.error = STATUS_FAILED, f"non-finite values in {name!r} (in {self.layout.dtype})"
                _log.warning("image %d: %s; recorded as failed", rec.image_id, rec.error)
            finite &= ~bad
        return out if finite.all() else {name: a[finite] for name, a in out.items()}

    def _write_rows(self, ids: np.ndarray, data: Mapping[str, np.ndarray]) -> None:
        """Write whole chunks, one ``setitem`` per chunk, all concurrently.

        A value shaped exactly like its chunk goes to the codec as is; a multi-chunk ``setitem`` would first
        copy every chunk into a fresh fill-value buffer (an extra pass over the data).
        """
        def put(job: tuple[str, int]) -> None:
            name, j = job
            row = int(ids[j])
            self._arrays[name][row:row + 1] = data[name][j:j + 1]

        list(self._executor().map(put, [(name, j) for name in data for j in range(len(ids))]))

    def _executor(self) -> ThreadPoolExecutor:
        """Threads that only wait on zarr's event loop, which does the I/O concurrently."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="dvt-store")
        return self._pool

    def compact(self) -> int:
        """Merge all manifest parts into one object (driver only, no writer running). Returns parts merged."""
        with storage_errors(self.url):
            n, _ = compact_parts(self.fs, self.root)
        self.refresh()
        return n

    # ------------------------------------------------------------------------------------------ reading
    def get(self, ids: Sequence[int] | np.ndarray, arrays: Sequence[str] | None = None, *, torch: bool = False,
            check: bool = True) -> dict[str, Any]:
        """Arrays for ``ids`` (= rows), in the order given: ``{name: (n, gh, gw, C)}`` numpy or torch.

        Args:
            check: refuse ids that are not ``ok`` in the manifest (their chunks may be missing or torn).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        names = tuple(arrays or self.layout.arrays)
        unknown = set(names) - set(self.layout.arrays)
        if unknown:
            raise KeyError(f"{self.url} has no array {sorted(unknown)}; it holds {list(self.layout.arrays)}")
        if check:
            in_range = (ids >= 0) & (ids < self.num_rows)
            not_ok = ids[~in_range].tolist() + ids[in_range][self._row_status()[ids[in_range]] != 1].tolist()
            if not_ok:
                raise KeyError(f"images {not_ok[:10]} are not finished (ok) in {self.url}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        contiguous = len(uniq) and uniq[-1] - uniq[0] + 1 == len(uniq)

        def load(name: str) -> np.ndarray:
            arr = self._arrays[name]
            return arr[int(uniq[0]):int(uniq[-1]) + 1] if contiguous else arr.oindex[uniq]

        with storage_errors(self.url):
            raw = dict(zip(names, self._executor().map(load, names)))
        out = {n: a[inverse] if len(uniq) != len(ids) or not np.array_equal(uniq, ids) else a for n, a in raw.items()}
        if torch:
            import torch as _torch

            return {n: _torch.from_numpy(np.ascontiguousarray(a)) for n, a in out.items()}
        return out

    def read(self, name: str, ids: Sequence[int] | np.ndarray, *, torch: bool = False, check: bool = True) -> Any:
        """One array for ``ids``: ``(n, gh, gw, C)``."""
        return self.get(ids, (name,), torch=torch, check=check)[name]

    def iter_pairs(self, batch_size: int = 8, *, ids: Sequence[int] | None = None, shuffle: bool = False,
                   seed: int = 0, torch: bool = False, drop_last: bool = False) -> Iterator[tuple[Any, Any]]:
        """``(raw, clean)`` batches for training, over ``ids`` (default: every ok image), reading one batch ahead."""
        ids = self.ids(STATUS_OK) if ids is None else np.asarray(ids, dtype=np.int64)
        if shuffle:
            ids = np.random.default_rng(seed).permutation(ids)
        stop = len(ids) - len(ids) % batch_size if drop_last else len(ids)
        batches = [ids[i:i + batch_size] for i in range(0, stop, batch_size)]
        if not batches:
            return
        self.manifest()  # fetched once, here, not in the prefetch thread

        def load(batch: np.ndarray) -> dict[str, Any]:
            return self.get(batch, ("raw", "clean"), torch=torch)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, batches[0])
            for nxt in batches[1:]:
                current, pending = pending.result(), pool.submit(load, nxt)
                yield current["raw"], current["clean"]
            current = pending.result()
            yield current["raw"], current["clean"]

    def to_ray_dataset(self, arrays: Sequence[str] = ("raw", "clean"), *, ids: Sequence[int] | None = None,
                       batch_size: int = 8, num_cpus: float = 0.5, with_uri: bool = False,
                       rows_per_block: int | None = None) -> ray.data.Dataset:
        """A Ray Dataset of ok images: columns ``image_id`` (``uri`` if asked) and one tensor column per array.

        Built from the manifest on the driver; the arrays are read lazily by Ray tasks, a batch at a time, so it
        streams into ``iter_torch_batches`` or Ray Train's ``get_dataset_shard``. Not for ``memory://`` stores
        (other processes cannot see them).
        """
        import ray.data

        m = self.manifest()
        m = m.filter(pc.equal(m["status"], STATUS_OK)).select(["image_id", "uri"] if with_uri else ["image_id"])
        if ids is not None:
            m = m.filter(pc.is_in(m["image_id"], pa.array(np.asarray(ids, dtype=np.int64))))
        step = rows_per_block or max(batch_size, math.ceil(m.num_rows / 64))
        blocks = [m.slice(i, step) for i in range(0, m.num_rows, step)] or [m]
        options = dict(self._options)
        from .storage import s3_endpoint

        if self.url.startswith(("s3://", "s3a://")) and s3_endpoint() and "endpoint_url" not in options:
            options["endpoint_url"] = s3_endpoint()  # the driver's endpoint, so remote workers talk to the same one
        return ray.data.from_arrow(blocks).map_batches(
            _read_batch, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
            fn_kwargs={"url": self.url, "arrays": tuple(arrays), "options": json.dumps(options, sort_keys=True)})

    # ------------------------------------------------------------------------------------------ summary
    def info(self, size: bool = True) -> StoreInfo:
        """Counts, failure reasons, attributes, arrays and (unless ``size=False``: it lists every object) the
        size on storage."""
        m = self.refresh().manifest()
        status = self._row_status()
        ok, failed = int((status == 1).sum()), int((status == 2).sum())
        failed_rows = m.filter(pc.equal(m["status"], STATUS_FAILED))["error"].to_pylist()
        errors = [e.splitlines()[0][:120] if e else "unknown" for e in failed_rows]
        with storage_errors(self.url):
            parts = len(self.fs.find(f"{self.root}/{PARTS_DIR}"))
            objects = self.fs.find(self.root, detail=True) if size else None
        arrays = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                      "compressor": self.layout.compressor or "none"} for n, a in self._arrays.items()}
        return StoreInfo(
            url=self.url, attrs=self.attrs, arrays=arrays, listed=self.num_rows, ok=ok, failed=failed,
            pending=self.num_rows - ok - failed, failures=Counter(errors).most_common(10), manifest_parts=parts,
            size_bytes=None if objects is None else int(sum(o.get("size") or 0 for o in objects.values())),
            objects=None if objects is None else len(objects))


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

    def __init__(self, store: FeatureStore):
        self.store = store
        self.records: list[ImageRecord] = []
        self._arrays: dict[str, list[np.ndarray]] = {name: [] for name in store.layout.arrays}
        self.unit_id: str | None = None

    def add(self, record: ImageRecord | Mapping[str, Any] | int, **arrays: Any) -> None:
        """One finished image: its record and one ``(gh, gw, C)`` entry per array of the store."""
        rec = ImageRecord.coerce({"image_id": record} if isinstance(record, (int, np.integer)) else record)
        if rec.status != STATUS_OK:
            raise ValueError("use fail() for failed images")
        if set(arrays) != set(self._arrays):
            raise ValueError(f"image {rec.image_id}: got arrays {sorted(arrays)}, the store holds {sorted(self._arrays)}")
        self.records.append(rec)
        for name, value in arrays.items():
            self._arrays[name].append(_to_numpy(value, self.store.layout.dtype))

    def fail(self, record: ImageRecord | Mapping[str, Any] | int, error: str) -> None:
        """One image that could not be processed; recorded with ``status="failed"`` and no array data."""
        base = {"image_id": record} if isinstance(record, (int, np.integer)) else record
        rec = ImageRecord.coerce(base)
        rec.status, rec.error = STATUS_FAILED, str(error)
        self.records.append(rec)

    def commit(self) -> str | None:
        if not self.records:
            return None
        arrays = {n: np.stack(v) for n, v in self._arrays.items() if v}
        self.unit_id = self.store.write_unit(self.records, arrays)
        return self.unit_id

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()


# --------------------------------------------------------------------------------------------------- helpers

def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _read_attrs(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Root group attributes, or None when there is no Zarr group at ``url``."""
    loc, so = zarr_location(url, **dict(storage_options or {}))
    with storage_errors(url):
        try:
            return dict(zarr.open_group(loc, mode="r", storage_options=so).attrs)
        except (FileNotFoundError, zarr.errors.NodeTypeValidationError):
            return None


def _has_objects(fs: Any, root: str) -> bool:
    try:
        return bool(fs.find(root, maxdepth=None, withdirs=False)[:1])
    except FileNotFoundError:
        return False


def _raise_missing(url: str, storage_options: Mapping[str, Any] | None) -> None:
    fs, root = filesystem(url, **dict(storage_options or {}))
    if url.startswith(("s3://", "s3a://")):
        with storage_errors(url):
            if not fs.exists(strip_protocol(url).split("/", 1)[0]):
                raise missing_bucket(url)
    raise StoreNotFoundError(f"{url} is not a DVT feature store: there is no zarr.json there. Create one with "
                             f"FeatureStore.create (stage 1 does) or check the URL.")


def _check_format(url: str, attrs: Mapping[str, Any]) -> None:
    if attrs.get("format") != FORMAT:
        raise StoreNotFoundError(f"{url} is a Zarr group but not a DVT feature store (its attributes have no "
                                 f"'format': '{FORMAT}')")
    if attrs.get("creating"):
        raise StoreNotFoundError(f"{url}: creating this store did not finish; run FeatureStore.create again")
    version = int(attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise StoreError(f"{url} has store format {version}; this dvt {__version__} reads up to {FORMAT_VERSION}: "
                         f"upgrade the package")


def _reopen(url: str, mode: str, options: Mapping[str, Any]) -> FeatureStore:
    return FeatureStore.open(url, mode, storage_options=options)


@functools.lru_cache(maxsize=8)
def _cached_store(url: str, options: str) -> FeatureStore:
    return FeatureStore.open(url, "r", storage_options=json.loads(options))


def _read_batch(batch: dict[str, np.ndarray], *, url: str, arrays: tuple[str, ...], options: str) -> dict[str, Any]:
    """Ray map_batches step: the arrays of a batch of ok ids (checked on the driver)."""
    store = _cached_store(url, options)
    return {**batch, **store.get(batch["image_id"], arrays, check=False)}
