"""Denoiser training throughput: samples/s for 1 and 2 Ray Train workers, and the share of step time spent
waiting for data (target: below 5%).

Writes a store of ``--images`` synthetic (raw, clean) pairs at a realistic size (default ViT-S: 37 x 37 x 384,
float16, 2.1 MiB per image for both arrays), then trains ``--epochs`` epochs with each worker count through
:func:`pipeline.train_denoiser.run_training` (Ray Data streaming from the store, DDP on gloo for CPUs) and
reports each run's last epoch (the first one also pays for starting the workers):

* samples/s: training images of the epoch over the slowest worker's epoch time;
* data wait: time blocked in the dataset iterator over the epoch time, summed over workers; shown in total and
  after the first batch (the wait for the first batch is the epoch's pipeline start-up, a fixed cost per epoch
  that large epochs amortise; the rest is stalls, which grow with the epoch).

    python benchmarks/train_denoiser.py --images 64 --epochs 2 --workers 1 2
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

from pipeline.synthetic_pairs import write_synthetic_store  # noqa: E402
from pipeline.train_denoiser import TrainConfig, run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic images in the store")
    parser.add_argument("--grid", type=int, default=37, help="feature grid side (37: ViT/14 at 518)")
    parser.add_argument("--channels", type=int, default=384, help="feature channels (384: ViT-S)")
    parser.add_argument("--batch-size", type=int, default=4, help="per worker")
    parser.add_argument("--epochs", type=int, default=2)
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
        began = time.perf_counter()
        s = run_training(TrainConfig(stores=[url], output=out, epochs=args.epochs, batch_size=args.batch_size,
                                     workers=workers, val_fraction=0.0, overwrite=True))
        last, first = s.history[-1], s.history[0]
        rows.append((workers, args.batch_size, last["steps"], last["samples_per_s"], last["data_wait_fraction"],
                     last["data_wait_fraction_after_first_batch"], last["first_batch_s"], first["data_wait_fraction"],
                     time.perf_counter() - began))
    print(f"\nDenoiser training, {args.grid}x{args.grid}x{args.channels} features, {args.images} images, "
          f"{os.cpu_count()} CPUs, torch threads per worker from its CPU share\n")
    print("| workers | batch/worker | steps/worker/epoch | samples/s | data wait | data wait after 1st batch "
          "| 1st batch s | data wait, 1st epoch | wall s, all epochs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w, b, steps, sps, wait, steady, first_s, wait0, wall in rows:
        print(f"| {w} | {b} | {steps} | {sps:.2f} | {100 * wait:.1f}% | {100 * steady:.1f}% | {first_s:.1f} "
              f"| {100 * wait0:.1f}% | {wall:.0f} |")
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
