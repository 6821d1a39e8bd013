"""`dvt distill`'s pixel stream over shards: passes visit every image once in shard-sized runs, held-out rows decode."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io.decode import DecodeConfig
from pipeline.io.shards import index_shards
from pipeline.stage3.pixels import _shard_pass_blocks, held_out_pixels, rows_of_rank, training_dataset
from pipeline.testing.shard_writers import make_items, write_shard


@pytest.fixture()
def index(tmp_path):
    urls = [write_shard(str(tmp_path / f"{s:05d}.tar"), make_items(s, 5)) for s in range(3)]
    urls.append(write_shard(str(tmp_path / "00003.parquet"), make_items(3, 4), row_group_size=2))
    return index_shards(urls, use_ray=False)


def test_a_pass_visits_each_training_image_once_in_runs_of_one_shard(index):
    ids = np.array([0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 15, 16, 17, 18])
    blocks = _shard_pass_blocks(index, ids, np.random.default_rng([0, 0]))
    seen = np.concatenate([b["image_id"].to_numpy() for b in blocks])
    assert sorted(seen) == sorted(ids)
    assert all(len(set(b["shard"].to_pylist())) == 1 for b in blocks)
    again = _shard_pass_blocks(index, ids, np.random.default_rng([0, 0]))
    assert [b["image_id"].to_pylist() for b in again] == [b["image_id"].to_pylist() for b in blocks]
    other = _shard_pass_blocks(index, ids, np.random.default_rng([0, 1]))
    assert [b["image_id"].to_pylist() for b in other] != [b["image_id"].to_pylist() for b in blocks]


def test_held_out_rows_are_read_from_their_shards(index):
    rows = index.take(pa.array([1, 7, 16]))
    pixels = held_out_pixels(rows, 16, DecodeConfig())
    assert pixels.shape == (3, 3, 16, 16) and pixels.float().std() > 0
    assert rows_of_rank(rows, 1, 2).num_rows == 1 and rows_of_rank(rows, 0, 2)["uri"].to_pylist() == [
        rows["uri"][0].as_py(), rows["uri"][2].as_py()]


@pytest.mark.slow
def test_the_training_stream_reads_shards_through_ray(ray_local, index):
    ids = np.arange(index.num_rows)
    uris = index["uri"].to_pylist()
    ds = training_dataset(uris, ids, 16, 4, passes=2, index=index)
    oks = [b["ok"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(len(o) for o in oks) == 2 * index.num_rows and all(o.all() for o in oks)
