"""Every job goes through `ray job submit --working-dir .` to a Ray head, exactly as the README shows.

Each test asks for what it needs through fixtures (a denoised store on S3, a trained denoiser, an applied store),
which submit the jobs that make it once per module, so any test runs alone, in any order.
"""

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.cli import JOBS
from pipeline.store import FeatureStore

from ..conftest import ROOT, SAMPLES

pytestmark = pytest.mark.slow

TINY_VIT = ["--weights", "none", "--input-size", "56"]
NUM_SAMPLES = len([p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("submitted")


@pytest.fixture(scope="module")
def s3_bucket_module(s3_endpoint):
    from pipeline.io.storage import filesystem

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
    assert re.search(r"Job '[^']+' succeeded", out.stdout + out.stderr), out.stdout[-2000:]
    return out


@pytest.fixture(scope="module")
def denoised(ray_head, s3_endpoint, s3_bucket_module) -> str:
    """A store on S3 made by a submitted `jobs.denoise` over the bundled samples."""
    url = f"{s3_bucket_module}/submitted.zarr"
    submit(ray_head, "jobs.denoise", "--output", url, "--model", "vit_small_patch14_dinov2", *TINY_VIT,
           "--preset", "ci", "--views", "4", "--steps", "10", "--cpus-per-worker", "0.5",
           runtime_env={"env_vars": {"AWS_ENDPOINT_URL_S3": s3_endpoint, "HF_HUB_OFFLINE": "1"}})
    return url


@pytest.fixture(scope="module")
def trained(ray_head, denoised, work) -> Path:
    """A denoiser file made by a submitted `jobs.train_denoiser` on the denoised store."""
    submit(ray_head, "jobs.train_denoiser", "--stores", denoised, "--output", str(work / "train"), "--cpu",
           "--workers", "2", "--cpus-per-worker", "0.5", "--epochs", "2", "--batch-size", "2",
           "--val-fraction", "0.2")
    return work / "train" / "denoiser.safetensors"


@pytest.fixture(scope="module")
def applied(ray_head, trained, work) -> Path:
    """A store made by a submitted `jobs.apply_denoiser` with the trained denoiser."""
    submit(ray_head, "jobs.apply_denoiser", "--denoiser", str(trained), "--output", str(work / "applied.zarr"),
           *TINY_VIT, "--cpus-per-worker", "0.5")
    return work / "applied.zarr"


def test_denoise_to_an_s3_store(denoised):
    store = FeatureStore.open(denoised)
    assert store.info().ok == NUM_SAMPLES
    assert store.attrs["last_run"]["failed"] == 0


def test_store_info(ray_head, denoised):
    out = submit(ray_head, "jobs.store", "info", denoised)
    counts = re.search(r"(\d+) listed, (\d+) ok, (\d+) failed, (\d+) pending", out.stdout)
    assert counts, out.stdout[-2000:]
    assert tuple(map(int, counts.groups())) == (NUM_SAMPLES, NUM_SAMPLES, 0, 0)


def test_train_denoiser(trained):
    assert trained.is_file()


def test_apply_denoiser(applied):
    info = FeatureStore.open(str(applied)).info()
    assert (info.ok, info.failed) == (NUM_SAMPLES, 0)


def test_eval_and_show(ray_head, denoised, applied, work):
    submit(ray_head, "jobs.eval", "--store", denoised, "--stage2-store", str(applied), "--out", str(work / "eval"),
           "--no-information")
    report = json.loads((work / "eval" / "report.json").read_text())
    assert list(report["sources"]) == ["raw", "stage-1", "stage-2"]
    assert report["measures"], "the report measured nothing"
    submit(ray_head, "jobs.show", "--store", denoised, "--out", str(work / "show"))
    assert list((work / "show").glob("*.png"))


def test_artifact(ray_head, s3_endpoint, denoised, work):
    from pipeline.denoise.bias import ArtifactMap

    out = work / "artifact.npz"
    submit(ray_head, "jobs.artifact", "--store", denoised, "--output", str(out),
           runtime_env={"env_vars": {"AWS_ENDPOINT_URL_S3": s3_endpoint}})
    artifact, _ = ArtifactMap.load(str(out))
    store = FeatureStore.open(denoised)
    assert artifact.map.shape == (*store.layout.grid, store.layout.channels)
    assert artifact.meta["images"] == NUM_SAMPLES


def test_distill(ray_head, trained, work):
    submit(ray_head, "jobs.distill", "--denoiser", str(trained), "--output", str(work / "distill"), *TINY_VIT,
           "--max-steps", "2", "--batch-size", "2", "--workers", "1", "--cpus-per-worker", "0.5",
           "--max-val-images", "1", "--no-gpu")
    assert (work / "distill" / "student.safetensors").is_file()


def test_info(ray_head):
    out = submit(ray_head, "jobs.info")
    assert "torch" in out.stdout


def test_every_job_has_a_submission_here():
    submitted = set(re.findall(r'submit\(ray_head, "(jobs\.\w+)"', Path(__file__).read_text()))
    assert submitted == set(JOBS.values()), f"never submitted: {set(JOBS.values()) - submitted}"
