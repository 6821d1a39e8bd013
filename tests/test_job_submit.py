"""Every job goes through `ray job submit --working-dir .` to a Ray head, exactly as the README shows.

The tests run in order and feed each other: denoise (to S3) -> store info -> train -> apply -> eval -> show
-> distill; the last one checks that every job of `dvt` was submitted.
"""

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.cli import JOBS
from pipeline.store import FeatureStore

from .conftest import ROOT

pytestmark = pytest.mark.slow

SUBMITTED: set[str] = set()
TINY_VIT = ["--weights", "none", "--input-size", "56"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("submitted")


@pytest.fixture(scope="module")
def store_url(s3_bucket_module) -> str:
    return f"{s3_bucket_module}/submitted.zarr"


@pytest.fixture(scope="module")
def s3_bucket_module(s3_endpoint):
    from pipeline.storage import filesystem

    name = f"dvt-submit-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{name}", skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


def submit(ray_head, module: str, *args: str, runtime_env: dict | None = None) -> subprocess.CompletedProcess:
    address, env = ray_head
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd + ["--", "python", "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        # A head that just started may not have its job agent registered yet; Ray says to try again.
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    SUBMITTED.add(module)
    return out


def test_denoise_to_an_s3_store(ray_head, s3_endpoint, store_url):
    submit(ray_head, "jobs.denoise", "--output", store_url, "--model", "vit_small_patch14_dinov2", *TINY_VIT,
           "--preset", "ci", "--views", "4", "--steps", "10", "--cpus-per-worker", "0.5",
           runtime_env={"env_vars": {"AWS_ENDPOINT_URL_S3": s3_endpoint, "HF_HUB_OFFLINE": "1"}})
    store = FeatureStore.open(store_url)
    assert store.info().ok == len(list((ROOT / "pipeline" / "samples").glob("*.[pj][np]g")))
    assert store.attrs["last_run"]["failed"] == 0


def test_store_info(ray_head, store_url):
    out = submit(ray_head, "jobs.store", "info", store_url)
    assert "ok" in out.stdout


def test_train_denoiser(ray_head, store_url, work):
    submit(ray_head, "jobs.train_denoiser", "--stores", store_url, "--output", str(work / "train"), "--cpu",
           "--workers", "2", "--cpus-per-worker", "0.5", "--epochs", "2", "--batch-size", "2",
           "--val-fraction", "0.2")
    assert (work / "train" / "denoiser.safetensors").is_file()


def test_apply_denoiser(ray_head, work):
    submit(ray_head, "jobs.apply_denoiser", "--denoiser", str(work / "train" / "denoiser.safetensors"),
           "--output", str(work / "applied.zarr"), *TINY_VIT, "--cpus-per-worker", "0.5")
    assert FeatureStore.open(str(work / "applied.zarr")).info().failed == 0


def test_eval_and_show(ray_head, store_url, work):
    submit(ray_head, "jobs.eval", "--store", store_url, "--stage2-store", str(work / "applied.zarr"),
           "--out", str(work / "eval"), "--no-information")
    report = json.loads((work / "eval" / "report.json").read_text())
    assert report
    submit(ray_head, "jobs.show", "--store", store_url, "--out", str(work / "show"))
    assert list((work / "show").glob("*.png"))


def test_distill_and_every_job_was_submitted(ray_head, work):
    submit(ray_head, "jobs.distill", "--denoiser", str(work / "train" / "denoiser.safetensors"),
           "--output", str(work / "distill"), *TINY_VIT, "--max-steps", "2", "--batch-size", "2",
           "--workers", "1", "--cpus-per-worker", "0.5", "--max-val-images", "1", "--no-gpu")
    assert (work / "distill" / "student.safetensors").is_file()
    submit(ray_head, "jobs.info")
    assert SUBMITTED == set(JOBS.values()), f"never submitted: {set(JOBS.values()) - SUBMITTED}"
