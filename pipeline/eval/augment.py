"""Training augmentations of the reference probe configs (mmseg 0.27 / the depth toolbox), on uint8 RGB.

Segmentation (``vitb_voc2012_linear_config.py``, ``vitb_ade20k_linear_config.py``)::

    Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio) -> RandomCrop(512, cat_max_ratio=0.75)
    -> RandomFlip(0.5) -> PhotoMetricDistortion -> Pad(512, label 255)

Depth (``vitb_nyu_linear_config.py``)::

    NYUCrop([45:472, 43:608]) -> RandomRotate(0.5, 2.5 deg) -> RandomFlip(0.5) -> RandomCrop(416, 544)
    -> ColorAug(0.5, gamma [0.9, 1.1], brightness [0.75, 1.25], colour [0.9, 1.1])

Each draw comes from the ``numpy.random.Generator`` passed in, so a sample depends only on its seed.
Colour conversions follow OpenCV's 8-bit HSV (hue in [0, 180)); rounding may differ from OpenCV's by one
grey level.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["rescale_size", "resize_pair", "resize_label", "seg_train_sample", "photometric_distortion",
           "depth_train_sample", "NYU_CROP"]

NYU_CROP = (45, 472, 43, 608)  # rows, columns kept by NYUCrop


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size whose long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> bilinear resize (float, not rounded)."""
    x = img.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def resize_pair(img: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image bilinear (rounded back to uint8), label nearest."""
    return _resize_image(img, size).round().clamp(0, 255).to(torch.uint8), resize_label(label, size)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label or depth map ``(H, W)`` resized with nearest neighbours (no new values)."""
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)


def _crop_box(h: int, w: int, ch: int, cw: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    y = int(rng.integers(0, max(h - ch, 0) + 1))
    x = int(rng.integers(0, max(w - cw, 0) + 1))
    return y, min(y + ch, h), x, min(x + cw, w)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """uint8 RGB -> uint8 HSV with H in [0, 180), as OpenCV's 8-bit conversion."""
    rgb = img.float()
    r, g, b = rgb.unbind(-1)
    v, _ = rgb.max(-1)
    mn, _ = rgb.min(-1)
    d = v - mn
    s = torch.where(v > 0, 255 * d / v.clamp_min(1e-6), torch.zeros_like(v))
    dd = d.clamp_min(1e-6)
    h = torch.where(v == r, 60 * (g - b) / dd, torch.where(v == g, 120 + 60 * (b - r) / dd, 240 + 60 * (r - g) / dd))
    h = torch.where(d > 0, h % 360, torch.zeros_like(h))
    return torch.stack([(h / 2).round() % 180, s.round(), v], -1).clamp(0, 255).to(torch.uint8)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = (hsv.float()[..., 0] * 2) / 60, hsv.float()[..., 1] / 255, hsv.float()[..., 2]
    k = lambda n: (n + h) % 6  # noqa: E731 - the standard HSV -> RGB closed form
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], -1).round().clamp(0, 255).to(torch.uint8)


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion: brightness +-32, contrast x[0.5, 1.5] (before or after the colour
    steps), saturation x[0.5, 1.5], hue +-18 (of 180); each step with probability 1/2, uint8 after each."""
    if rng.integers(2):
        img = _convert(img, beta=float(rng.uniform(-32, 32)))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=float(rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=float(rng.uniform(0.5, 1.5)))
        img = _hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 0] = ((hsv[..., 0].long() + int(rng.integers(-18, 19))) % 180).to(torch.uint8)
        img = _hsv_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=float(rng.uniform(0.5, 1.5)))
    return img


def seg_train_sample(img: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, crop: int = 512,
                     scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0),
                     cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                     ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One augmented training crop: pixels ``(crop, crop, 3)`` uint8, label ``(crop, crop)`` and the mask of
    real (not padded) pixels."""
    im, lab = torch.from_numpy(np.array(img)), torch.from_numpy(np.array(label))
    ratio = float(rng.uniform(*ratio_range))
    size = rescale_size(*lab.shape, (int(scale[0] * ratio), int(scale[1] * ratio)))
    im, lab = resize_pair(im, lab, size)
    h, w = lab.shape
    box = _crop_box(h, w, crop, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = torch.unique(lab[box[0]:box[1], box[2]:box[3]], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
                break
            box = _crop_box(h, w, crop, crop, rng)
    im, lab = im[box[0]:box[1], box[2]:box[3]], lab[box[0]:box[1], box[2]:box[3]]
    if rng.random() < flip_prob:
        im, lab = im.flip(1), lab.flip(1)
    if photometric:
        im = photometric_distortion(im, rng)
    out = torch.zeros(crop, crop, 3, dtype=torch.uint8)
    out_lab = torch.full((crop, crop), ignore_index, dtype=lab.dtype)
    valid = torch.zeros(crop, crop, dtype=torch.bool)
    out[: im.shape[0], : im.shape[1]] = im
    out_lab[: lab.shape[0], : lab.shape[1]] = lab
    valid[: im.shape[0], : im.shape[1]] = True
    return out, out_lab, valid


def _rotate(x: torch.Tensor, degrees: float, mode: str) -> torch.Tensor:
    """Rotate ``(C, H, W)`` about its centre, zeros outside (OpenCV's imrotate without auto-bound)."""
    t = math.radians(degrees)
    h, w = x.shape[-2:]
    theta = torch.tensor([[math.cos(t), -math.sin(t) * h / w, 0.0], [math.sin(t) * w / h, math.cos(t), 0.0]])
    grid = F.affine_grid(theta[None], [1, x.shape[0], h, w], align_corners=False)
    return F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def depth_train_sample(img: np.ndarray, depth: np.ndarray, rng: np.random.Generator, *,
                       crop: tuple[int, int] = (416, 544), nyu_crop: tuple[int, int, int, int] | None = NYU_CROP,
                       rotate_prob: float = 0.5, degrees: float = 2.5, flip_prob: float = 0.5, color_prob: float = 0.5,
                       gamma: tuple[float, float] = (0.9, 1.1), brightness: tuple[float, float] = (0.75, 1.25),
                       color: tuple[float, float] = (0.9, 1.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented depth training crop: pixels ``(h, w, 3)`` float in ``[0, 255]`` and depth ``(h, w)``."""
    im = torch.from_numpy(np.array(img)).float()
    dep = torch.from_numpy(np.array(depth)).float()
    if nyu_crop is not None:
        r0, r1, c0, c1 = nyu_crop
        im, dep = im[r0:r1, c0:c1], dep[r0:r1, c0:c1]
    rot = rng.random() < rotate_prob
    angle = float(rng.uniform(-degrees, degrees))
    if rot:
        im = _rotate(im.permute(2, 0, 1), angle, "bilinear").permute(1, 2, 0)
        dep = _rotate(dep[None], angle, "nearest")[0]
    if rng.random() < flip_prob:
        im, dep = im.flip(1), dep.flip(1)
    y0, y1, x0, x1 = _crop_box(dep.shape[0], dep.shape[1], crop[0], crop[1], rng)
    im, dep = im[y0:y1, x0:x1], dep[y0:y1, x0:x1]
    if rng.random() < color_prob:
        # the reference raises 0-255 values to the gamma (not 0-1 values), then clips: kept as it is
        im = im ** float(rng.uniform(*gamma)) * float(rng.uniform(*brightness))
        im = (im * torch.from_numpy(rng.uniform(*color, size=3)).float()).clamp(0, 255)
    return im, dep
