"""Denoise an image corpus with stage 1 into a feature store (Ray Data; resumable)."""

from __future__ import annotations

import argparse
import sys

from pipeline.denoise.job import DenoiseConfig, run_denoise
from pipeline.runtime.failures import EXIT_SOME_FAILED
from pipeline.stage1.fit import PRESETS

from .flags import (DEFAULT_MODEL, add_amp_argument, add_images_argument, add_method_arguments, add_store_arguments,
                    add_worker_arguments, image_job_config)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    add_images_argument(io)
    io.add_argument("--output", default="outputs/denoised.zarr", help="feature store URL (path, file://, s3://)")
    add_store_arguments(io, changed="stage-1 configuration")
    io.add_argument("--no-artifact", dest="keep_artifact", action="store_false", help="do not store G")
    model = parser.add_argument_group("backbone")
    model.add_argument("--model", default=DEFAULT_MODEL, help="timm model name or package.module:factory")
    model.add_argument("--weights", default="hub", help="'hub' (timm pretrained), 'none' (random), or a local file")
    model.add_argument("--block", type=int, default=-1, help="transformer block to denoise (default: last)")
    model.add_argument("--stride", type=int, default=None, help="patch stride (default: the patch size)")
    model.add_argument("--input-size", type=int, default=518, help="images are resized to this square size")
    fit = parser.add_argument_group("stage 1")
    fit.add_argument("--preset", choices=sorted(PRESETS), default="default", help="stage-1 preset")
    fit.add_argument("--views", type=int, default=None, help="random views per image (overrides the preset)")
    fit.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides the preset)")
    fit.add_argument("--seed", type=int, default=0, help="seed for views and random draws")
    add_amp_argument(fit)
    add_method_arguments(parser)
    add_worker_arguments(parser, images_per_batch="images per store unit, fitted together (default: 4 on CPUs; on "
                                                  "GPUs units of 16, fitted in passes sized to the GPU's free memory)")


def run(args: argparse.Namespace) -> int:
    summary = run_denoise(image_job_config(DenoiseConfig, args))
    return EXIT_SOME_FAILED if summary.failed else 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
