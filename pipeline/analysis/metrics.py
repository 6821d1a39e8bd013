"""Label-free measures of positional artifacts in patch features, for raw, stage-1 and stage-2 outputs.

Every measure takes feature maps ``(N, gh, gw, C)`` of ``N`` images (channels last, as the store holds them),
except :func:`cross_view_consistency`, which needs a feature function and images because it renders its own
crops. All return plain floats; higher means *more artifact* for :func:`positional_energy`,
:func:`grid_energy` and :func:`position_information`, and *fewer artifacts* for
:func:`cross_view_consistency`. They are relative measures: compare a model's raw and denoised features on the
same images, not numbers across models.

* :func:`positional_energy`: share of the feature variance explained by grid position alone (one-way ANOVA
  over positions, chance-corrected).
* :func:`grid_energy`: share of spectral (DCT) energy of the mean-removed maps at high grid frequencies.
* :func:`position_information`: a maximal-information score between feature summaries and patch coordinates,
  computed on equal-frequency grids (a lower bound on the MIC of the DVT paper's Table 1; see its docstring).
* :func:`cross_view_consistency`: cosine similarity of two overlapping crops' features at the same global
  points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..vit.views import ViewConfig, patch_coords, render_views, sample_boxes, view_generator

__all__ = ["FeatureFn", "fit_pca", "positional_energy", "grid_energy", "position_information", "ConsistencyConfig",
           "cross_view_consistency", "sample_at", "artifact_metrics"]

_log = logging.getLogger(__name__)

#: Pixels ``(B, 3, S, S)`` in ``[0, 1]`` -> patch features ``(B, gh, gw, C)`` (a backbone, a denoised ViT, ...).
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def _check_maps(features: torch.Tensor, name: str, min_images: int = 1) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 4:
        raise ValueError(f"{name} expects feature maps (N, gh, gw, C), got shape {tuple(features.shape)}.")
    if features.shape[0] < min_images:
        raise ValueError(f"{name} needs at least {min_images} images, got {features.shape[0]}.")
    features = features.double()
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: features contain NaN or Inf.")
    return features


def fit_pca(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal axes of ``tokens`` ``(n, C)``: returns ``(mean (C,), components (k, C))``.

    Exact SVD of the centred tokens (``n x C`` with ``C`` in the hundreds is cheap); each component's sign is
    fixed so its largest-magnitude loading is positive, so the result is deterministic.
    """
    tokens = tokens.float()
    mean = tokens.mean(0)
    k = min(k, tokens.shape[0], tokens.shape[1])
    _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
    comps = vh[:k]
    idx = comps.abs().argmax(1)
    signs = torch.sign(comps[torch.arange(len(comps)), idx])
    return mean, comps * torch.where(signs == 0, 1.0, signs)[:, None]


