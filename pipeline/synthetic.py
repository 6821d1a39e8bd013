"""A synthetic ViT with a known decomposition, so stage 1 can be scored against the truth.

On any view, :class:`SyntheticBackbone` returns, for each patch token:

* a **clean** term ``phi(image colour at the token's patch centre)``: a fixed random nonlinear map of the
  colour, so it depends only on image content at the token's global position. On smooth images (see
  :func:`smooth_images`) a view's bilinear resampling does not change that colour, so the clean term of a
  view equals the clean map of the image at the same global point, as DVT's model assumes;
* a fixed **artifact** that depends only on the token's position in the view grid (grid-like stripes and
  checkerboards plus a smooth ramp, like a positional-embedding leak);
* **noise**: pseudo-random in the view's pixels (hashed), so it changes from view to view yet is a pure
  function of the input, whatever the batch composition;
* sparse **outliers**: a few tokens (picked by the same hash) get a large vector added, the high-norm
  tokens DVT's residual term ``h`` is meant to capture.

:meth:`SyntheticBackbone.clean_map` gives the true clean map on the full-image grid, and
:func:`recovery_error` the score (relative error after removing each channel's mean, since ``F`` and ``G``
can trade a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .views import grid_shape

__all__ = ["SyntheticConfig", "SyntheticBackbone", "smooth_images", "recovery_error"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape and strength of each term (strengths are relative to the clean term's typical size, ~1)."""

    embed_dim: int = 32
    patch_size: int = 16
    stride: int | None = None
    artifact_strength: float = 0.7
    noise_std: float = 0.1
    outlier_prob: float = 0.0
    outlier_norm: float = 8.0
    seed: int = 0


class SyntheticBackbone(nn.Module):
    """Drop-in for :class:`pipeline.backbone.Backbone` (``features``, ``patch_size``, ``stride``,
    ``embed_dim``, ``grid``) whose output is clean + artifact + noise + outliers, each known."""

    def __init__(self, config: SyntheticConfig | None = None, **overrides):
        super().__init__()
        config = config or SyntheticConfig()
        if overrides:
            config = SyntheticConfig(**{**config.__dict__, **overrides})
        self.config = config
        self.patch_size = config.patch_size
        self.stride = config.stride or config.patch_size
        self.embed_dim = c = config.embed_dim
        g = torch.Generator().manual_seed(config.seed)
        # clean: phi(rgb) = sin(A rgb + b) mixed by M, a smooth nonlinear colour -> feature map
        self.register_buffer("phi_a", torch.randn(3, 2 * c, generator=g) * 3.0)
        self.register_buffer("phi_b", torch.rand(2 * c, generator=g) * 2 * math.pi)
        self.register_buffer("phi_m", torch.randn(2 * c, c, generator=g) / math.sqrt(c))
        # artifact: random channel mixes of grid-like patterns over the patch index (i, j)
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

    def clean(self, pixels: torch.Tensor) -> torch.Tensor:
        """The clean term ``(B, gh, gw, C)`` of each input."""
        return torch.sin(self._centres(pixels) @ self.phi_a + self.phi_b) @ self.phi_m

    def clean_map(self, images: torch.Tensor) -> torch.Tensor:
        """True clean map of full images on their patch grid: ``(B, gh, gw, C)``."""
        return self.clean(images)

    def artifact(self, gh: int, gw: int) -> torch.Tensor:
        """The fixed position-only artifact ``(gh, gw, C)``."""
        i = torch.arange(gh, device=self.art_freq.device, dtype=torch.float32)
        j = torch.arange(gw, device=self.art_freq.device, dtype=torch.float32)
        ii, jj = torch.meshgrid(i, j, indexing="ij")
        arg = 2 * math.pi * (ii[..., None] * self.art_freq[:, 0] + jj[..., None] * self.art_freq[:, 1])
        pattern = torch.cos(arg + self.art_phase)  # (gh, gw, K)
        art = pattern @ self.art_mix / math.sqrt(len(self.art_freq))
        return self.config.artifact_strength * art

    def _hash(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-token uniforms in ``[0, 1)``, ``(B, gh, gw, C + 1)``, a pure function of the patch pixels."""
        x = pixels.float()
        stats = torch.cat([F.avg_pool2d(x, self.patch_size, self.stride),
                           F.avg_pool2d(x * x, self.patch_size, self.stride)], 1).permute(0, 2, 3, 1)
        # fp64 keeps the hash stable: tiny colour changes from view to view give unrelated draws
        arg = stats.double() @ self.hash_w.double() + self.hash_b.double()
        return torch.frac(torch.sin(arg) * 43758.5453).abs().float()

    def parts(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of :meth:`features` separately: clean, artifact, noise, outlier (bool mask)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}.")
        gh, gw = self.grid(tuple(pixels.shape[-2:]))
        u = self._hash(pixels)
        # two uniforms per channel -> Gaussian (Box-Muller with a rolled copy as the second uniform)
        u1, u2 = u[..., :-1].clamp_min(1e-7), torch.roll(u[..., :-1], 1, -1)
        noise = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2) * self.config.noise_std
        outlier = u[..., -1] < self.config.outlier_prob
        return dict(clean=self.clean(pixels), artifact=self.artifact(gh, gw).expand(pixels.shape[0], -1, -1, -1),
                    noise=noise, outlier=outlier)

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


def recovery_error(pred: torch.Tensor, true: torch.Tensor) -> float:
    """``||(pred - mean) - (true - mean)|| / ||true - mean||`` with each channel's spatial mean removed.

    Both are ``(..., gh, gw, C)``; a batch is scored as one pooled ratio.
    """
    if pred.shape != true.shape:
        raise ValueError(f"recovery_error: shapes differ, {tuple(pred.shape)} vs {tuple(true.shape)}.")
    p = pred.float() - pred.float().mean((-3, -2), keepdim=True)
    t = true.float() - true.float().mean((-3, -2), keepdim=True)
    return float((p - t).norm() / t.norm().clamp_min(1e-12))
