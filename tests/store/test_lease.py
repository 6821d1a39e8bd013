"""One writer per store: the lease (docs/reliability.md 7)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.denoise.job import DenoiseConfig, run_denoise
from pipeline.store import LeaseLostError, StoreBusyError, StoreLayout, StoreLease, lease_holder


TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4, steps=10,
            images_per_batch=1, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)
LAYOUT = StoreLayout(backbone="vit_small_patch14_dinov2", block=11, input_size=(56, 56), patch_size=14, stride=14,
                     grid=(4, 4), channels=8, method={"steps": 10, "views": {"num_views": 4}},
                     weights={"source": "random", "seed": 0}, seed=0, stage1_version=1)
URIS = ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lease_is_taken_over(tmp_path, s3_bucket, where):
    url = str(tmp_path / "s.zarr") if where == "local" else f"{s3_bucket}/s.zarr"
    first = StoreLease(url, "denoise", ttl_s=600).acquire()
    try:
        with pytest.raises(StoreBusyError, match=rf"in use by a denoise job on host {socket.gethostname()} "
                                                 rf"\(pid {os.getpid()}, lease {first.holder.owner[:8]}\).*wait for it"):
            StoreLease(url, "apply").acquire()
        holder = lease_holder(url)
        assert holder is not None and holder.owner == first.holder.owner
        # the first job's heartbeat goes stale (its driver paused, or lost on another host): taken over
        stale = dataclasses.replace(holder, heartbeat="2000-01-01T00:00:00+00:00")
        _write_lease(url, stale)
        second = StoreLease(url, "apply", ttl_s=600).acquire()
        assert lease_holder(url).owner == second.holder.owner
        first.renew()
        assert first.lost.is_set()
        with pytest.raises(LeaseLostError, match="took over"):
            first.check()
        first.release()  # not ours any more: left alone
        assert lease_holder(url).owner == second.holder.owner
        second.release()
        assert lease_holder(url) is None
    finally:
        first.abandon()


def _write_lease(url: str, holder) -> None:
    from pipeline.io.storage import filesystem

    fs, root = filesystem(url)
    fs.pipe_file(f"{root}/lease.json", json.dumps(dataclasses.asdict(holder)).encode())


def test_a_lease_left_by_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    url = str(tmp_path / "s.zarr")
    first = StoreLease(url, "denoise").acquire()
    first.abandon()
    _write_lease(url, dataclasses.replace(first.holder, pid=int(dead.stdout)))  # a driver that was SIGKILLed
    with StoreLease(url, "denoise") as second:
        assert lease_holder(url).owner == second.holder.owner


@pytest.mark.slow
def test_a_running_job_refuses_a_second_one_before_starting_ray(tmp_path, sample_images):
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=1, **TINY)
    with StoreLease(config.output, "denoise"):
        with pytest.raises(StoreBusyError, match="in use by a denoise job"):
            run_denoise(config)  # refused before ray.init: this test runs without Ray
