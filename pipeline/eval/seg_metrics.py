"""Semantic-segmentation scores as mmseg computes them: one confusion matrix over the whole evaluation set.

``IoU_k = |pred = k and truth = k| / |pred = k or truth = k|`` over every pixel of every image (pixels whose
truth is the ignore label do not count); ``mIoU`` is the mean over classes whose union is not empty,
``aAcc`` the share of labelled pixels predicted right, ``mAcc`` the mean per-class recall.
"""

from __future__ import annotations

import torch

__all__ = ["ConfusionMeter", "confusion_iou"]


def confusion_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU from a ``(K, K)`` confusion matrix (rows: truth); NaN where a class has no union."""
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


class ConfusionMeter:
    """Accumulates a ``(K, K)`` confusion matrix from ``(pred, truth)`` label maps of any size."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, truth: torch.Tensor) -> None:
        pred, truth = torch.as_tensor(pred).long().cpu(), torch.as_tensor(truth).long().cpu()
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(truth.shape)} differ in shape.")
        keep = (truth != self.ignore_index) & (truth >= 0) & (truth < self.num_classes)
        bad = truth[(truth != self.ignore_index) & ~keep]
        if len(bad):
            raise ValueError(f"label value {int(bad[0])} is outside 0..{self.num_classes - 1} "
                             f"(and not {self.ignore_index}): wrong --num-classes or dataset?")
        k = self.num_classes
        self.matrix += torch.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)

    def result(self) -> dict:
        iou = confusion_iou(self.matrix)
        total = int(self.matrix.sum())
        per_class_total = self.matrix.sum(1).double()
        acc = torch.where(per_class_total > 0, self.matrix.diag().double() / per_class_total.clamp_min(1),
                          torch.full_like(per_class_total, float("nan")))
        return {"miou": float(iou.nanmean()), "aacc": float(self.matrix.diag().sum()) / max(total, 1),
                "macc": float(acc.nanmean()), "per_class_iou": [None if torch.isnan(v) else float(v) for v in iou]}
