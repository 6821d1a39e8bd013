"""Train the stage-2 denoiser on feature stores with Ray Train, and export it (resumable)."""

from __future__ import annotations

import argparse
import sys

from pipeline.stage2.train import MAX_STEPS, MIN_STEPS, PASSES, TrainConfig, run_training

from pipeline.runtime.ray_train import fixed_workers

from .flags import add_trainer_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--stores", nargs="+", required=True, help="feature store URLs made by `dvt denoise`")
    data.add_argument("--output", default="outputs/denoiser",
                      help="run folder (path or s3://): checkpoints in run/, the denoiser in denoiser.safetensors")
    data.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of images held out (by a hash of the file name)")
    data.add_argument("--model", dest="expect_backbone", default=None,
                      help="refuse stores of any other backbone (default: the backbone the stores name)")
    data.add_argument("--overwrite", action="store_true", help="delete the run folder instead of resuming from it")
    fit = parser.add_argument_group("training (defaults from the learning curves in benchmarks/learning_curves.py)")
    fit.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                     help="global batch: feature maps per step over all workers (each takes batch / workers)")
    fit.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: --base-lr * sqrt(batch / 256), the same on any --workers)")
    fit.add_argument("--base-lr", type=float, default=TrainConfig.base_lr, help="learning rate at a global batch of 256")
    fit.add_argument("--max-steps", type=int, default=None,
                     help=f"step budget (default: {PASSES} passes over the training images, between {MIN_STEPS} and "
                          f"{MAX_STEPS} steps)")
    fit.add_argument("--epochs", type=float, default=None, help="step budget in passes, instead of --max-steps")
    fit.add_argument("--eval-every", type=int, default=None,
                     help="steps between held-out checks and checkpoints (default: ~25 per run)")
    fit.add_argument("--patience", type=int, default=TrainConfig.patience,
                     help="stop after this many held-out checks without improvement (0: train to the budget)")
    fit.add_argument("--min-delta", type=float, default=TrainConfig.min_delta,
                     help="relative drop of the held-out loss that counts as an improvement")
    fit.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay")
    fit.add_argument("--warmup-fraction", type=float, default=TrainConfig.warmup_fraction, help="share of the budget with linear warm-up")
    fit.add_argument("--num-blocks", type=int, default=1, help="Transformer blocks of the denoiser")
    fit.add_argument("--seed", type=int, default=0, help="initialisation seed")
    add_trainer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    fixed_workers(args.workers)  # a MIN-MAX range: one line, before anything starts
    run_training(config_from_args(TrainConfig, args))
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
