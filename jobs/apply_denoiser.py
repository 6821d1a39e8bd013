"""Run backbone + trained denoiser over an image corpus into a feature store (Ray Data; resumable)."""

from __future__ import annotations

import argparse
import sys

from pipeline.stage2.apply import ApplyConfig, run_apply
from pipeline.runtime.failures import EXIT_SOME_FAILED

from .flags import add_amp_argument, add_images_argument, add_store_arguments, add_worker_arguments, image_job_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    io.add_argument("--denoiser", required=True, help="denoiser file from `dvt train` (path or URL)")
    add_images_argument(io)
    io.add_argument("--output", default="outputs/applied.zarr", help="feature store URL (path, file://, s3://)")
    add_store_arguments(io, changed="denoiser")
    io.add_argument("--no-raw", dest="keep_raw", action="store_false",
                    help="store only the denoised features, not the backbone's raw ones")
    model = parser.add_argument_group("backbone")
    model.add_argument("--model", default=None, help="expected backbone; refuses a denoiser trained for another")
    model.add_argument("--weights", default="hub", help="'hub' (timm pretrained), 'none' (random), or a local file")
    model.add_argument("--input-size", type=int, default=None, help="square input size (default: the training size)")
    add_amp_argument(model)
    add_worker_arguments(parser, images_per_batch="images per forward pass and store unit (default: 16 on CPUs; on "
                                                  "GPUs units of 64, in passes sized to the GPU's free memory)")


def run(args: argparse.Namespace) -> int:
    summary = run_apply(image_job_config(ApplyConfig, args))
    return EXIT_SOME_FAILED if summary.failed else 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