def positional_energy(features: torch.Tensor, *, adjusted: bool = True) -> float:
    """Share of feature variance explained by grid position alone, across images.

    With ``f[n, p]`` the feature of image ``n`` at grid position ``p`` (``P = gh * gw`` positions),
    ``m_p = mean_n f[n, p]`` the per-position mean and ``m = mean_{n,p} f[n, p]`` the global mean::

        SS_pos   = N * sum_p |m_p - m|^2           (between positions)
        SS_total = sum_{n,p} |f[n, p] - m|^2
        SS_in    = SS_total - SS_pos                (within positions: content)

    Unadjusted, the score is ``SS_pos / SS_total`` (eta squared). Position-free features still score about
    ``1 / N`` that way, because ``N`` samples never average to exactly the global mean, so by default the
    chance-corrected omega squared is returned::

        MS_in = SS_in / (P * (N - 1));   score = (SS_pos - (P - 1) * MS_in) / (SS_total + MS_in)

    clamped to ``[0, 1]``. A map that is the same in every image (a pure position pattern) scores 1;
    features independent of position score about 0.

    Args:
        features: ``(N, gh, gw, C)`` with ``N >= 2`` (all images on the same grid).
        adjusted: return omega squared (default) rather than eta squared.
    """
    f = _check_maps(features, "positional_energy", min_images=2)
    n, gh, gw, _ = f.shape
    p = gh * gw
    m = f.mean((0, 1, 2))
    m_p = f.mean(0)
    ss_total = float(((f - m) ** 2).sum())
    if ss_total <= 0:
        return 0.0
    ss_pos = float(n * ((m_p - m) ** 2).sum())
    if not adjusted:
        return min(1.0, max(0.0, ss_pos / ss_total))
    ms_in = max(ss_total - ss_pos, 0.0) / (p * (n - 1))
    return min(1.0, max(0.0, (ss_pos - (p - 1) * ms_in) / (ss_total + ms_in)))


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``: row ``k`` is the basis function of frequency ``k / (2 n)``."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def grid_energy(features: torch.Tensor, *, cutoff: float = 0.25) -> float:
    """Share of spectral energy at high grid frequencies (periods shorter than ``1 / cutoff`` patches).

    Each channel of each map has its spatial mean removed and is transformed with an orthonormal 2-D DCT-II
    (``X = D_h f D_w^T``; the DCT's even extension avoids the wrap-around edges an FFT would add to smooth
    maps). Coefficient ``(ky, kx)`` has frequency ``(ky / (2 gh), kx / (2 gw))`` cycles per patch, the highest
    (``k = g - 1``) being a period-2 (checkerboard / stripe) pattern. The score pools every image and channel::

        score = sum_{max(fy, fx) >= cutoff} X^2 / sum_{all} X^2

    Smooth content scores near 0, patch-periodic artifacts (checkerboards, stripes every 2-3 patches) near 1,
    white noise about ``1 - (2 cutoff)^2`` (0.75 at the default).
    """
    f = _check_maps(features, "grid_energy")
    _, gh, gw, _ = f.shape
    f = f - f.mean((1, 2), keepdim=True)
    dh, dw = _dct_matrix(gh), _dct_matrix(gw)
    coef = torch.einsum("ky,nyxc,lx->nklc", dh, f, dw)
    energy = (coef ** 2).sum((0, 3))  # (gh, gw)
    fy = torch.arange(gh, dtype=torch.float64) / (2 * gh)
    fx = torch.arange(gw, dtype=torch.float64) / (2 * gw)
    high = torch.maximum(fy[:, None], fx[None, :]) >= cutoff
    total = float(energy.sum())
    return float(energy[high].sum()) / total if total > 0 else 0.0


# ------------------------------------------------------------------------------------------- information

