"""``dvt eval`` end to end: several stores (one on the local S3 server) side by side, and computed sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from pipeline.eval.datasets import read_label, voc_pairs
from tests.eval_data import SIZE, label_features, make_voc, positional_artifact, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def stores(voc_root, tmp_path_factory) -> tuple[str, torch.Tensor]:
    """A denoise-style store: raw = label features + a positional artifact, clean = the label features."""
    pairs = voc_pairs(str(voc_root), "train") + voc_pairs(str(voc_root), "val")
    clean = label_features([read_label(lab) for _, lab in pairs])
    url = str(tmp_path_factory.mktemp("stores") / "voc.zarr")
    write_store(url, [p for p, _ in pairs], {"raw": clean + positional_artifact(strength=1.0), "clean": clean})
    return url, clean


@pytest.mark.slow
def test_eval_stores_side_by_side(voc_root, stores, s3_bucket, tmp_path):
    url, clean = stores
    uris = [p for p, _ in voc_pairs(str(voc_root), "train") + voc_pairs(str(voc_root), "val")]
    noise_url = write_store(f"{s3_bucket}/noise.zarr", uris, {"clean": torch.randn_like(clean)})
    out = tmp_path / "report"
    argv = ["eval", "--store", url, "--source", f"noise={noise_url}", "--voc", str(voc_root), "--num-classes", "4",
            "--lost-voc07", str(voc_root), "--quick", "--probe-iters", "40", "--seeds", "0,1", "--limit", "3",
            "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["sources"]) == ["raw", "stage-1", "noise"]
    assert report["sources"]["noise"] == {"kind": "store", "url": noise_url, "array": "clean", "backbone":
                                          "tests.custom_backbone:create", "input_size": [SIZE, SIZE], "grid": [8, 8]}
    m = report["measures"]
    assert set(m) == {"mic", "extras", "knn_voc2012", "probe_voc2012", "lost_voc07"}
    mic = m["mic"]["results"]
    assert mic["raw"]["mic"] > 0.9 and mic["stage-1"]["mic"] < mic["raw"]["mic"] - 0.3, mic
    assert mic["raw"]["images"] == 3 and len(mic["raw"]["per_image"]) == 3
    extras = m["extras"]["results"]
    assert extras["raw"]["positional_energy"] > 0.5 > extras["stage-1"]["positional_energy"]
    knn = m["knn_voc2012"]["results"]
    assert knn["stage-1"]["miou"] > knn["noise"]["miou"] + 0.3, knn
    probe = m["probe_voc2012"]["results"]
    assert probe["stage-1"]["miou"]["mean"] > probe["noise"]["miou"]["mean"] + 0.3, probe
    assert len(probe["stage-1"]["miou"]["runs"]) == 2 and probe["stage-1"]["miou"]["std"] >= 0
    protocol = m["probe_voc2012"]["protocol"]
    assert protocol["form"] == "quick" and protocol["schedule"]["iters"] == 40
    lost = m["lost_voc07"]["results"]
    assert lost["stage-1"]["images"] == 32 and lost["stage-1"]["corloc"] > lost["noise"]["corloc"], lost
    md = (out / "report.md").read_text()
    assert "| metric | better | raw | stage-1 | noise |" in md and "± " in md and "![mic](mic.png)" in md
    for key in m:
        assert (out / f"{key}.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_computed_sources_with_a_stage1_fit(voc_root, tmp_path):
    from tests.custom_backbone import create

    out = tmp_path / "report"
    torch.manual_seed(1)
    torch.save(create().state_dict(), tmp_path / "student.pt")  # a distilled export for the same architecture
    argv = ["eval", "--images", str(voc_root / "JPEGImages"), "--limit", "3", "--model", "tests.custom_backbone:create",
            "--weights", "none", "--input-size", str(SIZE), "--stage1-preset", "ci", "--pairs", "2",
            "--student", str(tmp_path / "student.pt"),
            "--voc", str(voc_root), "--num-classes", "4", "--max-train", "12", "--no-knn", "--quick",
            "--probe-iters", "30", "--seeds", "0", "--out", str(out)]
    torch.manual_seed(0)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["sources"]) == ["raw", "stage-1", "student"]
    extras = report["measures"]["extras"]["results"]
    assert 0.9 < extras["raw"]["cross_view_consistency"] <= 1.0  # a position-free conv: crops agree
    assert "cross_view_consistency" not in extras["stage-1"]
    assert set(report["measures"]["probe_voc2012"]["results"]) == {"raw", "student"}
    assert extras["student"]["grid_energy"] != extras["raw"]["grid_energy"]  # its own weights
    assert report["measures"]["probe_voc2012"]["results"]["raw"]["miou"]["mean"] > 0.5
    assert any("stage-1" in n and "label-free" in n for n in report["notes"])


def test_eval_reference_probe_through_a_model(voc_root, tmp_path):
    out = tmp_path / "report"
    argv = ["eval", "--model", "tests.custom_backbone:create", "--weights", "none", "--voc", str(voc_root),
            "--num-classes", "4", "--no-mic", "--no-extras", "--no-knn", "--probe-iters", "8", "--probe-batch", "4",
            "--seeds", "0", "--max-val", "2", "--workers", "0", "--out", str(out)]
    assert main(argv) == 0
    entry = json.loads((out / "report.json").read_text())["measures"]["probe_voc2012"]
    assert entry["protocol"]["form"] == "reference" and entry["protocol"]["crop"] == 512
    assert entry["protocol"]["schedule"]["warmup_iters"] == 2 and entry["protocol"]["val_images"] == 2
    assert 0 <= entry["results"]["raw"]["miou"]["mean"] <= 1


def test_eval_refuses_bad_sources(stores, tmp_path, caplog):
    url, _ = stores
    assert main(["eval", "--source", "nameonly", "--out", str(tmp_path)]) == 1
    assert "NAME=URL" in caplog.text
    assert main(["eval", "--out", str(tmp_path)]) == 1
    assert "nothing to evaluate" in caplog.text
    assert main(["eval", "--source", f"a:artifact={url}", "--no-extras", "--out", str(tmp_path)]) == 1
    assert "no array 'artifact'" in caplog.text


def test_store_sources_take_the_reference_schedule_without_quick(voc_root, stores, tmp_path):
    url, _ = stores
    out = tmp_path / "report"
    assert main(["eval", "--store", url, "--voc", str(voc_root), "--num-classes", "4", "--no-mic", "--no-extras",
                 "--no-knn", "--probe-iters", "12", "--seeds", "0", "--out", str(out)]) == 0
    protocol = json.loads((out / "report.json").read_text())["measures"]["probe_voc2012"]["protocol"]
    assert protocol["form"] == "frozen features" and "crop" not in protocol  # no augmentation from a store
    assert protocol["schedule"] == {**protocol["schedule"], "iters": 12, "lr": 1e-3, "warmup_iters": 3,
                                    "policy": "poly"}
