"""End to end: the denoise job on Ray Data into feature stores, with broken inputs, resumes and crashes."""

import io
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.denoise.job import DenoiseConfig, run_denoise
from pipeline.store import FeatureStore
from pipeline.store.manifest import ledger_paths, read_manifest

from ..conftest import ROOT, StreamLines

pytestmark = pytest.mark.slow

TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4, steps=10,
            images_per_batch=2, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_corpus(folder: Path, sample_images) -> dict[str, str]:
    """Two good images, two awkward but valid ones (a 2000x40 strip, a 3x5 icon) and one of each kind of broken
    file; returns name -> expected failure reason for the broken ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in sample_images[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 2000, 3), np.uint8)).save(folder / "strip.jpg")
    Image.fromarray(rng.integers(0, 255, (5, 3, 3), np.uint8)).save(folder / "tiny.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    broken = {
        "truncated.jpg": (buf.getvalue()[:300], "corrupt or truncated"),
        "empty.png": (b"", "empty file"),
        "notes.jpg": (b"just some text, not an image", "not an image"),
        "bomb.png": (png_header_only(60000, 60000), "decompression bomb"),
    }
    for name, (data, _) in broken.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in broken.items()}


def test_denoise_samples_to_s3_store(ray_local, s3_bucket, sample_images):
    url = f"{s3_bucket}/features.zarr"
    summary = run_denoise(DenoiseConfig(images=str(sample_images[0].parent), output=url, **TINY))
    n = len(sample_images)
    assert (summary.ok, summary.failed, summary.todo, summary.store_ok) == (n, 0, n, n)
    store = FeatureStore.open(url)
    m = store.manifest().to_pylist()
    assert sorted(r["image_id"] for r in m) == list(range(n)) and all(r["status"] == "ok" for r in m)
    sizes = {Path(p).name: Image.open(p).size for p in sample_images}
    for r in m:
        assert (r["width"], r["height"]) == sizes[Path(r["uri"]).name]
        assert r["seconds"] > 0 and np.isfinite(r["losses"]["total"] if isinstance(r["losses"], dict)
                                                else dict(r["losses"])["total"])
    data = store.get(range(n), ["raw", "clean", "artifact"])
    for name in ("raw", "clean", "artifact"):
        assert data[name].shape == (n, 4, 4, 384) and np.isfinite(data[name]).all()
    # the clean map is not the raw map: stage 1 removed something
    assert np.abs(data["clean"].astype(np.float32) - data["raw"].astype(np.float32)).mean() > 1e-3
    assert store.attrs["last_run"]["ok"] == n


def test_broken_files_fail_alone_and_resume_skips_done(ray_local, tmp_path, sample_images):
    reasons = make_corpus(tmp_path / "corpus", sample_images)
    url = str(tmp_path / "store.zarr")
    first = run_denoise(DenoiseConfig(images=str(tmp_path / "corpus"), output=url, limit=4, **TINY))
    assert first.todo == 4
    summary = run_denoise(DenoiseConfig(images=str(tmp_path / "corpus"), output=url, **TINY))
    assert summary.skipped == 4 - first.failed and summary.todo == 8 - 4 + first.failed
    store = FeatureStore.open(url)
    rows = {Path(r["uri"]).name: r for r in store.manifest().to_pylist()}
    assert len(rows) == 8
    for name, reason in reasons.items():
        assert rows[name]["status"] == "failed" and reason in rows[name]["error"], (name, rows[name]["error"])
    good = [r for r in rows.values() if r["status"] == "ok"]
    assert len(good) == 4 and (rows["strip.jpg"]["width"], rows["tiny.png"]["height"]) == (2000, 5)
    assert np.isfinite(store.get([r["image_id"] for r in good], ["clean"])["clean"]).all()
    # failed rows hold no data
    failed_ids = [r["image_id"] for r in rows.values() if r["status"] == "failed"]
    assert np.isnan(store.read("clean", failed_ids[:1], check=False)).all()
    # a third run has nothing left but the failures, which fail again the same way
    last_run = FeatureStore.open(url).attrs["last_run"]
    again = run_denoise(DenoiseConfig(images=str(tmp_path / "corpus"), output=url, retry_failed=False, **TINY))
    assert again.todo == 0 and FeatureStore.open(url).attrs["last_run"] == last_run  # nothing done, nothing written
    assert [Path(p).name[:8] for p in ledger_paths(store.fs, store.root)] == ["compact-"]  # each run folded its parts


def test_a_killed_worker_is_replaced_without_lost_or_duplicated_rows(ray_local, tmp_path, sample_images):
    marker = tmp_path / "died-once"
    url = str(tmp_path / "store.zarr")
    config = DenoiseConfig(images=str(sample_images[0].parent), output=url,
                           **{**TINY, "model": "tests.faulty_backbone:create", "weights": str(marker),
                              "input_size": 32, "images_per_batch": 1})
    summary = run_denoise(config)
    assert marker.exists(), "the worker never died: the test did not test anything"
    n = len(sample_images)
    assert (summary.ok, summary.failed) == (n, 0)
    store = FeatureStore.open(url)
    m = store.manifest()
    assert sorted(m["image_id"].to_pylist()) == list(range(n))
    # one unit per image, folded by the driver beside the workers and all at the end: one object, each image once
    assert [Path(p).name[:8] for p in ledger_paths(store.fs, store.root)] == ["compact-"]
    assert sorted(read_manifest(store.fs, store.root, dedup=False)["image_id"].to_pylist()) == list(range(n))


def test_interrupted_job_resumes(tmp_path, sample_images):
    """SIGTERM the job's driver after its first unit: it ends in one line with status 143, its local Ray and its
    lease gone; a re-run completes the store."""
    url = str(tmp_path / "store.zarr")
    args = [sys.executable, "-m", "jobs.denoise", "--images", str(sample_images[0].parent), "--output", url,
            "--model", "tests.faulty_backbone:slow", "--weights", "none", "--input-size", "32", "--preset", "ci",
            "--views", "4", "--images-per-batch", "1", "--cpus-per-worker", "0.5", "--progress-every", "1"]
    # the backbone takes 2 s per pass: images finish seconds apart, so the signal lands while images remain
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = StreamLines(proc.stderr)
        err.wait_for(r"denoise: [1-9]\d*/\d+ images", timeout=240)  # a unit is in the store
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        stderr = err.text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 143 and "terminated (SIGTERM): finished work is kept" in lines[-1], stderr[-3000:]
    assert not any("Traceback" in line for line in lines) and not (tmp_path / "store.zarr" / "lease.json").exists()
    done_before = FeatureStore.open(url).manifest().num_rows
    assert 1 <= done_before < len(sample_images)
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Workers of the killed job may finish the unit they held, so the re-run has at most n - done_before left.
    redone = int(re.search(r"denoise finished: (\d+) ok", rerun.stderr).group(1))
    assert 0 <= redone <= len(sample_images) - done_before
    m = FeatureStore.open(url).manifest()
    assert sorted(m["image_id"].to_pylist()) == list(range(len(sample_images)))
    assert set(m["status"].to_pylist()) == {"ok"}
