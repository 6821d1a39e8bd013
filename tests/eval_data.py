"""Generated datasets and feature stores with known structure, in the official layouts the harness reads.

Images are 64 px squares of dark background with 1-3 coloured shapes whose colour gives the class; the
first shape of each image is also its one VOC box, so object discovery has a planted answer. Feature
stores are written for those images with features built from the labels: ``informative`` maps encode
each patch's class histogram, ``artifact`` adds a fixed per-position pattern (what DVT removes), and
``noise`` carries no information at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 64
PATCH = 8
GRID = SIZE // PATCH
COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)


def shapes_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """An image with 1-3 coloured squares / discs, its label map (VOC-style 255 borders) and the first
    shape's box ``[x1, y1, x2, y2]``."""
    img = np.full((SIZE, SIZE, 3), 25, np.uint8)
    label = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    box = None
    for cls in rng.choice([1, 2, 3], size=rng.integers(1, 4), replace=False):
        cx, cy, r = rng.integers(14, SIZE - 14, 2).tolist() + [int(rng.integers(6, 13))]
        mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) if cls != 2 else (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = COLOURS[int(cls)]
        label[mask] = cls
        if box is None:
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    edge = np.zeros_like(label, bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:] |= label[1:] != label[:-1]
    label[edge] = 255
    return img, label, box


def make_voc(root: Path, n_train: int = 24, n_val: int = 8, seed: int = 0) -> Path:
    """A VOC-layout folder: segmentation splits, and one annotated box per image (trainval)."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/Main", "Annotations"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    for i in ids:
        img, label, box = shapes_image(rng)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        lab = Image.fromarray(label, "P")
        lab.putpalette(PALETTE)
        lab.save(root / "SegmentationClass" / f"{i}.png")
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><size><width>{SIZE}</width><height>{SIZE}</height><depth>3</depth></size>"
            f"<object><name>thing</name><truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{box[0]}"
            f"</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object></annotation>")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    return root


def patch_histograms(labels: list[np.ndarray], classes: int = 4) -> torch.Tensor:
    """``(N, GRID, GRID, classes)`` share of each class under each patch (ignored pixels left out)."""
    out = torch.zeros(len(labels), GRID, GRID, classes)
    for n, lab in enumerate(labels):
        t = torch.from_numpy(lab.astype(np.int64)).reshape(GRID, PATCH, GRID, PATCH).permute(0, 2, 1, 3)
        for k in range(classes):
            out[n, ..., k] = (t == k).float().mean((-1, -2))
    return out


def class_embeddings(channels: int = 16) -> torch.Tensor:
    """``(4, C)``: background ``e0``, class ``k`` ``e_k - 0.6 e0`` (objects anti-correlate with background, as
    LOST assumes), turned by one fixed random rotation."""
    emb = torch.zeros(4, channels)
    emb[0, 0] = 1.0
    for k in range(1, 4):
        emb[k, k], emb[k, 0] = 1.0, -0.6
    rot, _ = torch.linalg.qr(torch.randn(channels, channels, generator=torch.Generator().manual_seed(7)))
    return emb @ rot


def label_features(labels: list[np.ndarray], channels: int = 16, seed: int = 0, noise: float = 0.1) -> torch.Tensor:
    """Features that encode the labels: each patch's class histogram times :func:`class_embeddings`, plus a
    little noise (``seed``)."""
    g = torch.Generator().manual_seed(seed)
    hist = patch_histograms(labels)
    return hist @ class_embeddings(channels) + noise * torch.randn(*hist.shape[:3], channels, generator=g)


def positional_artifact(channels: int = 16, strength: float = 2.0) -> torch.Tensor:
    """One fixed ``(GRID, GRID, C)`` pattern: a ramp in x, a ramp in y and a checkerboard."""
    ii, jj = torch.meshgrid(torch.arange(GRID).float(), torch.arange(GRID).float(), indexing="ij")
    pattern = torch.stack([jj / GRID, ii / GRID, (-1.0) ** (ii + jj)], -1)
    return strength * pattern @ torch.randn(3, channels, generator=torch.Generator().manual_seed(99))


def write_store(url: str, uris: list[str], arrays: dict[str, torch.Tensor]) -> str:
    """A finished feature store at ``url`` holding ``arrays`` (each ``(N, GRID, GRID, C)``) for ``uris``."""
    from pipeline.store import FeatureStore, StoreLayout

    c = next(iter(arrays.values())).shape[-1]
    layout = StoreLayout(backbone="tests.custom_backbone:create", block=0, input_size=(SIZE, SIZE),
                         patch_size=PATCH, stride=PATCH, grid=(GRID, GRID), channels=c, dtype="float32",
                         arrays=tuple(arrays))
    store = FeatureStore.create(url, layout, uris, overwrite=True)
    store.write_unit([{"image_id": i, "uri": u} for i, u in enumerate(uris)], arrays)
    return url
