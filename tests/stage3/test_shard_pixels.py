"""`dvt distill`'s pixel stream over shards: passes visit every image once in shard-sized runs, held-out rows decode."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io.decode import DecodeConfig
from pipeline.io.shards import index_shards
from pipeline.runtime.train_stream import RankBatches
from pipeline.stage3.pixels import PixelRows, held_out_pixels, rows_of_rank
from pipeline.testing.shard_writers import make_items, write_shard


@pytest.fixture()
def index(tmp_path):
    urls = [write_shard(str(tmp_path / f"{s:05d}.tar"), make_items(s, 5)) for s in range(3)]
    urls.append(write_shard(str(tmp_path / "00003.parquet"), make_items(3, 4), row_group_size=2))
    return index_shards(urls, use_ray=False)


def test_a_pass_visits_each_training_image_once_in_runs_of_one_shard(index):
    ids = np.array([0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 15, 16, 17, 18])
    rows = PixelRows(index, ids, 16, shards=True)
    order = rows.order(0)
    assert sorted(order) == sorted(ids)
    shards = index["shard"].to_numpy(zero_copy_only=False)[order]
    assert sum(shards[1:] != shards[:-1]) + 1 == len(set(shards)), "a shard's members are not one run"
    assert (rows.order(0) == order).all() and not (rows.order(1) == order).all()


def test_held_out_rows_are_read_from_their_shards(index):
    rows = index.take(pa.array([1, 7, 16]))
    pixels = held_out_pixels(rows, 16, DecodeConfig())
    assert pixels.shape == (3, 3, 16, 16) and pixels.float().std() > 0
    assert rows_of_rank(rows, 1, 2).num_rows == 1 and rows_of_rank(rows, 0, 2)["uri"].to_pylist() == [
        rows["uri"][0].as_py(), rows["uri"][2].as_py()]


def test_the_ranks_read_decoded_pixels_of_every_image_from_their_shards(index):
    ids = np.arange(index.num_rows)
    rows = PixelRows(index, ids, 16, shards=True)
    seen = []
    for rank in range(2):
        with RankBatches(rows.order, len(rows), rows.read, batch=3, rank=rank, world=2, threads=2) as batches:
            for _ in range(3):  # 3 steps of 2 x 3 rows: the first 18 of pass 0's 19
                batch = next(batches)
                assert batch["pixels"].shape == (3, 3, 16, 16) and batch["ok"].all()
                seen.append(batch["pixels"])
    assert len({p.tobytes() for p in np.concatenate(seen)}) == 18
