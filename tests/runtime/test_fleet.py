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


def lose_a_node_midway(fleet, job: list[str], progress: str, nodes: list) -> tuple[int, str, float, float]:
    """Run ``python -m jobs.NAME ...`` on ``fleet``; once ``progress`` shows in its log, kill the last of ``nodes``
    (raylet and every process, as a preemption) and add a fresh node 5 s later. Returns the exit status, the log,
    when the node was lost and the wall time (s)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", *job], cwd=ROOT, env=fleet.driver_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        err = StreamLines(proc.stderr)
        err.wait_for(progress, timeout=480)
        fleet.remove_node(nodes.pop())
        lost_at = time.monotonic() - started
        time.sleep(5)
        nodes.append(fleet.add_node(cpus=2))
        proc.wait(timeout=480)
        return proc.returncode, err.text(), lost_at, time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def compare_with_single_node(url: str, single: str, n: int, keys: tuple[str, ...]) -> tuple[int, float, int]:
    """Every image ``ok`` exactly once after deduplication and every row equal to the single-node run's (float16
    precision). Returns the duplicated manifest rows, the largest difference and the worker processes seen."""
    fs, root = filesystem(url)
    every = read_manifest(fs, root, dedup=False)
    latest = read_manifest(fs, root)
    assert sorted(latest["image_id"].to_pylist()) == list(range(n))
    assert set(latest["status"].to_pylist()) == {"ok"}
    a, b = FeatureStore.open(url), FeatureStore.open(single)
    ids = np.arange(n)
    worst = max(float(np.abs(a.read(k, ids).astype(np.float32) - b.read(k, ids).astype(np.float32)).max())
                for k in keys)
    assert np.isfinite(worst) and worst <= 1e-2, f"rows differ from the single-node run by up to {worst}"
    return every.num_rows - latest.num_rows, worst, len(set(every["worker"].to_pylist()))


def test_denoise_survives_a_lost_node_and_uses_one_that_joins(fleet, s3_bucket, tmp_path):
    """Single-node run first (one worker node); then two worker nodes, one killed (raylet and every process, as a
    preemption) after a few images are committed, and a fresh node joining 5 s later. The job ends with status 0,
    every image ``ok`` exactly once after deduplication, every row equal to the single-node run's.

    The backbone takes 0.5 s a pass (weights from a file, the same in every process), so images finish at most a
    few a second on any machine and the progress log shows the job midway before it ends."""
    from tests.custom_backbone import write_custom_denoiser

    n = 10
    model = "tests.faulty_backbone:paced"
    weights, _ = write_custom_denoiser(str(tmp_path), model)
    paced = ["--model", model, "--weights", weights, "--input-size", "32"]
    images = upload_images(s3_bucket, n)
    nodes = [fleet.add_node(cpus=2)]
    try:
        started = time.monotonic()
        base = denoise(fleet, *paced, "--images", images, "--output", f"{s3_bucket}/single.zarr", "--workers", "1",
                       "--cpus-per-worker", "1.5")
        single_s = time.monotonic() - started
        assert base.returncode == 0, base.stderr[-3000:]

        nodes.append(fleet.add_node(cpus=2))
        url = f"{s3_bucket}/fleet.zarr"
        # 1.5 CPUs per actor on nodes of 2: one actor per node, with room on each for the fetch tasks.
        job = ["jobs.denoise", *TINY, *paced, "--images", images, "--output", url, "--workers", "2",
               "--cpus-per-worker", "1.5"]
        status, stderr, lost_at, fleet_s = lose_a_node_midway(fleet, job, r"denoise: [3-9]/\d+ images", nodes)
        assert status == 0, stderr[-4000:]
        assert re.search(rf"denoise finished: {n} ok, 0 failed", stderr), stderr[-3000:]
        duplicated, worst, writers = compare_with_single_node(url, f"{s3_bucket}/single.zarr", n,
                                                              ("raw", "clean", "artifact"))
        print(f"\nfleet denoise: single node {single_s:.0f} s; 2 nodes, one lost at {lost_at:.0f} s and one joined "
              f"5 s later: {fleet_s:.0f} s, exit 0, {n} ok, {duplicated} duplicated manifest rows (deduplicated), "
              f"max |diff| vs single node {worst:.3g}, {writers} worker processes wrote units")
    finally:
        for node in nodes:
            fleet.remove_node(node)


def test_apply_survives_a_lost_node_and_uses_one_that_joins(fleet, s3_bucket, tmp_path):
    """``dvt apply`` through the same fault: a backbone of 0.5 s a pass with its weights in a file (every node
    reads the same disk here, as an NFS mount), images one per unit; rows equal to a single-node run's."""
    from tests.custom_backbone import write_custom_denoiser

    n = 12
    model = "tests.faulty_backbone:paced"
    weights, denoiser = write_custom_denoiser(str(tmp_path), model)
    images = upload_images(s3_bucket, n, seed=1)
    flags = ["--images", images, "--denoiser", denoiser, "--model", model, "--weights", weights,
             "--images-per-batch", "1", "--cpus-per-worker", "1.5", "--progress-every", "1"]
    nodes = [fleet.add_node(cpus=2)]
    try:
        started = time.monotonic()
        base = subprocess.run([sys.executable, "-m", "jobs.apply_denoiser", *flags, "--output",
                               f"{s3_bucket}/single.zarr", "--workers", "1"], cwd=ROOT, env=fleet.driver_env(),
                              capture_output=True, text=True, timeout=600)
        single_s = time.monotonic() - started
        assert base.returncode == 0, base.stderr[-3000:]

        nodes.append(fleet.add_node(cpus=2))
        url = f"{s3_bucket}/fleet.zarr"
        job = ["jobs.apply_denoiser", *flags, "--output", url, "--workers", "2"]
        status, stderr, lost_at, fleet_s = lose_a_node_midway(fleet, job, r"apply: [3-9]/\d+ images", nodes)
        assert status == 0, stderr[-4000:]
        assert re.search(rf"apply finished: {n} ok, 0 failed", stderr), stderr[-3000:]
        duplicated, worst, writers = compare_with_single_node(url, f"{s3_bucket}/single.zarr", n, ("raw", "clean"))
        print(f"\nfleet apply: single node {single_s:.0f} s; 2 nodes, one lost at {lost_at:.0f} s and one joined "
              f"5 s later: {fleet_s:.0f} s, exit 0, {n} ok, {duplicated} duplicated manifest rows (deduplicated), "
              f"max |diff| vs single node {worst:.3g}, {writers} worker processes wrote units")
    finally:
        for node in nodes:
            fleet.remove_node(node)


