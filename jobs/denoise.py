"""Denoise an image corpus with stage 1 into a feature store (Ray Data; resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.decode import DecodeConfig
from pipeline.denoise import DEFAULT_MODEL, DenoiseConfig, run_denoise
from pipeline.failures import EXIT_SOME_FAILED
from pipeline.stage1 import PRESETS

from .flags import add_dashboard_argument

SAMPLES = str(Path(__file__).resolve().parents[1] / "pipeline" / "samples")



def add_store_arguments(group: argparse._ArgumentGroup, *, changed: str) -> None:
    """Flags of every image-to-store job (``denoise``, ``apply``): which listed images to do and how to store them."""
    group.add_argument("--limit", type=int, default=None, help="only the first N images of the listing")
    group.add_argument("--overwrite", action="store_true", help="delete the store and redo every image")
    group.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                       help="skip images a previous run recorded as failed")
    group.add_argument("--allow-config-change", action="store_true", help=f"add to a store made with another {changed}")
    group.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="feature storage type")
    group.add_argument("--min-side", type=int, default=1,
                       help="refuse images with a shorter side (default: every image is used, stretched to the input)")
    group.add_argument("--max-aspect", type=float, default=None,
                       help="refuse images whose long/short side ratio is above this (default: no limit)")


def config_from_args(config_class: type, args: argparse.Namespace) -> object:
    """A job config from its flags: the dataclass fields, plus the decode limits."""
    fields = set(config_class.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    return config_class(**values, decode=DecodeConfig(min_side=args.min_side, max_aspect=args.max_aspect))


def add_worker_arguments(group: argparse._ArgumentGroup) -> None:
    """Resource flags of every image-to-store job: the actor pool, and Ray when the job starts its own."""
    group.add_argument("--workers", type=int, default=1, help="number of workers (actors)")
    group.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs")
    group.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 with a GPU, else a share")
    group.add_argument("--progress-every", dest="progress_every_s", type=float, default=30.0,
                       help="seconds between progress lines")
    add_dashboard_argument(group)


def add_amp_argument(group: argparse._ArgumentGroup) -> None:
    """``--amp``: autocast on the model (a GPU's bf16 units), for the jobs that run a backbone."""
    group.add_argument("--amp", choices=("bfloat16",), default=None,
                       help="autocast dtype for the model (default: fp32); bfloat16 runs several times faster on "
                            "GPUs at about 3 significant digits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    io.add_argument("--images", default=SAMPLES,
                    help="folder, glob, s3:// prefix, or .txt/.csv/.parquet list of image URIs (default: bundled samples)")
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
    run = parser.add_argument_group("resources")
    run.add_argument("--images-per-batch", type=int, default=None,
                     help="images per store unit, fitted together (default: 4 on CPUs; on GPUs units of 16, fitted "
                          "in passes sized to the GPU's free memory)")
    add_worker_arguments(run)


def run(args: argparse.Namespace) -> int:
    summary = run_denoise(config_from_args(DenoiseConfig, args))
    return EXIT_SOME_FAILED if summary.failed else 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
