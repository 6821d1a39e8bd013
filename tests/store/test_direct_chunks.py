"""Chunks written as plain objects (pipeline/store/direct.py) read back exactly as zarr-written ones, through the
store, plain zarr and xarray, locally and on S3; a failed chunk write fails its unit."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from pipeline.io.storage import storage_options, zarr_location
from pipeline.store import FeatureStore, StoreLayout
from pipeline.store import writer as store_writer
from pipeline.store.direct import DirectChunkWriter

GRID, C = (3, 4), 5
LAYOUT = StoreLayout(backbone="b", block=0, input_size=(42, 56), patch_size=14, stride=14, grid=GRID, channels=C)
URIS = [f"img{i}.jpg" for i in range(8)]


def unit(ids, dtype="float32"):
    rng = np.random.default_rng(sum(ids))
    arrays = {n: rng.standard_normal((len(ids), *GRID, C)).astype(dtype) for n in LAYOUT.arrays}
    return [{"image_id": i} for i in ids], arrays


def write_both(url_direct: str, url_zarr: str, layout: StoreLayout, monkeypatch) -> None:
    """The same two units into a store written directly and one written through zarr."""
    direct = FeatureStore.create(url_direct, layout, URIS)
    via_zarr = FeatureStore.create(url_zarr, layout, URIS)
    assert store_writer.direct_writer(FeatureStore.open(url_direct, "r+")) is not None
    for ids in ([0, 1, 2], [6, 4]):
        direct.write_unit(*unit(ids))
    with monkeypatch.context() as m:
        m.setattr(store_writer, "direct_writer", lambda store: None)
        for ids in ([0, 1, 2], [6, 4]):
            via_zarr.write_unit(*unit(ids))


def check_same(url_direct: str, url_zarr: str, layout: StoreLayout) -> None:
    import xarray as xr
    import zarr

    a, b = FeatureStore.open(url_direct), FeatureStore.open(url_zarr)
    assert a.ids().tolist() == b.ids().tolist() == [0, 1, 2, 4, 6]
    got, want = a.get([0, 1, 2, 4, 6]), b.get([0, 1, 2, 4, 6])
    for name in layout.arrays:
        np.testing.assert_array_equal(got[name], want[name])
        assert got[name].dtype == np.dtype(layout.dtype)
    groups = []
    for url in (url_direct, url_zarr):
        loc, so = zarr_location(url)
        groups.append(zarr.open_group(loc, mode="r", storage_options=so))
    names = sorted(groups[0].array_keys())
    assert names == sorted(groups[1].array_keys())
    for name in names:  # plain zarr, every row: NaN rows (never written) match too
        np.testing.assert_array_equal(groups[0][name][...], groups[1][name][...])
    opts = storage_options(url_direct) if url_direct.startswith("s3://") else None
    da = xr.open_zarr(url_direct, consolidated=False, storage_options=opts)
    db = xr.open_zarr(url_zarr, consolidated=False, storage_options=opts)
    for name in ("raw", "clean"):
        if name in da:
            np.testing.assert_array_equal(da[name][[0, 1, 2, 4, 6]].values, db[name][[0, 1, 2, 4, 6]].values)


def test_direct_chunks_read_back_as_zarr_chunks_locally(tmp_path, monkeypatch):
    d, z = str(tmp_path / "direct.zarr"), str(tmp_path / "zarr.zarr")
    write_both(d, z, LAYOUT, monkeypatch)
    check_same(d, z, LAYOUT)
    # Same objects under the same keys, byte for byte; no temporary file left behind.
    for path in sorted(glob.glob(f"{z}/*/c/**/*", recursive=True)):
        if os.path.isfile(path):
            other = path.replace(z, d)
            assert open(path, "rb").read() == open(other, "rb").read(), path
    assert not glob.glob(f"{d}/**/*.partial", recursive=True)


def test_direct_chunks_on_s3_and_compact_int8(s3_bucket, monkeypatch):
    write_both(f"{s3_bucket}/d.zarr", f"{s3_bucket}/z.zarr", LAYOUT, monkeypatch)
    check_same(f"{s3_bucket}/d.zarr", f"{s3_bucket}/z.zarr", LAYOUT)
    int8 = StoreLayout(**{**LAYOUT.__dict__, "compact": {"kind": "int8"}})
    write_both(f"{s3_bucket}/d8.zarr", f"{s3_bucket}/z8.zarr", int8, monkeypatch)
    check_same(f"{s3_bucket}/d8.zarr", f"{s3_bucket}/z8.zarr", int8)


def test_compressed_stores_go_through_zarr(tmp_path):
    zstd = StoreLayout(**{**LAYOUT.__dict__, "compressor": "zstd"})
    store = FeatureStore.create(str(tmp_path / "z.zarr"), zstd, URIS)
    assert store_writer.direct_writer(store) is None
    store.write_unit(*unit([3]))
    np.testing.assert_array_equal(FeatureStore.open(store.url).get([3])["clean"],
                                  unit([3])[1]["clean"].astype("float16"))


def test_a_failed_chunk_write_fails_the_unit(tmp_path, monkeypatch):
    store = FeatureStore.create(str(tmp_path / "s.zarr"), LAYOUT, URIS)
    put = DirectChunkWriter._put

    def flaky(self, path, value):
        if "/clean/c/5/" in path:
            raise OSError("disk full")
        put(self, path, value)

    monkeypatch.setattr(DirectChunkWriter, "_put", flaky)
    with pytest.raises(OSError, match="disk full"):
        store.write_unit(*unit([4, 5]))
    reopened = FeatureStore.open(store.url)
    assert reopened.todo().tolist() == list(range(8))  # no part: nothing of the unit is trusted
    assert not glob.glob(f"{store.url}/manifest/parts/*")
    with pytest.raises(Exception, match="not ok|pending|finished"):
        reopened.get([4])
    monkeypatch.setattr(DirectChunkWriter, "_put", put)
    store.write_unit(*unit([4, 5]))  # the retry commits it
    np.testing.assert_array_equal(FeatureStore.open(store.url).get([5])["raw"], unit([4, 5])[1]["raw"][1:].astype("float16"))


def test_local_chunks_reach_the_disk_before_their_rename_and_before_the_units_part(tmp_path, monkeypatch):
    """A committed unit survives a power cut: each chunk is synced (then dropped from the page cache) before it
    is renamed into place, and all of them before the unit's manifest part is written."""
    store = FeatureStore.create(str(tmp_path / "s.zarr"), LAYOUT, URIS)
    events = []
    sync, replace, write_part = getattr(os, "fdatasync", os.fsync), os.replace, store_writer.write_part

    def recording_sync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        sync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    def recording_part(*args, **kwargs):
        events.append(("part",))
        return write_part(*args, **kwargs)

    monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync", recording_sync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(store_writer, "write_part", recording_part)
    store.write_unit(*unit([2, 3]))
    monkeypatch.undo()

    chunks = [e for e in events if e[0] == "replace" and "/c/" in e[2]]
    assert len(chunks) == 2 * len(LAYOUT.arrays)
    for _, tmp, _ in chunks:  # synced as the temporary file, before the rename
        synced = [j for j, e in enumerate(events) if e == ("sync", os.path.realpath(tmp))]
        assert synced and synced[0] < events.index(("replace", tmp, _)), events
    assert events.index(("part",)) > max(events.index(e) for e in chunks)
    np.testing.assert_array_equal(FeatureStore.open(store.url).get([3])["raw"],
                                  unit([2, 3])[1]["raw"][1:].astype("float16"))


def test_a_units_rows_of_one_batch_travel_without_a_copy():
    from pipeline.store.writer import _rows

    batch = np.arange(5 * 3 * 4, dtype=np.float16).reshape(5, 3, 4)
    rows = [batch[j] for j in range(5)]
    joined = _rows(rows)
    assert np.shares_memory(joined, batch) and np.array_equal(joined, np.stack(rows))
    for values in ([batch[j] for j in (0, 2, 3)], [batch[1], batch[0]], [batch[0], batch[0]],
                   [batch[j].copy() for j in range(5)], [batch[j, :, ::2] for j in range(5)]):
        got = _rows(values)  # gaps, another order, repeats, separate arrays, strided rows: stacked as before
        assert not np.shares_memory(got, batch) and np.array_equal(got, np.stack(values))
