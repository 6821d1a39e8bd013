"""A synthetic ViT with a known decomposition, so stage 1 can be scored against the truth.

On any view, :class:`SyntheticBackbone` returns, for each patch token:

* a **clean** term that depends only on image content at the token's global place: ``phi`` (a fixed random
  nonlinear map) of the colour at the patch centre (``content="point"``: on smooth images a view's
  resampling does not change it, so every view agrees with the full image exactly, as DVT's model
  assumes), or of the patch's mean colour (``content="patch"``: a patch of a zoomed-in view averages a
  smaller piece of the image, so its content changes with the crop scale, as in a real ViT, and no ``F`` is
  perfectly consistent across views);
* an **artifact** that depends only on the token's position in the view grid: grid-like stripes and
  checkerboards (``artifact="grid"``), or a random, smooth-plus-rough map with a non-zero mean, like a
  learned positional embedding leaking through (``artifact="learned"``);
* **noise**: pseudo-random in the view's pixels (hashed), so it changes from view to view yet is a pure
  function of the input, whatever the batch composition;
* sparse **outliers**, large vectors added to a few tokens: picked by the noise hash (``outliers="random"``),
  or tied to content (``outliers="content"``): low-information, flat patches of certain colours, so they
  recur at the same global places across views, like DINOv2's high-norm background tokens.

The truth follows stage 1's gauge (:mod:`pipeline.stage1.noise_model`): the artifact has zero mean over the view
grid, so its mean belongs to the clean map. :meth:`SyntheticBackbone.clean_map` is that clean map on the
full-image grid and :meth:`SyntheticBackbone.artifact_map` the zero-mean artifact. :func:`clean_scores`
compares a clean estimate with it directly (uncentred error, token cosine, mean-vector norms) as well as
after removing means; :data:`FAMILIES` names the problems stage 1 is benchmarked and tested on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..vit.views import grid_shape

__all__ = ["SyntheticConfig", "SyntheticBackbone", "SyntheticFamily", "FAMILIES", "smooth_images", "photo_images",
           "make_problem", "recovery_error", "clean_scores"]

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape and strength of each term (strengths are relative to the clean term's typical size, ~1).

    Attributes:
        content: ``"point"`` (colour at the patch centre) or ``"patch"`` (the patch's mean colour).
        artifact: ``"grid"`` (stripes and checkerboards) or ``"learned"`` (random map with a non-zero mean).
        artifact_mean: for ``"learned"``, the norm of the artifact's mean vector per unit of
            ``artifact_strength * sqrt(embed_dim)``.
        outliers: ``"random"`` (hashed tokens, ``outlier_prob`` of them) or ``"content"`` (flat patches
            whose colour falls in narrow bands, at most ``2 * outlier_prob`` of a view's tokens).
    """

    embed_dim: int = 32
    patch_size: int = 16
    stride: int | None = None
    content: str = "point"
    artifact: str = "grid"
    artifact_strength: float = 0.7
    artifact_mean: float = 1.0
    noise_std: float = 0.1
    outliers: str = "random"
    outlier_prob: float = 0.0
    outlier_norm: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (("content", self.content, ("point", "patch")),
                                     ("artifact", self.artifact, ("grid", "learned")),
                                     ("outliers", self.outliers, ("random", "content"))):
            if value not in allowed:
                raise ValueError(f"SyntheticConfig.{name} must be one of {allowed}, got {value!r}.")


