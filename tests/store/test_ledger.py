"""The folded ledger: folding beside a writer, a fold killed half-way, an unfolded ledger met by the next run,
reads that touch O(1 + new parts) objects, and stores written before folding existed."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.runtime.job_runner import open_job_store
from pipeline.store import FeatureStore, StoreLayout
from pipeline.store.ledger import LedgerFolder, fold_all
from pipeline.store.manifest import (PARTS_DIR, ImageRecord, ledger_paths, parquet_bytes, put_atomic, read_manifest,
                                     records_table, unit_id, write_part)

GRID, C = (2, 3), 4
LAYOUT = StoreLayout(backbone="vit_small_patch14_dinov2", block=11, input_size=(28, 42), patch_size=14, stride=14,
                     grid=GRID, channels=C, method={"steps": 1})


def uris(n: int) -> list[str]:
    return [f"file:///corpus/img{i:05d}.jpg" for i in range(n)]


def features(ids) -> dict[str, np.ndarray]:
    return {name: np.stack([np.full((*GRID, C), i + k, np.float32) for i in ids]) for k, name in enumerate(LAYOUT.arrays)}


def commit(store: FeatureStore, ids, failed=()) -> None:
    recs = [{"image_id": i, "status": "failed", "error": "bad"} if i in failed else {"image_id": i} for i in ids]
    ok = [i for i in ids if i not in failed]
    store.write_unit(recs, features(ok) if ok else None)


def objects(store: FeatureStore) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in ledger_paths(store.fs, store.root)]


def _writer(url: str, units: list[list[int]], silent: list[list[int]], done) -> None:
    """A worker process: commits ``units`` (reporting each once written) and ``silent`` ones it never reports."""
    store = FeatureStore.open(url, "r+")
    for k, ids in enumerate(units):
        commit(store, ids, failed={ids[0]} if k % 5 == 0 else ())
        done.put(ids)
        if k < len(silent):
            commit(store, silent[k])
    done.put(None)


def test_folding_beside_a_running_writer_loses_nothing_and_counts_nothing_twice(tmp_path):
    n = 96
    url = str(tmp_path / "store.zarr")
    store = FeatureStore.create(url, LAYOUT, uris(n))
    units = [list(range(i, i + 2)) for i in range(0, 64, 2)]  # reported to the driver when written
    silent = [list(range(i, i + 4)) for i in range(64, n, 4)]  # written, never reported (rows lost in transit)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    proc = ctx.Process(target=_writer, args=(url, units, silent, done))
    folder = LedgerFolder(store.fs, store.root, every=3)
    folder.start()
    proc.start()
    seen = []
    while (ids := done.get(timeout=120)) is not None:
        folder.add(ids)  # folds every 3 reported units while the writer goes on writing
        seen.append(ids)
        reported = {i for u in seen for i in u} - {u[0] for k, u in enumerate(seen) if k % 5 == 0}
        status = FeatureStore.open(url).row_status()
        assert reported <= set(np.flatnonzero(status == 1)), "a fold hid a committed image"
    proc.join(60)
    assert proc.exitcode == 0
    assert folder.folds >= 5 and len(folder.stack) <= 4  # it folded as it went, and merged down the stack
    folder.finish()

    reader = FeatureStore.open(url)
    assert objects(reader) == [p.rsplit("/", 1)[-1] for p, _ in folder.stack] and len(objects(reader)) == 1
    raw = read_manifest(reader.fs, reader.root, dedup=False)
    assert sorted(raw["image_id"].to_pylist()) == list(range(n))  # every image once: nothing lost, nothing twice
    failed = {u[0] for k, u in enumerate(units) if k % 5 == 0}
    assert set(reader.ids("failed").tolist()) == failed
    assert len(reader.todo()) == 0 and len(reader.todo(retry_failed=True)) == len(failed)
    info = reader.info(size=False)
    assert (info.ok, info.failed, info.pending, info.manifest_parts) == (n - len(failed), len(failed), 0, 1)
    got = reader.get([5, 70, 95])
    assert np.array_equal(got["clean"][:, 0, 0, 0], [6, 71, 96])


def test_a_fold_killed_between_write_and_delete_leaves_a_readable_ledger(tmp_path, monkeypatch):
    url = str(tmp_path / "store.zarr")
    store = FeatureStore.create(url, LAYOUT, uris(20))
    for i in range(0, 12, 2):
        commit(store, [i, i + 1], failed={4})
    commit(store, [4, 5])  # image 4 retried: ok now
    fs = store.fs

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-fold")

    monkeypatch.setattr(type(fs), "rm", killed)
    with pytest.raises(KeyboardInterrupt):
        fold_all(fs, store.root)  # the merged object was written, no input deleted
    monkeypatch.undo()
    names = objects(store)
    assert sum(n.startswith("compact-") for n in names) == 1 and sum(n.startswith("part-") for n in names) == 6
    reader = FeatureStore.open(url)
    assert reader.ids("ok").tolist() == list(range(12)) and len(reader.todo()) == 8
    assert reader.manifest()["image_id"].to_pylist() == list(range(12))  # rows twice on storage, once read
    assert reader.info(size=False).ok == 12

    def broken_put(*args, **kwargs):
        raise OSError("storage went away")

    monkeypatch.setattr("pipeline.store.ledger.put_atomic", broken_put)
    with pytest.raises(OSError):
        fold_all(fs, store.root)  # killed before the merged object: every input stays
    monkeypatch.undo()
    assert objects(store) == names
    fold_all(fs, store.root)  # the next fold tidies it up
    assert len(objects(store)) == 1
    assert read_manifest(fs, store.root, dedup=False)["image_id"].to_pylist() == list(range(12))


def test_the_next_run_folds_a_ledger_left_unfolded(tmp_path):
    url = str(tmp_path / "store.zarr")
    listed = uris(40)
    store = FeatureStore.create(url, LAYOUT, listed)
    for i in range(0, 24, 4):  # a crashed run's units
        commit(store, list(range(i, i + 4)))
    other = records_table([ImageRecord(image_id=30, uri=listed[30])], "another-program")
    put_atomic(store.fs, f"{store.root}/{PARTS_DIR}/part-another-program.parquet", parquet_bytes(other))
    store.write_rows(np.array([30]), features([30]))
    assert len(objects(store)) == 7

    again, covered, pending = open_job_store(url, LAYOUT, listed)  # what a re-run does before planning
    assert len(objects(again)) == 1 and objects(again)[0].startswith("compact-")
    assert covered == 40
    assert pending["image_id"].to_pylist() == [i for i in range(24, 40) if i != 30]
    assert pending["uri"].to_pylist() == [listed[i] for i in range(24, 40) if i != 30]
    grown = uris(44)  # a listing grown at the end: the new images are to do, the old keep their rows
    _, covered, pending = open_job_store(url, LAYOUT, grown)
    assert covered == 44 and pending["image_id"].to_pylist()[-4:] == [40, 41, 42, 43]
    _, covered, pending = open_job_store(url, LAYOUT, [listed[3], listed[25]])  # a subset: by URI
    assert (covered, pending["image_id"].to_pylist()) == (2, [25])


class CountingFS:
    """The store's filesystem, counting the objects read through it (GETs) and the listings (LISTs)."""

    def __init__(self, fs):
        self._fs, self.reads, self.lists = fs, [], 0

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def cat(self, paths, **kwargs):
        self.reads += list(paths) if isinstance(paths, list) else [paths]
        return self._fs.cat(paths, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        self.reads.append(path)
        return self._fs.cat_file(path, *args, **kwargs)

    def open(self, path, *args, **kwargs):
        self.reads.append(path)
        return self._fs.open(path, *args, **kwargs)

    def find(self, *args, **kwargs):
        self.lists += 1
        return self._fs.find(*args, **kwargs)


@pytest.mark.parametrize("new_parts", [0, 3])
def test_todo_and_info_read_one_folded_object_plus_the_new_parts(tmp_path, new_parts):
    url = str(tmp_path / "store.zarr")
    store = FeatureStore.create(url, LAYOUT, uris(200))
    folder = LedgerFolder(store.fs, store.root, every=8)
    folder.start()
    for i in range(0, 160, 4):  # 40 units, folded as a job folds them, then finished
        commit(store, list(range(i, i + 4)))
        folder.add(list(range(i, i + 4)))
    folder.finish()
    for i in range(160, 160 + 4 * new_parts, 4):  # units of a later run, not folded yet
        commit(store, list(range(i, i + 4)))

    reader = FeatureStore.open(url)
    reader.fs = counting = CountingFS(reader.fs)
    assert len(reader.todo()) == 200 - 160 - 4 * new_parts
    assert len(counting.reads) == 1 + new_parts and counting.lists == 1
    counting.reads.clear()
    info = reader.info(size=False)
    assert info.ok == 160 + 4 * new_parts and info.manifest_parts == 1 + new_parts
    assert len(counting.reads) == 1 + new_parts  # the listing is not read, the other columns are not fetched


def test_stores_written_before_folding_still_read_and_fold(tmp_path):
    """Only parts, or parts beside a ``compact-<time>.parquet`` as ``dvt store compact`` named it before."""
    url = str(tmp_path / "store.zarr")
    store = FeatureStore.create(url, LAYOUT, uris(30))
    for i in range(0, 8, 2):
        commit(store, [i, i + 1], failed={2})
    assert FeatureStore.open(url).ids("ok").tolist() == [0, 1, 3, 4, 5, 6, 7]
    old = records_table([ImageRecord(image_id=i, uri=f"file:///corpus/img{i:05d}.jpg") for i in range(10, 20)] +
                        [ImageRecord(image_id=2, uri="x", status="failed", error="older")], unit_id(list(range(10, 20))))
    when = datetime(2026, 1, 2, tzinfo=timezone.utc)
    old = old.set_column(old.schema.get_field_index("written_at"), "written_at",
                         pa.array([when] * old.num_rows, old.schema.field("written_at").type))
    stamp = when.strftime("%Y%m%dT%H%M%S%f")
    put_atomic(store.fs, f"{store.root}/{PARTS_DIR}/compact-{stamp}.parquet", parquet_bytes(old))
    store.write_rows(np.arange(10, 20), features(range(10, 20)))
    reader = FeatureStore.open(url)
    assert reader.ids("ok").tolist() == [0, 1, 3, 4, 5, 6, 7, *range(10, 20)]
    assert reader.ids("failed").tolist() == [2]
    m = reader.manifest(columns=["image_id", "error"])
    assert m.filter(pc.equal(m["image_id"], 2))["error"].to_pylist() == ["bad"]  # the latest failure wins
    assert reader.compact() == 5 and len(objects(reader)) == 1
    assert FeatureStore.open(url).ids("ok").tolist() == [0, 1, 3, 4, 5, 6, 7, *range(10, 20)]


def test_write_part_names_what_the_folder_expects(tmp_path):
    from pipeline.store.ledger import part_path

    url = str(tmp_path / "store.zarr")
    store = FeatureStore.create(url, LAYOUT, uris(8))
    written = write_part(store.fs, store.root, [ImageRecord(image_id=i) for i in (5, 3, 4)], unit_id([5, 3, 4]))
    assert Path(written).name == Path(part_path(store.root, [3, 4, 5])).name


def test_a_whole_ledger_is_folded_in_batches_to_one_object(tmp_path):
    url = str(tmp_path / "store.zarr")
    store = FeatureStore.create(url, LAYOUT, uris(40))
    for i in range(0, 36, 2):
        commit(store, [i, i + 1], failed={6})
    commit(store, [6, 7])  # the retried unit: ok now
    path, rows, merged = fold_all(store.fs, store.root, batch=4)  # 18 parts, 5 batches, then one object
    assert (rows, merged) == (36, 18) and objects(store) == [path.rsplit("/", 1)[-1]]
    assert read_manifest(store.fs, store.root, dedup=False)["image_id"].to_pylist() == list(range(36))
    assert FeatureStore.open(url).ids("ok").tolist() == list(range(36))
