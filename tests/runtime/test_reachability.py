"""The storage check every job runs before any work, and ``--workers`` as a number or a range (the multi-node cases
are in test_fleet.py)."""

from __future__ import annotations

import argparse

import pytest

from pipeline.runtime.checks import JobConfigError, check_job_flags, parse_workers, pool_bounds
from pipeline.runtime.ray_train import fixed_workers
from pipeline.runtime.reachability import (Location, _write_token, check_reachable, image_job_inputs,
                                           outputs_and_inputs, probe_node)


def test_a_node_that_sees_the_token_and_the_inputs_reports_nothing(tmp_path):
    data = tmp_path / "images" / "a.png"
    data.parent.mkdir()
    data.write_bytes(b"12345")
    token = _write_token("--output", str(tmp_path / "new" / "store.zarr"))  # not created yet: its nearest folder
    assert token.token.startswith(str(tmp_path) + "/.dvt-reachability-")
    assert probe_node([token, Location("--images", str(data), size=5)]) == []


def test_a_node_with_another_disk_is_told_apart(tmp_path):
    token = _write_token("--output", str(tmp_path / "store.zarr"))
    other = Location("--output", token.url, output=True, token=token.token, content="another machine's file")
    missing = Location("--output", token.url, output=True, token=str(tmp_path / ".dvt-reachability-none"),
                       content="x")
    (tmp_path / "a.png").write_bytes(b"12345")
    problems = probe_node([other, missing, Location("--images", str(tmp_path / "a.png"), size=9),
                           Location("--denoiser", str(tmp_path / "gone.safetensors"), size=1)])
    assert len(problems) == 4
    assert "sees another file at the driver's path" in problems[0]
    assert "does not see the file the driver wrote" in problems[1]
    assert "another file (5 bytes, the driver 9)" in problems[2]
    assert "--denoiser" in problems[3] and "missing on this node" in problems[3]


def test_inputs_are_sampled_and_memory_urls_skipped():
    outs, ins = outputs_and_inputs([("--output", "memory://x"), ("--output", "s3://b/o")],
                                   [("--images", [f"s3://b/{i}.png" for i in range(10)]), ("--stores", [])])
    assert outs == [("--output", "s3://b/o")]
    assert ins == [("--images", "s3://b/0.png"), ("--images", "s3://b/5.png"), ("--images", "s3://b/9.png")]

    class Config:
        denoiser, weights, artifact = "s3://b/d.safetensors", "hub", None

    assert image_job_inputs(Config(), ["a"]) == [("--images", ["a"]), ("--denoiser", ["s3://b/d.safetensors"])]


def test_a_single_node_with_the_driver_is_not_asked(ray_local, tmp_path):
    """A laptop's local Ray: the only node that runs work is the driver's, so nothing is written or asked."""
    assert check_reachable(outputs=[("--output", str(tmp_path / "store.zarr"))]) == 0
    assert not list(tmp_path.iterdir())


def test_workers_is_a_number_or_a_range():
    assert parse_workers("4") == 4 and parse_workers("2-16") == (2, 16) and parse_workers(" 1 - 3 ") == (1, 3)
    assert pool_bounds(3) == (3, 3) and pool_bounds((2, 5)) == (2, 5)
    for bad in ("x", "2-", "-3", "2-3-4", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="MIN-MAX"):
            parse_workers(bad)
    check_job_flags(workers=(1, 4), images_per_batch=None, limit=None, progress_every_s=1)
    with pytest.raises(JobConfigError, match="maximum must be at least its minimum"):
        check_job_flags(workers=(4, 2), images_per_batch=None, limit=None, progress_every_s=1)
    with pytest.raises(JobConfigError, match="at least 1, got 0-2"):
        check_job_flags(workers=(0, 2), images_per_batch=None, limit=None, progress_every_s=1)
    assert fixed_workers(3) == 3
    with pytest.raises(JobConfigError, match="--workers 2-4: training takes a fixed number"):
        fixed_workers((2, 4))


@pytest.mark.slow
def test_denoise_with_a_workers_range_runs_an_autoscaling_pool(ray_local, tmp_path, sample_images):
    """``--workers 1-2`` builds Ray Data's autoscaling actor pool (min 1, max 2) and finishes every image."""
    from pipeline.denoise.job import DenoiseConfig, run_denoise
    from pipeline.store import FeatureStore

    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "store.zarr"), limit=3,
                           model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4,
                           steps=10, images_per_batch=1, workers=(1, 2), cpus_per_worker=0.5, progress_every_s=1.0)
    summary = run_denoise(config)
    assert (summary.ok, summary.failed) == (3, 0)
    assert sorted(FeatureStore.open(config.output).manifest()["image_id"].to_pylist()) == [0, 1, 2]
