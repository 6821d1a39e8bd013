import os
import subprocess
from pathlib import Path

import pytest

from pipeline.io.storage import filesystem, storage_options
from pipeline.testing.object_store import answers, free_port

from ..conftest import ROOT


def test_s3_fixture_writes_and_reads_an_object(s3_bucket):
    fs, _ = filesystem(s3_bucket)
    fs.pipe(f"{s3_bucket}/dir/hello.bin", b"\x00hello\xff")
    assert fs.cat(f"{s3_bucket}/dir/hello.bin") == b"\x00hello\xff"
    assert fs.ls(f"{s3_bucket}/dir") == [f"{s3_bucket[5:]}/dir/hello.bin"]


def test_endpoint_and_credentials_come_from_the_environment(s3_endpoint):
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_endpoint
    opts = storage_options("s3://bucket/x")
    flat = repr(opts)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in flat and os.environ["AWS_ACCESS_KEY_ID"] not in flat
    config = opts["config_kwargs"]
    assert config["retries"]["total_max_attempts"] > 1 and config["read_timeout"] > 0 and config["connect_timeout"] > 0
    assert storage_options("memory://x") == {} and storage_options("/tmp/x") == {}


def test_infra_script_starts_and_stops_a_server(tmp_path: Path):
    port = free_port()
    env = {**os.environ, "DVT_S3_PORT": str(port), "DVT_S3_DIR": str(tmp_path)}
    script = ROOT / "infra" / "object_store.sh"
    subprocess.run(["bash", str(script), "start"], env=env, check=True, timeout=60)
    try:
        assert answers(f"http://127.0.0.1:{port}")
        exports = subprocess.run(["bash", str(script), "env"], env=env, check=True, capture_output=True,
                                 text=True).stdout
        assert f"AWS_ENDPOINT_URL_S3=http://127.0.0.1:{port}" in exports
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, check=True, timeout=30)
    status = subprocess.run(["bash", str(script), "status"], env=env, capture_output=True, timeout=30)
    assert status.returncode == 1


def test_minio_backend_without_minio_fails_clearly(tmp_path: Path):
    if subprocess.run(["bash", "-c", "command -v minio"], capture_output=True).returncode == 0:
        pytest.skip("MinIO is installed here")
    env = {**os.environ, "DVT_S3_PORT": str(free_port()), "DVT_S3_DIR": str(tmp_path), "DVT_S3_BACKEND": "minio"}
    out = subprocess.run(["bash", str(ROOT / "infra" / "object_store.sh"), "start"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and "no 'minio' on PATH" in out.stderr
