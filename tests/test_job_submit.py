"""Jobs go through `ray job submit --working-dir .` to a Ray head, exactly as the README shows."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.store import FeatureStore

from .conftest import ROOT

pytestmark = pytest.mark.slow


def submit(address: str, env: dict, *entrypoint: str, runtime_env: dict | None = None, timeout: int = 600):
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--submission-id", f"test-{uuid.uuid4().hex[:8]}", "--working-dir", "."]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    return subprocess.run(cmd + ["--", *entrypoint], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_denoise_job_submitted_to_a_ray_head_writes_an_s3_store(ray_head, s3_endpoint, s3_bucket):
    address, env = ray_head
    url = f"{s3_bucket}/submitted.zarr"
    out = submit(address, env, "python", "-m", "jobs.denoise", "--output", url, "--model", "vit_small_patch14_dinov2",
                 "--weights", "none", "--input-size", "56", "--preset", "ci", "--views", "4", "--steps", "10",
                 "--cpus-per-worker", "0.5",
                 runtime_env={"env_vars": {"AWS_ENDPOINT_URL_S3": s3_endpoint, "HF_HUB_OFFLINE": "1"}})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    store = FeatureStore.open(url)
    assert store.info().ok == len(list((ROOT / "pipeline" / "samples").glob("*.[pj][np]g")))
    assert store.attrs["last_run"]["failed"] == 0
