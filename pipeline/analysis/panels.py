"""Pictures of feature maps like the DVT paper's figures: PCA colours, K-means clusters, norms, G, residual.

One row per image, one titled column per panel::

    image | raw PCA | raw K-means | raw norm | <denoised> PCA | K-means | norm | artifact G | residual

* **PCA**: the first three principal components mapped to RGB. One basis is fitted across all the images
  shown (one for the raw features, one for the denoised ones), and each component is scaled by its 1st-99th
  percentile over those images, so colours compare across rows.
* **K-means**: ``k`` clusters (Lloyd's algorithm, k-means++ start) fitted across the images shown; the
  denoised clusters are relabelled to overlap the raw ones as much as possible, so a colour means the same
  region in both.
* **norm**: the L2 norm of each token, one colour scale per column across rows (high-norm artifact tokens
  stand out).
* **artifact G**: PCA colours of the stage-1 artifact map ``G`` (stores written with ``--artifact``).
* **residual**: ``|raw - clean - G|``, what neither the clean field nor ``G`` explains (DVT's ``h`` term).

Feature maps are drawn with nearest-neighbour upsampling so each patch stays a visible square.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import fit_pca

__all__ = ["PanelConfig", "PanelRow", "pca_rgb", "kmeans", "kmeans_maps", "norm_maps", "render_panels"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PanelConfig:
    """Look of the panels.

    Attributes:
        clusters: K-means clusters.
        kmeans_iters: Lloyd iterations.
        cell: pixel size of one panel.
        header: pixel height of the column-title band.
        dpi: resolution used to lay the figure out (its pixel size is exact whatever the value).
        denoised_label: what the denoised columns are called (``stage-1``, ``stage-2``, ...).
        seed: K-means start.
    """

    clusters: int = 8
    kmeans_iters: int = 25
    cell: int = 160
    header: int = 28
    dpi: int = 100
    denoised_label: str = "denoised"
    seed: int = 0


@dataclass
class PanelRow:
    """One image's maps (channels last, on one grid); anything ``None`` leaves its panel out or blank."""

    raw: torch.Tensor
    clean: torch.Tensor | None = None
    artifact: torch.Tensor | None = None
    image: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    title: str = ""
    clean_fine: torch.Tensor | None = None  # clean on a finer grid (a store's clean_x2 / clean_x4)


def pca_rgb(maps: Sequence[torch.Tensor], low: float = 0.01, high: float = 0.99, *,
            fit_on: Sequence[torch.Tensor] | None = None) -> list[np.ndarray]:
    """First three principal components of ``maps`` (each ``(gh, gw, C)``), one basis fitted across all of
    them, as RGB images ``(gh, gw, 3)`` in ``[0, 1]`` (each component scaled by its ``low``-``high``
    quantiles over all maps).

    ``fit_on``: fit the basis and the colour scale on these maps instead (e.g. the raw features), so that
    ``maps`` (the denoised ones) are coloured on the same axes and the two can be compared by eye.
    """
    def project(ms: Sequence[torch.Tensor]) -> torch.Tensor:
        p = (torch.cat([m.reshape(-1, m.shape[-1]).float() for m in ms]) - mean) @ comps.T
        return torch.cat([p, p.new_zeros(p.shape[0], 3 - p.shape[1])], 1) if p.shape[1] < 3 else p

    reference = maps if fit_on is None else fit_on
    mean, comps = fit_pca(torch.cat([m.reshape(-1, m.shape[-1]).float() for m in reference]), 3)
    fitted = project(reference)
    lo, hi = torch.quantile(fitted, low, dim=0), torch.quantile(fitted, high, dim=0)
    proj = fitted if fit_on is None else project(maps)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    out, start = [], 0
    for m in maps:
        n = m.shape[0] * m.shape[1]
        out.append(rgb[start:start + n].reshape(m.shape[0], m.shape[1], 3).numpy())
        start += n
    return out


