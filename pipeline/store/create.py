"""Creating a store, or growing an existing one for another run: the driver side of :meth:`FeatureStore.create`.

The functions take the store class as ``cls`` (as the classmethods they implement do), so this module needs
:class:`FeatureStore` for type hints only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .. import __version__
from ..manifest import LISTING_FILE, extend_listing, put_atomic
from ..storage import filesystem, storage_errors, zarr_location
from .errors import StoreError, StoreMismatchError
from .info import _human
from .layout import (DESCRIPTIONS, DIMS, FORMAT, FORMAT_VERSION, StoreLayout, _check_format, _describe_diff,
                     _jsonable, _read_attrs)

if TYPE_CHECKING:
    from .feature_store import FeatureStore

__all__ = ["create_store"]

_log = logging.getLogger(__package__)


def create_store(cls: type[FeatureStore], url: str, layout: StoreLayout, listing: pa.Table | Sequence[str], *,
                 overwrite: bool = False, allow_config_change: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
    """:meth:`FeatureStore.create` (see there): a new store, an overwritten one, or an append to one."""
    url = str(url).rstrip("/")
    fs, root = filesystem(url, **dict(storage_options or {}))
    root = root.rstrip("/")
    attrs = _read_attrs(url, storage_options)
    with storage_errors(url):
        if attrs is not None and attrs.get("format") == FORMAT and not attrs.get("creating") and not overwrite:
            return _append(cls, url, attrs, layout, listing, allow_config_change, storage_options)
        if attrs is None or attrs.get("format") != FORMAT:
            if _has_objects(fs, root):
                raise StoreError(f"{url} already holds data that is not a DVT feature store; refusing to "
                                 f"write there. Pick another URL or remove it yourself.")
        elif overwrite:
            _log.warning("overwriting the feature store at %s", url)
        if _has_objects(fs, root):
            fs.rm(root, recursive=True)
        table = extend_listing(None, listing)
        return _initialise(cls, url, fs, root, layout, table, storage_options)


def _initialise(cls: type[FeatureStore], url: str, fs: Any, root: str, layout: StoreLayout, listing: pa.Table,
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


def _append(cls: type[FeatureStore], url: str, attrs: dict[str, Any], layout: StoreLayout,
            listing: pa.Table | Sequence[str], allow_config_change: bool,
            storage_options: Mapping[str, Any] | None) -> FeatureStore:
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


def _has_objects(fs: Any, root: str) -> bool:
    try:
        return bool(fs.find(root, maxdepth=None, withdirs=False)[:1])
    except FileNotFoundError:
        return False


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
