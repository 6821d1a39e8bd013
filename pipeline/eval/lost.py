"""LOST unsupervised object discovery (Siméoni et al., BMVC 2021) and its CorLoc score, on stored features.

Per image, with patch features ``f`` (``N`` tokens) and ``A = f f^T``:

1. **seed**: the patch with the fewest positive correlations (degree ``d_p = #{q != p : A_pq > 0}``);
   objects cover less of the image than background, so their patches correlate with fewer others;
2. **expansion**: among the ``k = 100`` lowest-degree patches, those positively correlated with the seed;
3. **box**: patches whose summed correlation with that set is positive form a mask; the box bounds the
   4-connected component of the mask that holds the seed, scaled from grid cells to image pixels.

CorLoc is the share of images whose box has IoU >= 0.5 with at least one ground-truth box (VOC07 /
VOC12 ``trainval``, all objects, as LOST's own evaluation). The reference LOST runs DINO on the image at
its own aspect ratio (padded to the patch size); a store holds the square resize of the whole image, so
here grid cell ``(i, j)`` maps to pixels ``[j W / gw, (j + 1) W / gw) x [i H / gh, (i + 1) H / gh)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .datasets import BoxAnnotation

__all__ = ["LOSTConfig", "lost_box", "box_iou", "lost_corloc"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LOSTConfig:
    """Settings of LOST and CorLoc (the paper's defaults)."""

    k_patches: int = 100
    iou_threshold: float = 0.5


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask`` that holds ``seed`` (a flood fill)."""
    out = np.zeros_like(mask, dtype=bool)
    if not mask[seed]:
        out[seed] = True
        return out
    stack = [seed]
    out[seed] = True
    h, w = mask.shape
    while stack:
        i, j = stack.pop()
        for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            if 0 <= a < h and 0 <= b < w and mask[a, b] and not out[a, b]:
                out[a, b] = True
                stack.append((a, b))
    return out


@torch.no_grad()
def lost_box(features: torch.Tensor, k_patches: int = 100) -> tuple[np.ndarray, tuple[int, int]]:
    """LOST on one map ``(gh, gw, C)``: the box ``(x1, y1, x2, y2)`` in grid cells (``x2``/``y2`` exclusive)
    and the seed ``(row, col)``."""
    gh, gw, c = features.shape
    f = features.reshape(-1, c).float()
    a = f @ f.T
    degree = ((a > 0).sum(1) - (torch.diagonal(a) > 0).long()).float()
    order = torch.argsort(degree, stable=True)
    seed = int(order[0])
    potentials = order[:k_patches]
    similar = potentials[a[seed, potentials] > 0]
    score = a[similar].sum(0).reshape(gh, gw).numpy()
    comp = _component(score > 0, divmod(seed, gw))
    rows, cols = np.nonzero(comp)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64), divmod(seed, gw)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(x1, y1, x2, y2)`` box with each row of ``boxes`` (continuous coordinates)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def lost_corloc(maps: torch.Tensor, annotations: Sequence[BoxAnnotation], config: LOSTConfig | None = None) -> dict:
    """CorLoc of LOST boxes from feature maps ``(N, gh, gw, C)`` (one per annotated image, same order)."""
    config = config or LOSTConfig()
    if len(maps) != len(annotations):
        raise ValueError(f"lost_corloc: {len(maps)} feature maps for {len(annotations)} annotated images.")
    t0 = time.perf_counter()
    _, gh, gw, _ = maps.shape
    hits = []
    for fmap, ann in zip(maps, annotations):
        cells, _ = lost_box(fmap, config.k_patches)
        sx, sy = ann.width / gw, ann.height / gh
        box = np.array([cells[0] * sx, cells[1] * sy, min(cells[2] * sx, ann.width), min(cells[3] * sy, ann.height)])
        hits.append(bool((box_iou(box, ann.boxes) >= config.iou_threshold).any()))
    return {"corloc": float(np.mean(hits)) if hits else float("nan"), "images": len(hits), "found": int(sum(hits)),
            "settings": asdict(config), "seconds": round(time.perf_counter() - t0, 2)}
