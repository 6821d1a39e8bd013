"""KNN segmentation: label each evaluation patch by its nearest training patches (no training at all).

The cheapest check that features carry semantics, used by the DVT paper's stage-1 ablation (VOC). Every
training patch gets the majority label of the pixels it covers; each evaluation patch takes the ``k``
most cosine-similar training patches and sums their votes weighted by ``exp(similarity / T)`` (DINO's k-NN
weighting); the per-patch class scores are upsampled bilinearly to each label's own resolution and the
argmax is scored with mIoU. The reference code does not publish its KNN settings; ours are ``k = 20``,
``T = 0.07`` (DINO's k-NN classifier defaults), recorded in every result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .seg_metrics import ConfusionMeter

__all__ = ["KNNConfig", "patch_labels", "knn_segmentation"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KNNConfig:
    """Settings of :func:`knn_segmentation`.

    Attributes:
        k: neighbours per evaluation patch.
        temperature: vote weight ``exp(cosine / temperature)``.
        max_elements: bound on one similarity block (queries x training patches).
        device: where the similarities are computed.
    """

    k: int = 20
    temperature: float = 0.07
    max_elements: int = 1 << 26
    device: str = "cpu"


def patch_labels(labels: Sequence[np.ndarray], grid: tuple[int, int], num_classes: int,
                 ignore_index: int = 255) -> torch.Tensor:
    """Majority label of the pixels under each grid cell: ``(N, gh, gw)`` long, ``-1`` where all are ignored.

    The grid spans the whole image (the stores' square resize), so cell ``(i, j)`` covers rows
    ``[i H / gh, (i + 1) H / gh)`` and the matching columns."""
    gh, gw = grid
    out = torch.full((len(labels), gh, gw), -1, dtype=torch.long)
    for n, lab in enumerate(labels):
        lab = torch.as_tensor(np.asarray(lab)).long()
        h, w = lab.shape
        cell = (torch.arange(h)[:, None] * gh // h) * gw + torch.arange(w)[None, :] * gw // w
        keep = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
        hist = torch.bincount(cell[keep] * num_classes + lab[keep], minlength=gh * gw * num_classes)
        hist = hist.reshape(gh * gw, num_classes)
        out[n] = torch.where(hist.sum(1) > 0, hist.argmax(1), -1).reshape(gh, gw)
    return out


@torch.no_grad()
def knn_segmentation(train_maps: torch.Tensor, train_labels: Sequence[np.ndarray], val_maps: torch.Tensor,
                     val_labels: Sequence[np.ndarray], num_classes: int, config: KNNConfig | None = None,
                     ignore_index: int = 255) -> dict:
    """mIoU of nearest-neighbour label transfer from ``train_maps`` ``(N, gh, gw, C)`` to ``val_maps``.

    Labels are class-index maps at their original resolution (255 = ignore); returns ``miou``, ``aacc``,
    ``macc``, ``per_class_iou`` and the settings used."""
    config = config or KNNConfig()
    dev = torch.device(config.device)
    _, gh, gw, c = train_maps.shape
    if val_maps.shape[1:] != train_maps.shape[1:]:
        raise ValueError(f"knn_segmentation: training maps {tuple(train_maps.shape[1:])} and evaluation maps "
                         f"{tuple(val_maps.shape[1:])} differ; use sources of one backbone and input size.")
    tl = patch_labels(train_labels, (gh, gw), num_classes, ignore_index).reshape(-1)
    keep = tl >= 0
    if not keep.any():
        raise ValueError("knn_segmentation: no labelled training patch.")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    bank = F.normalize(train_maps.reshape(-1, c)[keep].float(), dim=1).to(dev, dtype)
    bank_labels = tl[keep].to(dev)
    k = min(config.k, len(bank))
    chunk = max(1, config.max_elements // len(bank))
    meter = ConfusionMeter(num_classes, ignore_index)
    for n in range(len(val_maps)):
        q = F.normalize(val_maps[n].reshape(-1, c).float(), dim=1).to(dev, dtype)
        scores = torch.zeros(len(q), num_classes, device=dev)
        for a in range(0, len(q), chunk):
            sim, idx = (q[a:a + chunk] @ bank.T).float().topk(k, dim=1)
            weights = torch.exp((sim - 1.0) / config.temperature)  # shifted by the largest cosine: no overflow
            scores[a:a + chunk].scatter_add_(1, bank_labels[idx], weights)
        truth = torch.as_tensor(np.asarray(val_labels[n]))
        logits = scores.T.reshape(1, num_classes, gh, gw)
        pred = F.interpolate(logits, size=tuple(truth.shape), mode="bilinear", align_corners=False)[0].argmax(0)
        meter.update(pred.cpu(), truth)
    result = meter.result()
    result.update(train_images=len(train_maps), val_images=len(val_maps), train_patches=int(keep.sum()),
                  settings=asdict(config))
    return result
