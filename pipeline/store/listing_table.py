"""A store's listing (``manifest/listing.parquet``): image id -> URI (and, for shard inputs, where each image
lies in its shard and the kept columns). Append-only, so every image keeps its id, which is its array row; built,
deduplicated and compared in Arrow, so 10^7 URIs never become Python objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["make_listing", "extend_listing", "uri_text", "uri_array"]


def make_listing(uris: Iterable[str] | pa.Table) -> pa.Table:
    """A listing for ``uris`` in the order given (repeats dropped), ``image_id`` dense from 0.

    Same order as :mod:`pipeline.io.listing`, which sorts folder and glob sources and keeps list-file order, so
    the same source always gives the same ids. ``uris`` may also be a table with a ``uri`` column and more
    (shard inputs: where each image lies in its shard, kept columns), carried into the listing.
    """
    if isinstance(uris, pa.Table):
        table = _first_of_each_uri(uris)
        return table.add_column(0, "image_id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    unique = uri_array(uris)
    return pa.table({"image_id": pa.array(np.arange(len(unique), dtype=np.int64)), "uri": unique})


def _first_of_each_uri(table: pa.Table) -> pa.Table:
    """``table`` without rows whose ``uri`` came earlier (in Arrow: no Python set of N URIs)."""
    uris = table["uri"].combine_chunks()
    unique = pc.unique(uris)  # in order of first appearance
    if len(unique) == len(uris):
        return table
    return table.take(pc.index_in(unique, value_set=uris))


def uri_text(uris: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """``uris`` as one Arrow string array, as given (repeats kept)."""
    if isinstance(uris, pa.ChunkedArray):
        uris = uris.combine_chunks()
    if not isinstance(uris, pa.Array):
        uris = uris if isinstance(uris, list) else list(uris)
        try:
            uris = pa.array(uris, pa.string())
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # paths or other objects: their text
            uris = pa.array([str(u) for u in uris], pa.string())
    return uris.cast(pa.string())


def uri_array(uris: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """``uris`` as one Arrow string array, repeats dropped (first one kept, order kept): built and deduplicated
    in Arrow, so 10^7 URIs never become a Python set or dict."""
    uris = uri_text(uris)
    unique = pc.unique(uris)  # in order of first appearance
    return uris if len(unique) == len(uris) else unique


def _check_listing(table: pa.Table) -> pa.Table:
    missing = {"image_id", "uri"} - set(table.column_names)
    if missing:
        raise ValueError(f"a listing needs columns image_id and uri; missing {sorted(missing)}")
    table = table.sort_by("image_id")
    ids = table["image_id"].to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError("listing image_id must be dense 0..n-1 (it is the row of every array)")
    return table.set_column(table.column_names.index("image_id"), "image_id", table["image_id"].cast(pa.int64()))


def extend_listing(old: pa.Table | None, new: pa.Table | pa.Array | Sequence[str]) -> pa.Table:
    """The listing after adding ``new``: append-only, so every image keeps its id (and its row).

    ``new`` is either URIs (those not listed yet get the next ids, in the order given), a table of URIs with more
    columns and no ``image_id`` (the same, carrying its columns), or a full listing table (as
    :func:`pipeline.io.listing.read_listing` returns) whose first ``len(old)`` rows must match ``old``.
    """
    rows = isinstance(new, pa.Table) and "image_id" not in new.column_names
    if old is None or old.num_rows == 0:
        return make_listing(new) if rows or not isinstance(new, pa.Table) else _check_listing(new)
    if isinstance(new, pa.Table) and not rows:
        new = _check_listing(new)
        n = old.num_rows
        if new.num_rows < n or not new["uri"].slice(0, n).combine_chunks().equals(
                old["uri"].combine_chunks().cast(new["uri"].type)):
            raise ValueError(f"the new listing ({new.num_rows} images) does not keep the ids of the store's "
                             f"listing ({n} images): a listing may only grow at the end")
        return new
    n = start = old.num_rows
    known = old["uri"]
    if rows:  # a table of URIs with more columns (shard inputs): the rows not listed yet, with their columns
        table = _first_of_each_uri(new)
        tail = table.filter(pc.invert(pc.is_in(table["uri"], value_set=known.combine_chunks())))
        if not tail.num_rows:
            return old
        tail = tail.add_column(0, "image_id", pa.array(np.arange(start, start + tail.num_rows, dtype=np.int64)))
        return pa.concat_tables([old, tail], promote_options="default")
    uris = uri_text(new)
    if len(uris) >= n and pa.chunked_array([uris.slice(0, n)]).equals(known):  # chunk by chunk: no copy of N URIs
        # The usual re-run: the same listing (its URIs are distinct), perhaps grown at the end. Only the tail is
        # deduplicated and looked up: no pass over N strings but the comparison.
        tail = uri_array(uris.slice(n)) if len(uris) > n else uris.slice(n)
        added = tail.filter(pc.invert(pc.is_in(tail, value_set=known.combine_chunks()))) if len(tail) else tail
    else:
        uris = uri_array(uris)
        added = uris.filter(pc.invert(pc.is_in(uris, value_set=known.combine_chunks())))
    if not len(added):
        return old
    tail = pa.table({"image_id": pa.array(np.arange(start, start + len(added), dtype=np.int64)),
                     "uri": added})
    return pa.concat_tables([old, tail], promote_options="default")  # an old listing's extra columns: null here
