"""Random resized views of one image, with the exact global coordinate of every patch centre.

Coordinate convention (used by every module in the package):

* An image of width ``W`` and height ``H`` covers the unit square ``[0, 1] x [0, 1]``; pixel ``k`` spans
  ``[k / W, (k + 1) / W]``, so its centre is at ``(k + 0.5) / W``. Coordinates are stored as ``(x, y)``
  pairs, the order ``torch.nn.functional.grid_sample`` expects (after ``2 * c - 1``).
* A view is an axis-aligned box ``(x0, y0, w, h)`` of the image, optionally flipped left-right, resampled
  to ``size x size`` pixels. The ViT sees that view as a grid of patches of ``patch`` pixels taken every
  ``stride`` pixels. Patch ``(i, j)`` covers view pixels ``[j * stride, j * stride + patch)``, so its
  centre lies at ``u = (j * stride + patch / 2) / size`` in view coordinates, and at
  ``x = x0 + u * w`` in image coordinates (``x = x0 + (1 - u) * w`` when flipped). This is exact; it is
  not the common approximation that spaces coordinates evenly from one crop edge to the other.

Crops are rendered on whatever device the image lives on with ``grid_sample``, so a GPU worker never
moves crops across the bus, and the same box gives both the pixels and the coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ViewConfig", "Views", "grid_shape", "make_views", "patch_coords", "render_views", "sample_boxes",
           "view_generator"]


@dataclass(frozen=True)
class ViewConfig:
    """How random views are drawn (defaults are the DVT reference: scale 0.1-0.5, ratio 3/4-4/3).

    ``near_full_share`` of the ``num_views`` (rounded) are drawn instead at ``near_full_scale`` of the area, after
    the others: views close to the full view's scale whose patches sit at other places than its patches. Their
    tokens see nearly what a full-view token sees, with their own noise, so they can average a clean map's noise
    where zoomed-in crops cannot (their content is at a finer scale); the zoomed-in crops still tell the artifact
    from the content.
    """

    num_views: int = 768
    scale: tuple[float, float] = (0.1, 0.5)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    include_full: bool = True
    near_full_share: float = 0.0
    near_full_scale: tuple[float, float] = (0.9, 1.0)

    @property
    def near_full_views(self) -> int:
        """How many of the random views are drawn at ``near_full_scale`` (the last ones)."""
        return round(self.near_full_share * self.num_views)

    def __post_init__(self) -> None:
        if self.num_views < 0:
            raise ValueError(f"ViewConfig.num_views must be >= 0, got {self.num_views}.")
        for name in ("scale", "near_full_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"ViewConfig.{name} must satisfy 0 < min <= max <= 1, got {getattr(self, name)}.")
        if not 0 <= self.near_full_share <= 1:
            raise ValueError(f"ViewConfig.near_full_share must be in [0, 1], got {self.near_full_share}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ViewConfig.ratio must satisfy 0 < min <= max, got {self.ratio}.")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"ViewConfig.flip_prob must be in [0, 1], got {self.flip_prob}.")


@dataclass
class Views:
    """A batch of views of one image.

    Attributes:
        images: ``(V, 3, size, size)`` view pixels.
        coords: ``(V, gh, gw, 2)`` global ``(x, y)`` of each patch centre, in ``[0, 1]``.
        boxes: ``(V, 4)`` boxes ``(x0, y0, w, h)`` in image coordinates.
        flips: ``(V,)`` bool, True where the view is mirrored left-right.
    """

    images: torch.Tensor
    coords: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def grid_shape(size: int | tuple[int, int], patch: int, stride: int | None = None) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` a ViT produces for an input of ``size`` pixels."""
    stride = stride or patch
    h, w = (size, size) if isinstance(size, int) else size
    for name, v in (("height", h), ("width", w)):
        if v < patch or (v - patch) % stride:
            raise ValueError(
                f"Input {name} {v} does not fit patch {patch} with stride {stride}: "
                f"use a size s with (s - {patch}) divisible by {stride}, e.g. {patch + stride * max(1, (v - patch) // stride)}."
            )
    return (h - patch) // stride + 1, (w - patch) // stride + 1


