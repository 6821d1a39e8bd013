"""Linear depth probe on NYUv2 as the DVT reference runs it (``vitb_nyu_linear_config.py``).

Head (the depth toolbox's ``BNHead`` with ``classify=True``): the last block's patch features concatenated
with the class token (broadcast to every patch), upsampled x4 bilinearly, a 1x1 convolution to 256 bins
spread uniformly over [0.001, 10] m; bin weights ``relu(logit) + 0.1`` normalised to sum 1; depth = the
weighted sum of the bin centres. Loss: the scale-invariant log loss ``sqrt(var(g) + 0.15 mean(g)^2)``,
``g = log(d* + 1e-3) - log(d + 1e-3)`` over pixels with depth > 0 (its first 100 iterations use only the
mean term). The reference also lists a gradient loss (weight 0.5), but as written it indexes the batch and
channel axes of its 4-D input, so with the reference's 2 images per GPU it is exactly zero; it is left out.

* **reference** (needs an encoder): AdamW lr 5e-3, wd 0.01, 38.4k iterations of 16 crops, gradient norm
  clipped at 35, linear warm-up over 12.8k iterations then cosine decay (to 1e-8 x), AdamW ``beta1`` on a
  one-cycle schedule 0.95 -> 0.85 -> 0.95; crops per :mod:`.augment`. Evaluation on the whole 480 x 640
  image and its mirror (averaged), prediction clamped to [0.001, 10] m.
* **frozen** (stores, ``--quick``): precomputed square-resize features; stores hold no class token, so the
  mean patch feature stands in for it (recorded in the result); no mirror at evaluation.

Scores per image over ground truth in (0.001, 10) m inside the Eigen crop (rows 45-470, columns 41-600),
then averaged over images: RMSE, AbsRel, delta1 (< 1.25) and the others the toolbox reports.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import depth_train_sample, resize_label
from .datasets import read_depth, read_rgb
from .probe_data import SampleSet, batches, center_pad, sample_order
from .sources import Encoder
from .probe_training import Schedule, train_head

__all__ = ["DepthProbeConfig", "BinsDepthHead", "depth_metrics", "probe_depth_online", "probe_depth_frozen"]

_log = logging.getLogger(__name__)

EIGEN_CROP = (45, 471, 41, 601)


def _reference_schedule() -> Schedule:
    return Schedule(iters=38_400, lr=5e-3, weight_decay=0.01, policy="cosine", min_lr_ratio=1e-8,
                    warmup_iters=12_800, warmup_ratio=1e-3, one_cycle_momentum=(0.85, 0.95), pct_start=0.3,
                    grad_clip=35.0)


@dataclass(frozen=True)
class DepthProbeConfig:
    """Protocol of the depth probe (defaults: the reference config).

    Attributes:
        schedule: optimisation; batch: crops per iteration; crop: training crop ``(h, w)``.
        bins, min_depth, max_depth, upsample: the head.
        sigloss_warmup: iterations that use only the mean term of the loss.
        depth_scale: PNG units per metre.
        eigen_crop: score inside the Eigen crop only (NYU's 480 x 640 frames).
        flip_test: average the prediction of the mirrored image (reference form only).
        workers, device, seed: as for the segmentation probe.
    """

    schedule: Schedule = field(default_factory=_reference_schedule)
    batch: int = 16
    crop: tuple[int, int] = (416, 544)
    bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    upsample: int = 4
    sigloss_warmup: int = 100
    depth_scale: float = 1000.0
    eigen_crop: bool = True
    flip_test: bool = True
    workers: int = 0
    device: str = "cpu"
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> DepthProbeConfig:
        """The short form: 300 iterations at lr 5e-3 without warm-up (not the paper's numbers)."""
        schedule = Schedule(iters=300, lr=5e-3, weight_decay=0.01, policy="cosine", min_lr_ratio=1e-8,
                            warmup_iters=0, grad_clip=35.0)
        return cls(**{"schedule": schedule, **overrides})

    def describe(self, online: bool = True) -> dict:
        """The settings that apply to the form run (augmentation and mirroring only with an encoder)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "workers", "seed")}
        if not online:
            d = {k: v for k, v in d.items() if k not in ("crop", "flip_test")}
        return d


class BinsDepthHead(nn.Module):
    """Patch features + class token -> x4 bilinear -> 1x1 conv to bins -> expected depth ``(B, 1, H, W)``."""

    def __init__(self, channels: int, bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0,
                 upsample: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, bins, 1)
        self.upsample = upsample
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins), persistent=False)

    def forward(self, maps: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        x = maps.permute(0, 3, 1, 2).float()
        x = torch.cat([x, cls.float()[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1)
        x = F.interpolate(x, size=(x.shape[-2] * self.upsample, x.shape[-1] * self.upsample), mode="bilinear",
                          align_corners=False)
        weights = torch.relu(self.conv(x)) + 0.1
        weights = weights / weights.sum(1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", weights, self.centres)[:, None]


def _sigloss(pred: torch.Tensor, gt: torch.Tensor, warm: bool) -> torch.Tensor:
    valid = gt > 0
    g = torch.log(pred[valid] + 1e-3) - torch.log(gt[valid] + 1e-3)
    if warm:
        return torch.sqrt(0.15 * g.mean() ** 2)
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


def depth_metrics(gt: np.ndarray, pred: np.ndarray, min_depth: float = 1e-3, max_depth: float = 10.0,
                  eigen_crop: bool = True) -> dict[str, float]:
    """The toolbox's metrics of one image (ground truth in ``(min_depth, max_depth)``, inside the Eigen crop)."""
    mask = (gt > min_depth) & (gt < max_depth)
    if eigen_crop:
        crop = np.zeros_like(mask)
        r0, r1, c0, c1 = EIGEN_CROP
        crop[r0:r1, c0:c1] = True
        mask &= crop
    g, p = gt[mask].astype(np.float64), pred[mask].astype(np.float64)
    if not len(g):
        return {k: math.nan for k in ("a1", "a2", "a3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log_10", "silog")}
    ratio = np.maximum(g / p, p / g)
    err = np.log(p) - np.log(g)
    return {"a1": float((ratio < 1.25).mean()), "a2": float((ratio < 1.25 ** 2).mean()),
            "a3": float((ratio < 1.25 ** 3).mean()), "abs_rel": float(np.mean(np.abs(g - p) / g)),
            "sq_rel": float(np.mean((g - p) ** 2 / g)), "rmse": float(np.sqrt(np.mean((g - p) ** 2))),
            "rmse_log": float(np.sqrt(np.mean(err ** 2))), "log_10": float(np.mean(np.abs(np.log10(g) - np.log10(p)))),
            "silog": float(np.sqrt(max(np.mean(err ** 2) - np.mean(err) ** 2, 0.0)) * 100)}


def _mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _loss_fn(config: DepthProbeConfig):
    def loss(head: nn.Module, maps: torch.Tensor, cls: torch.Tensor, depth: torch.Tensor, i: int) -> torch.Tensor:
        pred = F.interpolate(head(maps, cls), size=tuple(depth.shape[-2:]), mode="bilinear", align_corners=False)
        return _sigloss(pred[:, 0], depth, warm=i < config.sigloss_warmup)

    return loss


def _seeded_head(channels: int, config: DepthProbeConfig) -> BinsDepthHead:
    torch.manual_seed(config.seed)
    return BinsDepthHead(channels, config.bins, config.min_depth, config.max_depth, config.upsample).to(config.device)


@torch.no_grad()
def _encode(encoder: Encoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    maps, cls = encoder.encode(center_pad(pixels.to(encoder.device), encoder.patch_size, encoder.stride,
                                          encoder.mean), with_cls=True)
    maps = maps.float()
    return maps, (cls.float() if cls is not None else maps.mean((1, 2)))


@dataclass(frozen=True)
class _DepthSample:
    """Sample maker for the loader (a plain class, so worker processes can unpickle it)."""

    pairs: list
    config: DepthProbeConfig

    def __call__(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, depth = self.pairs[i]
        img, dep = depth_train_sample(read_rgb(rgb), read_depth(depth, self.config.depth_scale), rng,
                                      crop=self.config.crop)
        return img.permute(2, 0, 1), dep


def probe_depth_online(encoder: Encoder, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]],
                       config: DepthProbeConfig | None = None) -> dict:
    """The reference protocol: augmented crops through ``encoder``; whole images (and mirrors) to score."""
    config = config or DepthProbeConfig()
    t0 = time.perf_counter()

    samples = SampleSet(len(train), _DepthSample(list(train), config), config.seed)
    loader = batches(samples, config.schedule.iters, config.batch, config.workers)
    dim = int(_encode(encoder, torch.zeros(1, 3, *config.crop))[0].shape[-1])
    head = _seeded_head(dim, config)

    def batch_fn(_i: int):
        pixels, depth = next(loader)
        maps, cls = _encode(encoder, pixels.float() / 255)
        return maps.to(config.device), cls.to(config.device), depth.to(config.device)

    train_head(head, batch_fn, _loss_fn(config), config.schedule, log_every=max(config.schedule.iters // 20, 0))
    rows = []
    with torch.no_grad():
        for rgb, depth in val:
            gt = read_depth(depth, config.depth_scale)
            img = torch.from_numpy(read_rgb(rgb)).permute(2, 0, 1).float()[None] / 255
            views = [img, img.flip(-1)] if config.flip_test else [img]
            preds = []
            for k, view in enumerate(views):
                maps, cls = (t.to(config.device) for t in _encode(encoder, view))
                pred = head(maps, cls).clamp(config.min_depth, config.max_depth)
                pred = F.interpolate(pred, size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu()
                preds.append(pred.flip(-1) if k else pred)
            rows.append(depth_metrics(gt, torch.stack(preds).mean(0).numpy(), config.min_depth, config.max_depth,
                                      config.eigen_crop))
    return {**_mean_metrics(rows), "class_token": "model" if encoder.has_cls else "mean of patch features",
            "train_images": len(train), "val_images": len(val), "seconds": round(time.perf_counter() - t0, 1)}


def probe_depth_frozen(train_maps: torch.Tensor, train_depth: Sequence[np.ndarray], val_maps: torch.Tensor,
                       val_depth: Sequence[np.ndarray], config: DepthProbeConfig | None = None,
                       label_size: int | None = None) -> dict:
    """Train on precomputed square-resize features; score at each depth map's original size."""
    config = config or DepthProbeConfig.quick()
    t0 = time.perf_counter()
    n, gh, gw, dim = train_maps.shape
    size = label_size or 14 * max(gh, gw)
    depth = torch.stack([resize_label(torch.from_numpy(d), (size, size)) for d in train_depth])
    head = _seeded_head(dim, config)
    order = sample_order(n, config.seed)

    def batch_fn(i: int):
        idx = torch.tensor([order(i * config.batch + j) for j in range(config.batch)])
        maps = train_maps[idx].float().to(config.device)
        return maps, maps.mean((1, 2)), depth[idx].to(config.device)

    train_head(head, batch_fn, _loss_fn(config), config.schedule)
    rows = []
    with torch.no_grad():
        for fmap, gt in zip(val_maps, val_depth):
            maps = fmap[None].float().to(config.device)
            pred = head(maps, maps.mean((1, 2))).clamp(config.min_depth, config.max_depth)
            pred = F.interpolate(pred, size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            rows.append(depth_metrics(gt, pred, config.min_depth, config.max_depth, config.eigen_crop))
    return {**_mean_metrics(rows), "class_token": "mean of patch features", "train_images": n,
            "val_images": len(val_maps), "seconds": round(time.perf_counter() - t0, 1)}
