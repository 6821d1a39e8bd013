"""Shared fixtures: a real S3-compatible server on 127.0.0.1, a loopback-only Ray, no network for models."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline.testing.object_store import MotoServer, answers, free_port

# Set before anything imports timm, huggingface_hub or ray.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds and talks on 127.0.0.1 only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # Ray Train's gloo process groups listen on loopback only
os.environ.setdefault("AWS_ACCESS_KEY_ID", "dvt-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dvt-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "pipeline" / "samples"


class StreamLines:
    """Reads a child process's text stream in a thread, so a test can wait for a line (an event, with a bound)
    instead of polling for its effects, and still gets all of the text at the end."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first line matching the regular expression ``pattern``; fails if the stream ends or ``timeout``
        seconds pass without one."""
        regex, seen = re.compile(pattern), 0
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                assert not self._ended, f"the stream ended without {pattern!r}: {''.join(self.lines)[-3000:]}"
                assert left > 0, f"no line {pattern!r} in {timeout:.0f} s: {''.join(self.lines)[-3000:]}"
                self._changed.wait(left)

    def text(self, timeout: float = 30) -> str:
        """All of the stream, once it has ended (the process exited)."""
        self._thread.join(timeout)
        return "".join(self.lines)


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of an S3 server on 127.0.0.1: the one in AWS_ENDPOINT_URL_S3 if it answers, else a
    moto server started here (a separate process, so Ray workers and writer processes reach it too)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint and endpoint.startswith(("http://127.0.0.1", "http://localhost")) and answers(endpoint):
        yield endpoint
        return
    try:
        server = MotoServer()
    except RuntimeError as e:
        pytest.fail(str(e))
    os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
    try:
        yield server.endpoint
    finally:
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields its ``s3://`` URL."""
    from pipeline.io.storage import filesystem

    name = f"dvt-test-{uuid.uuid4().hex[:12]}"
    fs, _ = filesystem(f"s3://{name}", skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"
    try:
        fs.rm(name, recursive=True)
    except FileNotFoundError:
        pass


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray instance for the whole session (starting Ray costs seconds), loopback only.

    Started after the S3 server so its workers inherit the endpoint, as a job's runtime_env gives it them.
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a private instance, never a cluster another test (ray_head) started.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def _kill_group(pgid: int, timeout: float = 30) -> None:
    """SIGKILL the process group ``pgid`` (one this session started) and wait until it is gone."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises once no process of the group is left
            time.sleep(0.1)
    except ProcessLookupError:
        return


@pytest.fixture(scope="session")
def ray_head(s3_endpoint, tmp_path_factory):
    """A Ray head started with `ray start` on 127.0.0.1 with its dashboard, for `ray job submit` tests.

    Yields the dashboard address and the environment to run `ray` commands with. The venv's bin comes first
    on PATH, as a cluster image would have it, so job entry points' `python` is the one with the package.
    The head gets its own temp dir. `ray start` runs as the leader of a new process group, which every process
    it starts joins; that group, and nothing else, is stopped at the end (`ray stop` would stop every Ray on the
    machine).
    """
    bin_dir = str(Path(sys.executable).parent)
    port, dashboard = free_port(), free_port()
    # Every listening port chosen here, so the head never collides with another Ray on the machine.
    ports = {flag: str(free_port()) for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                                                  "--metrics-export-port", "--node-manager-port",
                                                  "--object-manager-port")}
    temp_dir = f"/tmp/dvt-ray-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.Popen([str(Path(bin_dir) / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                              "--port", str(port), "--num-cpus", "2", "--include-dashboard", "true",
                              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir",
                              temp_dir, "--disable-usage-stats", *(x for kv in ports.items() for x in kv)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, f"ray start failed: {out.decode(errors='replace')[-2000:]}"
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _kill_group(start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: one torch thread is faster, and much faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert paths, f"no sample images in {SAMPLES}"
    return paths


@pytest.fixture()
def own_s3(monkeypatch):
    """A moto server of this test's own (so freezing it touches nothing else), with short S3 limits."""
    from pipeline.testing.object_store import MotoServer

    server = MotoServer()
    proc, endpoint = server.proc, server.endpoint
    from pipeline.io.storage import filesystem

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    bucket = f"b{uuid.uuid4().hex[:10]}"
    filesystem(f"s3://{bucket}")[0].mkdir(bucket)  # with the default limits: the server may still be warming up
    assert proc.poll() is None, "moto_server exited (its port taken?)"
    for k, v in {"DVT_S3_READ_TIMEOUT": "1", "DVT_S3_CONNECT_TIMEOUT": "1", "DVT_S3_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    try:
        yield proc, endpoint, f"s3://{bucket}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(s3_endpoint):
    """A multi-node Ray cluster on this machine (:class:`pipeline.testing.cluster.LocalCluster`): a head with 0 CPUs
    and no worker node yet; a test adds (and removes) the nodes it needs. The S3 server is the storage the nodes
    share. Jobs reach it in a driver process of their own (``fleet.driver_env()`` sets ``RAY_ADDRESS``), as on a
    real cluster; this process never joins it, so the session's in-process local Ray (``ray_local``) and the
    cluster live side by side without sharing a driver."""
    from pipeline.testing.cluster import LocalCluster

    cluster = LocalCluster(env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "AWS_ENDPOINT_URL_S3": s3_endpoint})
    try:
        yield cluster
    finally:
        cluster.shutdown()
