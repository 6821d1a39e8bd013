"""Linear probes learn generated tasks, read from the real dataset layouts (VOC, NYU-style pairs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbone import create_backbone
from pipeline.probes import (ProbeConfig, compute_features, confusion_iou, depth_pairs, depth_probe, load_depth,
                             load_images, load_segmentation, segmentation_probe, store_features, voc_pairs)

SIZE = 64  # TinyConvViT: patch 8 -> 8 x 8 grid
COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shapes_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image with 2-3 coloured rectangles / discs on a dark background; the label follows the colour."""
    img = np.full((SIZE, SIZE, 3), 25, np.uint8)
    label = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cls in rng.choice([1, 2, 3], size=rng.integers(2, 4), replace=False):
        cx, cy, r = rng.integers(12, SIZE - 12, 2).tolist() + [int(rng.integers(8, 16))]
        mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) if cls != 2 else (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = COLOURS[int(cls)]
        label[mask] = cls
    edge = np.zeros_like(label, bool)  # VOC marks object borders 255
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:] |= label[1:] != label[:-1]
    label[edge] = 255
    return img, label


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(32)]
    for i in ids:
        img, label = _shapes_image(rng)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        lab = Image.fromarray(label, "P")
        lab.putpalette(PALETTE)
        lab.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:24]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[24:]) + "\n")
    return root


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory) -> Path:
    """Smooth colour images; depth (16-bit mm) is a smooth function of the colour."""
    from pipeline.synthetic import smooth_images

    root = tmp_path_factory.mktemp("nyu")
    images = smooth_images(24, SIZE, seed=3, max_freq=1.0)
    for split, sl in (("train", slice(0, 18)), ("val", slice(18, 24))):
        (root / split).mkdir()
        for k, img in enumerate(images[sl]):
            rgb = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            depth_m = 1.0 + 3.0 * img[0] + 1.5 * img[2]
            depth = (depth_m.numpy() * 1000).astype(np.uint16)
            depth[:2, :2] = 0  # missing measurements
            Image.fromarray(rgb).save(root / split / f"{k:04d}_rgb.png")
            Image.fromarray(depth).save(root / split / f"{k:04d}_depth.png")
    return root


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone("tests.custom_backbone:create", weights="none")


def test_voc_reader(voc_root):
    train, val = voc_pairs(str(voc_root), "train"), voc_pairs(str(voc_root), "val")
    assert len(train) == 24 and len(val) == 8
    labels = load_segmentation([p for _, p in val], 32)
    assert labels.shape == (8, 32, 32) and labels.dtype == torch.uint8
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2, 3, 255}
    with pytest.raises(FileNotFoundError, match="VOC root"):
        voc_pairs(str(voc_root / "JPEGImages"), "train")


def test_segmentation_probe_learns_colour_classes(voc_root, tiny):
    config = ProbeConfig(steps=150, lr=0.05, batch_images=8)
    data = {}
    for split in ("train", "val"):
        pairs = voc_pairs(str(voc_root), split)
        feats = compute_features(tiny.features, load_images([p for p, _ in pairs], SIZE))
        data[split] = feats, load_segmentation([p for _, p in pairs], 32)
    assert data["train"][0].shape == (24, 8, 8, 12)
    result = segmentation_probe(*data["train"], *data["val"], num_classes=4, config=config)
    assert result["miou"] > 0.6, result
    assert len(result["per_class_iou"]) == 4
    # the same probe on features that carry no image information learns nothing useful
    noise = [torch.randn_like(data[s][0].float()) for s in ("train", "val")]
    blind = segmentation_probe(noise[0], data["train"][1], noise[1], data["val"][1], num_classes=4, config=config)
    assert blind["miou"] < result["miou"] - 0.3, (blind, result)


