"""Creating a store, or growing an existing one for another run: the driver side of :meth:`FeatureStore.create`.

The functions take the store class as ``cls`` (as the classmethods they implement do), typed by
:class:`~.handle.StoreClass`, so this module does not import the class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import zarr

from .. import __version__
from .listing_table import extend_listing
from .manifest import LISTING_FILE, parquet_bytes, put_atomic
from ..io.storage import filesystem, storage_errors, zarr_location
from .compact import description as describe_compact
from .compact import dimension_names as compact_dims
from .compact import storage_arrays
from .errors import StoreError, StoreMismatchError
from .handle import S, StoreClass
from .inventory import human_bytes
from .layout import (DESCRIPTIONS, DIMS, FORMAT, FORMAT_VERSION, StoreLayout, check_format, read_attrs,
                     field_differences, upsample_factor)
from .lease import LEASE_FILE

__all__ = ["create_store", "check_store", "check_append", "remove_store"]

_log = logging.getLogger(__package__)


def create_store(cls: StoreClass[S], url: str, layout: StoreLayout, listing: pa.Table | Sequence[str], *,
                 overwrite: bool = False, allow_config_change: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> S:
    """:meth:`FeatureStore.create` (see there): a new store, an overwritten one, or an append to one."""
    url = str(url).rstrip("/")
    fs, root = filesystem(url, **dict(storage_options or {}))
    root = root.rstrip("/")
    attrs = read_attrs(url, storage_options)
    with storage_errors(url):
        if attrs is not None and attrs.get("format") == FORMAT and not attrs.get("creating") and not overwrite:
            return _append(cls, url, attrs, layout, listing, allow_config_change, storage_options)
        if attrs is None or attrs.get("format") != FORMAT:
            if _objects(fs, root):
                raise _foreign(url)
        elif overwrite:
            _log.warning("overwriting the feature store at %s", url)
        _remove_objects(fs, root)
        table = extend_listing(None, listing)
        return _initialise(cls, url, fs, root, layout, table, storage_options)


def check_store(url: str, layout: StoreLayout, *, overwrite: bool = False, allow_config_change: bool = False,
                storage_options: Mapping[str, Any] | None = None) -> bool:
    """Everything :func:`create_store` would refuse, checked without writing anything; True if a store is there.

    Raises :class:`StoreMismatchError` for a store made with other settings, :class:`StoreError` for a location
    holding other data, and the storage errors of :func:`pipeline.io.storage.storage_errors`.
    """
    url = str(url).rstrip("/")
    fs, root = filesystem(url, **dict(storage_options or {}))
    attrs = read_attrs(url, storage_options)
    with storage_errors(url):
        if attrs is not None and attrs.get("format") == FORMAT and not attrs.get("creating"):
            if not overwrite:
                check_append(url, attrs, layout, allow_config_change, quiet=True)
            return True
        if (attrs is None or attrs.get("format") != FORMAT) and _objects(fs, root):
            raise _foreign(url)
        if url.startswith(("s3://", "s3a://")) and not _objects(fs, root):
            bucket = root.split("/", 1)[0]
            if not fs.exists(bucket):
                from ..io.storage import missing_bucket

                raise missing_bucket(url)
    return False


def remove_store(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the store at ``url`` and its lease (a store this run created and left empty)."""
    fs, root = filesystem(str(url).rstrip("/"), **dict(storage_options or {}))
    with storage_errors(url):
        _remove_objects(fs, root.rstrip("/"), keep_lease=False)


def _foreign(url: str) -> StoreError:
    return StoreError(f"{url} already holds data that is not a DVT feature store; refusing to write there. Pick "
                      f"another URL or remove it yourself.")


def _initialise(cls: StoreClass[S], url: str, fs: Any, root: str, layout: StoreLayout, listing: pa.Table,
                storage_options: Mapping[str, Any] | None) -> S:
    loc, so = zarr_location(url, **dict(storage_options or {}))
    # "a" creates the group in the emptied location; "w" would also delete the lease the job holds there
    group = zarr.open_group(loc, mode="a", storage_options=so, attributes={"format": FORMAT, "creating": True})
    n = listing.num_rows
    compressors = None if layout.compressor is None else zarr.codecs.ZstdCodec(level=1)
    for name, (row, dtype, per_image) in storage_arrays(layout).items():
        attributes = {"description": DESCRIPTIONS.get(name) or describe_compact(name) or name}
        if upsample_factor(name) > 1:
            attributes = {"description": f"clean features (stage-1 F) on a {upsample_factor(name)}x finer grid",
                          **layout.fine_geometry(name)}
        shape, chunks = ((n, *row), (1, *row)) if per_image else (row, row)
        group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0 if dtype == "int8" else float("nan"),
            dimension_names=compact_dims(name, len(shape)), compressors=compressors, attributes=attributes)
    group.create_group("manifest", attributes={"description": "Parquet ledger, not Zarr: listing.parquet and "
                                                              "parts/part-*.parquet; see docs/store.md"})
    put_atomic(fs, f"{root}/{LISTING_FILE}", parquet_bytes(listing))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION if layout.compact else 1, "package_version": __version__,
             "created": now, "updated": now, "num_rows": n, "dims": list(DIMS), "history": [],
             **layout.to_attrs()}
    group.attrs.put(attrs)  # replaces the "creating" marker last: the store is usable from here on
    _log.info("created feature store %s: %d images, arrays %s, %s per image per array", url, n,
              ",".join(layout.arrays), human_bytes(layout.image_nbytes))
    return cls(url, zarr.open_group(loc, mode="r+", storage_options=so), "r+", storage_options)


