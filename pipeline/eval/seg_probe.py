"""Linear segmentation probe as the DVT reference runs it (VOC 2012, ADE20k), plus a frozen-feature form.

Head (mmseg ``BNHead``): ``BatchNorm2d`` on the last block's patch features, a 1x1 convolution to the
classes (weights ~ N(0, 0.01)), logits resized bilinearly to the label, cross-entropy (ignore 255).

* **reference** (needs an encoder): AdamW lr 1e-3, wd 1e-4, 40k iterations of 16 augmented 512 px crops
  (see :mod:`.augment`), each centre-padded to the patch grid (518 px for /14 models); linear warm-up over
  1500 iterations, then poly decay. Evaluation: each image rescaled to short side 512 (long side <= 2048),
  sliding 512 px windows at stride 341, logits averaged and resized to the original image.
* **frozen** (stores, or ``--quick``): features of each image's square resize computed once; labels
  resized (nearest) to that square for training; logits resized to each image's original size to score.

Scores: mIoU / aAcc / mAcc over the whole evaluation set (:mod:`.seg_metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import rescale_size, resize_label, resize_pair, seg_train_sample
from .datasets import VOC2012, SegmentationSet, read_label, read_rgb
from .probe_data import SampleSet, batches, center_pad, sample_order
from .seg_metrics import ConfusionMeter
from .sources import Encoder
from .probe_training import Schedule, train_head

__all__ = ["SegProbeConfig", "BNLinearHead", "probe_segmentation_online", "probe_segmentation_frozen"]

_log = logging.getLogger(__name__)


def _reference_schedule() -> Schedule:
    return Schedule(iters=40_000, lr=1e-3, weight_decay=1e-4, policy="poly", power=1.0, min_lr=0.0,
                    warmup_iters=1500, warmup_ratio=1e-6)


@dataclass(frozen=True)
class SegProbeConfig:
    """Protocol of the segmentation probe (defaults: the reference configs).

    Attributes:
        schedule: optimisation (40k iterations, AdamW 1e-3, poly, warm-up 1500).
        batch: images per iteration (the reference: 8 GPUs x 2).
        crop, scale, ratio_range, cat_max_ratio, flip_prob, photometric: training augmentation.
        slide_stride: evaluation window stride (windows of ``crop`` pixels).
        workers: data-loading processes for the reference form.
        device: where the encoder and the head run.
        seed: initialisation, sample order and augmentation.
    """

    schedule: Schedule = field(default_factory=_reference_schedule)
    batch: int = 16
    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    slide_stride: int = 341
    workers: int = 0
    device: str = "cpu"
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> SegProbeConfig:
        """The short form: 300 iterations at lr 0.01, no warm-up (minutes on a CPU, not the paper's numbers)."""
        schedule = Schedule(iters=300, lr=1e-2, weight_decay=1e-4, policy="poly", warmup_iters=0)
        return cls(**{"schedule": schedule, **overrides})

    def describe(self, online: bool = True) -> dict:
        """The settings that apply to the form run (augmentation and windows only with an encoder)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "workers", "seed")}
        if not online:
            d = {k: d[k] for k in ("schedule", "batch")}
        return d


class BNLinearHead(nn.Module):
    """``BatchNorm2d`` + 1x1 convolution: ``(B, gh, gw, C)`` features -> ``(B, K, gh, gw)`` logits."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(maps.permute(0, 3, 1, 2).float()))


def _loss(head: nn.Module, maps: torch.Tensor, labels: torch.Tensor, _i: int) -> torch.Tensor:
    logits = F.interpolate(head(maps), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=255)


def _seeded_head(channels: int, num_classes: int, seed: int, device: str) -> BNLinearHead:
    torch.manual_seed(seed)
    return BNLinearHead(channels, num_classes).to(device)


@torch.no_grad()
def _encode_crops(encoder: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Features of ``(B, 3, h, w)`` crops in ``[0, 1]``, centre-padded to the patch grid first."""
    return encoder.encode(center_pad(pixels, encoder.patch_size, encoder.stride, encoder.mean))[0].float()


@torch.no_grad()
def _slide_logits(encoder: Encoder, head: nn.Module, img: torch.Tensor, config: SegProbeConfig) -> torch.Tensor:
    """mmseg's slide inference on ``(3, H, W)`` pixels: averaged logits ``(K, H, W)``."""
    _, h, w = img.shape
    c, s = config.crop, config.slide_stride
    windows = []
    for hi in range(max(h - c + s - 1, 0) // s + 1):
        for wi in range(max(w - c + s - 1, 0) // s + 1):
            y2, x2 = min(hi * s + c, h), min(wi * s + c, w)
            windows.append((max(y2 - c, 0), y2, max(x2 - c, 0), x2))
    crops = torch.stack([img[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    logits = head(_encode_crops(encoder, crops.to(encoder.device)))
    logits = F.interpolate(logits, size=tuple(crops.shape[-2:]), mode="bilinear", align_corners=False).cpu()
    total = torch.zeros(logits.shape[1], h, w)
    count = torch.zeros(1, h, w)
    for (y1, y2, x1, x2), lg in zip(windows, logits):
        total[:, y1:y2, x1:x2] += lg
        count[:, y1:y2, x1:x2] += 1
    return total / count


@dataclass(frozen=True)
class _SegSample:
    """Sample maker for the loader (a plain class, so worker processes can unpickle it)."""

    pairs: list
    dataset: SegmentationSet
    config: SegProbeConfig

    def __call__(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.pairs[i]
        c = self.config
        img, lab, _ = seg_train_sample(read_rgb(image), read_label(label, self.dataset), rng, crop=c.crop,
                                       scale=c.scale, ratio_range=c.ratio_range, cat_max_ratio=c.cat_max_ratio,
                                       flip_prob=c.flip_prob, photometric=c.photometric)
        return img.permute(2, 0, 1), lab


def probe_segmentation_online(encoder: Encoder, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]],
                              dataset: SegmentationSet = VOC2012, config: SegProbeConfig | None = None) -> dict:
    """The reference protocol: train on augmented crops through ``encoder``, evaluate by sliding windows."""
    config = config or SegProbeConfig()
    t0 = time.perf_counter()

    samples = SampleSet(len(train), _SegSample(list(train), dataset, config), config.seed)
    loader = batches(samples, config.schedule.iters, config.batch, config.workers)
    dim = int(_encode_crops(encoder, torch.zeros(1, 3, config.crop, config.crop)).shape[-1])
    head = _seeded_head(dim, dataset.num_classes, config.seed, config.device)

    def batch_fn(_i: int):
        pixels, labels = next(loader)
        return _encode_crops(encoder, pixels.to(encoder.device).float() / 255), labels.to(config.device)

    train_head(head, batch_fn, _loss, config.schedule, log_every=max(config.schedule.iters // 20, 0))
    meter = ConfusionMeter(dataset.num_classes)
    for image, label in val:
        truth = torch.from_numpy(read_label(label, dataset))
        img = torch.from_numpy(read_rgb(image))
        h, w = truth.shape
        small, _ = resize_pair(img, truth, rescale_size(h, w, config.scale))
        logits = _slide_logits(encoder, head, small.permute(2, 0, 1).float() / 255, config)
        pred = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
        meter.update(pred, truth)
    return {**meter.result(), "train_images": len(train), "val_images": len(val),
            "seconds": round(time.perf_counter() - t0, 1)}


def probe_segmentation_frozen(train_maps: torch.Tensor, train_labels: Sequence[np.ndarray], val_maps: torch.Tensor,
                              val_labels: Sequence[np.ndarray], dataset: SegmentationSet = VOC2012,
                              config: SegProbeConfig | None = None, label_size: int | None = None) -> dict:
    """Train on precomputed square-resize features (a store's), score at each label's original size.

    Args:
        train_labels, val_labels: class-index maps at their original resolution.
        label_size: square size the training labels are resized to (default: 14 x the grid).
    """
    config = config or SegProbeConfig.quick()
    t0 = time.perf_counter()
    n, gh, gw, dim = train_maps.shape
    size = label_size or 14 * max(gh, gw)
    labels = torch.stack([resize_label(torch.from_numpy(lab), (size, size)) for lab in train_labels])
    head = _seeded_head(dim, dataset.num_classes, config.seed, config.device)
    order = sample_order(n, config.seed)

    def batch_fn(i: int):
        idx = torch.tensor([order(i * config.batch + j) for j in range(config.batch)])
        return train_maps[idx].to(config.device), labels[idx].to(config.device)

    train_head(head, batch_fn, _loss, config.schedule)
    meter = ConfusionMeter(dataset.num_classes)
    with torch.no_grad():
        for fmap, lab in zip(val_maps, val_labels):
            logits = head(fmap[None].to(config.device))
            pred = F.interpolate(logits, size=lab.shape, mode="bilinear", align_corners=False)[0].argmax(0)
            meter.update(pred.cpu(), torch.from_numpy(lab))
    return {**meter.result(), "train_images": n, "val_images": len(val_maps),
            "seconds": round(time.perf_counter() - t0, 1)}
