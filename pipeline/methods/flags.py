"""The ``dvt denoise`` flags that choose a method and its settings (fields of :class:`pipeline.denoise.DenoiseConfig`)."""

from __future__ import annotations

import argparse

from . import METHODS
from .average import AverageConfig

__all__ = ["add_method_arguments"]


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method (see README: which method when)")
    group.add_argument("--method", choices=METHODS, default="dvt",
                       help="dvt: stage 1 per image (default); average: shifted and flipped copies averaged; "
                            "bias: subtract a dataset-level artifact map (--artifact); denoiser: a trained "
                            "denoiser (--denoiser), as `dvt apply`")
    group.add_argument("--copies", type=int, default=AverageConfig.copies,
                       help=f"average: forward passes per image (default {AverageConfig.copies})")
    group.add_argument("--max-shift", type=float, default=AverageConfig.max_shift,
                       help=f"average: largest shift in patches (default {AverageConfig.max_shift:g})")
    group.add_argument("--artifact", default=None, help="bias: artifact file from `dvt artifact`")
    group.add_argument("--denoiser", default=None, help="denoiser: file from `dvt train`")
    group.add_argument("--compress", choices=("int8",), default=None,
                       help="keep features as int8 with per-image, per-channel scale and offset (about half the "
                            "bytes of float16; reads decode it). PCA: `dvt store convert`")
    group.add_argument("--upsample", type=int, choices=(1, 2, 4), default=1,
                       help="dvt: also store the clean field F on a grid 2 or 4 times finer (array clean_x2 or clean_x4)")
