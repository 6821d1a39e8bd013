"""Backbone features of many random views of one image, in memory-bounded chunks, and batches of them.

The boxes are exactly :func:`pipeline.vit.views.make_views`'s (same generator, full view first), but the crops
are rendered and passed through the ViT ``chunk`` views at a time, so 768 views of a 518-pixel image never
sit in memory as pixels at once; only the ``(V, gh, gw, C)`` features and coordinates are kept.
:class:`ViewBatch` holds several images' view features, token by token, ready for stage 1's fit; batches of
the same geometry concatenate, so images seen by different backbones can be fitted together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..vit.backbone import FeatureBackbone
from ..vit.views import ViewConfig, patch_coords, render_views, sample_boxes, view_generator

__all__ = ["ViewFeatures", "ViewBatch", "view_boxes", "extract_view_features", "extract_batch"]


@dataclass
class ViewFeatures:
    """Features ``(V, gh, gw, C)`` of ``V`` views and their patch centres' global ``(x, y)`` ``(V, gh, gw, 2)``;
    view 0 is the full image when ``ViewConfig.include_full``."""

    features: torch.Tensor
    coords: torch.Tensor


def view_boxes(config: ViewConfig, image_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes and flips :func:`pipeline.vit.views.make_views` uses for ``(image_id, seed)``."""
    boxes, flips = sample_boxes(config.num_views, config, view_generator(image_id, seed))
    if config.include_full:
        boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), boxes])
        flips = torch.cat([torch.zeros(1, dtype=torch.bool), flips])
    return boxes, flips


@torch.no_grad()
def extract_view_features(backbone: FeatureBackbone, image: torch.Tensor, config: ViewConfig, *, image_id: int, seed: int,
                          chunk: int = 32, dtype: torch.dtype = torch.float32,
                          autocast_dtype: torch.dtype | None = None) -> ViewFeatures:
    """Run ``backbone.features`` over every view of ``image`` ``(3, S, S)``, ``chunk`` views per pass.

    Raises:
        ValueError: the backbone returned non-finite values or an unexpected shape.
    """
    size = image.shape[-1]
    boxes, flips = view_boxes(config, image_id, seed)
    boxes, flips = boxes.to(image.device), flips.to(image.device)
    coords = patch_coords(boxes, flips, size, backbone.patch_size, backbone.stride)
    gh, gw = coords.shape[1:3]
    out: torch.Tensor | None = None
    for start in range(0, len(boxes), chunk):
        sl = slice(start, start + chunk)
        pixels = render_views(image, boxes[sl], flips[sl], size)
        with torch.autocast(image.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            feats = backbone.features(pixels)
        if feats.ndim != 4 or feats.shape[:3] != (pixels.shape[0], gh, gw):
            raise ValueError(f"image {image_id}: backbone returned features of shape {tuple(feats.shape)} for "
                             f"{pixels.shape[0]} views of {size} px; expected ({pixels.shape[0]}, {gh}, {gw}, C).")
        bad = ~torch.isfinite(feats).flatten(1).all(1)
        if bad.any():
            first = start + int(bad.nonzero()[0])
            raise ValueError(f"image {image_id}: backbone features of view {first} (box "
                             f"{[round(v, 3) for v in boxes[first].tolist()]}) contain NaN or Inf; "
                             "check the input pixels and the model's dtype (try fp32).")
        if out is None:
            out = torch.empty(len(boxes), gh, gw, feats.shape[-1], dtype=dtype, device=image.device)
        out[sl] = feats.to(dtype)
    assert out is not None
    return ViewFeatures(features=out, coords=coords)


@dataclass
class ViewBatch:
    """View features of ``B`` images, every view's tokens in order (the full view first).

    Attributes:
        raw: ``(B, V * P, C)`` features, ``P = gh * gw`` tokens a view.
        xy: ``(B, V * P, 2)`` global patch-centre coordinates of those tokens.
        views: ``V``, views per image.
        full_coords: ``(gh, gw, 2)`` coordinates of the full view's patch centres.
        image_ids: one id per image (with the seed they fixed the views).
        seconds: wall-clock seconds the extraction took.
    """

    raw: torch.Tensor
    xy: torch.Tensor
    views: int
    full_coords: torch.Tensor
    image_ids: list[int]
    seconds: float = 0.0

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.full_coords.shape[0]), int(self.full_coords.shape[1])

    @classmethod
    def concat(cls, batches: Sequence["ViewBatch"]) -> "ViewBatch":
        """One batch of every image of ``batches`` (same views, grid and channels; distinct ids)."""
        first = batches[0]
        for other in batches[1:]:
            if (other.views, other.grid, other.raw.shape[-1]) != (first.views, first.grid, first.raw.shape[-1]):
                raise ValueError("ViewBatch.concat needs the same views, grid and channels in every batch.")
        return cls(torch.cat([b.raw for b in batches]), torch.cat([b.xy for b in batches]), first.views,
                   first.full_coords, [i for b in batches for i in b.image_ids], sum(b.seconds for b in batches))


def extract_batch(backbone: FeatureBackbone, images: torch.Tensor, config: ViewConfig, *, image_ids: Sequence[int], seed: int,
                  chunk: int = 32, dtype: torch.dtype = torch.float32,
                  autocast_dtype: torch.dtype | None = None) -> ViewBatch:
    """:func:`extract_view_features` for each of ``images (B, 3, S, S)``, stacked token by token."""
    t0 = time.perf_counter()
    feats, coords = [], []
    for image, image_id in zip(images, image_ids):
        vf = extract_view_features(backbone, image, config, image_id=int(image_id), seed=seed, chunk=chunk,
                                   dtype=dtype, autocast_dtype=autocast_dtype)
        feats.append(vf.features)
        coords.append(vf.coords)
    views, channels = feats[0].shape[0], feats[0].shape[-1]
    size = images.shape[-1]
    full = patch_coords(torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=images.device),
                        torch.zeros(1, dtype=torch.bool, device=images.device), size, backbone.patch_size,
                        backbone.stride)[0]
    b = len(feats)
    if images.device.type == "cuda":  # so `seconds` holds the GPU's work, not only its queueing
        torch.cuda.synchronize(images.device)
    return ViewBatch(torch.stack(feats).reshape(b, -1, channels), torch.stack(coords).reshape(b, -1, 2), views,
                     full, [int(i) for i in image_ids], time.perf_counter() - t0)
