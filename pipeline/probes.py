"""Downstream linear probes on frozen patch features: semantic segmentation (mIoU) and depth (RMSE).

Datasets (local paths or any fsspec URL; see ``docs/evaluation.md``):

* **Pascal VOC layout** (:func:`voc_pairs`): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
  PNG whose pixel values are class indices, 255 = ignore) and ``ImageSets/Segmentation/<split>.txt``.
* **NYU-style depth pairs** (:func:`depth_pairs`): either a folder ``<root>/<split>/`` of ``<name>_rgb.png|jpg``
  with ``<name>_depth.png`` (16-bit, millimetres, 0 = no measurement), or a list file ``<root>/<split>.txt``
  with one ``rgb_path depth_path`` pair per line (relative to ``<root>``).

Images are resized to a square ``input_size`` as every stage does; labels and depths are resized to a square
``label_size`` with nearest neighbours, and metrics are computed at that resolution.

A probe is one linear map per patch (a 1x1 convolution on standardised features), trained with Adam on
frozen features; its patch-level outputs are upsampled bilinearly to the label resolution before the loss,
as in the DINOv2 / DVT linear-probe protocol. Features come from any :data:`FeatureFn` (a backbone, or a
backbone followed by a stage-2 denoiser) or from a feature store, matched by image URI
(:func:`store_features`).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .decode import decode_image, resize_to_tensor
from .metrics import FeatureFn
from .storage import filesystem, is_local, local_path

__all__ = ["ProbeConfig", "LinearProbe", "voc_pairs", "depth_pairs", "load_images", "load_segmentation",
           "load_depth", "compute_features", "store_features", "segmentation_probe", "depth_probe",
           "confusion_iou", "VOC_CLASSES"]

_log = logging.getLogger(__name__)

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


@dataclass(frozen=True)
class ProbeConfig:
    """Training of a linear probe.

    Attributes:
        steps: Adam steps.
        lr, weight_decay: Adam settings (decoupled weight decay, AdamW).
        batch_images: images per step.
        seed: initialisation and batch order.
    """

    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_images: int = 16
    seed: int = 0


# ------------------------------------------------------------------------------------------------ datasets

def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def _with_protocol(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _read(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def voc_pairs(root: str, split: str = "train") -> list[tuple[str, str]]:
    """``(image, label)`` paths of a Pascal VOC split (``ImageSets/Segmentation/<split>.txt``)."""
    listing = _join(root, "ImageSets", "Segmentation", f"{split}.txt")
    try:
        ids = [line.split()[0] for line in _read(listing).decode().splitlines() if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"{listing} not found: pass the VOC root (the folder holding JPEGImages/, "
                                "SegmentationClass/ and ImageSets/).") from None
    return [(_join(root, "JPEGImages", f"{i}.jpg"), _join(root, "SegmentationClass", f"{i}.png")) for i in ids]


def depth_pairs(root: str, split: str = "train") -> list[tuple[str, str]]:
    """``(rgb, depth)`` paths of an NYU-style split: ``<root>/<split>.txt`` if present, else ``<root>/<split>/``."""
    listing = _join(root, f"{split}.txt")
    fs, path = filesystem(listing)
    if fs.exists(path):
        pairs = []
        for line in fs.cat_file(path).decode().splitlines():
            if line.strip() and not line.startswith("#"):
                rgb, depth = line.split()[:2]
                pairs.append((_join(root, rgb), _join(root, depth)))
        return pairs
    folder = _join(root, split)
    fs, path = filesystem(folder)
    found = sorted(fs.glob(posixpath.join(path, "*_depth.png")))
    if not found:
        raise FileNotFoundError(f"No {split}.txt and no *_depth.png files in {folder}: see docs/evaluation.md "
                                "for the depth dataset layout.")
    pairs = []
    for depth in found:
        stem = depth[: -len("_depth.png")]
        rgb = next((stem + f"_rgb{ext}" for ext in (".png", ".jpg", ".jpeg") if fs.exists(stem + f"_rgb{ext}")), None)
        if rgb is None:
            raise FileNotFoundError(f"{depth} has no matching {stem}_rgb.png or .jpg.")
        pairs.append((_with_protocol(fs, rgb), _with_protocol(fs, depth)))
    return pairs


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Decode and resize images to ``(N, 3, size, size)`` in ``[0, 1]``."""
    return torch.stack([resize_to_tensor(decode_image(_read(p)).pixels, size) for p in paths])


