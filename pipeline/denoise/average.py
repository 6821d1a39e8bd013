"""Test-time averaging: the backbone on shifted and flipped copies of an image, each map warped back, averaged.

A positional artifact is tied to the token's place in the ViT's grid, content to the place in the image. Shift
the image by a few patches (or mirror it) and the content moves with it while the artifact stays put; warp each
copy's map back to the image's grid and average, and the content adds up while the artifact is spread over the
shifts and partly cancels. This is how post-hoc-registers work builds its teacher. No optimisation: ``copies``
forward passes per image.

Every copy is a view box of :mod:`pipeline.vit.views` (``(x0, y0, 1, 1)``, out-of-image pixels repeat the border),
so the patch centres are the exact ones of :func:`pipeline.vit.views.patch_coords`. Warping back samples each
copy's map at the full grid's patch centres (bilinear in the copy's patch grid); a position a copy does not
see (shifted out of its grid) gets no weight from it. With whole-patch shifts (the default) the samples fall on
the copy's own patch centres, so the content is not blurred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vit.views import patch_coords, render_views

__all__ = ["AverageConfig", "copy_boxes", "warp_back", "average_features"]


@dataclass(frozen=True)
class AverageConfig:
    """Which copies are averaged.

    Attributes:
        copies: forward passes per image, the unshifted image included (1 is the raw features).
        max_shift: largest shift along each axis, in patches (strides).
        whole_patches: round shifts to whole patches (no interpolation of the content); otherwise sub-patch.
        flip: mirror every other copy left-right.
        seed: fixes the shifts (the same for every image, so a store's rows are comparable).
    """

    copies: int = 8
    max_shift: float = 2.0
    whole_patches: bool = True
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise ValueError(f"average: copies must be at least 1, got {self.copies}")
        if self.max_shift < 0:
            raise ValueError(f"average: max_shift must be 0 or more (patches), got {self.max_shift}")


def copy_boxes(config: AverageConfig, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(copies, 4)`` and flips ``(copies,)`` of the copies; the first is the image itself.

    Shifts are distinct where possible: drawn without replacement from the whole-patch offsets in
    ``[-max_shift, max_shift]^2`` (or uniformly, for sub-patch shifts).
    """
    g = torch.Generator().manual_seed(config.seed)
    n = config.copies - 1
    if config.whole_patches:
        r = int(config.max_shift)
        offsets = torch.tensor([(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dx or dy],
                               dtype=torch.float32).reshape(-1, 2)
        if len(offsets):
            order = torch.cat([torch.randperm(len(offsets), generator=g) for _ in range(n // len(offsets) + 1)])
            shifts = offsets[order[:n]]
        else:
            shifts = torch.zeros(n, 2)
    else:
        shifts = (torch.rand(n, 2, generator=g) * 2 - 1) * config.max_shift
    shifts = torch.cat([torch.zeros(1, 2), shifts]) * stride / size
    boxes = torch.cat([shifts, torch.ones(len(shifts), 2)], 1)
    flips = (torch.arange(len(boxes)) % 2 == 1) & config.flip
    return boxes, flips


def warp_back(maps: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, patch: int,
              stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each copy's map ``(V, gh, gw, C)`` sampled at the image's own patch centres.

    Returns the samples ``(V, gh, gw, C)`` and their weights ``(V, gh, gw)`` (0 where the copy does not cover
    the position, 1 inside its grid).
    """
    v, gh, gw, _ = maps.shape
    full = patch_coords(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.zeros(1, dtype=torch.bool), size, patch,
                        stride)[0].to(maps.device)  # (gh, gw, 2)
    boxes, flips = boxes.to(maps.device), flips.to(maps.device)
    u = (full[None, ..., 0] - boxes[:, None, None, 0]) / boxes[:, None, None, 2]
    u = torch.where(flips[:, None, None], 1 - u, u)
    w = (full[None, ..., 1] - boxes[:, None, None, 1]) / boxes[:, None, None, 3]
    # view coordinate -> fractional patch index (inverse of the patch-centre formula of pipeline.vit.views)
    col = (u * size - patch / 2) / stride
    row = (w * size - patch / 2) / stride
    eps = 1e-4
    inside = (col > -eps) & (col < gw - 1 + eps) & (row > -eps) & (row < gh - 1 + eps)
    grid = torch.stack([2 * col / max(gw - 1, 1) - 1, 2 * row / max(gh - 1, 1) - 1], -1)
    sampled = F.grid_sample(maps.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
    return sampled.permute(0, 2, 3, 1), inside.float()


@torch.no_grad()
def average_features(backbone, images: torch.Tensor, config: AverageConfig = AverageConfig(), *,
                     chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, clean)``, each ``(B, gh, gw, C)`` fp32: the image's own features and the copies' average (with one
    copy, the same tensor twice: callers may store it once converted).

    Args:
        backbone: anything with ``features(pixels) -> (B, gh, gw, C)``, ``patch_size`` and ``stride``.
        images: ``(B, 3, S, S)`` in ``[0, 1]``.
        chunk: copies per backbone pass.
    """
    size = images.shape[-1]
    patch, stride = backbone.patch_size, backbone.stride
    if config.copies == 1:  # the image itself only: no copy to render or warp back, the average is the raw map
        parts = [backbone.features(images[i:i + chunk]).float() for i in range(0, len(images), chunk)]
        raw = parts[0] if len(parts) == 1 else torch.cat(parts)
        return raw, raw
    boxes, flips = copy_boxes(config, size, stride)
    copies = torch.cat([render_views(image, boxes, flips, size) for image in images])  # image-major
    maps = torch.cat([backbone.features(copies[i:i + chunk]).float() for i in range(0, len(copies), chunk)])
    maps = maps.reshape(len(images), len(boxes), *maps.shape[1:])
    raws, cleans = [], []
    for per_image in maps:
        sampled, weight = warp_back(per_image, boxes, flips, size, patch, stride)
        cleans.append((sampled * weight[..., None]).sum(0) / weight.sum(0).clamp_min(1e-6)[..., None])
        raws.append(per_image[0])
    return torch.stack(raws), torch.stack(cleans)
