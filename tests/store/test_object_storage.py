"""Object storage that stalls or is unreachable: bounded time, one line, a consistent store (docs/reliability.md 2, 3)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.runtime.failures import EXIT_FAULT
from pipeline.io.storage import StorageUnavailableError
from pipeline.store import FeatureStore, StoreLayout
from pipeline.testing.object_store import free_port

from ..conftest import ROOT

LAYOUT = StoreLayout(backbone="vit_small_patch14_dinov2", block=11, input_size=(56, 56), patch_size=14, stride=14,
                     grid=(4, 4), channels=8, method={"steps": 10, "views": {"num_views": 4}},
                     weights={"source": "random", "seed": 0}, seed=0, stage1_version=1)
URIS = ["a.jpg", "b.jpg"]


def _unit(store: FeatureStore, ids: list[int]) -> None:
    rng = np.random.default_rng(ids[0])
    store.write_unit([{"image_id": i} for i in ids],
                     {n: rng.standard_normal((len(ids), 4, 4, 8)).astype(np.float32) for n in store.layout.arrays})


def test_a_frozen_object_store_fails_in_bounded_time_and_stays_consistent(own_s3):
    proc, endpoint, bucket = own_s3
    url = f"{bucket}/s.zarr"
    store = FeatureStore.create(url, dataclasses.replace(LAYOUT, arrays=("raw", "clean")), ["a", "b", "c"])
    _unit(store, [0])
    os.kill(proc.pid, signal.SIGSTOP)
    for operation in (lambda: _unit(store, [1]), lambda: store.refresh().manifest(), lambda: FeatureStore.open(url)):
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError, match=rf"Storage for {url} at endpoint {endpoint} did not "
                                                          r"answer: timed out .*re-run the same command"):
            operation()
        assert time.monotonic() - started < 20
    os.kill(proc.pid, signal.SIGCONT)
    again = FeatureStore.open(url)
    assert again.ids().tolist() == [0] and again.todo().tolist() == [1, 2]  # the cut unit is simply not done


def test_an_unreachable_endpoint_is_one_line_and_status_4():
    # default attempts: zarr's concurrent requests once left coroutines that printed tracebacks at exit
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}", "DVT_S3_CONNECT_TIMEOUT": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("DVT_S3_ATTEMPTS", None)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jobs.store", "info", "s3://bucket/x.zarr"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == EXIT_FAULT and len(lines) == 1, out.stderr
    assert "did not answer: could not connect" in lines[0] and time.monotonic() - started < 60


def test_the_manifest_is_listed_afresh_after_other_processes_write(s3_bucket):
    url = f"{s3_bucket}/fresh.zarr"
    driver = FeatureStore.create(url, dataclasses.replace(LAYOUT, arrays=("raw", "clean")), ["a", "b", "c"])
    assert driver.manifest().num_rows == 0
    # a worker: its own filesystem object, as in another process
    worker = FeatureStore.open(url, "r+", storage_options={"skip_instance_cache": True})
    _unit(worker, [0])
    _unit(worker, [1])
    assert driver.refresh().manifest().num_rows == 2 and driver.info(size=False).ok == 2
