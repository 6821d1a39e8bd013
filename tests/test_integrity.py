"""Data integrity and faults (docs/reliability.md): a store never mixes backbones, a stalled endpoint never hangs a
job, one writer per store, and every expected failure is one clear line with a documented exit status.

Library-level where possible (no Ray); the job-level checks that need real processes are few and marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from jobs.cli import main
from pipeline.vit.backbone import BackboneConfig, create_backbone
from pipeline.denoise.job import DenoiseConfig, check_denoise, prepare_store, run_denoise
from pipeline.runtime.failures import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_TERMINATED, JobFailedError
from pipeline.runtime.progress import Progress
from pipeline.io.storage import StorageUnavailableError
from pipeline.store import (FeatureStore, LeaseLostError, StoreBusyError, StoreLayout, StoreLease, StoreMismatchError,
                            lease_holder)
from pipeline.testing.object_store import MotoServer, free_port
from pipeline.vit.weights import weights_identity

from .conftest import ROOT, StreamLines

TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4, steps=10,
            images_per_batch=1, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)
FLAGS = ["--model", "vit_small_patch14_dinov2", "--input-size", "56", "--preset", "ci", "--views", "4", "--steps",
         "10", "--images-per-batch", "1", "--cpus-per-worker", "0.5"]
LAYOUT = StoreLayout(backbone="vit_small_patch14_dinov2", block=11, input_size=(56, 56), patch_size=14, stride=14,
                     grid=(4, 4), channels=8, method={"steps": 10, "views": {"num_views": 4}},
                     weights={"source": "random", "seed": 0}, seed=0, stage1_version=1)
URIS = ["a.jpg", "b.jpg"]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    """Valid weights for the tiny backbone that differ from the seeded random ones."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True,
                              img_size=56)
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _mem() -> str:
    return f"memory://integrity-{uuid.uuid4().hex[:8]}/s.zarr"


# ------------------------------------------------------------------------------------------ 1: identity

def test_random_weights_are_seeded_and_recorded():
    a = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)
    b = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert x.equal(y), name
    assert weights_identity(BackboneConfig(model="vit_small_patch14_dinov2", weights="none")) == \
        {"source": "random", "seed": 0}
    hub = weights_identity(BackboneConfig(model="vit_small_patch14_dinov2", weights="hub"))
    assert hub["source"] == "hub" and hub["model"] == "vit_small_patch14_dinov2.lvd142m"  # the tag is resolved


def test_a_resume_with_other_weights_seed_or_version_is_refused_naming_the_field(tmp_path, weights_file):
    url = _mem()
    FeatureStore.create(url, LAYOUT, URIS)
    file_weights = weights_identity(BackboneConfig(model="vit_small_patch14_dinov2", weights=weights_file))
    assert file_weights["source"] == "file" and len(file_weights["sha256"]) == 64
    other = dataclasses.replace(LAYOUT, weights=file_weights)
    for allow in (False, True):  # two networks never share a store, whatever the flags
        with pytest.raises(StoreMismatchError, match=r"weights: store has random init \(seed 0\), this run file "
                                                     r"w.safetensors \(sha256 [0-9a-f]{12}\).*--overwrite"):
            FeatureStore.create(url, other, URIS, allow_config_change=allow)
    for change, text in [({"seed": 1}, "seed: store has 0, this run 1"),
                         ({"stage1_version": 2}, "stage1_version: store has 1, this run 2"),
                         ({"method": {"steps": 20, "views": {"num_views": 4}}}, "steps: store has 10, this run 20")]:
        with pytest.raises(StoreMismatchError, match=f"other run settings: {text}\\. Pass .*--allow-config-change") as e:
            FeatureStore.create(url, dataclasses.replace(LAYOUT, **change), URIS)
        assert len(str(e.value)) < 400
    changed = FeatureStore.create(url, dataclasses.replace(LAYOUT, seed=1), URIS, allow_config_change=True)
    assert changed.attrs["seed"] == 1 and changed.attrs["history"][-1]["seed"] == 0
    info = changed.info(size=False).format()
    assert "weights:  random init (seed 0)" in info and "stage 1:  version 1, seed 1" in info


