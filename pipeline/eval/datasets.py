"""Readers for the datasets of the paper's evaluation, in their official layouts (local paths or fsspec URLs).

* **Pascal VOC 2012 segmentation** (:func:`voc_pairs`): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  (palette PNG of class indices 0-20, 255 = ignore), ``ImageSets/Segmentation/<split>.txt``.
* **ADE20k** (:func:`ade20k_pairs`, the ``ADEChallengeData2016`` release): ``images/<split>/*.jpg`` and
  ``annotations/<split>/*.png`` with ``split`` ``training`` / ``validation``; label 0 ("other") is ignored
  and classes 1-150 become 0-149 (mmseg's ``reduce_zero_label``), see :data:`ADE20K`.
* **NYU depth v2** (:func:`depth_pairs`): a list file ``<root>/<split>.txt`` of ``rgb depth [...]`` lines
  (the reference's ``nyu_train.txt`` / ``nyu_test.txt``), or a folder ``<root>/<split>/`` of
  ``<name>_rgb.png|jpg`` + ``<name>_depth.png``; 16-bit PNGs in millimetres, 0 = no measurement.
* **Pascal VOC07 / VOC12 boxes** (:func:`voc_boxes`): ``ImageSets/Main/<split>.txt`` and
  ``Annotations/<id>.xml``, for unsupervised object discovery.
"""

from __future__ import annotations

import io
import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..io.decode import decode_image, resize_to_tensor
from ..io.storage import filesystem, with_protocol

__all__ = ["SegmentationSet", "VOC2012", "ADE20K", "voc_pairs", "ade20k_pairs", "depth_pairs", "voc_boxes",
           "BoxAnnotation", "read_bytes", "read_rgb", "load_images", "read_label", "read_depth",
           "VOC_CLASSES"]

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


@dataclass(frozen=True)
class SegmentationSet:
    """How a segmentation dataset's labels read: class count and whether label 0 means "ignore"."""

    name: str
    num_classes: int
    reduce_zero_label: bool = False
    splits: tuple[str, str] = ("train", "val")


VOC2012 = SegmentationSet("voc2012", 21, False, ("train", "val"))
ADE20K = SegmentationSet("ade20k", 150, True, ("training", "validation"))


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def _lines(url: str, what: str) -> list[str]:
    try:
        text = read_bytes(url).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: pass the {what}.") from None
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]


def voc_pairs(root: str, split: str = "train") -> list[tuple[str, str]]:
    """``(image, label)`` paths of a Pascal VOC split (``ImageSets/Segmentation/<split>.txt``)."""
    ids = _lines(_join(root, "ImageSets", "Segmentation", f"{split}.txt"),
                 "VOC root (the folder holding JPEGImages/, SegmentationClass/ and ImageSets/)")
    return [(_join(root, "JPEGImages", f"{i}.jpg"), _join(root, "SegmentationClass", f"{i}.png")) for i in ids]


def ade20k_pairs(root: str, split: str = "training") -> list[tuple[str, str]]:
    """``(image, label)`` paths of an ADE20k split: every ``images/<split>/*.jpg`` with its annotation PNG."""
    fs, path = filesystem(_join(root, "images", split))
    found = sorted(fs.glob(posixpath.join(path, "*.jpg")))
    if not found:
        raise FileNotFoundError(f"No images in {_join(root, 'images', split)}: pass the ADEChallengeData2016 root "
                                "(images/ and annotations/ with training/ and validation/).")
    pairs = []
    for image in found:
        stem = posixpath.basename(image)[: -len(".jpg")]
        pairs.append((with_protocol(fs, image), _join(root, "annotations", split, f"{stem}.png")))
    return pairs


def depth_pairs(root: str, split: str = "train") -> list[tuple[str, str]]:
    """``(rgb, depth)`` paths of an NYU-style split: ``<root>/<split>.txt`` if present, else ``<root>/<split>/``.

    In a list file, lines whose depth is ``None`` are skipped (as the reference's reader does) and the pairs
    are sorted by image path."""
    listing = _join(root, f"{split}.txt")
    fs, path = filesystem(listing)
    if fs.exists(path):
        pairs = []
        for line in fs.cat_file(path).decode().splitlines():
            if line.strip() and not line.startswith("#"):
                rgb, depth = line.split()[:2]
                if depth != "None":
                    pairs.append((_join(root, rgb.lstrip("/")), _join(root, depth.lstrip("/"))))
        return sorted(pairs)
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
        pairs.append((with_protocol(fs, rgb), with_protocol(fs, depth)))
    return pairs


@dataclass(frozen=True)
class BoxAnnotation:
    """Ground-truth boxes of one image, ``(k, 4)`` as ``x1, y1, x2, y2`` in pixels (VOC's own integers)."""

    image: str
    boxes: np.ndarray
    width: int
    height: int
    hard: np.ndarray  # per box: truncated or difficult


def voc_boxes(root: str, split: str = "trainval") -> list[BoxAnnotation]:
    """Boxes of every image of a VOC detection split (``ImageSets/Main/<split>.txt``, ``Annotations/*.xml``);
    images without objects are left out."""
    ids = _lines(_join(root, "ImageSets", "Main", f"{split}.txt"),
                 "VOC root (the folder holding JPEGImages/, Annotations/ and ImageSets/Main/)")
    out = []
    for i in ids:
        tree = ET.fromstring(read_bytes(_join(root, "Annotations", f"{i}.xml")))
        size = tree.find("size")
        boxes, hard = [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            boxes.append([int(float(bb.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax")])
            hard.append(obj.findtext("truncated", "0").strip() == "1" or obj.findtext("difficult", "0").strip() == "1")
        if boxes:
            out.append(BoxAnnotation(_join(root, "JPEGImages", f"{i}.jpg"), np.asarray(boxes, np.float64),
                                     int(size.findtext("width")), int(size.findtext("height")), np.asarray(hard)))
    return out


def read_rgb(url: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of one image file."""
    return np.array(decode_image(read_bytes(url)).pixels)  # writable: torch.from_numpy shares it


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Decode and resize images to ``(N, 3, size, size)`` in ``[0, 1]`` (the stores' square resize)."""
    return torch.stack([resize_to_tensor(read_rgb(p), size) for p in paths])


def read_label(url: str, dataset: SegmentationSet = VOC2012) -> np.ndarray:
    """Class-index map ``(H, W)`` uint8 from a palette or greyscale PNG; 255 = ignore (and 0 for ADE20k)."""
    img = Image.open(io.BytesIO(read_bytes(url)))
    if img.mode not in ("P", "L"):
        raise ValueError(f"{url}: segmentation labels must be palette or greyscale PNGs of class indices, "
                         f"got mode {img.mode}.")
    label = np.asarray(img).astype(np.uint8)
    if dataset.reduce_zero_label:
        label = np.where(label == 0, 255, label - 1).astype(np.uint8)
        label[label == 254] = 255
    return label


def read_depth(url: str, scale: float = 1000.0) -> np.ndarray:
    """Depth ``(H, W)`` float32 in metres (PNG value / ``scale``); 0 marks no measurement."""
    a = np.asarray(Image.open(io.BytesIO(read_bytes(url))))
    if a.ndim != 2:
        raise ValueError(f"{url}: depth must be a single-channel (16-bit) PNG, got shape {a.shape}.")
    return a.astype(np.float32) / scale
