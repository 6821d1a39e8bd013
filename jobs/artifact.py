"""Make a dataset-level artifact map (mean stage-1 G) from a `dvt denoise` store, for `dvt denoise --method bias`."""

from __future__ import annotations

import argparse
import sys

from pipeline.denoise.bias import from_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True,
                        help="a `dvt denoise` store (method dvt, with its artifact array), e.g. of a sample run "
                             "with --limit 64")
    parser.add_argument("--output", required=True, help="artifact file to write (.npz; path or URL)")
    parser.add_argument("--limit", type=int, default=None, help="average over the first N finished images only")


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    from_store(args.store, limit=args.limit).save(args.output)
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