def _absent(value: Any) -> bool:
    return value is None or value == {}


def check_append(url: str, attrs: Mapping[str, Any], layout: StoreLayout, allow_config_change: bool, *,
                 quiet: bool = False) -> dict[str, Any]:
    """Refuse adding rows computed with ``layout`` to the store with ``attrs`` when they would not mean the same;
    returns the attributes the append must update (new run settings, history, identity an older store lacks).

    Geometry, dtype, arrays and weights are never mixed (:attr:`StoreLayout.FIXED`); the stage-1
    configuration, seed and algorithm version (:attr:`StoreLayout.RUN`) only with ``allow_config_change``. A
    store written before the version was recorded counts as version 1; weights and seed it does not record
    cannot be checked, and this run's are recorded from now on. Messages name each differing field.
    """
    check_format(url, attrs)
    theirs = layout.to_attrs()
    store = dict(attrs)
    if store.get("stage1_version") is None:
        store["stage1_version"] = 1  # written before versions were recorded
    new_attrs: dict[str, Any] = {}
    for key in ("weights", "seed", "stage1_version"):
        if _absent(theirs.get(key)):
            theirs[key] = store.get(key)  # this run does not say: nothing to compare
        elif _absent(store.get(key)):
            if not quiet:
                _log.warning("%s does not record its %s (written by an older dvt), so it cannot be checked; "
                             "recording this run's from now on", url, key)
            store[key] = new_attrs[key] = theirs[key]
    fixed, text = field_differences(store, theirs, StoreLayout.FIXED)
    if fixed:
        raise StoreMismatchError(
            f"{url} holds features made with other settings: {text}. A store never mixes features of two "
            f"networks or geometries: write to another URL, or pass overwrite=True (--overwrite) to delete the "
            f"store and start again.")
    changed, text = field_differences(store, theirs, StoreLayout.RUN)
    if changed:
        if not allow_config_change:
            raise StoreMismatchError(
                f"{url} was written with other run settings: {text}. Pass allow_config_change=True "
                f"(--allow-config-change) to add rows computed this way anyway (the store keeps the old settings "
                f"in 'history'), or write to another URL.")
        if not quiet:
            _log.warning("%s: run settings change (%s); the previous ones are kept in 'history'", url, text)
        new_attrs["history"] = [*attrs.get("history", []),
                                {"until": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 **{k: store.get(k) for k in StoreLayout.RUN}}]
        new_attrs.update({k: theirs[k] for k in StoreLayout.RUN})
    return new_attrs


def _append(cls: StoreClass[S], url: str, attrs: dict[str, Any], layout: StoreLayout,
            listing: pa.Table | Sequence[str], allow_config_change: bool,
            storage_options: Mapping[str, Any] | None) -> S:
    new_attrs = check_append(url, attrs, layout, allow_config_change)
    store = cls.open(url, "r+", storage_options=storage_options)
    old = store.listing()
    table = extend_listing(old, listing)
    if table.num_rows != old.num_rows:
        n = table.num_rows
        _log.info("%s: listing grows from %d to %d images; resizing arrays", url, old.num_rows, n)
        for name, (row, _, per_image) in storage_arrays(layout).items():  # metadata only: chunks keep their keys
            if per_image:
                store.zarr_arrays[name].resize((n, *row))
        put_atomic(store.fs, f"{store.root}/{LISTING_FILE}", parquet_bytes(table))
        new_attrs["num_rows"] = n
    if new_attrs:
        new_attrs["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        loc, so = zarr_location(url, **dict(storage_options or {}))
        group = zarr.open_group(loc, mode="r+", storage_options=so)
        group.attrs.update(new_attrs)
        if "method" in new_attrs and "stage1" in group.attrs:
            del group.attrs["stage1"]  # the record's name before it was `method` (layout.upgrade_attrs)
        store = cls(url, group, "r+", storage_options)
    return store


def _objects(fs: Any, root: str) -> list[str]:
    """Every object under ``root`` but the lease (a job takes the lease before it creates the store)."""
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, maxdepth=None, withdirs=False)
    except FileNotFoundError:
        return []
    return [p for p in found if p.rstrip("/") != f"{root.rstrip('/')}/{LEASE_FILE}"]


def _remove_objects(fs: Any, root: str, keep_lease: bool = True) -> None:
    objects = _objects(fs, root)
    if not keep_lease:
        fs.invalidate_cache(root)
        try:
            objects = fs.find(root, maxdepth=None, withdirs=False)
        except FileNotFoundError:
            objects = []
    if objects:
        fs.rm(objects)
    if not keep_lease and fs.exists(root):
        fs.rm(root, recursive=True)  # empty folders of a local store
