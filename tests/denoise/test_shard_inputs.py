"""End to end: `dvt denoise` over WebDataset and Parquet shards, with a corrupt member, a resume and a new shard."""

import numpy as np
import pytest

from jobs.cli import main
from pipeline.denoise.job import DenoiseConfig, run_denoise
from pipeline.io.shards import index_shard
from pipeline.runtime.failures import EXIT_SOME_FAILED
from pipeline.store import FeatureStore
from pipeline.testing.shard_writers import make_items, tar_bytes, write_shard

pytestmark = pytest.mark.slow

SMALL = "pipeline.testing.artifact_vit:create_small"
FLAGS = ["--model", SMALL, "--weights", "none", "--input-size", "32", "--method", "average", "--copies", "1",
         "--images-per-batch", "3", "--cpus-per-worker", "0.5", "--progress-every", "1"]


def _statuses(url: str) -> dict[str, str]:
    manifest = FeatureStore.open(url).manifest(refresh=True)
    return dict(zip(manifest["uri"].to_pylist(), manifest["status"].to_pylist()))


def test_tar_shards_on_s3_corrupt_member_resume_and_a_new_shard(ray_local, s3_bucket):
    shards = f"{s3_bucket}/shards"
    items = make_items(0, 4)
    items[1].image = b"\xff\xd8\xff truncated jpeg"
    write_shard(f"{shards}/00000.tar", items)
    write_shard(f"{shards}/00001.tar", make_items(1, 3))
    out = f"{s3_bucket}/feats.zarr"
    pattern = f"{shards}/{{00000..00001}}.tar"
    args = ["denoise", "--images", pattern, "--output", out, *FLAGS, "--keep-columns", "key,url,caption"]
    assert main(args) == EXIT_SOME_FAILED
    status = _statuses(out)
    bad = f"{shards}/00000.tar#000000001"
    assert len(status) == 7 and status.pop(bad) == "failed" and set(status.values()) == {"ok"}
    store = FeatureStore.open(out)
    listing = store.listing()
    assert listing["uri"].to_pylist()[:2] == [f"{shards}/00000.tar#000000000", bad]
    assert listing["caption"][5].as_py() == "image 1 of shard 1"
    first = dict(zip(listing["uri"].to_pylist(), listing["image_id"].to_pylist()))
    clean = store.get(store.ids())["clean"]
    assert clean.shape[0] == 6 and np.isfinite(clean).all()

    # A re-run resumes: nothing left but the failed member, which fails again on its own.
    summary = run_denoise(_config(pattern, out))
    assert (summary.todo, summary.ok, summary.failed, summary.skipped) == (1, 0, 1, 6)

    # The corpus grows by a shard: old rows keep their ids, only the new images are done.
    write_shard(f"{shards}/00002.tar", make_items(2, 2))
    summary = run_denoise(_config(f"{shards}/{{00000..00002}}.tar", out, retry_failed=False))
    assert (summary.todo, summary.ok, summary.failed) == (2, 2, 0)
    listing = FeatureStore.open(out).listing()
    assert {u: i for u, i in zip(listing["uri"].to_pylist(), listing["image_id"].to_pylist()) if u in first} == first
    assert listing["image_id"].to_pylist()[-2:] == [7, 8]
    assert listing["uri"][8].as_py() == f"{shards}/00002.tar#000020001"


def test_parquet_shards_and_a_truncated_tar_fail_rows_not_the_job(ray_local, tmp_path):
    write_shard(str(tmp_path / "pq" / "00000.parquet"), make_items(4, 5), row_group_size=2)
    out = str(tmp_path / "pq.zarr")
    summary = run_denoise(_config(str(tmp_path / "pq"), out, keep_columns="url"))
    assert (summary.ok, summary.failed) == (5, 0)
    listing = FeatureStore.open(out).listing()
    assert listing["url"].to_pylist() == [i.url for i in make_items(4, 5)]

    cut = tmp_path / "tar" / "00000.tar"
    last = index_shard(write_shard(str(cut), make_items(5, 3)))["shard_offset"][2].as_py()
    cut.write_bytes(tar_bytes(make_items(5, 3))[:last + 100])  # cut inside the last image
    summary = run_denoise(_config(str(tmp_path / "tar"), str(tmp_path / "tar.zarr")))
    assert (summary.ok, summary.failed) == (2, 1)
    failures = dict(summary.failures)
    assert any("truncated" in reason for reason in failures), failures


def _config(images: str, output: str, **kw) -> DenoiseConfig:
    return DenoiseConfig(images=images, output=output, model=SMALL, weights="none", input_size=32, method="average",
                         copies=1, images_per_batch=3, cpus_per_worker=0.5, progress_every_s=1.0, **kw)
