"""A real timm ViT (random weights) with a strong, grid-like positional artifact, for testing DVT end to end.

Random-weight ViTs carry almost no positional artifact (positional energy ~0.02 on photos), so the method has
nothing to remove there. This module builds timm's ``vit_tiny_patch16_224`` architecture, seeded, and adds a
fixed pattern to the patch positions of its positional embedding: six plane waves with periods of 2 to 4
patches (stripes, diagonals and a checkerboard), each along a random channel direction, plus a random
per-position part, like a learned embedding. Its size is ``scale`` times the standard deviation of the patch
embedding's output. The attention blocks and the final norm then mix it with the content non-linearly, as in a
trained ViT, so the artifact in the last block's features is not simply additive.

At the default ``scale`` (0.38) the last-block features at 224 px have a positional energy
(:func:`pipeline.analysis.metrics.positional_energy`) of 0.32 on the five bundled photos and 0.39 on 16 random crops of
them, against 0.00-0.03 without the pattern. The scale trades artifact strength against how much of the features
it takes: removing a component that explains a share ``p`` of the variance leaves a token cosine to the raw
features of about ``sqrt(1 - p)`` (0.78 at ``p = 0.39``), whatever the method.

Factories for ``--model`` (each takes ``weights=None`` or a weights file, as every custom backbone does; the
same call gives the same weights in every process):

* ``pipeline.testing.artifact_vit:create``: 12 blocks, built for 224 px (14 x 14 grid), the chain benchmark's;
* ``pipeline.testing.artifact_vit:create_small``: 4 blocks at 128 px (8 x 8 grid), for tests;
* ``create_reference`` / ``create_small_reference``: the same weights without the pattern, what a denoised map
  should resemble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ..vit.backbone import load_state_dict

__all__ = ["ArtifactViTConfig", "ArtifactViT", "artifact_pattern", "create", "create_small", "create_reference",
           "create_small_reference"]

#: Grid frequencies (cycles per patch along y, x) of the pattern's waves: periods of 2, 3 and 4 patches.
WAVES = ((0.5, 0.0), (0.0, 0.5), (1 / 3, 1 / 3), (0.25, -0.25), (0.5, 0.5), (1 / 3, 0.0))


@dataclass(frozen=True)
class ArtifactViTConfig:
    """Which ViT and which artifact.

    Attributes:
        model: timm architecture (built with random weights).
        depth: transformer blocks (``None``: the architecture's own).
        img_size: size the positional embedding (and the pattern) is made for; other sizes interpolate it.
        scale: pattern size relative to the patch embedding's output standard deviation (0: no artifact).
        random_part: weight of the random per-position part against the waves.
        seed: weights and pattern.
    """

    model: str = "vit_tiny_patch16_224"
    depth: int | None = None
    img_size: int = 224
    scale: float = 0.38
    random_part: float = 0.5
    seed: int = 0


def artifact_pattern(grid: tuple[int, int], channels: int, *, random_part: float = 0.5, seed: int = 0) -> torch.Tensor:
    """The unit-variance pattern ``(gh, gw, C)``: :data:`WAVES` along random channel directions plus noise."""
    g = torch.Generator().manual_seed(seed + 1)
    yy, xx = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32),
                            indexing="ij")
    pattern = torch.zeros(*grid, channels)
    for fy, fx in WAVES:
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        direction = torch.randn(channels, generator=g)
        pattern += torch.cos(2 * math.pi * (fy * yy + fx * xx) + phase)[..., None] * direction
    pattern += random_part * torch.randn(*grid, channels, generator=g)
    return pattern / pattern.std()


class ArtifactViT(nn.Module):
    """The custom-backbone interface of :mod:`pipeline.vit.backbone` around a timm ViT: last block, final norm."""

    def __init__(self, config: ArtifactViTConfig = ArtifactViTConfig()):
        super().__init__()
        self.config = config
        kwargs = dict(num_classes=0, dynamic_img_size=True, img_size=config.img_size)
        if config.depth is not None:
            kwargs["depth"] = config.depth
        with torch.random.fork_rng(devices=[]):  # the same weights in every process, the caller's RNG untouched
            torch.manual_seed(config.seed)
            self.vit = timm.create_model(config.model, pretrained=False, **kwargs)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.embed_dim = int(self.vit.embed_dim)
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.mean, self.std = self.vit.pretrained_cfg["mean"], self.vit.pretrained_cfg["std"]
        if config.scale and not self.vit.pos_embed.is_meta:
            self._add_artifact()

    @torch.no_grad()
    def _add_artifact(self) -> None:
        grid = tuple(self.vit.patch_embed.grid_size)
        pattern = artifact_pattern(grid, self.embed_dim, random_part=self.config.random_part, seed=self.config.seed)
        # The patch embedding's output spread on a fixed, seeded input: what "strong" is measured against.
        probe = torch.randn(4, 3, self.config.img_size, self.config.img_size, generator=torch.Generator().manual_seed(7))
        spread = float(self.vit.patch_embed(probe).std())
        start = 0 if self.vit.no_embed_class else self.num_prefix_tokens
        self.vit.pos_embed[:, start:] += self.config.scale * spread * pattern.reshape(1, -1, self.embed_dim)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H / 16, W / 16, C)`` last-block tokens after the final norm, prefix tokens dropped."""
        (out,) = self.vit.forward_intermediates(x, indices=[len(self.vit.blocks) - 1], norm=True, output_fmt="NLC",
                                                intermediates_only=True)
        grid = self.vit.patch_embed.dynamic_feat_size(x.shape[-2:])
        return out.reshape(x.shape[0], *grid, -1)


def _build(config: ArtifactViTConfig, weights: str | None) -> ArtifactViT:
    model = ArtifactViT(config)
    if weights is not None:
        model.load_state_dict(load_state_dict(weights), strict=True)
    return model


def create(weights: str | None = None) -> ArtifactViT:
    """ViT-Ti/16 (12 blocks) at 224 px with the artifact: the chain benchmark's backbone."""
    return _build(ArtifactViTConfig(), weights)


def create_reference(weights: str | None = None) -> ArtifactViT:
    """:func:`create`'s weights without the artifact."""
    return _build(ArtifactViTConfig(scale=0.0), weights)


SMALL = ArtifactViTConfig(depth=4, img_size=128)


def create_small(weights: str | None = None) -> ArtifactViT:
    """A 4-block ViT-Ti/16 at 128 px (8 x 8 grid) with the artifact, for tests."""
    return _build(SMALL, weights)


def create_small_reference(weights: str | None = None) -> ArtifactViT:
    """:func:`create_small`'s weights without the artifact."""
    return _build(ArtifactViTConfig(depth=4, img_size=128, scale=0.0), weights)
