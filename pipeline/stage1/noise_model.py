"""DVT's per-image noise model ``raw(view, p) = F(x) + G(p) + h(raw)``, batched over images, with its losses.

``F`` (a neural field over global image coordinates ``x``) is the clean feature map; ``G`` (a ``C x K x K``
map over the position ``p`` of a token inside the ViT's view grid) is the input-independent artifact,
shared by all views of an image; ``h`` (an MLP ``C -> C/4 -> C/4 -> C`` on the raw token) the
image-dependent residual (high-norm tokens). Losses follow the reference exactly:

* phase 1: ``MSE(F + G, raw) + (1 - cos(F + G, raw))``;
* phase 2 (``G`` frozen): the same on ``F + G + sg(h)``, plus ``0.1 * MSE(h, sg(raw - F - G))`` and
  ``0.02 * mean|h|``.

Gauge: ``F + G`` is unchanged when a constant vector moves from ``G`` to ``F``, so the split is fixed by
convention, the same in every preset: ``G`` holds only what depends on the position in the view grid (zero
mean over its nodes, per channel) and ``F`` everything else, including the image's mean feature. Then ``F``
on the full view is directly comparable with the raw features (cosine, norms, K-means).
:meth:`NoiseModel.fix_gauge` moves ``G``'s mean into ``F`` exactly (every token's ``F + G`` is unchanged).

Every loss is a per-image mean, so image ``b``'s gradients never depend on the other images in the batch.
:meth:`NoiseModel.solve_linear` is the closed-form start of the default preset: alternating exact ``G``
solves and Jacobi ``F`` solves of the MSE problem when ``F`` is a dense bilinear grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .field import BatchedGrid, BatchedMLP, FieldConfig, GridField, GridInterp, create_field

__all__ = ["LossWeights", "NoiseModel"]


@dataclass(frozen=True)
class LossWeights:
    """Loss weights of the reference (``cos`` multiplies ``1 - cos``)."""

    mse: float = 1.0
    cos: float = 1.0
    residual: float = 0.1
    sparsity: float = 0.02


class NoiseModel(nn.Module):
    """``F``, ``G`` and ``h`` for ``B`` images.

    Args:
        field: how ``F`` is parametrised.
        channels: feature dimension ``C``.
        full_coords: ``(gh, gw, 2)`` global patch-centre coordinates of the full view (where ``F`` is read out).
        view_coords: ``(gh, gw, 2)`` patch-centre coordinates inside a view (where ``G``'s nodes sit).
        generators: one CPU generator per image; all initial values of image ``b`` come from ``generators[b]``.
        g_init_std: ``G`` starts as ``N(0, std^2)`` (reference: 0.02), or from ``g_init`` if given.
        g_init: optional ``(C, gh, gw)`` or ``(B, C, gh, gw)`` starting ``G`` (e.g. a model-level estimate).
        residual: build ``h`` (its random start is drawn after ``F``'s and ``G``'s).
        device: where zero starts are made; random ones are drawn on the CPU. Move the model there after.
    """

    def __init__(self, field: FieldConfig, channels: int, full_coords: torch.Tensor, view_coords: torch.Tensor,
                 generators: Sequence[torch.Generator], *, g_init_std: float = 0.02,
                 g_init: torch.Tensor | None = None, residual: bool = True,
                 device: torch.device | str | None = None):
        super().__init__()
        gh, gw = view_coords.shape[:2]
        self.field = create_field(field, channels, generators, full_coords, device=device)
        span = ((float(view_coords[0, 0, 0]), float(view_coords[0, -1, 0])),
                (float(view_coords[0, 0, 1]), float(view_coords[-1, 0, 1])))
        self.artifact = BatchedGrid(channels, (gh, gw), generators, span=span, init_std=g_init_std, device=device)
        if g_init is not None:
            with torch.no_grad():
                self.artifact.grid.copy_(g_init.expand_as(self.artifact.grid))
        hidden = max(1, channels // 4)
        self.residual = BatchedMLP((channels, hidden, hidden, channels), generators) if residual else None
        self.register_buffer("view_coords", view_coords.reshape(1, -1, 2).float(), persistent=False)
        self.batch = len(generators)

    def artifact_tokens(self) -> torch.Tensor:
        """``G`` at every view-grid position: ``(B, gh * gw, C)``. ``G``'s nodes are the view grid's patch
        centres, so these are its node values (read directly rather than bilinearly sampled at the nodes)."""
        return self.artifact.grid.float().flatten(2).transpose(1, 2)

    def interpolation(self, coords: torch.Tensor) -> "GridInterp | None":
        """The bilinear weights of a grid ``F`` at ``coords (B, N, 2)``, to reuse over many
        :meth:`losses` calls on the same tokens (``None`` for a hash ``F``)."""
        return GridInterp(self.field, coords) if isinstance(self.field, GridField) else None

    @torch.no_grad()
    def fix_gauge(self) -> torch.Tensor:
        """Move each image's per-channel mean of ``G`` (over its nodes) into ``F``; returns the moved
        ``(B, C)`` means. Exact: ``G`` is read at its nodes with weights summing to one and ``F`` gains the same
        constant everywhere (a grid ``F``'s nodes, or a hash ``F``'s output bias), so no loss changes."""
        grid = self.artifact.grid
        mean = grid.mean((2, 3))  # (B, C)
        grid.sub_(mean[:, :, None, None].to(grid.dtype))
        if isinstance(self.field, GridField):
            self.field.grid.add_(mean[:, :, None, None].to(self.field.grid.dtype))
        else:
            bias = self.field.mlp.biases[-1]  # (B, 1, C)
            bias.add_(mean[:, None, :].to(bias.dtype))
        return mean

    def freeze_artifact(self) -> None:
        self.artifact.grid.requires_grad_(False)
        self.artifact.grid.grad = None

    def explain(self, n: int, coords: torch.Tensor | None, pos: torch.Tensor | None, *,
                interp: "GridInterp | None" = None) -> torch.Tensor:
        """``F(x) + G(p)`` for ``n`` tokens, fp32 ``(B, n, C)`` (arguments as in :meth:`losses`)."""
        clean = interp(self.field.grid) if interp is not None else self.field(coords).float()
        b, _, c = clean.shape
        g_all = self.artifact_tokens()
        if pos is None:
            p = g_all.shape[1]
            return (clean.view(b, n // p, p, c) + g_all[:, None]).view(b, n, c)
        return clean + torch.gather(g_all, 1, pos[..., None].expand(-1, -1, c))

    def losses(self, raw: torch.Tensor, coords: torch.Tensor | None, pos: torch.Tensor | None, *,
               use_residual: bool, weights: LossWeights = LossWeights(),
               interp: "GridInterp | None" = None) -> dict[str, torch.Tensor]:
        """Per-image losses ``(B,)`` on tokens ``raw (B, N, C)`` at global ``coords (B, N, 2)`` and view-grid
        indices ``pos (B, N)``; ``"total"`` is what is optimised.

        ``pos=None`` means the tokens are whole views, view by view (``N = V * gh * gw``): ``G`` is then
        broadcast over the views instead of gathered. ``interp`` (from :meth:`interpolation` on ``coords``)
        evaluates a grid ``F`` as a sparse product; ``coords`` is then not used.
        """
        base = self.explain(raw.shape[1], coords, pos, interp=interp)
        raw = raw.float()
        pred = base
        out: dict[str, torch.Tensor] = {}
        if use_residual and self.residual is not None:
            h = self.residual(raw).float()
            pred = base + h.detach()
            out["residual"] = weights.residual * (h - (raw - base).detach()).square().mean((1, 2))
            out["sparsity"] = weights.sparsity * h.abs().mean((1, 2))
        out["mse"] = weights.mse * (pred - raw).square().mean((1, 2))
        out["cos"] = weights.cos * (1 - F.cosine_similarity(pred, raw, dim=-1, eps=1e-8).mean(1))
        out["total"] = sum(out.values())
        return out

    # ---- closed-form solve for a linear F (dense bilinear grid) ---- #

    @torch.no_grad()
    def solve_linear(self, raw: torch.Tensor, coords: torch.Tensor, views: int, iters: int, *,
                     full_weight: float | torch.Tensor = 1.0, high_norm: float = 0.0,
                     smooth: float = 0.0, view_weights: torch.Tensor | None = None,
                     artifact_views: torch.Tensor | None = None) -> torch.Tensor:
        """Alternate exact ``G`` and Jacobi ``F`` updates of the weighted least-squares problem
        ``min sum_tokens w ||F(x) + G(p) - raw||^2 + smooth * ||grad F||^2``; returns the token weights.

        ``raw (B, V * P, C)`` and ``coords (B, V * P, 2)`` hold every token, view by view (``P = gh * gw``),
        view 0 being the full view.

        * ``G(p)`` is the mean over views of ``raw - F`` (every view counts the same: each is one more
          observation of the same artifact), or over the views ``artifact_views`` (``(V,)``, 0 or 1) marks:
          a near-full view puts each grid position at nearly the image place the full view does, so it cannot
          tell ``G`` from ``F`` and, counted in, lets ``F`` keep part of the artifact.
        * ``F``'s tokens weigh ``full_weight`` (a number, or one per image ``(B,)``) in the full view and 1
          elsewhere, or ``view_weights[v]`` in view ``v`` when given (``(V,)``; the full view's still times
          ``full_weight``). A crop's patch covers less of
          the image than a full-view patch, so its content differs from the full view's at the same place;
          the full view is the scale the clean map is read at, so it leads ``F`` while crops, where the
          artifact sits at other image places, separate ``F`` from ``G``.
        * Tokens whose centred norm exceeds ``high_norm`` times the image's median (DINOv2-style high-norm
          tokens, ``h``'s part of the model) get weight 0 (``0`` disables).
        * ``smooth`` (relative to the mean node weight) adds a membrane term that fills nodes left without
          tokens from their neighbours and damps noise.

        ``F += (splat(w r) - smooth L F) / (splat(w) + 8 smooth)`` is a damped Jacobi step (it converges: the
        bilinear rows sum to one and ``L``'s eigenvalues are at most 8). Stopping after ``iters`` steps leaves
        the finest, least-supported detail partly unfitted, which measures better than solving to the end.
        """
        if not isinstance(self.field, GridField):
            raise TypeError("solve_linear needs a dense grid F (FieldConfig(kind='grid')).")
        b, n, c = raw.shape
        grid = self.field.grid
        rh, rw = grid.shape[-2:]
        interp = GridInterp(self.field, coords)
        flat = grid.data.float().flatten(2).transpose(1, 2).reshape(b * rh * rw, c)  # (B * R, C)
        p = self.artifact.grid.shape[-2] * self.artifact.grid.shape[-1]
        raw = raw.float()
        keep = torch.ones(b, n, 1, device=raw.device)
        if high_norm:
            dev = (raw - raw.mean(1, keepdim=True)).norm(dim=-1, keepdim=True)
            keep = (dev <= high_norm * dev.median(1, keepdim=True).values).float()
        f_w = keep.clone()
        if view_weights is not None:
            f_w = (f_w.view(b, views, p) * view_weights.to(f_w).view(-1, views, 1)).view(b, n, 1)
        f_w[:, :p] *= torch.as_tensor(full_weight, dtype=f_w.dtype, device=f_w.device).reshape(-1, 1, 1)
        weight = interp.splat(f_w).view(b * rh * rw, 1)  # per node: sum of its tokens' bilinear weights
        lam = smooth * weight.view(b, -1).mean(1).repeat_interleave(rh * rw)[:, None]
        g_keep = keep if artifact_views is None else \
            (keep.view(b, views, p) * artifact_views.to(keep).view(1, views, 1)).view(b, n, 1)
        for _ in range(iters):
            resid = raw - interp.apply(flat)
            g_nodes = _weighted_view_mean(resid, g_keep, views, p)
            resid = resid.view(b, views, p, c).sub_(g_nodes[:, None]).view(b, n, c)
            acc = interp.splat(resid * f_w) - lam * _laplacian(flat, b, rh, rw)
            flat = flat + torch.where(weight + lam > 1e-6, acc / (weight + 8 * lam).clamp_min(1e-6), 0)
        g_nodes = _weighted_view_mean(raw - interp.apply(flat), g_keep, views, p)
        grid.data.copy_(flat.view(b, rh * rw, c).transpose(1, 2).reshape(b, c, rh, rw))
        self.artifact.grid.data.copy_(g_nodes.transpose(1, 2).reshape_as(self.artifact.grid))
        return keep[..., 0]

    def _view_residuals(self, raw: torch.Tensor, coords: torch.Tensor, views: int,
                        interp: "GridInterp | None" = None) -> torch.Tensor:
        """``raw - F - G`` of every token under the grid ``F`` and ``G`` this model holds: ``(B, V, P, C)``."""
        b, _, c = raw.shape
        p = self.artifact.grid.shape[-2] * self.artifact.grid.shape[-1]
        rh, rw = self.field.grid.shape[-2:]
        interp = interp or GridInterp(self.field, coords)
        flat = self.field.grid.data.float().flatten(2).transpose(1, 2).reshape(b * rh * rw, c)
        g = self.artifact.grid.data.float().flatten(2).transpose(1, 2)  # (B, P, C)
        return (raw.float() - interp.apply(flat)).view(b, views, p, c) - g[:, None]

    @torch.no_grad()
    def zoomed_crop_disagreement(self, raw: torch.Tensor, coords: torch.Tensor, views: int, keep: torch.Tensor,
                                 near: int) -> torch.Tensor:
        """How much more the zoomed-in crops disagree with the solve this model holds than the ``near`` near-full
        views (the last ones) do, per image ``(B,)``: ``(E_zoom - E_near) / E_near`` from the mean squared residuals
        of their kept tokens. About 0 where content does not change with the crop's scale (the crops then average
        the noise as well as near-full views do); large on photographs, where a zoomed-in patch sees finer content
        than the clean map is read at."""
        b = raw.shape[0]
        resid = self._view_residuals(raw, coords, views)
        kept = keep.view(b, views, -1)
        energy = (resid.pow(2).sum(-1) * kept).sum(2)  # (B, V)
        zoom = slice(1, views - near)
        e_zoom = energy[:, zoom].sum(1) / kept[:, zoom].sum((1, 2)).clamp_min(1)
        e_near = energy[:, views - near:].sum(1) / kept[:, views - near:].sum((1, 2)).clamp_min(1)
        return (e_zoom - e_near) / e_near.clamp_min(1e-12)

    @torch.no_grad()
    def full_view_weights(self, raw: torch.Tensor, coords: torch.Tensor, views: int, keep: torch.Tensor,
                          k: float, *, limit: float = 1000.0) -> torch.Tensor:
        """A full-view weight per image ``(B,)`` for :meth:`solve_linear`, from the residuals of the solve this
        model holds (one at a fixed weight; ``keep`` is what it returned).

        The weight that minimises ``F``'s error at one place is ``1 + m b^2 / s^2``: ``m`` crop observations there,
        ``b^2`` the crops' coherent disagreement with the full view (a crop's patch covers less of the image),
        ``s^2`` the token noise. Per image, with ``E_full`` and ``E_crop`` the mean squared residuals of the full
        view's and the crops' kept tokens, ``b^2 = (E_full - E_crop)(m + 1)/(m - 1)`` and
        ``s^2 = (E_crop - b^2/(m + 1)^2)(m + 1)/m`` (``m`` from the bilinear splats of both onto ``F``'s nodes);
        the weight is ``clamp(1 + k m b^2 / s^2, 1, limit)``. ``k`` corrects the estimate's bias (the first
        solve's ``F`` and ``G`` absorb part of both energies): 10, chosen on the tuning images
        (``docs/stage1.md``), picks 1 on smooth images and 10-90 on photographs.
        """
        b, n, _ = raw.shape
        p = self.artifact.grid.shape[-2] * self.artifact.grid.shape[-1]
        interp = GridInterp(self.field, coords)
        resid = self._view_residuals(raw, coords, views, interp)
        kept = keep.view(b, views, p)
        energy = resid.pow(2).sum(-1) * kept
        e_full = energy[:, 0].sum(1) / kept[:, 0].sum(1).clamp_min(1)
        e_crop = energy[:, 1:].sum((1, 2)) / kept[:, 1:].sum((1, 2)).clamp_min(1)
        only_full = torch.cat([kept[:, :1], torch.zeros_like(kept[:, 1:])], 1).reshape(b, n, 1)
        only_crops = torch.cat([torch.zeros_like(kept[:, :1]), kept[:, 1:]], 1).reshape(b, n, 1)
        full_w, crop_w = interp.splat(only_full).view(b, -1), interp.splat(only_crops).view(b, -1)
        m = (crop_w * full_w).sum(1) / full_w.pow(2).sum(1).clamp_min(1e-12)  # crop observations per full-view one
        b2 = (e_full - e_crop).clamp_min(0) * (m + 1) / (m - 1).clamp_min(1e-3)
        s2 = ((e_crop - b2 / (m + 1) ** 2) * (m + 1) / m).clamp_min(1e-12)
        return (1 + k * m * b2 / s2).clamp(1, limit)


def _laplacian(flat: torch.Tensor, b: int, rh: int, rw: int) -> torch.Tensor:
    """Graph Laplacian (4-neighbour, free boundary) of channels-last grid nodes ``flat (B * R, C)``."""
    g = flat.view(b, rh, rw, -1)
    out = torch.zeros_like(g)
    dy, dx = g[:, 1:] - g[:, :-1], g[:, :, 1:] - g[:, :, :-1]
    out[:, :-1] -= dy
    out[:, 1:] += dy
    out[:, :, :-1] -= dx
    out[:, :, 1:] += dx
    return out.view_as(flat)


def _weighted_view_mean(x: torch.Tensor, w: torch.Tensor | None, views: int, p: int) -> torch.Tensor:
    """Per view-grid position, the ``w``-weighted mean over views of ``x (B, V * P, C)``: ``(B, P, C)``
    (``w=None``: every weight 1)."""
    b, _, c = x.shape
    if w is None:
        return x.view(b, views, p, c).mean(1)
    num = (x * w).view(b, views, p, c).sum(1)
    return num / w.view(b, views, p, 1).sum(1).clamp_min(1e-12)