def test_a_store_written_before_identities_counts_as_version_1(caplog):
    url = _mem()
    old = dataclasses.replace(LAYOUT, weights={}, seed=None, stage1_version=None)
    store = FeatureStore.create(url, old, URIS)
    assert "stage1_version" not in {k for k, v in store.attrs.items() if v is not None}
    with pytest.raises(StoreMismatchError, match="stage1_version: store has 1, this run 2"):
        FeatureStore.create(url, dataclasses.replace(LAYOUT, stage1_version=2), URIS)
    with caplog.at_level(logging.WARNING):
        again = FeatureStore.create(url, LAYOUT, URIS)
    assert "does not record its weights" in caplog.text and again.attrs["weights"] == {"source": "random", "seed": 0}


def test_mixing_weights_is_refused_before_anything_runs(tmp_path, sample_images, weights_file):
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=1, **TINY)
    prepare_store(config)  # a store made with --weights none
    with pytest.raises(StoreMismatchError, match="weights: store has random init"):
        check_denoise(dataclasses.replace(config, weights=weights_file, limit=2))
    with pytest.raises(StoreMismatchError, match="seed: store has 0, this run 5"):
        check_denoise(dataclasses.replace(config, seed=5))
    layout, uris, existed = check_denoise(dataclasses.replace(config, limit=2))
    assert existed and len(uris) == 2 and layout.stage1_version >= 1


# ------------------------------------------------------------------------------------------ 5: checked up front

@pytest.mark.parametrize("flags,message", [
    (["--input-size", "100"], "--input-size 100: vit_small_patch14_dinov2: Input height 100 does not fit patch 14"),
    (["--views", "0"], "--views must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--images-per-batch", "0"], "--images-per-batch must be at least 1, got 0"),
    (["--weights", "MISSING"], "Weights file .*no.safetensors does not exist"),
    (["--weights", "GARBAGE"], "Could not read weights file .*garbage.safetensors"),
    (["--weights", "hub", "--model", "vit_small_patch14_dinov2.lvd142m"],
     "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"),
    (["--images", "/no/such/folder"], "Image source /no/such/folder does not exist"),
])
def test_bad_flags_fail_in_one_line_before_anything_is_written(tmp_path, caplog, flags, message):
    (tmp_path / "garbage.safetensors").write_bytes(b"not weights" * 10)
    flags = [{"MISSING": str(tmp_path / "no.safetensors"), "GARBAGE": str(tmp_path / "garbage.safetensors")}.get(f, f)
             for f in flags]
    out = tmp_path / "out.zarr"
    weights = [] if "--weights" in flags else ["--weights", "none"]
    with caplog.at_level(logging.ERROR, logger="dvt"):
        assert main(["denoise", "--output", str(out), *FLAGS, *weights, *flags]) == EXIT_REFUSED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage(), errors
    import re

    assert re.search(message, errors[0].getMessage()), errors[0].getMessage()
    assert not out.exists(), "a refused run left a store behind"


def test_limit_0_says_there_is_nothing_to_do(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["denoise", "--output", str(tmp_path / "out.zarr"), *FLAGS, "--weights", "none",
                     "--limit", "0"]) == 0
    assert "--limit 0 selects no images: nothing to do" in caplog.text and not (tmp_path / "out.zarr").exists()


def test_a_typo_in_weights_on_a_finished_store_changes_nothing(tmp_path, sample_images):
    url = str(tmp_path / "s.zarr")
    store, _, _ = prepare_store(DenoiseConfig(images=str(sample_images[0].parent), output=url, limit=1, **TINY))
    store.update_attrs(last_run={"ok": 1})
    before = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    assert main(["denoise", "--images", str(sample_images[0].parent), "--output", url, *FLAGS, "--limit", "1",
                 "--weights", str(tmp_path / "wieghts.safetensors")]) == EXIT_REFUSED
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before


# ------------------------------------------------------------------------------------------ 4: one line

def test_interrupts_end_in_one_line_and_their_exit_status(caplog):
    from jobs.cli import _run_job

    args = type("Args", (), {"verbose": 0})()

    def sigint(_):
        raise KeyboardInterrupt

    def sigterm(_):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler _run_job installs turns it into an exception
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the job")

    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.ERROR, logger="dvt"):
        assert _run_job(sigint, args) == EXIT_INTERRUPTED
        assert _run_job(sigterm, args) == EXIT_TERMINATED
    assert signal.getsignal(signal.SIGTERM) is previous
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["interrupted (SIGINT): finished work is kept in the output; re-run the same command to resume",
                     "terminated (SIGTERM): finished work is kept in the output; re-run the same command to resume"]


