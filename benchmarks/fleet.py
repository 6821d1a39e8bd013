"""Jobs on a multi-node Ray cluster built on this machine (:mod:`pipeline.testing.cluster`), through faults.

Cases (each prints one line of the table in docs/cluster.md):

* ``denoise-join``: ``dvt denoise --workers 1-2`` starts on one worker node; a second node joins once a few images
  are committed. Throughput before and after the join, from the manifest's commit times.
* ``train-loss``: ``dvt train --workers 2`` on an S3 store (made first by ``dvt denoise`` on the cluster); the
  node of one training worker is killed as soon as the first checkpoint is on S3, a new node joins 5 s later.
  Steps redone (the step the new worker group resumed from vs the last step checkpointed before the loss), the
  data wait's share of step time, and the held-out loss against an uninterrupted run.

Everything runs against a moto S3 server on 127.0.0.1 started here; ViT-S/14 with random weights at 56 px.

    python benchmarks/fleet.py denoise-join --images 24
    python benchmarks/fleet.py train-loss --images 16 --steps 60
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io.storage import filesystem  # noqa: E402
from pipeline.store.manifest import read_manifest  # noqa: E402
from pipeline.testing.cluster import LocalCluster  # noqa: E402
from pipeline.testing.object_store import MotoServer  # noqa: E402

_log = logging.getLogger("fleet")

TINY = ["--model", "vit_small_patch14_dinov2", "--weights", "none", "--input-size", "56", "--preset", "ci",
        "--views", "4", "--steps", "10", "--images-per-batch", "1", "--progress-every", "2"]


def upload_images(bucket: str, n: int) -> str:
    from PIL import Image

    fs, root = filesystem(bucket)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
        fs.pipe_file(f"{root}/images/{i:03d}.png", buf.getvalue())
    return f"{bucket}/images/"


def start(cluster: LocalCluster, module: str, *args: str, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=cluster.driver_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(every)
    raise TimeoutError(f"no {what} in {timeout:.0f} s")


def committed(url: str) -> int:
    fs, root = filesystem(url)
    fs.invalidate_cache()
    try:
        return read_manifest(fs, root).num_rows
    except (FileNotFoundError, ValueError):
        return 0


def denoise_join(cluster: LocalCluster, bucket: str, n: int, work: Path) -> dict:
    images = upload_images(bucket, n)
    nodes = [cluster.add_node(cpus=2)]
    url = f"{bucket}/join.zarr"
    began = time.monotonic()
    job = start(cluster, "jobs.denoise", *TINY, "--images", images, "--output", url, "--workers", "1-2",
                "--cpus-per-worker", "1.5", log=work / "denoise-join.log")
    wait_for(lambda: committed(url) >= max(3, n // 4), 900, "committed images")
    asked_at = time.time()
    nodes.append(cluster.add_node(cpus=2))
    joined_at = time.time()  # the new node is alive in the cluster
    status = job.wait(timeout=1200)
    wall = time.monotonic() - began
    fs, root = filesystem(url)
    import pyarrow as pa

    m = read_manifest(fs, root, dedup=False)
    stamps = m["written_at"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy() / 1e3  # epoch seconds
    times = np.sort(stamps)
    workers = np.asarray(m["worker"].to_pylist())
    new = set(workers[stamps > joined_at]) - set(workers[stamps <= joined_at])
    workers_after = len(new)
    first_new = min((t for t, w in zip(stamps, workers) if w in new), default=None)
    pre, post = times[times <= joined_at], times[times > joined_at]
    before = (len(pre) - 1) / (pre[-1] - pre[0]) if len(pre) > 1 else None
    after = (len(post) - 1) / (post[-1] - post[0]) if len(post) > 1 else None
    return {"case": "denoise --workers 1-2, a node joins", "exit": status, "ok": committed(url), "of": n,
            "images_per_s_before": before, "images_per_s_after": after, "new_workers_after_join": workers_after,
            "node_start_s": round(joined_at - asked_at, 1),
            "first_unit_on_new_node_s": None if first_new is None else round(first_new - joined_at, 1),
            "committed_at_join": int((stamps <= joined_at).sum()),
            "wall_s": round(wall, 1)}


def denoise_head_loss(cluster: LocalCluster, bucket: str, n: int, work: Path) -> dict:
    """The head (GCS and the job's driver node) dies mid-denoise; then the same command on a fresh cluster."""
    images = upload_images(bucket, n)
    cluster.add_node(cpus=2)
    url = f"{bucket}/head.zarr"
    args = [*TINY, "--images", images, "--output", url, "--workers", "1", "--cpus-per-worker", "1.5"]
    began = time.monotonic()
    job = start(cluster, "jobs.denoise", *args, log=work / "denoise-head.log")
    wait_for(lambda: committed(url) >= 2, 900, "committed images")
    cluster.remove_head()
    lost_at = time.monotonic() - began
    try:
        status = job.wait(timeout=300)
    except subprocess.TimeoutExpired:
        job.kill()
        status = "hung (killed after 300 s)"
    ended = time.monotonic() - began
    before = committed(url)
    text = (work / "denoise-head.log").read_text(errors="replace").splitlines()
    row = {"case": "denoise, the head node (GCS, driver) lost", "exit": status, "lost_at_s": round(lost_at, 1),
           "driver_ended_after_s": round(ended - lost_at, 1), "committed_when_lost": before,
           "last_lines": [line[:300] for line in text if "ERROR" in line or "Error" in line][-3:]}
    cluster.shutdown()
    fresh = LocalCluster(env=dict(cluster.env))
    try:
        fresh.add_node(cpus=2)
        began = time.monotonic()
        rerun = subprocess.run([sys.executable, "-m", "jobs.denoise", *args], cwd=ROOT, env=fresh.driver_env(),
                               capture_output=True, text=True, timeout=1200)
        summary = [line for line in rerun.stderr.splitlines() if "denoise finished" in line]
        row["rerun"] = {"exit": rerun.returncode, "wall_s": round(time.monotonic() - began, 1),
                        "summary": summary[-1] if summary else rerun.stderr[-1500:], "ok": committed(url)}
    finally:
        fresh.shutdown()
    return row


def train_loss(cluster: LocalCluster, bucket: str, n: int, steps: int, work: Path, baseline: bool) -> dict:
    images = upload_images(bucket, n)
    nodes = [cluster.add_node(cpus=1), cluster.add_node(cpus=1)]
    store = f"{bucket}/feats.zarr"
    made = subprocess.run([sys.executable, "-m", "jobs.denoise", *TINY, "--images", images, "--output", store,
                           "--workers", "2", "--cpus-per-worker", "0.75"], cwd=ROOT, env=cluster.driver_env(),
                          capture_output=True, text=True, timeout=1200)
    if made.returncode:
        raise RuntimeError(made.stderr[-3000:])
    every = max(1, steps // 6)
    train = ["--stores", store, "--workers", "2", "--cpu", "--cpus-per-worker", "0.75", "--batch-size", "4",
             "--max-steps", str(steps), "--eval-every", str(every), "--patience", "0", "--val-fraction", "0.2"]
    out = f"{bucket}/run-loss"
    fs, root = filesystem(out)
    began = time.monotonic()
    job = start(cluster, "jobs.train_denoiser", *train, "--output", out, log=work / "train-loss.log")

    def checkpoint() -> bool:
        fs.invalidate_cache()
        return bool(fs.glob(f"{root}/run/checkpoint_*/state.pt"))

    wait_for(checkpoint, 1200, "checkpoint on S3")
    victim = nodes.pop()
    cluster.remove_node(victim)
    lost_at = time.monotonic() - began
    time.sleep(5)
    nodes.append(cluster.add_node(cpus=1))
    status = job.wait(timeout=1800)
    wall = time.monotonic() - began
    row = {"case": "train --workers 2, a worker node lost at the first checkpoint, one joins", "exit": status,
           "lost_at_s": round(lost_at, 1), "wall_s": round(wall, 1), "checkpoint_every": every,
           **_training_record(out)}
    text = (work / "train-loss.log").read_text(errors="replace").splitlines()
    row["log"] = [line for line in text if "resum" in line or "finished" in line or "ERROR" in line][-8:]
    print(json.dumps(row, default=str), flush=True)  # before the baseline, which takes as long again
    if baseline:
        began = time.monotonic()
        base = subprocess.run([sys.executable, "-m", "jobs.train_denoiser", *train, "--output", f"{bucket}/run-base"],
                              cwd=ROOT, env=cluster.driver_env(), capture_output=True, text=True, timeout=1800)
        row["baseline"] = {"exit": base.returncode, "wall_s": round(time.monotonic() - began, 1),
                           **_training_record(f"{bucket}/run-base")}
    return row


def _training_record(out: str) -> dict:
    """Steps, resumes, held-out loss and data-wait shares from a finished run's denoiser file."""
    from pipeline.stage2.denoiser import read_spec

    try:
        spec = read_spec(f"{out}/denoiser.safetensors")
    except Exception as e:  # noqa: BLE001 - report what there is
        return {"error": f"{type(e).__name__}: {e}"}
    history = spec.training.get("history", [])
    return {"steps": spec.training.get("steps"), "resumed_from": spec.training.get("resumed_from"),
            "val_loss": [round(h.get("val_loss", float("nan")), 5) for h in history],
            "data_wait_fraction": [round(h.get("data_wait_fraction", float("nan")), 3) for h in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("denoise-join", "denoise-head-loss", "train-loss"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", default="/tmp/dvt-fleet-bench")
    parser.add_argument("--baseline", action="store_true", help="train-loss: also an uninterrupted run to compare")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for k, v in {"AWS_ACCESS_KEY_ID": "fleet", "AWS_SECRET_ACCESS_KEY": "fleet", "AWS_DEFAULT_REGION": "us-east-1",
                 "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with MotoServer() as server:
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
        bucket = "fleet-bench"
        filesystem(f"s3://{bucket}", skip_instance_cache=True)[0].mkdir(bucket)
        cluster = LocalCluster(env={"PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": server.endpoint})
        try:
            if args.case == "denoise-join":
                row = denoise_join(cluster, f"s3://{bucket}", args.images, work)
            elif args.case == "denoise-head-loss":
                row = denoise_head_loss(cluster, f"s3://{bucket}", args.images, work)
            else:
                row = train_loss(cluster, f"s3://{bucket}", args.images, args.steps, work, args.baseline)
        finally:
            cluster.shutdown()
    print(json.dumps(row, indent=1, default=str))


if __name__ == "__main__":
    main()
