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

One job writes a store at a time: it holds the store's lease (``<url>/lease.json``, :mod:`.lease`) while it runs.

Modules: :mod:`.layout` (what a store holds, format constants, root attributes), :mod:`.errors`,
:mod:`.feature_store` (open, reads, Ray datasets), :mod:`.create` (create or append, driver side), :mod:`.writer`
and :mod:`.direct` (committing units; plain chunks written directly), :mod:`.manifest` (the ledger's rows and
objects), :mod:`.ledger` (folding parts as a job runs), :mod:`.listing_table` (image id -> URI), :mod:`.lease`
(one writing job), :mod:`.inventory` (``dvt store info``), :mod:`.compact` and :mod:`.convert` (int8 / PCA stores).
Import from ``pipeline.store``.
"""

from __future__ import annotations

from .manifest import ImageRecord
from .create import check_store, remove_store
from .errors import StoreError, StoreMismatchError, StoreNotFoundError
from .feature_store import FeatureStore
from .inventory import StoreInfo
from .layout import DIMS, FORMAT, FORMAT_VERSION, StoreLayout, describe_weights, upsample_factor
from .lease import LEASE_FILE, LeaseLostError, StoreBusyError, StoreLease, lease_holder
from .writer import UnitWriter

__all__ = ["FORMAT", "FORMAT_VERSION", "DIMS", "StoreLayout", "FeatureStore", "UnitWriter", "StoreInfo",
           "StoreError", "StoreNotFoundError", "StoreMismatchError", "StoreBusyError", "LeaseLostError",
           "StoreLease", "LEASE_FILE", "ImageRecord", "check_store", "remove_store", "lease_holder",
           "describe_weights", "upsample_factor"]
