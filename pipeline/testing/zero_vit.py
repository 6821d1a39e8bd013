"""A backbone that costs (almost) nothing but has ViT-B/14's shapes, to measure the machinery around the model.

``--model pipeline.testing.zero_vit:create``: patch 14, 768 channels, so 37x37 features at 518 px, like
DINOv2 ViT-B/14, for almost no compute per image. Each patch's features are one of its pixels' grey level
repeated over the channels (finite, image-dependent), so stores, checks and readers see real data while a
benchmark times fetching, decoding, resizing, uploading and writing, not the network
(``benchmarks/feed.py``, the ``feed_job`` part of ``benchmarks/device_check.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.vit.backbone import load_state_dict

__all__ = ["ZeroCostViT", "create"]


class ZeroCostViT(nn.Module):
    patch_size = 14
    embed_dim = 768
    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        # One parameter, so device and dtype moves and weight files behave as with any backbone.
        self.scale = nn.Parameter(torch.ones(()))

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch_size
        cells = x[:, :, : h // p * p : p, : w // p * p : p].mean(1) * self.scale  # (B, gh, gw): one pixel per patch
        return cells[..., None].expand(b, h // p, w // p, self.embed_dim)


def create(weights: str | None = None) -> ZeroCostViT:
    model = ZeroCostViT()
    if weights is not None:
        model.load_state_dict(load_state_dict(weights))
    return model
