"""Distil a stage-2 denoiser into its ViT on an image corpus (Ray Train; resumable), export a timm checkpoint."""

from __future__ import annotations

import argparse
import sys

from pipeline.stage3.distill import DistillConfig, run_distillation

from pipeline.runtime.ray_train import fixed_workers

from .flags import add_images_argument, add_trainer_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    add_images_argument(io, keep_columns=False)
    io.add_argument("--denoiser", required=True, help="stage-2 denoiser file (written by `dvt train`)")
    io.add_argument("--output", default="outputs/distill",
                    help="run folder (path or s3://): checkpoints under run/, student.safetensors on top")
    io.add_argument("--limit", type=int, default=None, help="only the first N images of the listing")
    io.add_argument("--overwrite", action="store_true", help="delete the run folder and start again")
    io.add_argument("--val-fraction", type=float, default=0.05,
                    help="images with sha1(file name) below this fraction may be held out (the stage-2 rule)")
    io.add_argument("--max-val-images", type=int, default=256, help="held-out images measured (smallest hashes)")
    model = parser.add_argument_group("models")
    model.add_argument("--weights", default="hub",
                       help="backbone weights the denoiser was trained on: 'hub', 'none' or a local file")
    model.add_argument("--input-size", type=int, default=None, help="training size (default: the denoiser's)")
    model.add_argument("--train-blocks", default="all",
                       help="'all', 'last:N' (the N blocks ending at the distilled block) or 'i,j,k'")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead")
    opt.add_argument("--batch-size", type=int, default=8,
                     help="global batch: images per step over all workers (each takes batch / workers)")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak rate (default: --base-lr * sqrt(batch / 256), the same on any --workers)")
    opt.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay")
    opt.add_argument("--warmup-fraction", type=float, default=0.15, help="share of the steps spent warming up")
    opt.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    opt.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU only)")
    opt.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of the student")
    opt.add_argument("--checkpoint-every", type=int, default=None,
                     help="steps between checkpoints and held-out measurements (default: each epoch, at most 1000)")
    opt.add_argument("--seed", type=int, default=0, help="initialisation, flip and shuffle seed")
    add_trainer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    fixed_workers(args.workers)  # a MIN-MAX range: one line, before anything starts
    run_distillation(config_from_args(DistillConfig, args))
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
