"""Feature stores of synthetic (raw, clean) pairs with a known, learnable relation, for tests and benchmarks.

``raw = clean + artifact(position)``: the clean maps are random smooth fields (a few low-frequency waves per
image, so neighbouring tokens agree as in real ViT features) and the artifact is one fixed pattern per grid
position, the same in every image, like the position-dependent noise DVT removes. A denoiser that learns
the artifact drives the validation error towards zero, so "validation loss falls" is a meaningful check
and takes seconds instead of a stage-1 run per image.
"""

from __future__ import annotations

import math

import numpy as np

from ..store import FeatureStore, StoreLayout

__all__ = ["synthetic_pairs", "write_synthetic_store"]


def synthetic_pairs(n: int, grid: tuple[int, int], channels: int, *, seed: int = 0,
                    artifact_scale: float = 1.0, mean_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(raw, clean)`` float32 arrays of shape ``(n, gh, gw, C)``; the artifact depends on ``grid`` only.

    As in stage 1's output, the artifact has zero mean over the grid and each clean map carries its image's
    mean feature vector (``N(0, mean_scale^2)`` per channel), which a denoiser must keep."""
    gh, gw = grid
    yy, xx = np.meshgrid(np.linspace(0, 1, gh), np.linspace(0, 1, gw), indexing="ij")
    art_rng = np.random.default_rng(12345)  # the artifact is the same for every seed: one "backbone"
    stripes = np.stack([np.sin(2 * math.pi * (f * yy + g * xx)) for f, g in art_rng.integers(-3, 4, (4, 2))], -1)
    artifact = artifact_scale * stripes @ art_rng.normal(size=(4, channels)) / 2
    artifact -= artifact.mean((0, 1))
    rng = np.random.default_rng(seed)
    clean = np.empty((n, gh, gw, channels), dtype=np.float32)
    for i in range(n):
        freq = rng.normal(size=(6, 2)) * 2
        phase = rng.uniform(0, 2 * math.pi, 6)
        waves = np.stack([np.cos(2 * math.pi * (f[0] * yy + f[1] * xx) + p) for f, p in zip(freq, phase)], -1)
        clean[i] = waves @ rng.normal(size=(6, channels)) / math.sqrt(6) + mean_scale * rng.normal(size=channels)
    return (clean + artifact).astype(np.float32), clean


def write_synthetic_store(url: str, n: int, *, grid: tuple[int, int] = (4, 4), channels: int = 64,
                          backbone: str = "synthetic", patch_size: int = 14, seed: int = 0, unit: int = 16,
                          dtype: str = "float16", overwrite: bool = True) -> FeatureStore:
    """Create a store of ``n`` synthetic pairs at ``url`` (every image ``ok``), written in units of ``unit``."""
    layout = StoreLayout(backbone=backbone, block=0, input_size=(grid[0] * patch_size, grid[1] * patch_size),
                         patch_size=patch_size, stride=patch_size, grid=grid, channels=channels, dtype=dtype,
                         method={"synthetic": True, "seed": seed})
    uris = [f"synthetic://{seed}/{i:07d}.png" for i in range(n)]
    store = FeatureStore.create(url, layout, uris, overwrite=overwrite)
    for start in range(0, n, unit):
        count = min(unit, n - start)
        raw, clean = synthetic_pairs(count, grid, channels, seed=seed * 1_000_003 + start)
        with store.unit() as writer:
            for j in range(count):
                writer.add({"image_id": start + j}, raw=raw[j], clean=clean[j])
    return store.refresh()
