"""Shard inputs: expansion, the per-shard index, reading members, bad members as errors, local files and S3."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io.shard_reads import read_blocks, read_shard_members
from pipeline.io.shards import (INDEX_COLUMNS, ShardError, ShardOptions, expand_braces, index_shard, index_shards,
                                is_shard_source, shard_index, shard_urls)
from pipeline.io.storage import filesystem
from pipeline.store.listing_table import extend_listing
from pipeline.testing.shard_writers import ShardItem, jpeg_bytes, make_items, tar_bytes, write_shard

KEEP = ShardOptions(keep_columns=("key", "url", "caption"))


def _read(table: pa.Table, image_column: str = "jpg") -> dict[str, np.ndarray]:
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    batch["image_id"] = np.arange(table.num_rows)
    return read_shard_members(batch, image_column)


def test_brace_patterns_expand_in_order_with_their_zero_padding():
    assert expand_braces("s3://b/{00008..00011}.tar") == [f"s3://b/{i:05d}.tar" for i in (8, 9, 10, 11)]
    assert expand_braces("/d/{a,b}/{0..1}.parquet") == ["/d/a/0.parquet", "/d/a/1.parquet", "/d/b/0.parquet",
                                                        "/d/b/1.parquet"]
    assert expand_braces("/d/x.tar") == ["/d/x.tar"]


def test_an_img2dataset_tar_is_indexed_from_its_headers_and_read_back_exactly(tmp_path):
    items = make_items(3, 5)
    url = write_shard(str(tmp_path / "00003.tar"), items)
    table = index_shard(url, KEEP)
    assert table.column_names == [*INDEX_COLUMNS, "key", "url", "caption"]
    assert table["uri"].to_pylist() == [f"{url}#{i.key}" for i in items]
    assert table["url"].to_pylist() == [i.url for i in items]
    assert table["caption"].to_pylist() == [i.caption for i in items]
    assert set(table["shard_error"].to_pylist()) == {""}
    out = _read(table)
    assert list(out["bytes"]) == [i.image for i in items] and set(out["error"]) == {""}
    assert list(out["uri"]) == table["uri"].to_pylist()


def test_bad_members_become_errors_of_their_rows_only(tmp_path):
    items = make_items(0, 4)
    items[1].image = None  # a key with json and txt but no image
    items[2].image = b"these bytes are no image"  # indexed fine; decoding fails later
    whole = write_shard(str(tmp_path / "00000.tar"), items)
    data = tar_bytes(make_items(1, 3))
    cut = tmp_path / "00001.tar"  # truncated inside its last image
    last = index_shard(write_shard(str(cut), make_items(1, 3)))
    cut.write_bytes(data[:int(last["shard_offset"][2].as_py()) + 100])
    junk = tmp_path / "00002.tar"
    junk.write_bytes(b"not a tar at all" * 64)
    table = index_shards([whole, str(cut), str(junk)], use_ray=False)
    errors = table["shard_error"].to_pylist()
    assert "has no image (found json, txt)" in errors[1]
    assert errors[0] == errors[2] == errors[3] == errors[4] == errors[5] == ""
    assert "the tar is truncated" in errors[6]
    assert table["uri"][7].as_py() == f"{junk}#" and "not a readable tar" in errors[7]
    out = _read(table)
    assert [bool(e) for e in out["error"]] == [False, True, False, False, False, False, True, True]
    assert out["bytes"][2] == b"these bytes are no image" and out["bytes"][4] == make_items(1, 3)[0].image


def test_parquet_shards_are_indexed_from_key_columns_and_read_per_row_group(tmp_path):
    items = make_items(5, 7)
    items[4].image = None
    url = write_shard(str(tmp_path / "part.parquet"), items, row_group_size=3)
    table = index_shard(url, KEEP)
    assert table["key"].to_pylist() == [i.key for i in items]
    assert table["shard_group"].to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert [len(b) for b in read_blocks(table)] == [3, 3, 1]
    out = _read(table)
    assert list(out["bytes"][:4]) == [i.image for i in items[:4]]
    assert "is null" in out["error"][4] and out["error"][5] == ""
    with pytest.raises(ShardError, match="no column 'png'.*--image-column"):
        index_shard(url, ShardOptions(image_column="png"))
    with pytest.raises(ShardError, match="no column 'label' for --keep-columns"):
        index_shard(url, ShardOptions(keep_columns=("label",)))


def test_only_shards_are_taken_for_shards(tmp_path, sample_images):
    folder = tmp_path / "shards"
    write_shard(str(folder / "00000.tar"), make_items(0, 2))
    write_shard(str(folder / "00001.tar"), make_items(1, 2))
    uri_list = tmp_path / "list.parquet"
    pa.parquet.write_table(pa.table({"uri": [str(p) for p in sample_images]}), uri_list)
    with_bytes = write_shard(str(tmp_path / "bytes.parquet"), make_items(2, 2))
    assert is_shard_source(str(folder)) and is_shard_source(f"{folder}/{{00000..00001}}.tar")
    assert is_shard_source(f"{folder}/*.tar") and is_shard_source(with_bytes)
    assert not is_shard_source(str(uri_list)) and not is_shard_source(str(sample_images[0].parent))
    assert shard_urls(str(folder)) == shard_urls(f"{folder}/{{00000..00001}}.tar") == shard_urls(f"{folder}/*.tar")
    assert shard_index(str(sample_images[0].parent)) is None
    with pytest.raises(ShardError, match="00002.tar .* does not exist: check the pattern's range"):
        shard_urls(f"{folder}/{{00000..00002}}.tar")


def test_sparse_members_are_read_in_runs_and_match(tmp_path):
    items = [ShardItem(key=f"k{i:03d}", image=jpeg_bytes(i, size=64)) for i in range(40)]
    url = write_shard(str(tmp_path / "00000.tar"), items)
    table = index_shard(url)
    pick = [3, 4, 17, 39]
    out = _read(table.take(pa.array(pick)))
    assert list(out["bytes"]) == [items[i].image for i in pick]


def test_a_listing_grown_by_a_new_shard_keeps_every_old_row(tmp_path):
    first = [write_shard(str(tmp_path / f"{i:05d}.tar"), make_items(i, 3)) for i in range(2)]
    old = extend_listing(None, index_shards(first, KEEP, use_ray=False))
    second = first + [write_shard(str(tmp_path / "00002.tar"), make_items(2, 2))]
    grown = extend_listing(old, index_shards(second, KEEP, use_ray=False))
    assert grown.num_rows == 8 and grown.slice(0, 6).equals(old)
    assert grown["image_id"].to_pylist() == list(range(8))
    assert grown["uri"][6].as_py() == f"{second[2]}#000020000" and grown["caption"][7].as_py() == "image 1 of shard 2"


def test_repeated_keys_in_a_shard_keep_an_own_row(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for seed in (1, 2):
            data = jpeg_bytes(seed)
            info = tarfile.TarInfo("same.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "dup.tar"
    path.write_bytes(buf.getvalue())
    table = index_shard(str(path))
    assert table["uri"].to_pylist() == [f"{path}#same", f"{path}#same~2"]


def test_shards_on_s3_are_indexed_and_read_with_few_requests(s3_bucket):
    urls = [write_shard(f"{s3_bucket}/shards/{i:05d}.tar", make_items(i, 4)) for i in range(2)]
    parquet = write_shard(f"{s3_bucket}/pq/00000.parquet", make_items(7, 3))
    source = f"{s3_bucket}/shards/{{00000..00001}}.tar"
    assert is_shard_source(source) and is_shard_source(f"{s3_bucket}/shards/") and is_shard_source(parquet)
    assert shard_urls(f"{s3_bucket}/shards/") == urls
    table = pa.concat_tables([index_shards(urls, KEEP, use_ray=False), index_shard(parquet, KEEP)])
    assert table.num_rows == 11 and table["url"][4].as_py() == "https://example.com/1/0.jpg"
    out = _read(table)
    expected = [i.image for s in (0, 1) for i in make_items(s, 4)] + [i.image for i in make_items(7, 3)]
    assert list(out["bytes"]) == expected and set(out["error"]) == {""}
    fs, _ = filesystem(urls[0])
    fs.rm(urls[1].split("://", 1)[1])  # a shard gone between listing and reading: its rows fail, the rest read
    out = _read(table)
    assert [bool(e) for e in out["error"]] == [False] * 4 + [True] * 4 + [False] * 3
    assert "cannot read shard" in out["error"][4]


@pytest.mark.slow
def test_many_shards_are_indexed_by_ray_tasks_as_by_threads(ray_local, tmp_path):
    urls = [write_shard(str(tmp_path / f"{i:05d}.tar"), make_items(i, 3)) for i in range(5)]
    urls.append(write_shard(str(tmp_path / "00005.parquet"), make_items(5, 2)))
    by_ray = index_shards(urls, KEEP, use_ray=True, shards_per_task=2)
    assert by_ray.equals(index_shards(urls, KEEP, use_ray=False)) and by_ray.num_rows == 17
    with pytest.raises(ShardError, match="no column 'png'"):
        index_shards(urls, ShardOptions(image_column="png"), use_ray=True, shards_per_task=2)