def kmeans(tokens: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means on ``tokens`` ``(n, C)`` with a k-means++ start: ``(labels (n,), centroids (k, C))``."""
    x = tokens.float()
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).min(1).values ** 2
        if float(d2.sum()) <= 0:
            break
        centroids = torch.cat([centroids, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    labels = torch.cdist(x, centroids).argmin(1)
    for _ in range(iters):
        new = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centroids)).float()
        centroids = torch.where(counts[:, None] > 0, new / counts.clamp_min(1)[:, None], centroids)
        new_labels = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels, centroids


def _match_labels(labels: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Relabel ``labels`` so that, greedily by overlap, each cluster takes the colour of a ``reference`` one."""
    overlap = torch.bincount(labels * k + reference, minlength=k * k).reshape(k, k).double()
    mapping = torch.full((k,), -1, dtype=torch.long)
    free = set(range(k))
    for idx in torch.argsort(overlap.flatten(), descending=True).tolist():
        src, dst = divmod(idx, k)
        if mapping[src] < 0 and dst in free:
            mapping[src] = dst
            free.discard(dst)
    return mapping[labels]


def kmeans_maps(maps: Sequence[torch.Tensor], k: int = 8, *, iters: int = 25, seed: int = 0,
                reference: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """K-means cluster index maps ``(gh, gw)`` with clusters fitted across all ``maps``; with ``reference``
    (other cluster maps of the same images) the labels are matched to those."""
    tokens = torch.cat([m.reshape(-1, m.shape[-1]) for m in maps])
    labels, _ = kmeans(tokens, k, iters=iters, seed=seed)
    if reference is not None:
        ref = torch.cat([torch.as_tensor(r).reshape(-1) for r in reference]).long()
        labels = _match_labels(labels, ref, max(k, int(ref.max()) + 1, int(labels.max()) + 1))
    out, start = [], 0
    for m in maps:
        n = m.shape[0] * m.shape[1]
        out.append(labels[start:start + n].reshape(m.shape[:2]).numpy())
        start += n
    return out


def norm_maps(maps: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """L2 norm of every token: ``(gh, gw)`` per map."""
    return [m.float().norm(dim=-1).numpy() for m in maps]


def _columns(rows: Sequence[PanelRow], config: PanelConfig) -> list[tuple[str, str, list]]:
    """``(title, kind, per-row data)`` for each column; kind is ``image``, ``rgb``, ``labels`` or ``heat``."""
    cols: list[tuple[str, str, list]] = []
    if any(r.image is not None for r in rows):
        cols.append(("image", "image", [None if r.image is None else r.image.permute(1, 2, 0).clamp(0, 1).numpy()
                                        for r in rows]))
    raw = [r.raw.float() for r in rows]
    raw_km = kmeans_maps(raw, config.clusters, iters=config.kmeans_iters, seed=config.seed)
    cols += [("raw PCA", "rgb", pca_rgb(raw)), ("raw K-means", "labels", raw_km),
             ("raw norm", "heat", norm_maps(raw))]
    if all(r.clean is not None for r in rows):
        clean = [r.clean.float() for r in rows]
        name = config.denoised_label
        cols += [(f"{name} PCA", "rgb", pca_rgb(clean, fit_on=raw)),  # the raw PCA's axes and colours
                 (f"{name} K-means", "labels", kmeans_maps(clean, config.clusters, iters=config.kmeans_iters,
                                                           seed=config.seed, reference=raw_km)),
                 (f"{name} norm", "heat", norm_maps(clean))]
        if all(r.clean_fine is not None for r in rows):
            factor = (rows[0].clean_fine.shape[0] - 1) // max(1, rows[0].clean.shape[0] - 1)
            cols.append((f"{name} PCA x{factor} grid", "rgb", pca_rgb([r.clean_fine.float() for r in rows], fit_on=raw)))
        if all(r.artifact is not None for r in rows):
            art = [r.artifact.float() for r in rows]
            cols += [("artifact G", "rgb", pca_rgb(art)),
                     ("residual |raw-clean-G|", "heat", norm_maps([a - c - g for a, c, g in zip(raw, clean, art)]))]
    return cols


def render_panels(rows: Sequence[PanelRow], path: str | Path, config: PanelConfig | None = None,
                  title: str | None = None) -> tuple[int, int]:
    """Draw ``rows`` as one PNG grid at ``path``; returns its ``(width, height)`` in pixels.

    The size is exact: ``width = columns * cell``, ``height = header + rows * cell`` (plus ``header`` again
    when ``title`` is given).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("render_panels: no rows to draw.")
    config = config or PanelConfig()
    cols = _columns(rows, config)
    cell, head, dpi = config.cell, config.header, config.dpi
    top = head * (2 if title else 1)
    width, height = len(cols) * cell, top + len(rows) * cell
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    if title:
        fig.text(0.5, 1 - (head / 2) / height, title, ha="center", va="center", fontsize=11, weight="bold")
    cmap_labels = plt.get_cmap("tab10" if config.clusters <= 10 else "tab20")
    for c, (name, kind, data) in enumerate(cols):
        fig.text((c + 0.5) * cell / width, 1 - (top - head / 2) / height, name, ha="center", va="center",
                 fontsize=8.5)
        if kind == "heat":  # one scale per column, so rows compare
            finite = np.concatenate([d.reshape(-1) for d in data if d is not None])
            vmin, vmax = float(np.percentile(finite, 1)), float(np.percentile(finite, 99.5))
        for r, d in enumerate(data):
            pad = 2
            ax = fig.add_axes(((c * cell + pad) / width, 1 - (top + (r + 1) * cell - pad) / height,
                               (cell - 2 * pad) / width, (cell - 2 * pad) / height))
            ax.set_axis_off()
            if d is None:
                continue
            if kind == "image":
                ax.imshow(d, interpolation="bilinear")
            elif kind == "rgb":
                ax.imshow(d, interpolation="nearest")
            elif kind == "labels":
                ax.imshow(d, cmap=cmap_labels, vmin=-0.5, vmax=cmap_labels.N - 0.5, interpolation="nearest")
            else:
                ax.imshow(d, cmap="inferno", vmin=vmin, vmax=max(vmax, vmin + 1e-8), interpolation="nearest")
            if c == 0 and rows[r].title:
                ax.text(0.02, 0.02, rows[r].title, transform=ax.transAxes, fontsize=7, color="white",
                        va="bottom", ha="left", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)
    _log.info("wrote %s (%d x %d px, %d rows, %d columns)", path, width, height, len(rows), len(cols))
    return width, height
