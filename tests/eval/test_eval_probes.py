"""Dataset readers, augmentations, schedules and the linear probes (frozen and reference forms) on generated data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.vit.backbone import create_backbone
from pipeline.eval.augment import depth_train_sample, photometric_distortion, rescale_size, seg_train_sample
from pipeline.eval.datasets import (ADE20K, VOC2012, ade20k_pairs, depth_pairs, read_depth, read_label, voc_boxes,
                                    voc_pairs)
from pipeline.eval.depth_probe import DepthProbeConfig, depth_metrics, probe_depth_frozen, probe_depth_online
from pipeline.eval.probe_data import center_pad, padded_size
from pipeline.eval.seg_probe import SegProbeConfig, probe_segmentation_frozen, probe_segmentation_online
from pipeline.eval.sources import Encoder, compute_features
from pipeline.eval.probe_training import Schedule, summarize_runs
from tests.eval_data import SIZE, label_features, make_voc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOC4 = replace(VOC2012, num_classes=4)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory) -> Path:
    """Smooth colour images; depth (16-bit mm) is a smooth function of the colour."""
    from pipeline.testing.synthetic import smooth_images

    root = tmp_path_factory.mktemp("nyu")
    images = smooth_images(20, SIZE, seed=3, max_freq=1.0)
    for split, sl in (("train", slice(0, 14)), ("val", slice(14, 20))):
        (root / split).mkdir()
        for k, img in enumerate(images[sl]):
            rgb = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            depth = ((1.0 + 3.0 * img[0] + 1.5 * img[2]).numpy() * 1000).astype(np.uint16)
            depth[:2, :2] = 0  # missing measurements
            Image.fromarray(rgb).save(root / split / f"{k:04d}_rgb.png")
            Image.fromarray(depth).save(root / split / f"{k:04d}_depth.png")
    return root


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    torch.manual_seed(0)
    return Encoder(create_backbone("tests.custom_backbone:create", weights="none"))


def _labels(root: Path, split: str) -> tuple[list[str], list[np.ndarray]]:
    pairs = voc_pairs(str(root), split)
    return [p for p, _ in pairs], [read_label(lab) for _, lab in pairs]


def test_voc_reader_and_boxes(voc_root):
    train, val = voc_pairs(str(voc_root), "train"), voc_pairs(str(voc_root), "val")
    assert len(train) == 24 and len(val) == 8
    label = read_label(val[0][1])
    assert label.shape == (SIZE, SIZE) and set(np.unique(label).tolist()) <= {0, 1, 2, 3, 255}
    with pytest.raises(FileNotFoundError, match="VOC root"):
        voc_pairs(str(voc_root / "JPEGImages"), "train")
    boxes = voc_boxes(str(voc_root))
    assert len(boxes) == 32 and boxes[0].boxes.shape == (1, 4) and boxes[0].width == SIZE
    assert boxes[0].image.endswith("2007_000000.jpg") and not boxes[0].hard.any()


def test_ade20k_reader_reduces_zero_label(tmp_path):
    for d in ("images/training", "annotations/training"):
        (tmp_path / d).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images/training/ADE_train_00000001.jpg")
    Image.fromarray(np.array([[0, 1], [150, 7]], np.uint8).repeat(4, 0).repeat(4, 1), "L").save(
        tmp_path / "annotations/training/ADE_train_00000001.png")
    (pair,) = ade20k_pairs(str(tmp_path), "training")
    label = read_label(pair[1], ADE20K)
    assert label[0, 0] == 255 and label[0, 4] == 0 and label[4, 0] == 149 and label[4, 4] == 6
    assert ADE20K.num_classes == 150
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ade20k_pairs(str(tmp_path), "validation")


def test_depth_pairs_folder_and_list_file(nyu_root, tmp_path):
    train = depth_pairs(str(nyu_root), "train")
    assert len(train) == 14 and train[0][0].endswith("0000_rgb.png")
    (nyu_root / "listed.txt").write_text("# rgb depth focal\nval/0001_rgb.png val/0001_depth.png 518.8\n"
                                         "val/0000_rgb.png None 518.8\n/val/0000_rgb.png val/0000_depth.png\n")
    assert depth_pairs(str(nyu_root), "listed") == [
        (str(nyu_root / f"val/000{i}_rgb.png"), str(nyu_root / f"val/000{i}_depth.png")) for i in (0, 1)]
    depth = read_depth(train[0][1])
    assert depth.dtype == np.float32 and depth[0, 0] == 0 and 1.0 <= depth.max() < 6.0
    with pytest.raises(FileNotFoundError, match="_depth.png"):
        depth_pairs(str(tmp_path), "train")


def test_seg_augmentation_is_seeded_and_padded():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    label = (np.arange(90)[None, :].repeat(60, 0) // 30).astype(np.uint8)
    a = seg_train_sample(img, label, np.random.default_rng(5), crop=64, scale=(120, 40))
    b = seg_train_sample(img, label, np.random.default_rng(5), crop=64, scale=(120, 40))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    pixels, lab, valid = a
    assert pixels.shape == (64, 64, 3) and pixels.dtype == torch.uint8 and lab.shape == (64, 64)
    assert bool((lab[~valid] == 255).all()) and set(lab[valid].unique().tolist()) <= {0, 1, 2}
    assert rescale_size(375, 500, (2048, 512)) == (512, 683) and rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    same = photometric_distortion(torch.full((4, 4, 3), 100, dtype=torch.uint8), np.random.default_rng(1))
    assert same.dtype == torch.uint8 and same.shape == (4, 4, 3)


def test_depth_augmentation_crops_and_keeps_depth_values():
    img = np.full((480, 640, 3), 128, np.uint8)
    depth = np.linspace(0.5, 9.5, 480 * 640, dtype=np.float32).reshape(480, 640)
    pixels, dep = depth_train_sample(img, depth, np.random.default_rng(2))
    assert pixels.shape == (416, 544, 3) and dep.shape == (416, 544)
    assert float(pixels.max()) <= 255 and float(dep.max()) <= 9.5
    assert set(np.unique(dep.numpy())) <= set(np.unique(depth)) | {0.0}  # nearest: no new depth values


def test_schedules_follow_mmcv():
    poly = Schedule(iters=1000, lr=1e-3, weight_decay=0, policy="poly", warmup_iters=100, warmup_ratio=1e-6)
    assert poly.lr_at(0) == pytest.approx(1e-9) and poly.lr_at(100) == pytest.approx(0.9e-3)
    assert poly.lr_at(50) == pytest.approx(0.95e-3 * (1 - 0.5 * (1 - 1e-6)))
    cos = Schedule(iters=1000, lr=5e-3, weight_decay=0, policy="cosine", min_lr_ratio=1e-8,
                   one_cycle_momentum=(0.85, 0.95), pct_start=0.3)
    assert cos.lr_at(500) == pytest.approx(2.5e-3, rel=1e-6) and cos.lr_at(999) < 1e-7
    assert cos.beta1_at(0) == pytest.approx(0.95) and cos.beta1_at(299) == pytest.approx(0.85)
    assert cos.beta1_at(999) == pytest.approx(0.95) and 0.85 < cos.beta1_at(150) < 0.95
    summary = summarize_runs([{"m": 1.0}, {"m": 3.0}, {"m": float("nan")}], ["m", "absent"])
    assert summary == {"m": {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "min": 1.0, "max": 3.0, "runs": [1.0, 3.0]}}


def test_center_pad_fills_with_the_mean_colour():
    assert padded_size(512, 14, 14) == 518 and padded_size(416, 14, 14) == 420 and padded_size(10, 16, 16) == 16
    out = center_pad(torch.zeros(1, 3, 512, 512), 14, 14, (0.5, 0.25, 0.75))
    assert out.shape == (1, 3, 518, 518)
    assert out[0, :, 0, 0].tolist() == [0.5, 0.25, 0.75] and out[0, :, 3, 3].tolist() == [0.0, 0.0, 0.0]


def test_frozen_segmentation_probe_learns_labels_not_noise(voc_root):
    (_, tr), (_, va) = _labels(voc_root, "train"), _labels(voc_root, "val")
    config = SegProbeConfig.quick(batch=8, schedule=Schedule(iters=60, lr=1e-2, weight_decay=1e-4))
    good = probe_segmentation_frozen(label_features(tr), tr, label_features(va, seed=1), va, VOC4, config, SIZE)
    noise = [torch.randn(len(x), 8, 8, 16) for x in (tr, va)]
    blind = probe_segmentation_frozen(noise[0], tr, noise[1], va, VOC4, config, SIZE)
    assert good["miou"] > 0.7 and blind["miou"] < good["miou"] - 0.3, (good, blind)
    assert len(good["per_class_iou"]) == 4 and good["val_images"] == 8


def test_reference_segmentation_probe_runs_the_augmented_protocol(voc_root, tiny):
    train, val = voc_pairs(str(voc_root), "train"), voc_pairs(str(voc_root), "val")
    config = SegProbeConfig(schedule=Schedule(iters=40, lr=2e-2, weight_decay=1e-4, warmup_iters=5), batch=4,
                            crop=48, scale=(128, 48), slide_stride=32, workers=1)
    result = probe_segmentation_online(tiny, train, val, VOC4, config)  # one loader process: samples pickle
    assert result["miou"] > 0.5, result  # colour decides the class; a 1x1 conv of patch pixels sees it


def test_depth_metrics_on_a_known_prediction():
    gt = np.full((480, 640), 2.0, np.float32)
    gt[0, 0] = 0.0  # no measurement
    m = depth_metrics(gt, gt * 1.1)
    assert m["abs_rel"] == pytest.approx(0.1) and m["rmse"] == pytest.approx(0.2) and m["a1"] == 1.0
    assert depth_metrics(gt, gt)["rmse"] == 0.0


def test_depth_probes_frozen_and_reference(nyu_root, tiny):
    from pipeline.eval.datasets import load_images

    train, val = depth_pairs(str(nyu_root), "train"), depth_pairs(str(nyu_root), "val")
    truth = [[read_depth(d) for _, d in s] for s in (train, val)]
    maps = [compute_features(tiny, load_images([p for p, _ in s], SIZE)) for s in (train, val)]
    config = DepthProbeConfig.quick(batch=7, eigen_crop=False, bins=64, schedule=Schedule(
        iters=150, lr=5e-2, weight_decay=0.01, policy="cosine", grad_clip=35.0))
    result = probe_depth_frozen(maps[0], truth[0], maps[1], truth[1], config, SIZE)
    noise = probe_depth_frozen(*(torch.randn_like(m.float()) if i % 2 == 0 else m for i, m in
                                 enumerate((maps[0], truth[0], maps[1], truth[1]))), config, SIZE)
    spread = float(np.std(np.concatenate([t[t > 0] for t in truth[1]])))
    assert result["rmse"] < 0.7 * spread < noise["rmse"], (result, noise, spread)
    assert result["class_token"] == "mean of patch features"
    short = replace(config, crop=(48, 48), schedule=replace(config.schedule, iters=20))
    online = probe_depth_online(tiny, train, val, short)
    assert np.isfinite(online["rmse"]) and 0 < online["a1"] <= 1


def test_encoder_class_token_from_a_timm_vit():
    vit = create_backbone("vit_tiny_patch16_224", weights="none", img_size=32)
    enc = Encoder(vit)
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    maps, cls = enc.encode(pixels, with_cls=True)
    assert enc.has_cls and maps.shape == (2, 2, 3, 192) and cls.shape == (2, 192)
    assert torch.allclose(maps, vit.features(pixels), atol=1e-5)  # same patch features as the plain path
    assert not torch.allclose(cls, maps.mean((1, 2)), atol=1e-3)  # a real class token, not a stand-in
    plain, none = enc.encode(torch.rand(1, 3, 32, 32))
    assert none is None and plain.shape == (1, 2, 2, 192)


def test_encoder_can_normalise_as_the_reference_does(tiny):
    from pipeline.vit.backbone import IMAGENET_MEAN, IMAGENET_STD

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = Encoder(tiny.backbone, imagenet_norm=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = tiny.backbone.model.patch_features((x - mean) / std)
    assert torch.allclose(ref.encode(x)[0], expected, atol=1e-5)
    assert not torch.allclose(tiny.encode(x)[0], expected, atol=1e-3)  # its own statistics (0.5, 0.25) differ
    assert ref.mean == IMAGENET_MEAN