class SyntheticBackbone(nn.Module):
    """Drop-in for :class:`pipeline.vit.backbone.Backbone` (``features``, ``patch_size``, ``stride``,
    ``embed_dim``, ``grid``) whose output is clean + artifact + noise + outliers, each known."""

    def __init__(self, config: SyntheticConfig | None = None, **overrides):
        super().__init__()
        config = replace(config or SyntheticConfig(), **overrides)
        self.config = config
        self.patch_size = config.patch_size
        self.stride = config.stride or config.patch_size
        self.embed_dim = c = config.embed_dim
        g = torch.Generator().manual_seed(config.seed)
        # clean: phi(colour) = sin(A colour + b) mixed by M, a smooth nonlinear map
        self.register_buffer("phi_a", torch.randn(3, 2 * c, generator=g) * 3.0)
        self.register_buffer("phi_b", torch.rand(2 * c, generator=g) * 2 * math.pi)
        self.register_buffer("phi_m", torch.randn(2 * c, c, generator=g) / math.sqrt(c))
        # grid artifact: random channel mixes of grid-like patterns over the patch index (i, j)
        freqs = torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.5, 0.5], [0.25, 0.0], [0.0, 0.25], [1 / 3, 1 / 3],
                              [0.04, 0.0], [0.0, 0.04], [0.125, 0.25]])
        self.register_buffer("art_freq", freqs)
        self.register_buffer("art_phase", torch.rand(len(freqs), generator=g) * 2 * math.pi)
        self.register_buffer("art_mix", torch.randn(len(freqs), c, generator=g))
        # noise hash weights and the outlier direction
        self.register_buffer("hash_w", torch.randn(6, c + 1, generator=g) * 1e3)
        self.register_buffer("hash_b", torch.rand(c + 1, generator=g) * 1e3)
        direction = torch.randn(c, generator=g)
        self.register_buffer("outlier_dir", direction / direction.norm())
        # learned artifact: a mean vector and a seed for the per-position draws; content-outlier colour band
        self.register_buffer("art_offset", torch.randn(c, generator=g) * config.artifact_mean)
        self.learned_seed = int(torch.randint(2**31, (1,), generator=g))
        self.register_buffer("band_w", torch.randn(3, generator=g) * 8.0)

    def grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        return grid_shape(size, self.patch_size, self.stride)

    def _centres(self, pixels: torch.Tensor) -> torch.Tensor:
        """Colour at each patch centre, bilinear: ``(B, gh, gw, 3)``."""
        b, _, h, w = pixels.shape
        gh, gw = self.grid((h, w))
        xs = (torch.arange(gw, device=pixels.device) * self.stride + self.patch_size / 2) / w
        ys = (torch.arange(gh, device=pixels.device) * self.stride + self.patch_size / 2) / h
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1) * 2 - 1  # (gh, gw, 2)
        out = F.grid_sample(pixels.float(), grid[None].expand(b, -1, -1, -1), mode="bilinear",
                            padding_mode="border", align_corners=False)
        return out.permute(0, 2, 3, 1)

    def _patch_stats(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean colour and per-channel standard deviation of each patch: two ``(B, gh, gw, 3)``."""
        x = pixels.float()
        mean = F.avg_pool2d(x, self.patch_size, self.stride)
        var = (F.avg_pool2d(x * x, self.patch_size, self.stride) - mean * mean).clamp_min(0)
        return mean.permute(0, 2, 3, 1), var.sqrt().permute(0, 2, 3, 1)

    def clean(self, pixels: torch.Tensor) -> torch.Tensor:
        """The clean term ``(B, gh, gw, C)`` of each input (without the artifact's mean)."""
        colour = self._centres(pixels) if self.config.content == "point" else self._patch_stats(pixels)[0]
        return torch.sin(colour @ self.phi_a + self.phi_b) @ self.phi_m

    def artifact(self, gh: int, gw: int) -> torch.Tensor:
        """The fixed position-only artifact ``(gh, gw, C)``, mean included."""
        c = self.config
        if c.artifact == "grid":
            i = torch.arange(gh, device=self.art_freq.device, dtype=torch.float32)
            j = torch.arange(gw, device=self.art_freq.device, dtype=torch.float32)
            ii, jj = torch.meshgrid(i, j, indexing="ij")
            arg = 2 * math.pi * (ii[..., None] * self.art_freq[:, 0] + jj[..., None] * self.art_freq[:, 1])
            pattern = torch.cos(arg + self.art_phase)  # (gh, gw, K)
            return c.artifact_strength * (pattern @ self.art_mix / math.sqrt(len(self.art_freq)))
        # learned: half smooth (a few cells per side, upsampled), half rough (per position), plus the mean
        g = torch.Generator().manual_seed(self.learned_seed + 1009 * gh + gw)
        coarse = torch.randn(1, self.embed_dim, max(2, gh // 4), max(2, gw // 4), generator=g)
        smooth = F.interpolate(coarse, size=(gh, gw), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        rough = torch.randn(gh, gw, self.embed_dim, generator=g)
        field = (smooth / smooth.std() + rough) / math.sqrt(2)
        return c.artifact_strength * (field.to(self.art_offset.device) + self.art_offset)

    def artifact_map(self, gh: int, gw: int) -> torch.Tensor:
        """The artifact in stage 1's gauge (zero mean over the grid): what ``G`` should recover."""
        art = self.artifact(gh, gw)
        return art - art.mean((0, 1))

    def clean_map(self, images: torch.Tensor) -> torch.Tensor:
        """True clean map of full images on their patch grid in stage 1's gauge: ``(B, gh, gw, C)``, the
        clean term plus the artifact's mean (no method can tell a constant artifact from content)."""
        gh, gw = self.grid(tuple(images.shape[-2:]))
        return self.clean(images) + self.artifact(gh, gw).mean((0, 1))

    def _hash(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-token uniforms in ``[0, 1)``, ``(B, gh, gw, C + 1)``, a pure function of the patch pixels."""
        x = pixels.float()
        stats = torch.cat([F.avg_pool2d(x, self.patch_size, self.stride),
                           F.avg_pool2d(x * x, self.patch_size, self.stride)], 1).permute(0, 2, 3, 1)
        # fp64 keeps the hash stable: tiny colour changes from view to view give unrelated draws
        arg = stats.double() @ self.hash_w.double() + self.hash_b.double()
        return torch.frac(torch.sin(arg) * 43758.5453).abs().float()

    def _outliers(self, pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.outliers == "random" or c.outlier_prob <= 0:
            return u[..., -1] < c.outlier_prob
        # content: flat patches whose colour falls in narrow bands, a continuous score of the content at the
        # token's place (so the same places recur in every view that shows them), at most 2 * outlier_prob of
        # a view's tokens (the highest scores), so a large flat region does not turn wholly into outliers
        mean, std = self._patch_stats(pixels)
        score = (0.5 + 0.5 * torch.cos(mean @ self.band_w)) * (1 - std.mean(-1) / 0.05).clamp_min(0)
        flat = score.flatten(1)
        k = max(1, round(2 * c.outlier_prob * flat.shape[1]))
        kth = flat.topk(k, dim=1).values[:, -1:]
        return ((flat > 0.8) & (flat >= kth)).view_as(score)

    def parts(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of :meth:`features` separately: clean, artifact, noise, outlier (bool mask)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}.")
        gh, gw = self.grid(tuple(pixels.shape[-2:]))
        u = self._hash(pixels)
        # two uniforms per channel -> Gaussian (Box-Muller with a rolled copy as the second uniform)
        u1, u2 = u[..., :-1].clamp_min(1e-7), torch.roll(u[..., :-1], 1, -1)
        noise = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2) * self.config.noise_std
        return dict(clean=self.clean(pixels), artifact=self.artifact(gh, gw).expand(pixels.shape[0], -1, -1, -1),
                    noise=noise, outlier=self._outliers(pixels, u))

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.parts(pixels)
        out = p["clean"] + p["artifact"] + p["noise"]
        return out + p["outlier"][..., None] * (self.config.outlier_norm * self.outlier_dir)

    forward = features


def smooth_images(n: int, size: int, *, seed: int = 0, waves: int = 6, max_freq: float = 2.0) -> torch.Tensor:
    """``(n, 3, size, size)`` images in ``[0, 1]``: sums of a few low-frequency waves, so bilinear
    resampling preserves their colour at any point to high accuracy."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(t, t, indexing="ij")
    freq = (torch.rand(n, 3, waves, 2, generator=g) * 2 - 1) * max_freq
    phase = torch.rand(n, 3, waves, generator=g) * 2 * math.pi
    amp = torch.rand(n, 3, waves, generator=g) / waves
    arg = 2 * math.pi * (freq[..., 0, None, None] * x + freq[..., 1, None, None] * y) + phase[..., None, None]
    img = 0.5 + (amp[..., None, None] * torch.sin(arg)).sum(2)
    return img.clamp(0, 1)


def photo_images(n: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` square crops (half to all of the shorter side) of the bundled photographs,
    resized with an antialiased bicubic; image ``i`` cycles through the photos, the crop drawn from ``seed``."""
    from PIL import Image

    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            im = im.convert("RGB")
            side = int(min(im.size) * rng.uniform(0.5, 1.0))
            x0, y0 = rng.integers(0, im.size[0] - side + 1), rng.integers(0, im.size[1] - side + 1)
            crop = im.crop((int(x0), int(y0), int(x0) + side, int(y0) + side))
            crop = crop.resize((size, size), Image.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out).contiguous()


@dataclass(frozen=True)
class SyntheticFamily:
    """A named synthetic problem: which images, and how the backbone builds its features."""

    name: str
    description: str
    images: str  # "smooth" or "photos"
    config: SyntheticConfig


FAMILIES: dict[str, SyntheticFamily] = {f.name: f for f in [
    SyntheticFamily("smooth", "smooth images, colour at the patch centre, grid artifact, noise 0.05", "smooth",
                    SyntheticConfig(noise_std=0.05)),
    SyntheticFamily("photo", "photographs, patch mean colour (content changes with the crop scale)",
                    "photos", SyntheticConfig(content="patch", noise_std=0.05)),
    SyntheticFamily("outliers", "photographs with high-norm tokens on flat patches (recur across views)",
                    "photos", SyntheticConfig(content="patch", noise_std=0.05, outliers="content",
                                              outlier_prob=0.03, outlier_norm=4.0)),
    SyntheticFamily("learned", "photographs, random learned-embedding-like artifact with a non-zero mean",
                    "photos", SyntheticConfig(content="patch", artifact="learned", noise_std=0.05)),
    SyntheticFamily("noise-0.02", "photographs, grid artifact, noise 0.02", "photos",
                    SyntheticConfig(content="patch", noise_std=0.02)),
    SyntheticFamily("noise-0.1", "photographs, grid artifact, noise 0.1", "photos",
                    SyntheticConfig(content="patch", noise_std=0.1)),
]}


def make_problem(family: str, n: int, size: int, *, embed_dim: int = 64, patch_size: int = 16,
                 seed: int = 0) -> tuple[SyntheticBackbone, torch.Tensor]:
    """The backbone and ``n`` images of a named family (see :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise KeyError(f"Unknown synthetic family {family!r}; choose one of {sorted(FAMILIES)}.")
    fam = FAMILIES[family]
    config = fam.config
    if config.outlier_prob > 0:  # high-norm tokens: several times a typical token's norm (~sqrt(C)), as in DINOv2
        config = replace(config, outlier_norm=config.outlier_norm * math.sqrt(embed_dim))
    backbone = SyntheticBackbone(config, embed_dim=embed_dim, patch_size=patch_size, seed=seed)
    images = smooth_images(n, size, seed=seed) if fam.images == "smooth" else photo_images(n, size, seed=seed)
    return backbone, images


def recovery_error(pred: torch.Tensor, true: torch.Tensor) -> float:
    """``||(pred - mean) - (true - mean)|| / ||true - mean||`` with each channel's spatial mean removed.

    Both are ``(..., gh, gw, C)``; a batch is scored as one pooled ratio. Blind to a lost mean: use
    :func:`clean_scores` to judge a clean map.
    """
    if pred.shape != true.shape:
        raise ValueError(f"recovery_error: shapes differ, {tuple(pred.shape)} vs {tuple(true.shape)}.")
    p = pred.float() - pred.float().mean((-3, -2), keepdim=True)
    t = true.float() - true.float().mean((-3, -2), keepdim=True)
    return float((p - t).norm() / t.norm().clamp_min(1e-12))


def clean_scores(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """How well ``pred`` matches ``true``, both ``(B, gh, gw, C)``, judged as users use a clean map.

    * ``centred``: :func:`recovery_error` (channel means removed from both);
    * ``uncentred``: ``||pred - true|| / ||true - mean||``, means kept, on the same scale as ``centred``;
    * ``cosine``: mean cosine between ``pred`` and ``true`` token vectors;
    * ``mean_norm_ratio``: mean over images of ``|mean token of pred| / |mean token of true|`` (1 is right).
    """
    if pred.shape != true.shape or pred.ndim != 4:
        raise ValueError(f"clean_scores: expected two (B, gh, gw, C) maps, got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}.")
    p, t = pred.float(), true.float()
    centred = t - t.mean((1, 2), keepdim=True)
    ratio = p.mean((1, 2)).norm(dim=-1) / t.mean((1, 2)).norm(dim=-1).clamp_min(1e-12)
    return dict(centred=recovery_error(p, t), uncentred=float((p - t).norm() / centred.norm().clamp_min(1e-12)),
                cosine=float(F.cosine_similarity(p, t, dim=-1).mean()), mean_norm_ratio=float(ratio.mean()))
