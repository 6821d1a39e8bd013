import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.listing import ListingError, iter_uris, read_listing, write_listing
from pipeline.io.storage import filesystem


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.png", "sub/c.JPEG", "notes.txt", "sub/d.json"]:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folder_lists_images_recursively_sorted(folder):
    assert list(iter_uris(str(folder))) == [str(folder / n) for n in ["a.png", "b.jpg", "sub/c.JPEG"]]


def test_glob_and_single_file(folder):
    assert list(iter_uris(str(folder / "*.jpg"))) == [str(folder / "b.jpg")]
    assert list(iter_uris(str(folder / "a.png"))) == [str(folder / "a.png")]


def test_list_files_keep_order_and_resolve_relative_entries(folder):
    (folder / "list.txt").write_text("# comment\nsub/c.JPEG\n\ns3://bucket/x.jpg\n")
    assert list(iter_uris(str(folder / "list.txt"))) == [str(folder / "sub/c.JPEG"), "s3://bucket/x.jpg"]
    (folder / "list.csv").write_text("id,url\n1,b.jpg\n2,/abs/a.png\n")
    assert list(iter_uris(str(folder / "list.csv"))) == [str(folder / "b.jpg"), "/abs/a.png"]
    (folder / "bare.csv").write_text("b.jpg\na.png\n")
    assert list(iter_uris(str(folder / "bare.csv"))) == [str(folder / "b.jpg"), str(folder / "a.png")]
    pq.write_table(pa.table({"uri": ["s3://b/1.png", "s3://b/2.png"]}), folder / "list.parquet")
    assert list(iter_uris(str(folder / "list.parquet"))) == ["s3://b/1.png", "s3://b/2.png"]


def test_s3_prefix_and_listing_round_trip(s3_bucket):
    fs, _ = filesystem(s3_bucket)
    for name in ["img/2.png", "img/1.jpg", "img/readme.md"]:
        fs.pipe(f"{s3_bucket}/{name}", b"x")
    uris = list(iter_uris(f"{s3_bucket}/img"))
    assert uris == [f"{s3_bucket}/img/1.jpg", f"{s3_bucket}/img/2.png"]
    assert write_listing(f"{s3_bucket}/img", f"{s3_bucket}/listing.parquet", limit=1) == 1
    table = read_listing(f"{s3_bucket}/listing.parquet")
    assert table.to_pylist() == [{"image_id": 0, "uri": f"{s3_bucket}/img/1.jpg"}]


def test_missing_or_empty_sources_fail_clearly(tmp_path):
    with pytest.raises(ListingError, match="does not exist"):
        list(iter_uris(str(tmp_path / "nope")))
    with pytest.raises(ListingError, match="holds no image files"):
        list(iter_uris(str(tmp_path)))
    (tmp_path / "l.parquet").write_bytes(b"")
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "l.parquet")
    with pytest.raises(ListingError, match="no column named"):
        list(iter_uris(str(tmp_path / "l.parquet")))


def test_folder_sniffs_files_without_extension_and_says_what_it_skips(tmp_path, caplog):
    import io
    import logging

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    (tmp_path / "photo").write_bytes(buf.getvalue())  # an image without an extension
    (tmp_path / "README").write_text("not an image")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level(logging.INFO, logger="pipeline.io.listing"):
        assert list(iter_uris(str(tmp_path))) == [str(tmp_path / "a.jpg"), str(tmp_path / "photo")]
    assert "skipped 2 files that are not images (1 x no extension, not an image, 1 x .txt)" in caplog.text