def _resize_nearest(a: np.ndarray, size: int) -> np.ndarray:
    mode = "F" if a.dtype.kind == "f" else "I"
    img = Image.fromarray(a.astype(np.float32 if mode == "F" else np.int32), mode)
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST))


def load_segmentation(paths: Sequence[str], size: int) -> torch.Tensor:
    """Class-index maps ``(N, size, size)`` uint8 from palette (or grey) PNGs; 255 stays the ignore label."""
    out = []
    for p in paths:
        img = Image.open(io.BytesIO(_read(p)))
        if img.mode not in ("P", "L"):
            raise ValueError(f"{p}: segmentation labels must be palette or greyscale PNGs of class indices, "
                             f"got mode {img.mode}.")
        out.append(_resize_nearest(np.asarray(img), size).astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def load_depth(paths: Sequence[str], size: int, scale: float = 1000.0) -> torch.Tensor:
    """Depth maps ``(N, size, size)`` float32 in metres (PNG value / ``scale``); 0 marks no measurement."""
    out = []
    for p in paths:
        a = np.asarray(Image.open(io.BytesIO(_read(p))))
        if a.ndim != 2:
            raise ValueError(f"{p}: depth must be a single-channel (16-bit) PNG, got shape {a.shape}.")
        out.append(_resize_nearest(a.astype(np.float32) / scale, size))
    return torch.from_numpy(np.stack(out))


# ------------------------------------------------------------------------------------------------ features

@torch.no_grad()
def compute_features(features_fn: FeatureFn, images: torch.Tensor, batch: int = 8,
                     dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``features_fn`` over ``images`` ``(N, 3, S, S)`` in batches: ``(N, gh, gw, C)`` kept as ``dtype``."""
    return torch.cat([features_fn(images[i:i + batch]).to("cpu", dtype) for i in range(0, len(images), batch)])


def _uri_key(uri: str) -> str:
    return local_path(uri) if is_local(uri) else uri.rstrip("/")


def store_features(store, image_paths: Sequence[str], array: str = "clean") -> torch.Tensor:
    """Rows of ``store`` (a :class:`pipeline.store.FeatureStore`) for ``image_paths``, matched by URI.

    A path matches a row whose URI is the same file; failing that, a row whose file name is the same (so a
    store made from a copy of the dataset elsewhere still matches when the names are unique).
    """
    listing = store.listing()
    uris = [str(u) for u in listing["uri"].to_pylist()]
    ids = listing["image_id"].to_numpy()
    by_uri = {_uri_key(u): int(i) for u, i in zip(uris, ids)}
    names: dict[str, list[int]] = {}
    for u, i in zip(uris, ids):
        names.setdefault(posixpath.basename(u), []).append(int(i))
    rows, missing = [], []
    for p in image_paths:
        row = by_uri.get(_uri_key(p))
        if row is None and len(names.get(posixpath.basename(p), [])) == 1:
            row = names[posixpath.basename(p)][0]
        if row is None:
            missing.append(p)
        rows.append(row)
    if missing:
        raise KeyError(f"{len(missing)} images are not in {store.url} (first: {missing[0]}); make the store from "
                       "the dataset's images, e.g. dvt denoise --images <root>/JPEGImages.")
    return store.read(array, rows, torch=True)


# ------------------------------------------------------------------------------------------------ probes

class LinearProbe(nn.Module):
    """Per-patch linear map on standardised features: ``(B, gh, gw, C) -> (B, K, gh, gw)``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, outputs: int):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp_min(1e-6))
        self.head = nn.Linear(mean.numel(), outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features.float() - self.mean) / self.std).permute(0, 3, 1, 2)


