"""The DVT paper's artifact measure: how much any one feature channel tells about a token's grid position.

For one image's feature map ``f`` of ``H x W`` tokens and ``C`` channels (the paper, App. A.4)::

    MIC_x = max_c MIC(f_c, x),   MIC_y = max_c MIC(f_c, y),   score = (MIC_x + MIC_y) / 2

where ``x`` / ``y`` are the tokens' column / row indices and MIC uses ``n = H W`` samples with the grid
budget ``B = (HW) ** 0.6`` (:mod:`pipeline.eval.mic`). The report gives the mean over a set of images.
Features that carry a positional artifact score near 1 (one channel is a function of a coordinate);
position-free features score near the MIC of independent samples, which is not 0 at finite ``n``
(about 0.12 per channel for ``n = 37 x 37``, and the maximum over hundreds of channels is higher), so
compare sources on the same images and backbone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .mic import MineConfig, mic

__all__ = ["PositionMICConfig", "position_mic"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PositionMICConfig:
    """Settings of :func:`position_mic`.

    Attributes:
        mine: ApproxMaxMI parameters (``alpha = 0.6`` gives the paper's ``B = (HW) ** 0.6``).
        images: at most this many images (the first ones); ``None`` for all.
        channels: ``None`` for every channel (the paper's measure); an integer picks that many channels at
            random (seeded), a cheaper lower bound of the maximum, recorded in the result.
        seed: channel sampling.
        device: where ApproxMaxMI runs (``"cuda"`` is much faster for hundreds of channels).
    """

    mine: MineConfig = field(default_factory=MineConfig)
    images: int | None = 8
    channels: int | None = None
    seed: int = 0
    device: str = "cpu"


def position_mic(maps: torch.Tensor, config: PositionMICConfig | None = None) -> dict:
    """The paper's MIC measure of feature maps ``(N, H, W, C)``: mean over images of ``MIC_x``, ``MIC_y``
    and their mean, with per-image values and the channel that reached each maximum."""
    config = config or PositionMICConfig()
    maps = torch.as_tensor(maps)
    if maps.ndim != 4:
        raise ValueError(f"position_mic expects feature maps (N, H, W, C), got shape {tuple(maps.shape)}.")
    if config.images is not None:
        maps = maps[: config.images]
    n_img, h, w, c = maps.shape
    if n_img == 0 or h * w < 4:
        raise ValueError(f"position_mic needs at least one image of 4 tokens, got shape {tuple(maps.shape)}.")
    channels = torch.arange(c)
    if config.channels is not None and config.channels < c:
        picked = torch.randperm(c, generator=torch.Generator().manual_seed(config.seed))[: config.channels]
        channels = picked.sort().values
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    xs, ys = xs.reshape(-1).to(config.device), ys.reshape(-1).to(config.device)
    per_image = []
    t0 = time.perf_counter()
    for i in range(n_img):
        tokens = maps[i].reshape(h * w, c)[:, channels].T.double().to(config.device)
        if not torch.isfinite(tokens).all():
            raise ValueError(f"position_mic: image {i} has NaN or Inf features.")
        mx, my = mic(xs, tokens, config.mine).cpu(), mic(ys, tokens, config.mine).cpu()
        per_image.append({"mic_x": float(mx.max()), "mic_y": float(my.max()),
                          "channel_x": int(channels[int(mx.argmax())]), "channel_y": int(channels[int(my.argmax())])})
        _log.debug("image %d: MIC_x %.3f, MIC_y %.3f", i, per_image[-1]["mic_x"], per_image[-1]["mic_y"])
    mean_x = sum(p["mic_x"] for p in per_image) / n_img
    mean_y = sum(p["mic_y"] for p in per_image) / n_img
    return {"mic": (mean_x + mean_y) / 2, "mic_x": mean_x, "mic_y": mean_y, "images": n_img, "tokens": h * w,
            "channels": len(channels), "of_channels": c, "budget": config.mine.budget(h * w),
            "per_image": per_image, "seconds": round(time.perf_counter() - t0, 2)}
