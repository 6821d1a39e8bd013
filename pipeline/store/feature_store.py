"""The store handle: :class:`FeatureStore` opens a store, reads its ledger and arrays, and feeds training.

Creating a store lives in :mod:`.create`, committing units in :mod:`.writer`, the summary in :mod:`.info`;
the methods here delegate to them. Ray tasks reopen a store by URL through :func:`read_rows`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from ..io.storage import filesystem, s3_endpoint, storage_errors, zarr_location
from .ledger import compact_parts
from .manifest import (LISTING_FILE, ROW_FAILED, ROW_OK, ROW_PENDING, STATUS_FAILED, STATUS_OK, ImageRecord,
                       read_manifest, status_per_row)
from .compact import decode, storage_arrays, stored_names
from .create import create_store
from .errors import StoreError, StoreMismatchError
from .inventory import StoreInfo, store_info
from .layout import (StoreLayout, check_format, describe_diff, geometry_diff, jsonable, raise_missing, read_attrs,
                     upgrade_attrs)
from .writer import UnitWriter, write_unit

if TYPE_CHECKING:
    import ray.data

__all__ = ["FeatureStore", "task_options", "cached_store", "read_rows", "read_pairs"]

_IO_THREADS = 16


class FeatureStore:
    """A feature store at a URL. Use :meth:`create` (driver) or :meth:`open` (workers and readers).

    ``image_id`` (from the listing) is the row of every array, so "rows" and "image ids" are the same numbers.

    Attributes:
        url, mode, fs, root: where it is and how it is open; storage_options: the fsspec options it was opened with.
        attrs, layout, num_rows: its root attributes and what they say it holds.
        zarr_arrays: name -> Zarr array (``(num_rows, y, x, channel)``), used by the store's own modules.
    """

    def __init__(self, url: str, group: zarr.Group, mode: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.attrs: dict[str, Any] = upgrade_attrs(group.attrs)
        self.layout = StoreLayout.from_attrs(self.attrs)
        self.num_rows = int(self.attrs["num_rows"])
        # Workers only write chunks they fill completely, never the fill value: skip zarr's per-chunk
        # "is it all NaN?" scan (slow on float16) by declaring empty chunks worth writing.
        specs = storage_arrays(self.layout)
        self.zarr_arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in specs}
        for name, arr in self.zarr_arrays.items():
            row, _, per_image = specs[name]
            if arr.shape != ((self.num_rows, *row) if per_image else row):
                raise StoreError(f"{self.url}: array {name!r} has shape {arr.shape}, the store's attributes say "
                                 f"{(self.num_rows, *row) if per_image else row}; an append was interrupted: run "
                                 f"FeatureStore.create again with the same listing.")
        self._listing: pa.Table | None = None
        self._manifest: pa.Table | None = None
        self._status: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, mode={self.mode!r}, rows={self.num_rows})"

    def __reduce__(self) -> tuple:
        """Pickles as its URL: a copy sent to a Ray task or actor reopens the store there."""
        return _reopen, (self.url, self.mode, self.storage_options)

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
        attrs = read_attrs(url, storage_options)
        if attrs is None:
            raise_missing(url, storage_options)
        check_format(url, attrs)
        if expect is not None:
            expected = expect.geometry() if isinstance(expect, StoreLayout) else jsonable(dict(expect))
            diff = geometry_diff(attrs, expected)
            if diff:
                raise StoreMismatchError(f"{url} was written with other feature settings than expected: "
                                         f"{describe_diff(attrs, expected, diff)}. Use a store made with the same "
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
            listing: a table with dense ``image_id`` and ``uri`` (:func:`pipeline.io.listing.read_listing`), or URIs
                (ids in the order given).
            overwrite: delete an existing store (of any configuration) and start empty.
            allow_config_change: append even though ``layout.method`` differs from the store's; the previous
                configuration is kept in the ``history`` attribute. Geometry changes are never appended.
        """
        return create_store(cls, url, layout, listing, overwrite=overwrite,
                            allow_config_change=allow_config_change, storage_options=storage_options)

    # ------------------------------------------------------------------------------------------ ledger
    def listing(self) -> pa.Table:
        """The input listing: ``image_id`` (= row) and ``uri``, sorted by id. Cached."""
        if self._listing is None:
            with storage_errors(self.url):
                self._listing = pq.read_table(pa.BufferReader(self.fs.cat_file(f"{self.root}/{LISTING_FILE}")))
        return self._listing

    def manifest(self, refresh: bool = False, columns: Sequence[str] | None = None) -> pa.Table:
        """One manifest row per finished image (ok or failed), sorted by ``image_id``. The whole manifest is
        cached until ``refresh``; asking for some ``columns`` reads only those (and is not cached)."""
        if columns is not None and (self._manifest is None or refresh):
            with storage_errors(self.url):
                return read_manifest(self.fs, self.root, columns=columns)
        if self._manifest is None or refresh:
            with storage_errors(self.url):
                self._manifest = read_manifest(self.fs, self.root)
            self._status = None
        return self._manifest if columns is None else self._manifest.select(list(columns))

    def refresh(self) -> FeatureStore:
        """Forget the cached manifest, so the next read sees units committed since."""
        self._manifest = self._status = None
        return self

    def row_status(self) -> np.ndarray:
        """Per row: ``ROW_PENDING``, ``ROW_OK`` or ``ROW_FAILED`` (cached with the manifest). Reads only the ledger's ``image_id`` and
        ``status`` columns unless the whole manifest is already cached."""
        if self._status is None:
            if self._manifest is not None:
                table = self._manifest
            else:
                with storage_errors(self.url):
                    table = read_manifest(self.fs, self.root, dedup=False, columns=("image_id", "status"))
            self._status = status_per_row(table, self.num_rows)
        return self._status

    def update_attrs(self, **attrs: Any) -> None:
        """Merge JSON-serialisable ``attrs`` into the group attributes (driver only, e.g. a run's summary)."""
        if self.mode != "r+":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")
        loc, so = zarr_location(self.url, **self.storage_options)
        with storage_errors(self.url):
            zarr.open_group(loc, mode="r+", storage_options=so).attrs.update(jsonable(attrs))
        self.attrs.update(jsonable(attrs))

    def ids(self, status: str = STATUS_OK) -> np.ndarray:
        """Sorted image ids whose manifest status is ``status`` (``"ok"`` or ``"failed"``)."""
        if status not in (STATUS_OK, STATUS_FAILED):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        return np.flatnonzero(self.row_status() == (ROW_OK if status == STATUS_OK else ROW_FAILED))

    def todo(self, retry_failed: bool = False) -> np.ndarray:
        """Ids a run still has to process: listed images without a manifest entry (and failed ones on request)."""
        status = self.row_status()
        return np.flatnonzero(status != ROW_OK if retry_failed else status == ROW_PENDING)

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
        return write_unit(self, records, arrays)

    def write_rows(self, ids: np.ndarray, data: Mapping[str, np.ndarray]) -> None:
        """Write whole chunks, one ``setitem`` per chunk, all concurrently.

        A value shaped exactly like its chunk goes to the codec as is; a multi-chunk ``setitem`` would first
        copy every chunk into a fresh fill-value buffer (an extra pass over the data).
        """
        def put(job: tuple[str, int]) -> None:
            name, j = job
            row = int(ids[j])
            self.zarr_arrays[name][row:row + 1] = data[name][j:j + 1]

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
    def get(self, ids: Sequence[int] | np.ndarray, arrays: Sequence[str] | None = None, *, as_torch: bool = False,
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
            not_ok = ids[~in_range].tolist() + ids[in_range][self.row_status()[ids[in_range]] != ROW_OK].tolist()
            if not_ok:
                raise KeyError(f"images {not_ok[:10]} are not finished (ok) in {self.url}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        contiguous = len(uniq) and uniq[-1] - uniq[0] + 1 == len(uniq)

        def load(name: str) -> np.ndarray:
            arr = self.zarr_arrays[name]
            return arr[int(uniq[0]):int(uniq[-1]) + 1] if contiguous else arr.oindex[uniq]

        stored = stored_names(self.layout, names)
        with storage_errors(self.url):
            raw = dict(zip(stored, self._executor().map(load, stored)))
            if self.layout.compact:
                raw = decode(self, raw, names)
        out = {n: a[inverse] if len(uniq) != len(ids) or not np.array_equal(uniq, ids) else a for n, a in raw.items()}
        if as_torch:
            import torch

            return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in out.items()}
        return out

    def read(self, name: str, ids: Sequence[int] | np.ndarray, *, as_torch: bool = False, check: bool = True) -> Any:
        """One array for ``ids``: ``(n, gh, gw, C)``."""
        return self.get(ids, (name,), as_torch=as_torch, check=check)[name]

    def iter_pairs(self, batch_size: int = 8, *, ids: Sequence[int] | None = None, shuffle: bool = False,
                   seed: int = 0, as_torch: bool = False, drop_last: bool = False) -> Iterator[tuple[Any, Any]]:
        """``(raw, clean)`` batches for training, over ``ids`` (default: every ok image), reading one batch ahead."""
        if "raw" not in self.layout.arrays:
            raise StoreError(f"{self.url} holds no raw features (written with --no-raw), so it has no (raw, clean) "
                             f"pairs: train on a store from `dvt denoise`")
        ids = self.ids(STATUS_OK) if ids is None else np.asarray(ids, dtype=np.int64)
        if shuffle:
            ids = np.random.default_rng(seed).permutation(ids)
        stop = len(ids) - len(ids) % batch_size if drop_last else len(ids)
        batches = [ids[i:i + batch_size] for i in range(0, stop, batch_size)]
        if not batches:
            return
        self.row_status()  # fetched once, here, not in the prefetch thread

        def load(batch: np.ndarray) -> dict[str, Any]:
            return self.get(batch, ("raw", "clean"), as_torch=as_torch)

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

        m = self.manifest(columns=["image_id", "status", "uri"] if with_uri else ["image_id", "status"])
        m = m.filter(pc.equal(m["status"], STATUS_OK)).select(["image_id", "uri"] if with_uri else ["image_id"])
        if ids is not None:
            m = m.filter(pc.is_in(m["image_id"], pa.array(np.asarray(ids, dtype=np.int64))))
        step = rows_per_block or max(batch_size, math.ceil(m.num_rows / 64))
        blocks = [m.slice(i, step) for i in range(0, m.num_rows, step)] or [m]
        return ray.data.from_arrow(blocks).map_batches(
            read_rows, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
            fn_kwargs={"url": self.url, "arrays": tuple(arrays), "options": task_options([self.url], self.storage_options)})

    # ------------------------------------------------------------------------------------------ summary
    def info(self, size: bool = True) -> StoreInfo:
        """Counts, failure reasons, attributes, arrays and (unless ``size=False``: it lists every object) the
        size on storage."""
        return store_info(self, size)


# --------------------------------------------------------------------------------------------------- Ray tasks
# The store's read path inside Ray tasks, shared by :meth:`FeatureStore.to_ray_dataset` and stage 2's pair stream:
# only image ids travel through the driver; each task reopens the store by URL (cached per process) and reads the
# arrays of its block. The driver's S3 endpoint travels with the URL, so remote tasks talk to the same server.

def _reopen(url: str, mode: str, options: Mapping[str, Any]) -> FeatureStore:
    return FeatureStore.open(url, mode, storage_options=options)


def task_options(urls: Sequence[str], options: Mapping[str, Any] | None = None) -> str:
    """The storage options Ray tasks reopen ``urls`` with, as a hashable JSON string: ``options`` plus the driver's
    S3 endpoint when a URL is on S3 and none is given."""
    merged = dict(options or {})
    if any(u.startswith(("s3://", "s3a://")) for u in urls) and s3_endpoint() and "endpoint_url" not in merged:
        merged["endpoint_url"] = s3_endpoint()
    return json.dumps(merged, sort_keys=True)


@functools.lru_cache(maxsize=16)
def cached_store(url: str, options: str) -> FeatureStore:
    """The store at ``url`` opened read-only once per process (``options`` from :func:`task_options`)."""
    return FeatureStore.open(url, "r", storage_options=json.loads(options) or None)


def read_rows(batch: dict[str, np.ndarray], *, url: str, arrays: tuple[str, ...], options: str) -> dict[str, Any]:
    """Ray ``map_batches`` step: the batch's columns plus ``arrays`` of its ``image_id`` rows (ok ids, checked on
    the driver)."""
    return {**batch, **cached_store(url, options).get(batch["image_id"], arrays, check=False)}


def read_pairs(batch: dict[str, np.ndarray], *, urls: tuple[str, ...], options: str) -> dict[str, np.ndarray]:
    """Ray ``map_batches`` step: ``raw`` and ``clean`` of a block of ``(store, image_id)`` rows over several stores,
    in row order."""
    stores, ids = batch["store"], batch["image_id"]
    out: dict[str, np.ndarray] = {}
    for s in np.unique(stores):
        rows = np.flatnonzero(stores == s)
        data = cached_store(urls[int(s)], options).get(ids[rows], ("raw", "clean"), check=False)
        for name in ("raw", "clean"):
            if name not in out:
                out[name] = np.empty((len(ids), *data[name].shape[1:]), dtype=data[name].dtype)
            out[name][rows] = data[name]
    return out