def _train(features: torch.Tensor, targets: torch.Tensor, outputs: int,
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config: ProbeConfig) -> LinearProbe:
    g = torch.Generator().manual_seed(config.seed)
    flat = features.reshape(-1, features.shape[-1]).float()
    torch.manual_seed(config.seed)
    probe = LinearProbe(flat.mean(0), flat.std(0), outputs)
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = features.shape[0]
    order = torch.randperm(n, generator=g)
    for step in range(config.steps):
        start = (step * config.batch_images) % n
        idx = order[start:start + config.batch_images]
        if start + config.batch_images >= n:
            order = torch.randperm(n, generator=g)
        out = F.interpolate(probe(features[idx]), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss_fn(out, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _log.info("probe trained: %d steps, final loss %.4f", config.steps, float(loss.detach()))
    return probe.eval()


@torch.no_grad()
def _predict(probe: LinearProbe, features: torch.Tensor, size: tuple[int, int], batch: int = 16) -> torch.Tensor:
    return torch.cat([F.interpolate(probe(features[i:i + batch]), size=size, mode="bilinear", align_corners=False)
                      for i in range(0, len(features), batch)])


def confusion_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU from a ``(K, K)`` confusion matrix (rows: truth); NaN where a class has no union."""
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def segmentation_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                       val_labels: torch.Tensor, num_classes: int = 21, *, ignore_index: int = 255,
                       config: ProbeConfig | None = None) -> dict:
    """Train a linear segmentation probe and score it on the validation set.

    Returns ``miou`` (mean IoU over classes with a non-empty union in the validation set, VOC / mmseg
    convention), ``pixel_accuracy`` and ``per_class_iou`` (NaN for absent classes).
    """
    config = config or ProbeConfig()
    labels = train_labels.long()
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))]
    if len(bad):
        raise ValueError(f"label value {int(bad[0])} is outside 0..{num_classes - 1} (and not {ignore_index}).")
    probe = _train(train_features, labels, num_classes,
                   lambda out, t: F.cross_entropy(out, t, ignore_index=ignore_index), config)
    pred = _predict(probe, val_features, tuple(val_labels.shape[-2:])).argmax(1)
    truth = val_labels.long()
    keep = (truth != ignore_index) & (truth < num_classes)
    confusion = torch.bincount(truth[keep] * num_classes + pred[keep], minlength=num_classes ** 2)
    iou = confusion_iou(confusion.reshape(num_classes, num_classes))
    return {"miou": float(iou.nanmean()), "pixel_accuracy": float((pred[keep] == truth[keep]).double().mean()),
            "per_class_iou": [None if torch.isnan(v) else float(v) for v in iou]}


def depth_probe(train_features: torch.Tensor, train_depth: torch.Tensor, val_features: torch.Tensor,
                val_depth: torch.Tensor, *, config: ProbeConfig | None = None) -> dict:
    """Train a linear probe of log-depth and score it on the validation set (pixels with depth > 0).

    Returns ``rmse`` (in the depth's units, metres for NYU), ``abs_rel`` (mean ``|d* - d| / d``) and
    ``delta1`` (share of pixels with ``max(d*/d, d/d*) < 1.25``).
    """
    config = config or ProbeConfig()

    def loss_fn(out: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        valid = depth > 0
        return ((out[:, 0] - depth.clamp_min(1e-6).log()) ** 2)[valid].mean()

    if not (train_depth > 0).any() or not (val_depth > 0).any():
        raise ValueError("depth_probe: no valid (positive) depth values.")
    probe = _train(train_features, train_depth.float(), 1, loss_fn, config)
    pred = _predict(probe, val_features, tuple(val_depth.shape[-2:]))[:, 0].exp()
    valid = val_depth > 0
    d, p = val_depth[valid].double(), pred[valid].double()
    ratio = torch.maximum(p / d, d / p)
    return {"rmse": float(((p - d) ** 2).mean().sqrt()), "abs_rel": float(((p - d).abs() / d).mean()),
            "delta1": float((ratio < 1.25).double().mean())}
