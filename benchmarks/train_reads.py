"""How fast one training worker reads its batches: rows/s of (raw, clean) pairs at the shapes users train, through
the trainers' own reader (:class:`pipeline.runtime.train_stream.RankBatches` over
:class:`pipeline.stage2.pairs.PairRows`), for several thread counts.

On a GPU a denoiser step is milliseconds, so the reads set the pace: a worker needs ``batch / step time`` rows/s
(at batch 32 and 20 ms a step, 1,600 rows/s, 7 GB/s of ViT-B/14 pairs at 518 px) or it waits. This measures what
one worker process gets from a store (S3 when ``--store s3://...``, e.g. the local moto server, else local disk).

    python benchmarks/train_reads.py --store s3://bench/pairs.zarr --images 96 --threads 1 4 8 16
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

import numpy as np  # noqa: E402

from pipeline.io.storage import filesystem  # noqa: E402
from pipeline.runtime.train_stream import RankBatches, permutation_order  # noqa: E402
from pipeline.stage2.pairs import PairRows  # noqa: E402
from pipeline.testing.synthetic_pairs import write_synthetic_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="synthetic pairs in the store")
    parser.add_argument("--grid", type=int, default=37, help="feature grid side (37: ViT/14 at 518)")
    parser.add_argument("--channels", type=int, default=768, help="feature channels (768: ViT-B)")
    parser.add_argument("--batch", type=int, default=32, help="rows per step of the worker")
    parser.add_argument("--steps", type=int, default=12, help="steps read per thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--store", default=None, help="store URL (default: a temporary local folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.TemporaryDirectory(prefix="dvt-bench-reads-")
    url = args.store or os.path.join(tmp.name, "pairs.zarr")
    started = time.perf_counter()
    write_synthetic_store(url, args.images, grid=(args.grid, args.grid), channels=args.channels, unit=16)
    row_mb = 2 * args.grid * args.grid * args.channels * 2 / 2 ** 20
    print(f"store {url}: {args.images} pairs of {args.grid}x{args.grid}x{args.channels} float16 ({row_mb:.1f} MiB a "
          f"pair) written in {time.perf_counter() - started:.1f} s; load {os.getloadavg()[0]:.1f}")
    pairs = PairRows([(url, np.arange(args.images))])
    print("\n| threads | rows/s | MiB/s | ms per step of", args.batch, "|\n|---|---|---|---|")
    for threads in args.threads:
        with RankBatches(permutation_order(len(pairs), 0), len(pairs), pairs.read, batch=args.batch, rank=0, world=1,
                         threads=threads) as batches:
            next(batches)  # stores opened, first reads in flight
            began = time.perf_counter()
            for _ in range(args.steps):
                batch = next(batches)
            spent = time.perf_counter() - began
        assert batch["raw"].shape == (args.batch, args.grid, args.grid, args.channels)
        rate = args.steps * args.batch / spent
        print(f"| {threads} | {rate:.0f} | {rate * row_mb:.0f} | {1000 * spent / args.steps:.0f} |")
    print(f"\nload {os.getloadavg()[0]:.1f}")
    if args.store:
        fs, root = filesystem(url)
        fs.rm(root, recursive=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