def view_generator(image_id: int, seed: int) -> torch.Generator:
    """A CPU generator that depends only on ``(image_id, seed)``, whatever else ran before."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def sample_boxes(n: int, config: ViewConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` random resized crop boxes ``(x0, y0, w, h)`` and flips, torchvision-style.

    The area fraction is uniform in ``config.scale`` and the aspect ratio log-uniform in ``config.ratio``;
    draws that do not fit the unit square are redrawn (ten tries, then the box is shrunk to fit). With
    ``config.near_full_share``, the last ``round(share * n)`` boxes are drawn the same way at
    ``config.near_full_scale``, from the same generator after the others (a share of 0 draws as before it existed).
    """
    near = round(config.near_full_share * n)
    if near:
        boxes, flips = _sample_boxes(n - near, config.scale, config, generator)
        more, more_flips = _sample_boxes(near, config.near_full_scale, config, generator)
        return torch.cat([boxes, more]), torch.cat([flips, more_flips])
    return _sample_boxes(n, config.scale, config, generator)


def _sample_boxes(n: int, scale: tuple[float, float], config: ViewConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tries = 10
    area = torch.empty(n, tries).uniform_(*scale, generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(config.ratio[0]), math.log(config.ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w, h = torch.sqrt(area * r), torch.sqrt(area / r)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long))
    pick = torch.arange(n)
    w, h = w[pick, first].clamp(max=1.0), h[pick, first].clamp(max=1.0)
    x0 = torch.rand(n, generator=generator) * (1 - w)
    y0 = torch.rand(n, generator=generator) * (1 - h)
    flips = torch.rand(n, generator=generator) < config.flip_prob
    return torch.stack([x0, y0, w, h], 1), flips


def _view_axis(size: int, patch: int, stride: int, n: int, device: torch.device) -> torch.Tensor:
    """Patch-centre positions along one axis of a view, in view coordinates ``[0, 1]``."""
    return (torch.arange(n, device=device, dtype=torch.float32) * stride + patch / 2) / size


def patch_coords(boxes: torch.Tensor, flips: torch.Tensor, size: int, patch: int,
                 stride: int | None = None) -> torch.Tensor:
    """Global ``(x, y)`` of every patch centre of every view: ``(V, gh, gw, 2)``."""
    stride = stride or patch
    gh, gw = grid_shape(size, patch, stride)
    u = _view_axis(size, patch, stride, gw, boxes.device)
    v = _view_axis(size, patch, stride, gh, boxes.device)
    u = torch.where(flips[:, None], 1 - u[None], u[None])  # (V, gw)
    x = boxes[:, 0:1] + u * boxes[:, 2:3]
    y = boxes[:, 1:2] + v[None] * boxes[:, 3:4]
    return torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), -1)


def render_views(image: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``image`` ``(3, H, W)`` into ``size x size`` views, one per box, with bilinear filtering."""
    if image.ndim != 3:
        raise ValueError(f"render_views expects one image (3, H, W), got shape {tuple(image.shape)}.")
    boxes = boxes.to(image.device, torch.float32)
    flips = flips.to(image.device)
    t = (torch.arange(size, device=image.device, dtype=torch.float32) + 0.5) / size
    u = torch.where(flips[:, None], 1 - t[None], t[None])
    x = boxes[:, 0:1] + u * boxes[:, 2:3]
    y = boxes[:, 1:2] + t[None] * boxes[:, 3:4]
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), -1) * 2 - 1
    src = image[None].expand(boxes.shape[0], -1, -1, -1)
    # Views are crops of an image already resized to the input size, so they are upsampled, never aliased.
    return F.grid_sample(src.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_views(
    image: torch.Tensor,
    config: ViewConfig,
    size: int,
    patch: int,
    stride: int | None = None,
    *,
    image_id: int = 0,
    seed: int = 0,
) -> Views:
    """Random views of ``image`` (``(3, H, W)``, any device) and, first if requested, the full view.

    The boxes depend only on ``(image_id, seed)``, so a retried or resumed job sees the same views.
    """
    stride = stride or patch
    grid_shape(size, patch, stride)  # validate early with a clear message
    boxes, flips = sample_boxes(config.num_views, config, view_generator(image_id, seed))
    if config.include_full:
        boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), boxes])
        flips = torch.cat([torch.zeros(1, dtype=torch.bool), flips])
    boxes, flips = boxes.to(image.device), flips.to(image.device)
    images = render_views(image, boxes, flips, size)
    return Views(images=images, coords=patch_coords(boxes, flips, size, patch, stride), boxes=boxes, flips=flips)