def test_a_node_that_joins_takes_work_from_an_autoscaling_pool(fleet, s3_bucket):
    """``--workers 1-2`` starts one worker on the only node; a node that joins mid-run gets the second worker, which
    commits units before the job ends (Ray Data's pool adds an actor once the first one's two slots are full)."""
    import pyarrow as pa

    n = 60
    images = upload_images(s3_bucket, n, seed=2)
    url = f"{s3_bucket}/join.zarr"
    # 0.5 s per pass on a seeded backbone: the job lasts long enough for a node to join, at any load
    job = [sys.executable, "-m", "jobs.denoise", *TINY, "--model", "tests.faulty_backbone:paced", "--input-size",
           "32", "--images", images, "--output", url, "--workers", "1-2", "--cpus-per-worker", "1.5"]
    nodes = [fleet.add_node(cpus=2)]
    proc = subprocess.Popen(job, cwd=ROOT, env=fleet.driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        err = StreamLines(proc.stderr)
        err.wait_for(r"denoise: [1-9]\d*/\d+ images", timeout=480)
        nodes.append(fleet.add_node(cpus=2))
        joined = time.time()
        proc.wait(timeout=600)
        stderr = err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for node in nodes:
            fleet.remove_node(node)
    assert proc.returncode == 0, stderr[-4000:]
    every = read_manifest(*filesystem(url), dedup=False)
    stamps = every["written_at"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy() / 1e3
    workers = np.asarray(every["worker"].to_pylist())
    new = set(workers[stamps > joined]) - set(workers[stamps <= joined])
    assert new, f"no worker of the joining node committed a unit ({len(set(workers))} worker(s) in all)"
    first = min(t for t, w in zip(stamps, workers) if w in new) - joined
    later = int(np.isin(workers, list(new)).sum())
    print(f"\nfleet join: the new node's worker committed its first unit {first:.0f} s after the node joined, "
          f"{later} of {n} images in all")


#: Ray's own wait for a lost GCS in the head-loss tests' drivers: the job must speak before it (its watch, at 24 s).
RAY_TIMEOUT = 30


def lose_the_head(s3_endpoint: str, args: list[str], ready) -> tuple[str, float]:
    """Run ``args`` (a job's driver) on a cluster of its own with one worker node; once ``ready(log)`` holds (``log``:
    the driver's :class:`StreamLines` so far; ``ready`` must not wait for the stream to end), kill
    the head (GCS, the driver's node). The job must end with status 4 and one line of ours, before Ray's own exit.
    Returns its log and the seconds it took to end after the head died."""
    from pipeline.testing.cluster import LocalCluster

    with LocalCluster(env=cluster_env(s3_endpoint)) as cluster:
        cluster.add_node(cpus=2)
        proc = subprocess.Popen(args, cwd=ROOT, env=cluster.driver_env(
            RAY_gcs_rpc_server_reconnect_timeout_s=str(RAY_TIMEOUT)), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            err = StreamLines(proc.stderr)
            deadline = time.monotonic() + 480
            while not ready(err) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert ready(err) and proc.poll() is None, err.text()[-4000:]
            cluster.remove_head()
            lost = time.monotonic()
            proc.wait(timeout=120)
            ended_s = time.monotonic() - lost
            stderr = err.text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [line for line in stderr.splitlines() if " ERROR " in line and "dvt" in line]
    assert proc.returncode == 4, stderr[-4000:]
    assert len(errors) == 1 and "lost the Ray cluster's head node" in errors[0], stderr[-4000:]
    assert ended_s < RAY_TIMEOUT, f"the driver took {ended_s:.0f} s (Ray's own timeout {RAY_TIMEOUT} s): {stderr[-3000:]}"
    return stderr, ended_s


def resubmit(s3_endpoint: str, args: list[str]) -> subprocess.CompletedProcess:
    """``args`` again, on a new cluster of one worker node."""
    from pipeline.testing.cluster import LocalCluster

    with LocalCluster(env=cluster_env(s3_endpoint)) as cluster:
        cluster.add_node(cpus=2)
        return subprocess.run(args, cwd=ROOT, env=cluster.driver_env(), capture_output=True, text=True, timeout=900)


def cluster_env(s3_endpoint: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "AWS_ENDPOINT_URL_S3": s3_endpoint}


def test_a_lost_head_ends_the_job_in_one_line_and_a_resubmit_resumes(s3_endpoint, s3_bucket):
    """The head (GCS, the driver's node) of a cluster of its own is killed while a denoise job runs: the driver
    ends with status 4 and one line of ours, well before Ray's own silent exit; the committed units stay, and the
    same command on a new cluster does only the rest."""
    n = 12
    images = upload_images(s3_bucket, n, seed=3)
    url = f"{s3_bucket}/headless.zarr"
    # the backbone takes 2 s per pass: the images left when the head dies take longer than the watch's grace (a job
    # whose workers finish without the GCS ends normally)
    args = [sys.executable, "-m", "jobs.denoise", *TINY, "--model", "tests.faulty_backbone:slow", "--input-size",
            "32", "--images", images, "--output", url, "--workers", "1", "--cpus-per-worker", "1"]
    committing = re.compile(r"denoise: [1-9]\d*/\d+ images")
    _, ended_s = lose_the_head(s3_endpoint, args, lambda log: any(map(committing.search, list(log.lines))))
    kept = read_manifest(*filesystem(url))
    committed = sum(s == "ok" for s in kept["status"].to_pylist())
    assert 1 <= committed < n, f"{committed} of {n} committed when the head died"

    again = resubmit(s3_endpoint, args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert re.search(rf"denoise finished: {n - committed} ok, 0 failed", again.stderr), again.stderr[-3000:]
    assert sorted(read_manifest(*filesystem(url))["image_id"].to_pylist()) == list(range(n))
    print(f"\nlost head: exit 4 after {ended_s:.0f} s (Ray's timeout {RAY_TIMEOUT} s), {committed} of {n} kept; "
          f"resubmitted on a new cluster: {n - committed} done, exit 0")


def test_a_lost_head_ends_training_in_one_line_and_a_resubmit_resumes(s3_endpoint, s3_bucket):
    """The head of a cluster of its own (GCS, the driver's node, Ray Train's controller) is killed once the run's
    controller has registered a checkpoint on S3: ``dvt train`` ends with status 4 and one line of ours; the same
    command on a new cluster resumes from that checkpoint and finishes with status 0."""
    import json

    from pipeline.runtime.ray_train import RUN_NAME
    from pipeline.testing.synthetic_pairs import write_synthetic_store

    store = write_synthetic_store(f"{s3_bucket}/pairs.zarr", 24, channels=16, grid=(4, 4))
    output = f"{s3_bucket}/denoiser"
    args = [sys.executable, "-m", "jobs.train_denoiser", "--stores", store.url, "--output", output, "--max-steps",
            "40", "--eval-every", "4", "--patience", "0", "--batch-size", "4", "--workers", "1", "--no-gpu",
            "--cpus-per-worker", "1"]
    fs, snapshot = filesystem(f"{output}/{RUN_NAME}/checkpoint_manager_snapshot.json")

    def registered(log) -> bool:
        fs.invalidate_cache()
        try:
            return bool(json.loads(fs.cat_file(snapshot)).get("latest_checkpoint_result"))
        except (FileNotFoundError, ValueError):
            return False

    stderr, ended_s = lose_the_head(s3_endpoint, args, registered)
    done_before = max((int(m) for m in re.findall(r"rank 0 step (\d+)/40", stderr)), default=0)

    again = resubmit(s3_endpoint, args)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = re.search(r"rank 0 resumes at step (\d+) of 40", again.stderr)
    assert resumed and 4 <= int(resumed.group(1)) <= done_before, again.stderr[-4000:]
    assert re.search(r"rank 0 step 40/40", again.stderr), again.stderr[-3000:]
    print(f"\nlost head in training: exit 4 after {ended_s:.0f} s (Ray's timeout {RAY_TIMEOUT} s), steps logged "
          f"{done_before}; resubmitted: resumed at step {resumed.group(1)}, finished 40 steps, exit 0")
