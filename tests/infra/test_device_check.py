"""benchmarks/device_check.py: its smoke mode runs every part on a CPU and reports every figure; a part that
fails or cannot run is recorded and the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["backbone", "stage1", "apply_kernel", "scaling_processes", "denoise_job", "apply_job", "feed_job", "scaling_ray",
         "train"]


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_check

    yield device_check
    sys.path.remove(str(ROOT / "benchmarks"))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_smoke_run_measures_every_part(tmp_path):
    out = tmp_path / "out"
    # A generous budget: the smoke sizes are fixed, the budget only has to leave every part room on a busy machine.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke", "--out", str(out),
                           "--budget", "420", "--site-archive", "none"],
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["mode"] == "smoke" and report["environment"]["ray"] and report["environment"]["zarr"]
    parts = report["parts"]
    assert list(parts) == PARTS
    assert {name: p["status"] for name, p in parts.items()} == {name: "ok" for name in PARTS}, \
        {name: p.get("error") for name, p in parts.items()}

    backbone = parts["backbone"]["rows"]
    assert {r["dtype"] for r in backbone} == {"float32", "bfloat16"}
    assert all(_positive(r["images_per_s"]) for r in backbone)
    stage1 = parts["stage1"]["rows"]
    assert {(r["dtype"], r["images_per_batch"]) for r in stage1} == {(d, b) for d in ("float32", "bfloat16")
                                                                      for b in (1, 2)}
    for r in stage1:
        assert _positive(r["s_per_image"]) and _positive(r["views_s_per_image"]) and _positive(r["fit_s_per_image"])
        assert r["views_s_per_image"] + r["fit_s_per_image"] == pytest.approx(r["s_per_image"], abs=2e-4)
    (dev,) = parts["stage1"]["bf16_vs_fp32"]
    assert 0 <= dev["relative_error"] < 0.5 and dev["mean_cosine"] > 0.8
    assert all(_positive(r["ratio"]) for r in parts["apply_kernel"]["rows"])

    for name in ("scaling_processes", "scaling_ray"):
        rows = parts[name]["rows"]
        assert [r["workers"] for r in rows] == [1, 2], name
        assert all(_positive(r["images_per_s"]) for r in rows) and rows[0]["efficiency"] == 1.0, rows
        assert _positive(rows[1]["efficiency"]), rows

    job = parts["denoise_job"]["summary"]
    assert job["rc"] == 0 and job["ok"] == job["images"] == 4 and job["failed"] == 0
    assert _positive(job["kernel_steady_images_per_s"]) and _positive(job["steady_images_per_s"])
    assert job["overhead_steady"] == pytest.approx(1 - job["steady_images_per_s"] / job["kernel_steady_images_per_s"],
                                                   abs=1e-3)
    feed = parts["feed_job"]["summary"]
    assert feed["rc"] == 0 and feed["ok"] == feed["images"] == 4 and feed["failed"] == 0, feed
    assert _positive(feed["steady_images_per_s"]) and feed["model"] == "pipeline.testing.zero_vit:create"
    apply = parts["apply_job"]["summary"]
    assert apply["rc"] == 0 and apply["ok"] == apply["images"] and _positive(apply["ratio_steady"])
    checks = parts["train"]["rows"]  # one per pass: 16 images in global batches of 4, 2 passes
    assert [(r["step"], r["epoch"]) for r in checks] == [(4, 1.0), (8, 2.0)]
    assert all(_positive(r["samples_per_s"]) and 0 <= r["data_wait"] <= 1 for r in checks)
    train = parts["train"]["summary"]
    assert _positive(train["samples_per_s_after_first_check"]) and 0 <= train["data_wait_run"] <= 1

    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 6 and all({"target", "value", "met"} <= set(g) for g in goals.values())
    assert goals["denoise job overhead vs the stage-1 kernel: < 5%"]["value"] == job["overhead_steady"]
    md = (out / "device_check.md").read_text()
    assert all(f"## {name}: ok" in md for name in PARTS)
    assert (out / "logs" / "denoise_job.log").stat().st_size > 0


def test_parts_without_ray_are_skipped_and_a_failing_part_is_recorded(device_check, tmp_path, monkeypatch):
    import device_support
    import torch

    def broken(run):
        run.row(model="x", images_per_s=1.0)
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(device_support, "ray_missing", lambda: "skipped: ray not installed")
    monkeypatch.setattr(device_check, "part_backbone", broken)
    run = device_check.Run(tmp_path, device_check.CheckConfig.smoke(), torch.device("cpu"), "smoke")
    run.report["environment"] = {"ray": None, "zarr": None}
    device_check.run_parts(run, ["backbone", "denoise_job", "train"])
    report = json.loads((tmp_path / "device_check.json").read_text())
    backbone = report["parts"]["backbone"]
    assert backbone["status"] == "error" and backbone["error"] == "RuntimeError: no such kernel"
    assert backbone["rows"] == [{"model": "x", "images_per_s": 1.0}]  # what was measured before the failure stays
    for name in ("denoise_job", "train"):
        assert report["parts"][name] == {"status": "skipped", "skipped": "skipped: ray not installed"}
    md = (tmp_path / "device_check.md").read_text()
    assert "## train: skipped" in md and "no such kernel" in md