def _bins(sorted_values: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Equal-frequency bins of ``values`` (ties stay together): bin index per value and the bins used."""
    n = len(sorted_values)
    edges = np.unique(sorted_values[(np.arange(1, k) * n) // k])
    idx = np.searchsorted(edges, values, side="right")
    used, idx = np.unique(idx, return_inverse=True)  # drop empty bins
    return idx, len(used)


def _mutual_information(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> float:
    p = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb) / len(a)
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def _max_information(s: np.ndarray, c: np.ndarray, alpha: float) -> float:
    """Largest ``I(s; c) / log min(a, b)`` over equal-frequency ``a x b`` grids with ``a b <= n^alpha``."""
    budget = max(4, int(len(s) ** alpha))
    s_sorted, c_sorted = np.sort(s), np.sort(c)
    s_bins = {a: _bins(s_sorted, s, a) for a in range(2, budget // 2 + 1)}
    c_bins = {b: _bins(c_sorted, c, b) for b in range(2, budget // 2 + 1)}
    best = 0.0
    for a, (si, na) in s_bins.items():
        for b in range(2, budget // a + 1):
            ci, nb = c_bins[b]
            if min(na, nb) >= 2:
                best = max(best, _mutual_information(si, na, ci, nb) / math.log(min(na, nb)))
    return min(1.0, best)


def position_information(features: torch.Tensor, *, components: int = 3, alpha: float = 0.6,
                         max_tokens: int = 4096, seed: int = 0) -> float:
    """How much feature summaries tell about patch coordinates: a maximal-information score in ``[0, 1]``.

    The DVT paper (Table 1) reports the maximal information coefficient (MIC, Reshef et al. 2011) between
    features and patch coordinates. No maintained MIC package installs here (``minepy`` does not build), so
    this computes the same kind of statistic restricted to **equal-frequency grids**: for a scalar summary
    ``s`` of each token and a coordinate ``c`` (column ``x`` or row ``y``)::

        MI_eq(s, c) = max_{a, b >= 2, a b <= n^alpha}  I(s_a; c_b) / log min(a, b)

    where ``s_a`` / ``c_b`` bin ``s`` / ``c`` into ``a`` / ``b`` equal-frequency bins and ``I`` is the
    plug-in mutual information. MIC maximises over all partitions, so this is a lower bound of MIC (equal
    on monotone and functional-on-quantiles relations). The summaries are the feature L2 norm and the first
    ``components`` principal components of the pooled tokens; the score is::

        mean_s max(MI_eq(s, x), MI_eq(s, y))

    A feature that is a function of ``x`` or ``y`` scores close to 1, position-free features close to 0
    (plus a small positive estimation bias that shrinks with the number of tokens). Like MIC of one
    coordinate, a pattern that depends on ``x`` and ``y`` only jointly (a checkerboard) scores low: use
    :func:`positional_energy` for those.

    Args:
        features: ``(N, gh, gw, C)``.
        components: number of principal components summarised (plus the norm).
        alpha: grid budget exponent (MIC's default 0.6).
        max_tokens: tokens used at most (a seeded random subset above that).
    """
    f = _check_maps(features, "position_information")
    n, gh, gw, c = f.shape
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    tokens = f.reshape(-1, c)
    xs, ys = xs.expand(n, -1, -1).reshape(-1), ys.expand(n, -1, -1).reshape(-1)
    if tokens.shape[0] > max_tokens:
        keep = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        tokens, xs, ys = tokens[keep], xs[keep], ys[keep]
    mean, comps = fit_pca(tokens, components)
    summaries = [tokens.norm(dim=1)] + list(((tokens.float() - mean) @ comps.T).double().T)
    xs, ys = xs.numpy(), ys.numpy()
    scores = []
    for s in summaries:
        s = s.numpy()
        if s.std() <= 1e-9 * max(1.0, float(np.abs(s).max())):
            scores.append(0.0)
            continue
        scores.append(max(_max_information(s, xs, alpha), _max_information(s, ys, alpha)))
    return float(sum(scores) / len(scores))


# ------------------------------------------------------------------------------------------- consistency

@dataclass(frozen=True)
class ConsistencyConfig:
    """How crop pairs are drawn for :func:`cross_view_consistency`.

    Attributes:
        pairs: crop pairs per image.
        scale: area range of the first crop (fraction of the image).
        max_shift: the second crop's centre moves by up to this fraction of the first crop's width/height.
        zoom: range of the second crop's side relative to the first (log-uniform).
        flip_prob: probability that each crop is mirrored.
        seed: with the image index, fixes every draw.
    """

    pairs: int = 8
    scale: tuple[float, float] = (0.2, 0.6)
    max_shift: float = 0.5
    zoom: tuple[float, float] = (0.7, 1.4)
    flip_prob: float = 0.5
    seed: int = 0


def _pair_boxes(config: ConsistencyConfig, image_index: int) -> tuple[torch.Tensor, ...]:
    g = view_generator(image_index, config.seed)
    view_cfg = ViewConfig(num_views=config.pairs, scale=config.scale, flip_prob=config.flip_prob,
                          include_full=False)
    a, flip_a = sample_boxes(config.pairs, view_cfg, g)
    lo, hi = math.log(config.zoom[0]), math.log(config.zoom[1])
    z = torch.exp(torch.empty(config.pairs).uniform_(lo, hi, generator=g)) if hi > lo else torch.full(
        (config.pairs,), config.zoom[0])
    shift = (torch.rand(config.pairs, 2, generator=g) * 2 - 1) * config.max_shift
    w, h = (a[:, 2] * z).clamp(max=1.0), (a[:, 3] * z).clamp(max=1.0)
    cx = a[:, 0] + a[:, 2] / 2 + shift[:, 0] * a[:, 2]
    cy = a[:, 1] + a[:, 3] / 2 + shift[:, 1] * a[:, 3]
    x0 = torch.minimum(torch.clamp(cx - w / 2, min=0.0), 1 - w)
    y0 = torch.minimum(torch.clamp(cy - h / 2, min=0.0), 1 - h)
    flip_b = torch.rand(config.pairs, generator=g) < config.flip_prob
    return a, flip_a, torch.stack([x0, y0, w, h], 1), flip_b


def sample_at(features: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, points: torch.Tensor, size: int,
              patch: int, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinearly sample each view's features at global points.

    Args:
        features: ``(V, gh, gw, C)`` features of views ``boxes`` / ``flips`` rendered at ``size`` pixels.
        points: ``(V, ..., 2)`` global ``(x, y)`` per view.

    Returns:
        ``(V, ..., C)`` sampled features and a ``(V, ...)`` mask of points inside the hull of each view's
        patch centres (outside it the value is extrapolated from the border and should not be trusted).
    """
    stride = stride or patch
    v, gh, gw, c = features.shape
    shape = points.shape[1:-1]
    pts = points.reshape(v, -1, 2).to(features.dtype)
    b = boxes.to(features.dtype)
    u = (pts[..., 0] - b[:, None, 0]) / b[:, None, 2]
    u = torch.where(flips[:, None], 1 - u, u)
    t = (pts[..., 1] - b[:, None, 1]) / b[:, None, 3]
    j = (u * size - patch / 2) / stride  # fractional patch column
    i = (t * size - patch / 2) / stride
    eps = 1e-4
    inside = (j >= -eps) & (j <= gw - 1 + eps) & (i >= -eps) & (i <= gh - 1 + eps)
    grid = torch.stack([(2 * j + 1) / gw - 1, (2 * i + 1) / gh - 1], -1)[:, :, None]  # (V, n, 1, 2)
    out = F.grid_sample(features.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (V, C, n, 1)
    return out[..., 0].permute(0, 2, 1).reshape(v, *shape, c), inside.reshape(v, *shape)


@torch.no_grad()
def cross_view_consistency(features_fn: FeatureFn, images: torch.Tensor | Sequence[torch.Tensor], *, size: int,
                           patch: int, stride: int | None = None,
                           config: ConsistencyConfig | None = None) -> float:
    """Mean cosine similarity of two overlapping crops' features at the same global points.

    For each image, ``config.pairs`` crop pairs ``(A, B)`` are drawn (``B`` shifted, zoomed and maybe
    mirrored relative to ``A``) and rendered at ``size`` pixels with :func:`pipeline.vit.views.render_views`. The
    global points are ``A``'s patch centres (:func:`pipeline.vit.views.patch_coords`) that fall inside the hull of
    ``B``'s patch centres; there ``A``'s features are exact and ``B``'s are sampled bilinearly
    (:func:`sample_at`)::

        score = mean over points q of  cos(f_A(q), f_B(q))

    Content-only features give about 1 (identical crops give exactly 1); features carrying a grid-position
    artifact disagree because the same point sits at different grid positions in the two crops.

    Args:
        features_fn: pixels ``(B, 3, size, size)`` in ``[0, 1]`` -> ``(B, gh, gw, C)`` (a backbone's
            ``features``, or a backbone followed by a stage-2 denoiser).
        images: ``(N, 3, H, W)`` or a list of ``(3, H, W)`` in ``[0, 1]``.
        size, patch, stride: the crops' pixel size and the model's patch geometry.
    """
    config = config or ConsistencyConfig()
    total, count = 0.0, 0
    for n, image in enumerate(images):
        a, flip_a, b, flip_b = _pair_boxes(config, n)
        fa = features_fn(render_views(image, a, flip_a, size)).float()
        fb = features_fn(render_views(image, b, flip_b, size)).float()
        points = patch_coords(a, flip_a, size, patch, stride).to(fb.device)
        sampled, inside = sample_at(fb, b.to(fb.device), flip_b.to(fb.device), points, size, patch, stride)
        cos = F.cosine_similarity(fa, sampled, dim=-1)
        total += float(cos[inside].double().sum())
        count += int(inside.sum())
    if count == 0:
        raise ValueError("cross_view_consistency: no crop pair overlapped; widen ConsistencyConfig.scale/zoom.")
    _log.debug("cross-view consistency over %d shared points of %d images", count, len(images))
    return total / count


def artifact_metrics(features: torch.Tensor, *, information: bool = True) -> dict[str, float]:
    """The label-free measures of one set of maps ``(N, gh, gw, C)`` that need no feature function."""
    out = {"positional_energy": positional_energy(features) if features.shape[0] >= 2 else float("nan"),
           "grid_energy": grid_energy(features)}
    if information:
        out["position_information"] = position_information(features)
    return out
