"""A user's own backbone, built through ``--model tests.custom_backbone:create`` (see pipeline/vit/backbone.py)."""

import torch
from torch import nn

from pipeline.vit.backbone import load_state_dict


class TinyConvViT(nn.Module):
    patch_size = 8
    embed_dim = 12
    num_prefix_tokens = 0
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, self.embed_dim, self.patch_size, self.patch_size)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def write_custom_denoiser(folder: str, model: str = f"{__name__}:create") -> tuple[str, str]:
    """Seeded weights of this backbone (or another ``module:factory`` built on :class:`TinyConvViT`) and an
    untrained 32 px denoiser for it, saved in ``folder``: ``(weights file, denoiser file)``."""
    import os

    from pipeline.vit.backbone import create_backbone
    from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser

    torch.manual_seed(0)
    backbone = create_backbone(model, weights="none")
    weights = os.path.join(folder, "custom.pth")
    torch.save(backbone.model.state_dict(), weights)
    denoiser = Denoiser(DenoiserConfig(channels=12, pos_grid=(4, 4))).eval()
    spec = DenoiserSpec(denoiser=denoiser.config, backbone=model, block=backbone.block,
                        input_size=(32, 32), patch_size=8, stride=8)
    return weights, save_denoiser(os.path.join(folder, "denoiser.safetensors"), denoiser, spec)


def create(weights=None) -> TinyConvViT:
    model = TinyConvViT()
    if weights is not None:
        model.load_state_dict(load_state_dict(weights))  # a torch file, or a .safetensors such as `dvt distill`'s export
    return model
