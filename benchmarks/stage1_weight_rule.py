"""A full-view weight chosen per image, measured on the tuning/evaluation split (a prototype, not a preset yet).

The closed-form solve weighs a full-view token ``W`` times a crop token in ``F``'s fit. The weight that minimises
the error at one place is ``W* = 1 + m b^2 / s^2``: ``m`` crop observations there, ``b^2`` the crops' coherent
disagreement with the full view (a crop's patch covers less of the image), ``s^2`` the token noise. Per image,
from a first solve at ``W = 1``, with ``E_full`` and ``E_crop`` the mean squared residuals of the full view's and
the crops' kept tokens:

    b^2 = (E_full - E_crop) (m + 1) / (m - 1),    s^2 = (E_crop - b^2 / (m + 1)^2) (m + 1) / m

(``m`` from the bilinear splats of the full view's and the crops' tokens onto ``F``'s nodes), then
``W = clamp(1 + k m b^2 / s^2, 1, 1000)`` and the solve again from zero at that ``W``. ``k`` corrects the
estimate's bias (the first solve's ``F`` and ``G`` absorb part of both energies); it is chosen on the tuning split.

A candidate asks for the rule with a negative weight, ``full_view_weight=-k``; everything else is
``benchmarks/stage1_split.py``'s (flags pass through):

    python benchmarks/stage1_weight_rule.py --split tuning --candidate views=95,grid_factor=3,full_view_weight=-10
    python benchmarks/stage1_weight_rule.py --split eval --candidate views=95,grid_factor=3,full_view_weight=-10
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stage1 import noise_model as nm  # noqa: E402

_solve = nm.NoiseModel.solve_linear
WEIGHTS: list[float] = []  # every per-image weight chosen, for the summary line


@torch.no_grad()
def per_image_weight(model: nm.NoiseModel, raw: torch.Tensor, coords: torch.Tensor, views: int,
                     keep: torch.Tensor, k: float) -> torch.Tensor:
    """``W`` per image ``(B,)`` from the residuals of the solve ``model`` holds (one at ``W = 1``)."""
    b, n, c = raw.shape
    p = model.artifact.grid.shape[-2] * model.artifact.grid.shape[-1]
    rh, rw = model.field.grid.shape[-2:]
    interp = nm.GridInterp(model.field, coords)
    flat = model.field.grid.data.float().flatten(2).transpose(1, 2).reshape(b * rh * rw, c)
    g = model.artifact.grid.data.float().flatten(2).transpose(1, 2)  # (B, P, C)
    resid = (raw.float() - interp.apply(flat)).view(b, views, p, c) - g[:, None]
    kept = keep.view(b, views, p)
    energy = resid.pow(2).sum(-1) * kept
    e_full = energy[:, 0].sum(1) / kept[:, 0].sum(1).clamp_min(1)
    e_crop = energy[:, 1:].sum((1, 2)) / kept[:, 1:].sum((1, 2)).clamp_min(1)
    only_full = torch.cat([kept[:, :1], torch.zeros_like(kept[:, 1:])], 1).reshape(b, n, 1)
    only_crops = torch.cat([torch.zeros_like(kept[:, :1]), kept[:, 1:]], 1).reshape(b, n, 1)
    full_w, crop_w = interp.splat(only_full).view(b, -1), interp.splat(only_crops).view(b, -1)
    m = (crop_w * full_w).sum(1) / full_w.pow(2).sum(1).clamp_min(1e-12)  # crop observations where the full view is
    b2 = (e_full - e_crop).clamp_min(0) * (m + 1) / (m - 1).clamp_min(1e-3)
    s2 = ((e_crop - b2 / (m + 1) ** 2) * (m + 1) / m).clamp_min(1e-12)
    return (1 + k * m * b2 / s2).clamp(1, 1000)


def solve_linear(self: nm.NoiseModel, raw: torch.Tensor, coords: torch.Tensor, views: int, iters: int, *,
                 full_weight: float = 1.0, high_norm: float = 0.0, smooth: float = 0.0) -> torch.Tensor:
    """The library's solve; with ``full_weight = -k``, two solves: at ``W = 1``, then at the per-image ``W``."""
    if full_weight >= 0:
        return _solve(self, raw, coords, views, iters, full_weight=full_weight, high_norm=high_norm, smooth=smooth)
    start = self.field.grid.data.clone(), self.artifact.grid.data.clone()
    keep = _solve(self, raw, coords, views, iters, full_weight=1.0, high_norm=high_norm, smooth=smooth)
    weight = per_image_weight(self, raw, coords, views, keep, -full_weight)
    WEIGHTS.extend(weight.tolist())
    self.field.grid.data.copy_(start[0])  # the second solve starts where the first did
    self.artifact.grid.data.copy_(start[1])
    return _solve(self, raw, coords, views, iters, full_weight=weight, high_norm=high_norm, smooth=smooth)


def main() -> None:
    nm.NoiseModel.solve_linear = solve_linear
    import stage1_split  # noqa: E402  (benchmarks/, beside this file)

    stage1_split.main()
    if WEIGHTS:
        print(f"per-image full-view weight: median {statistics.median(WEIGHTS):.1f}, min {min(WEIGHTS):.1f}, "
              f"max {max(WEIGHTS):.1f} over {len(WEIGHTS)} fits")


if __name__ == "__main__":
    main()