def test_depth_reader_and_probe(nyu_root, tiny):
    train, val = depth_pairs(str(nyu_root), "train"), depth_pairs(str(nyu_root), "val")
    assert len(train) == 18 and len(val) == 6 and train[0][0].endswith("0000_rgb.png")
    data = {}
    for split, pairs in (("train", train), ("val", val)):
        feats = compute_features(tiny.features, load_images([p for p, _ in pairs], SIZE))
        data[split] = feats, load_depth([d for _, d in pairs], 32)
    depth = data["val"][1]
    assert depth.max() < 6.0 and (depth == 0).any() and depth.dtype == torch.float32
    result = depth_probe(*data["train"], *data["val"], config=ProbeConfig(steps=200, lr=0.05, batch_images=6))
    baseline = float(depth[depth > 0].std())
    assert result["rmse"] < 0.5 * baseline, (result, baseline)
    assert result["delta1"] > 0.8


def test_depth_list_file(nyu_root, tmp_path):
    (nyu_root / "listed.txt").write_text("# rgb depth\nval/0000_rgb.png val/0000_depth.png\n")
    assert depth_pairs(str(nyu_root), "listed") == [(str(nyu_root / "val/0000_rgb.png"),
                                                     str(nyu_root / "val/0000_depth.png"))]
    with pytest.raises(FileNotFoundError, match="depth_png|_depth.png"):
        depth_pairs(str(tmp_path), "train")


def test_confusion_iou():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    iou = confusion_iou(conf)
    assert iou[0] == pytest.approx(0.75) and iou[1] == pytest.approx(2 / 3) and torch.isnan(iou[2])


def test_store_features_match_by_uri(voc_root, tmp_path):
    from pipeline.store import FeatureStore, StoreLayout

    pairs = voc_pairs(str(voc_root), "val")
    uris = [p for p, _ in pairs]
    layout = StoreLayout(backbone="t", block=0, input_size=(SIZE, SIZE), patch_size=8, stride=8, grid=(8, 8),
                         channels=4, dtype="float32")
    store = FeatureStore.create(str(tmp_path / "s.zarr"), layout, uris)
    data = torch.arange(len(uris), dtype=torch.float32)[:, None, None, None].expand(-1, 8, 8, 4)
    store.write_unit([{"image_id": i, "uri": u} for i, u in enumerate(uris)], {"raw": data, "clean": -data})
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    got = store_features(store, [uris[3], uris[1]], "clean")
    assert got[:, 0, 0, 0].tolist() == [-3.0, -1.0]
    with pytest.raises(KeyError, match="not in"):
        store_features(store, ["/elsewhere/unknown.jpg"], "raw")


def test_eval_job_with_images_and_probes(voc_root, nyu_root, tmp_path):
    import json

    from pipeline.cli import main

    out = tmp_path / "report"
    argv = ["eval", "--images", str(voc_root / "JPEGImages"), "--limit", "4", "--model", "tests.custom_backbone:create",
            "--weights", "none", "--input-size", str(SIZE), "--stage1-preset", "ci", "--pairs", "2",
            "--voc", str(voc_root), "--num-classes", "4", "--depth", str(nyu_root), "--max-train", "12",
            "--label-size", "32", "--probe-steps", "80", "--probe-lr", "0.05", "--out", str(out)]
    torch.manual_seed(0)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    art = report["artifacts"]
    assert set(art) == {"raw", "stage-1"}
    assert 0.9 < art["raw"]["cross_view_consistency"] <= 1.0  # a position-free conv: crops agree
    assert "cross_view_consistency" not in art["stage-1"]
    seg, depth = report["probes"]["segmentation"], report["probes"]["depth"]
    assert seg["dataset"] == {"root": str(voc_root), "train": 12, "val": 8, "label_size": 32}
    assert seg["raw"]["miou"] > 0.5
    assert depth["raw"]["rmse"] > 0 and depth["raw"]["delta1"] > 0.5
    md = (out / "report.md").read_text()
    assert "## Linear segmentation probe" in md and "## Linear depth probe" in md and "| raw |" in md
