"""Jobs on a real multi-node Ray cluster on this machine (``fleet``): storage every node can see, and a worker node
lost and another joining mid-run.

Every job runs as a cluster user's job does: its own driver process with ``RAY_ADDRESS`` set, on the head node
(no CPUs), its workers on the worker nodes, S3 (moto on 127.0.0.1) the only storage the nodes share by design.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.io.storage import filesystem
from pipeline.store import FeatureStore
from pipeline.store.manifest import read_manifest
from pipeline.testing.cluster import private_dirs_supported

from ..conftest import ROOT, StreamLines

pytestmark = pytest.mark.slow

#: A tiny stage-1 run: ViT-S/14 with random weights at 56 px, the ci preset cut to 4 views and 10 steps.
TINY = ["--model", "vit_small_patch14_dinov2", "--weights", "none", "--input-size", "56", "--preset", "ci",
        "--views", "4", "--steps", "10", "--images-per-batch", "1", "--progress-every", "1"]


def upload_images(bucket: str, n: int, seed: int = 0) -> str:
    """``n`` random 64x64 PNGs under ``<bucket>/images/``; returns the prefix."""
    fs, root = filesystem(bucket)
    rng = np.random.default_rng(seed)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
        fs.pipe_file(f"{root}/images/{i:03d}.png", buf.getvalue())
    return f"{bucket}/images/"


def denoise(fleet, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.denoise", *TINY, *args], cwd=ROOT, env=fleet.driver_env(),
                          capture_output=True, text=True, timeout=timeout)


def check_on_cluster(fleet, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a driver process joined to the cluster."""
    prelude = "import logging, ray; logging.basicConfig(level=logging.INFO); ray.init(log_to_driver=False)\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=fleet.driver_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not private_dirs_supported(), reason="needs mount namespaces (root in a container)")
def test_a_path_one_node_cannot_see_is_refused_before_any_work(fleet, tmp_path, s3_bucket):
    """Node ``own`` has its own (empty) disk at ``tmp_path/own``; the rest of the disk is shared by every node, as an
    NFS mount is. The check accepts the shared folder, refuses the private one naming the node, and a denoise job
    into the private folder ends in one line with status 1, having created nothing."""
    own = tmp_path / "own"
    own.mkdir()
    shared = fleet.add_node(cpus=1)
    private = fleet.add_node(cpus=1, private_dirs=[own])
    try:
        code = ("from pipeline.runtime.reachability import check_reachable\n"
                "from pipeline.runtime.checks import JobConfigError\n"
                f"print('asked', check_reachable(outputs=[('--output', {str(tmp_path / 'shared.zarr')!r})]))\n"
                "try:\n"
                f"    check_reachable(outputs=[('--output', {str(own / 'out.zarr')!r})])\n"
                "except JobConfigError as e:\n"
                "    print('refused', e)\n")
        out = check_on_cluster(fleet, code)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "asked 2" in out.stdout, out.stdout + out.stderr[-3000:]
        refused = re.search(r"^refused (.*)$", out.stdout, re.M)
        assert refused and "does not see the file the driver wrote" in refused.group(1), out.stdout
        assert "(and" not in refused.group(1) and "NFS" in refused.group(1)  # one node only: the private one
        assert not list(own.iterdir()) and not list(tmp_path.glob(".dvt-reachability-*")), "tokens left behind"

        images = upload_images(s3_bucket, 2)
        job = denoise(fleet, "--images", images, "--output", str(own / "out.zarr"), "--workers", "1",
                      "--cpus-per-worker", "0.5")
        errors = [line for line in job.stderr.splitlines() if " ERROR " in line]
        assert job.returncode == 1, job.stderr[-3000:]
        assert len(errors) == 1 and "storage not shared by the nodes" in errors[0], job.stderr[-3000:]
        assert not (own / "out.zarr").exists() and "Traceback" not in job.stderr
    finally:
        fleet.remove_node(private)
        fleet.remove_node(shared)


def test_denoise_survives_a_lost_node_and_uses_one_that_joins(fleet, s3_bucket):
    """Single-node run first (one worker node); then two worker nodes, one killed (raylet and every process, as a
    preemption) after a few images are committed, and a fresh node joining 5 s later. The job ends with status 0,
    every image ``ok`` exactly once after deduplication, every row equal to the single-node run's."""
    n = 10
    images = upload_images(s3_bucket, n)
    first = fleet.add_node(cpus=2)
    nodes = [first]
    try:
        started = time.monotonic()
        base = denoise(fleet, "--images", images, "--output", f"{s3_bucket}/single.zarr", "--workers", "1",
                       "--cpus-per-worker", "1.5")
        single_s = time.monotonic() - started
        assert base.returncode == 0, base.stderr[-3000:]

        second = fleet.add_node(cpus=2)
        nodes.append(second)
        url = f"{s3_bucket}/fleet.zarr"
        # 1.5 CPUs per actor on nodes of 2: one actor per node, with room on each for the fetch tasks.
        args = [sys.executable, "-m", "jobs.denoise", *TINY, "--images", images, "--output", url, "--workers", "2",
                "--cpus-per-worker", "1.5"]
        started = time.monotonic()
        proc = subprocess.Popen(args, cwd=ROOT, env=fleet.driver_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            err = StreamLines(proc.stderr)
            err.wait_for(r"denoise: [3-9]/\d+ images", timeout=480)
            fleet.remove_node(second)
            nodes.remove(second)
            lost_at = time.monotonic() - started
            time.sleep(5)
            nodes.append(fleet.add_node(cpus=2))
            proc.wait(timeout=480)
            stderr = err.text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        fleet_s = time.monotonic() - started
        assert proc.returncode == 0, stderr[-4000:]
        assert re.search(rf"denoise finished: {n} ok, 0 failed", stderr), stderr[-3000:]

        fs, root = filesystem(url)
        every = read_manifest(fs, root, dedup=False)
        latest = read_manifest(fs, root)
        assert sorted(latest["image_id"].to_pylist()) == list(range(n))
        assert set(latest["status"].to_pylist()) == {"ok"}
        duplicated = every.num_rows - latest.num_rows
        a, b = FeatureStore.open(url), FeatureStore.open(f"{s3_bucket}/single.zarr")
        ids = np.arange(n)
        worst = max(float(np.abs(a.read(k, ids).astype(np.float32) - b.read(k, ids).astype(np.float32)).max())
                    for k in ("raw", "clean", "artifact"))
        assert np.isfinite(worst) and worst <= 1e-2, f"rows differ from the single-node run by up to {worst}"
        print(f"\nfleet denoise: single node {single_s:.0f} s; 2 nodes, one lost at {lost_at:.0f} s and one joined "
              f"5 s later: {fleet_s:.0f} s, exit 0, {n} ok, {duplicated} duplicated manifest rows (deduplicated), "
              f"max |diff| vs single node {worst:.3g}, {len(set(every['worker'].to_pylist()))} worker processes "
              f"wrote units")
    finally:
        for node in nodes:
            fleet.remove_node(node)
