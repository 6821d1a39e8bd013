"""The image-job runner at job level: a worker that cannot start, storage that stalls mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.denoise.job import DenoiseConfig, run_denoise
from pipeline.runtime.failures import EXIT_FAULT, JobFailedError
from pipeline.store import FeatureStore

from ..conftest import ROOT, StreamLines

TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4, steps=10,
            images_per_batch=1, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)
FLAGS = ["--model", "vit_small_patch14_dinov2", "--input-size", "56", "--preset", "ci", "--views", "4", "--steps",
         "10", "--images-per-batch", "1", "--cpus-per-worker", "0.5"]


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_job_in_one_line(ray_local, tmp_path, sample_images):
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=2,
                           **{**TINY, "model": "tests.faulty_backbone:broken", "weights": "model.bin",
                              "input_size": 32})
    with pytest.raises(JobFailedError) as e:
        run_denoise(config)
    message = str(e.value)
    assert message.startswith("denoise stopped after 0 of 2 images: stage 1 worker could not start: RuntimeError: "
                              "CUDA out of memory while loading model.bin (simulated)")
    assert "\n" not in message and "re-run the same command" in message
    assert not (tmp_path / "s.zarr").exists(), "the failed first run left an empty store behind"


@pytest.mark.slow
def test_a_stalled_object_store_stops_the_job_with_status_4(own_s3, sample_images):
    """The S3 server freezes (SIGSTOP) after the job's first unit: the job warns, then exits 4 in one line."""
    proc, endpoint, bucket = own_s3
    url = f"{bucket}/stall.zarr"
    # a backbone that takes 2 s per forward pass, one worker: images finish seconds apart, so the stall lands
    # while images remain
    flags = [*FLAGS[2:], "--model", "tests.faulty_backbone:slow", "--input-size", "32"]
    args = [sys.executable, "-m", "jobs.denoise", "--images", str(sample_images[0].parent), "--output", url,
            *flags, "--weights", "none", "--limit", "4", "--workers", "1", "--progress-every", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "DVT_S3_READ_TIMEOUT": "2"}
    job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        err = StreamLines(job.stderr)
        err.wait_for(r"denoise: [1-9]\d*/\d+ images", timeout=240)  # a unit is in the store
        os.kill(proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        job.wait(timeout=120)
        waited = time.monotonic() - frozen
        stderr = err.text()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        os.kill(proc.pid, signal.SIGCONT)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert job.returncode == EXIT_FAULT, stderr[-3000:]
    # One line naming the storage fault; whether a worker or the driver met the stall first is a race.
    assert "StorageUnavailableError" in lines[-1] and "did not answer" in lines[-1], lines[-3:]
    assert not any("Traceback" in line for line in lines), stderr[-3000:]
    assert waited < 90
    done = FeatureStore.open(url)
    assert 1 <= done.ids().size < 4 and np.isfinite(done.get(done.ids())["clean"]).all()
