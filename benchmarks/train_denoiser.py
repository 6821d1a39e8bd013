"""Denoiser training throughput: samples/s for 1 and 2 Ray Train workers, and the share of step time spent
waiting for data (target: below 5%).

Writes a store of ``--images`` synthetic (raw, clean) pairs at a realistic size (default ViT-S: 37 x 37 x 384,
float16, 2.1 MiB per image for both arrays), then trains ``--passes`` passes over them with each worker count
through :func:`pipeline.stage2.train.run_training` (each worker reads its slice of the run's data order, DDP on gloo for
CPUs) and reports over the whole run:

* samples/s: training images over the slowest worker's time, after the first held-out check (the first interval
  also pays for starting the workers and the stream);
* data wait: time blocked in the dataset iterator over the step time, summed over workers, in total and without
  the first batch (the stream's one start-up per run); a held-out check every pass.

    python benchmarks/train_denoiser.py --images 200 --passes 3 --workers 1 2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.testing.synthetic_pairs import write_synthetic_store  # noqa: E402
from pipeline.stage2.train import TrainConfig, run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="synthetic images in the store")
    parser.add_argument("--grid", type=int, default=37, help="feature grid side (37: ViT/14 at 518)")
    parser.add_argument("--channels", type=int, default=384, help="feature channels (384: ViT-S)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--passes", type=int, default=3, help="passes over the training images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--store", default=None, help="store URL (default: a temporary local folder)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    import ray

    tmp = tempfile.TemporaryDirectory(prefix="dvt-bench-train-")
    url = args.store or os.path.join(tmp.name, "pairs.zarr")
    started = time.perf_counter()
    write_synthetic_store(url, args.images, grid=(args.grid, args.grid), channels=args.channels, unit=8)
    print(f"store: {args.images} pairs of {args.grid}x{args.grid}x{args.channels} float16 in "
          f"{time.perf_counter() - started:.1f} s")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for workers in args.workers:
        out = os.path.join(tmp.name, f"run-{workers}")
        steps = args.passes * args.images // args.batch_size
        began = time.perf_counter()
        s = run_training(TrainConfig(stores=[url], output=out, max_steps=steps, eval_every=args.images // args.batch_size,
                                     batch_size=args.batch_size, workers=workers, val_fraction=0.05, patience=0,
                                     overwrite=True))
        h = s.history
        wait, spent, first = (sum(x["data_wait_s"] for x in h), sum(x["seconds"] for x in h), h[0]["first_batch_s"])
        later = h[1:] or h
        rate = sum(x["samples_per_s"] * x["seconds"] for x in later) / sum(x["seconds"] for x in later)
        rows.append((workers, args.batch_size, s.steps, rate, wait / spent, (wait - first) / (spent - first), first,
                     time.perf_counter() - began))
    print(f"\nDenoiser training, {args.grid}x{args.grid}x{args.channels} features, {args.images} images, "
          f"{args.passes} passes, {os.cpu_count()} CPUs, torch threads per worker from its CPU share\n")
    print("| workers | global batch | steps | samples/s | data wait | data wait after 1st batch | 1st batch s "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for w, b, steps, sps, wait, steady, first_s, wall in rows:
        print(f"| {w} | {b} | {steps} | {sps:.2f} | {100 * wait:.1f}% | {100 * steady:.1f}% | {first_s:.1f} | {wall:.0f} |")
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