def test_expected_ray_line_is_dropped_from_the_console():
    """The C++ line Ray prints on every run goes, any other line (and a partial one) passes, in order."""
    code = ("import os, re; from pipeline.runtime.ray_session import _filter_stderr, EXPECTED_RAY_LINES as P\n"
            "_filter_stderr(P)\n"
            "os.write(2, b'before\\n[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: '\n"
            "         b\"'MapWorker(X)' and ID: 'ab' has constructor arguments in the object store and max_restarts\"\n"
            "         b' > 0. If the arguments ...\\n[2026 E] core_worker.cc:12: something else\\nprogress 50%\\r')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stderr == b"before\n[2026 E] core_worker.cc:12: something else\nprogress 50%\r"


# ------------------------------------------------------------------------------------------ 2, 3: object storage

@pytest.fixture()
def own_s3(monkeypatch):
    """A moto server of this test's own (so freezing it touches nothing else), with short S3 limits."""
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


def test_progress_keeps_reporting_and_warns_when_nothing_finishes(caplog):
    progress = Progress(total=10, label="job", every_s=0.05, stall_s=0.3)
    with caplog.at_level(logging.INFO, logger="dvt"):
        progress.start()
        progress.update(ok=1)
        time.sleep(0.9)
        progress.close()
    lines = [r for r in caplog.records if r.name == "dvt"]
    assert sum("job: 1/10 images" in r.getMessage() for r in lines) >= 3  # the line keeps coming while quiet
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert warnings and "no image finished for" in warnings[0] and "stalled" in warnings[0]
    steady = Progress(total=10, every_s=1.0, stall_s=1.0)
    steady.update(ok=1)
    assert not steady.stalled()


# ------------------------------------------------------------------------------------------ 7: one writer

@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lease_is_taken_over(tmp_path, s3_bucket, where):
    url = str(tmp_path / "s.zarr") if where == "local" else f"{s3_bucket}/s.zarr"
    first = StoreLease(url, "denoise", ttl_s=600).acquire()
    try:
        with pytest.raises(StoreBusyError, match=rf"in use by a denoise job on host {socket.gethostname()} "
                                                 rf"\(pid {os.getpid()}, lease {first.holder.owner[:8]}\).*wait for it"):
            StoreLease(url, "apply").acquire()
        holder = lease_holder(url)
        assert holder is not None and holder.owner == first.holder.owner
        # the first job's heartbeat goes stale (its driver paused, or lost on another host): taken over
        stale = dataclasses.replace(holder, heartbeat="2000-01-01T00:00:00+00:00")
        _write_lease(url, stale)
        second = StoreLease(url, "apply", ttl_s=600).acquire()
        assert lease_holder(url).owner == second.holder.owner
        first.renew()
        assert first.lost.is_set()
        with pytest.raises(LeaseLostError, match="took over"):
            first.check()
        first.release()  # not ours any more: left alone
        assert lease_holder(url).owner == second.holder.owner
        second.release()
        assert lease_holder(url) is None
    finally:
        first.abandon()


def _write_lease(url: str, holder) -> None:
    from pipeline.io.storage import filesystem

    fs, root = filesystem(url)
    fs.pipe_file(f"{root}/lease.json", json.dumps(dataclasses.asdict(holder)).encode())


def test_a_lease_left_by_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    url = str(tmp_path / "s.zarr")
    first = StoreLease(url, "denoise").acquire()
    first.abandon()
    _write_lease(url, dataclasses.replace(first.holder, pid=int(dead.stdout)))  # a driver that was SIGKILLed
    with StoreLease(url, "denoise") as second:
        assert lease_holder(url).owner == second.holder.owner


@pytest.mark.slow
def test_a_running_job_refuses_a_second_one_before_starting_ray(tmp_path, sample_images):
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=1, **TINY)
    with StoreLease(config.output, "denoise"):
        with pytest.raises(StoreBusyError, match="in use by a denoise job"):
            run_denoise(config)  # refused before ray.init: this test runs without Ray


# ------------------------------------------------------------------------------------------ job level

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
