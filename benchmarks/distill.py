"""Stage-3 benchmark: distillation images/s per Ray Train worker, for 1 and 2 workers (or ViT-S/B at 518 on GPU).

Each configuration is one real ``run_distillation`` on a local Ray: random-noise PNGs, a randomly initialised
stage-2 denoiser (the cost does not depend on its values), random backbone weights (no download). Rates are
taken from the trainers' own metrics after the first checkpoint interval, so Ray start-up, the data pipeline's
first blocks and the held-out measurements are left out; the first interval is shown separately.

    python benchmarks/distill.py                   # CPU: ViT-S/14 at 112 px, 1 and 2 workers (~5 min, 2 cores)
    python benchmarks/distill.py --gpu             # GPU: ViT-S/14 and ViT-B/14 at 518 px, bf16, 1 worker
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def write_denoiser(path: str, model: str, size: int) -> str:
    import torch

    from pipeline.vit.backbone import create_backbone
    from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser

    bb = create_backbone(model, weights="none", img_size=size)
    grid = bb.grid(size)
    torch.manual_seed(0)
    config = DenoiserConfig(channels=bb.embed_dim, pos_grid=grid)
    spec = DenoiserSpec(denoiser=config, backbone=model, block=bb.block, input_size=(size, size),
                        patch_size=bb.patch_size, stride=bb.stride)
    return save_denoiser(path, Denoiser(config), spec)


def run_one(args, tmp: Path, model: str, size: int, workers: int) -> dict:
    from pipeline.stage3.distill import DistillConfig, run_distillation

    images = tmp / f"images-{size}"
    if not images.exists():  # one epoch covers every step, for every worker count
        images.mkdir()
        write_images(images, args.steps * args.batch_size * max(args.workers) + 8, int(size * 1.25))
    denoiser = write_denoiser(str(tmp / f"{model}-{size}.safetensors"), model, size)
    every = max(1, args.steps // args.intervals)
    config = DistillConfig(images=str(images), denoiser=denoiser, output=str(tmp / f"run-{model}-{size}-{workers}"),
                           weights="none", max_steps=args.steps, batch_size=args.batch_size, workers=workers,
                           checkpoint_every=every, val_fraction=0.02, max_val_images=4, bf16=args.gpu,
                           grad_checkpointing=args.grad_checkpointing, use_gpu=args.gpu or None, cpus_per_worker=args.cpus_per_worker,
                           overwrite=True)
    began = time.monotonic()
    summary = run_distillation(config)
    wall = time.monotonic() - began
    steady = summary.history[1:] or summary.history
    return {"model": model, "size": size, "workers": workers, "wall": wall,
            "first": summary.history[0]["images_per_s_per_worker"],
            "per_worker": statistics.mean(h["images_per_s_per_worker"] for h in steady),
            "total": statistics.mean(h["images_per_s"] for h in steady),
            "wait": statistics.mean(h["data_wait_fraction"] for h in steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="ViT-S/14 and ViT-B/14 at 518 px, bf16, on GPUs")
    parser.add_argument("--models", nargs="+", default=None, help="timm names (default: by --gpu)")
    parser.add_argument("--size", type=int, default=None, help="input size (default: 112 CPU, 518 GPU)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default: 1 2 CPU, 1 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per worker and step (4 CPU, 32 GPU)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--intervals", type=int, default=3, help="checkpoint intervals per run (the first is warm-up)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs (and torch threads, rounded) per worker (default: 0.75 CPU, so one thread each)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    args.models = args.models or (["vit_small_patch14_dinov2", "vit_base_patch14_dinov2"] if args.gpu
                                  else ["vit_small_patch14_dinov2"])
    args.size = args.size or (518 if args.gpu else 112)
    args.workers = args.workers or ([1] if args.gpu else [1, 2])
    args.batch_size = args.batch_size or (32 if args.gpu else 4)
    args.cpus_per_worker = args.cpus_per_worker or (None if args.gpu else 0.75)
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for workers in args.workers:
                rows.append(run_one(args, Path(tmp), model, args.size, workers))
    ray.shutdown()
    device = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores)"
    print(f"\nDistillation throughput on {device}: batch {args.batch_size} per worker, {args.steps} steps, "
          f"{args.cpus_per_worker or 'default'} CPU per worker, random weights, {'bf16 ' if args.gpu else ''}teacher "
          "forward + student forward/backward + AdamW.\n")
    print("| model | size | workers | images/s per worker | images/s total | first interval, per worker "
          "| data wait | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['workers']} | {r['per_worker']:.2f} | {r['total']:.2f} | "
              f"{r['first']:.2f} | {r['wait']:.0%} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
