"""A backbone whose process dies (as on a GPU fault or an OOM kill) the first time it runs.

Built with ``--model tests.faulty_backbone:create --weights MARKER``: the first process to run it creates
the file MARKER and exits at once; every later run (a restarted actor) works normally.
"""

import os
import time
from pathlib import Path

from pipeline.vit.backbone import load_state_dict
from tests.custom_backbone import TinyConvViT


class DiesOnceViT(TinyConvViT):
    def __init__(self, marker: str | None):
        super().__init__()
        self.marker = Path(marker) if marker else None

    def patch_features(self, x):
        if self.marker is not None and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().patch_features(x)


def create(weights=None) -> DiesOnceViT:
    return DiesOnceViT(weights)  # without a marker (weights none) it never dies


def broken(weights=None) -> TinyConvViT:
    """Builds on the driver (``weights=None``: metadata only) but not in a worker, as when a GPU has no memory left."""
    if weights is not None:
        raise RuntimeError(f"CUDA out of memory while loading {weights} (simulated)")
    return TinyConvViT()


class SlowViT(TinyConvViT):
    """Every forward pass takes at least ``seconds``: a job's images finish one by one, seconds apart, so a test
    can act between two of them without racing the clock."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def patch_features(self, x):
        time.sleep(self.seconds)
        return super().patch_features(x)


def slow(weights=None) -> SlowViT:
    return SlowViT(2.0)


def paced(weights=None) -> SlowViT:
    """:class:`SlowViT` at 0.5 s per pass with the weights of a file, so every process computes the same
    features (``tests.custom_backbone.write_custom_denoiser(folder, "tests.faulty_backbone:paced")``)."""
    model = SlowViT(0.5)
    if weights is not None:
        model.load_state_dict(load_state_dict(weights))
    return model
