"""The ledger's rows (:mod:`pipeline.store.manifest`): records, parts, deduplication, row states and listings, on
plain files without a store."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from pipeline.store.listing_table import extend_listing, make_listing
from pipeline.store.manifest import (MANIFEST_SCHEMA, ROW_FAILED, ROW_OK, ROW_PENDING, ImageRecord, latest_per_image,
                                     read_manifest, status_per_row, unit_id, write_part)


def test_record_fields():
    rec = ImageRecord.coerce({"row": 3, "loss_total": 1.0, "status": "failed"})
    assert rec.image_id == 3 and rec.stats == {"loss_total": 1.0} and rec.error == "unknown error"
    with pytest.raises(ValueError, match="not a manifest column"):
        ImageRecord.coerce({"image_id": 1, "note": "hello"})
    with pytest.raises(ValueError, match="status"):
        ImageRecord(1, status="done")


def test_a_unit_is_named_by_its_images_and_its_part_reads_back():
    assert unit_id([3, 1, 2]) == unit_id([1, 2, 3]) != unit_id([1, 2, 4])
    fs = fsspec.filesystem("memory")
    root = "/manifest-test"
    recs = [ImageRecord.coerce({"image_id": i, "uri": f"{i}.jpg", "seconds": 0.5}) for i in (0, 1)]
    path = write_part(fs, root, recs, unit_id([0, 1]))
    assert path.endswith(".parquet") and fs.exists(path)
    table = read_manifest(fs, root)
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert table["image_id"].to_pylist() == [0, 1] and set(table["status"].to_pylist()) == {"ok"}
    assert read_manifest(fs, root, columns=("image_id", "status")).column_names == ["image_id", "status"]


def test_ok_beats_failed_then_the_latest_write_wins_and_rows_get_their_state():
    fs = fsspec.filesystem("memory")
    root = "/manifest-dedup"
    write_part(fs, root, [ImageRecord.coerce({"image_id": 0, "status": "failed", "error": "first try"}),
                          ImageRecord.coerce({"image_id": 1, "status": "failed", "error": "old"})], "a")
    write_part(fs, root, [ImageRecord.coerce({"image_id": 0, "uri": "0.jpg"}),
                          ImageRecord.coerce({"image_id": 1, "status": "failed", "error": "new"})], "b")
    write_part(fs, root, [ImageRecord.coerce({"image_id": 0, "status": "failed", "error": "a later retry"})], "c")
    raw = read_manifest(fs, root, dedup=False)
    assert raw.num_rows == 5
    latest = latest_per_image(raw)
    assert latest["image_id"].to_pylist() == [0, 1]
    assert latest["status"].to_pylist() == ["ok", "failed"] and latest["error"].to_pylist()[1] == "new"
    states = status_per_row(raw, 4)
    assert states.tolist() == [ROW_OK, ROW_FAILED, ROW_PENDING, ROW_PENDING]
    assert states.dtype == np.int8


def test_listings_are_deterministic_and_only_grow_at_the_end():
    listing = make_listing(["b.jpg", "a.jpg", "b.jpg", "c.jpg"])
    assert listing["uri"].to_pylist() == ["b.jpg", "a.jpg", "c.jpg"] and listing["image_id"].to_pylist() == [0, 1, 2]
    grown = extend_listing(listing, ["d.jpg", "a.jpg", "e.jpg"])
    assert grown["uri"].to_pylist() == ["b.jpg", "a.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert grown["image_id"].to_pylist() == [0, 1, 2, 3, 4]
    assert extend_listing(listing, pa.array(["a.jpg"]))["uri"].to_pylist() == ["b.jpg", "a.jpg", "c.jpg"]
    with pytest.raises(ValueError, match="only grow at the end"):
        extend_listing(listing, pa.table({"image_id": [0, 1, 2], "uri": ["a.jpg", "b.jpg", "c.jpg"]}))
