"""Inspect and maintain feature stores: counts, failures, attributes and size on storage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from pipeline.store import FeatureStore, StoreError, StoreLease

_log = logging.getLogger("dvt.store")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    info = sub.add_parser("info", help="counts ok/failed/pending, failure reasons, attributes, arrays, size")
    info.add_argument("url", help="store URL: local path, file://, s3://, memory://")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.add_argument("--no-size", dest="size", action="store_false",
                      help="skip the size on storage (it lists every object: slow for millions of images)")
    compact = sub.add_parser("compact", help="merge the manifest parts into one object (takes the store's lease: "
                                             "refused while a job writes)")
    compact.add_argument("url", help="store URL")
    convert = sub.add_parser("convert", help="copy a finished store into a compact one (int8 codes, or PCA to K "
                                             "channels fitted on a sample); reads decode it")
    convert.add_argument("src", help="finished plain store")
    convert.add_argument("dst", help="new store URL")
    convert.add_argument("--compress", choices=("int8", "pca"), required=True)
    convert.add_argument("--pca-k", type=int, default=64, help="PCA channels kept (default 64)")
    convert.add_argument("--sample", type=int, default=256, help="images the PCA is fitted on (default 256)")
    convert.add_argument("--overwrite", action="store_true", help="replace a store at DST")


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "action", None):
        sys.stderr.write("usage: dvt store {info,compact,convert} URL\n")
        return 2
    try:
        if args.action == "info":
            info = FeatureStore.open(args.url).info(size=args.size)
            sys.stdout.write((json.dumps(asdict(info), indent=2, default=str) if args.json else info.format()) + "\n")
        elif args.action == "compact":
            store = FeatureStore.open(args.url, "r+")
            with StoreLease(store.url, "compact"):  # no job may write while parts are merged
                merged = store.compact()
            _log.info("merged %d manifest parts of %s", merged, args.url)
        elif args.action == "convert":
            from pipeline.store.convert import CompactConfig, convert_store

            convert_store(args.src, args.dst, CompactConfig(kind=args.compress, k=args.pca_k, sample=args.sample),
                          overwrite=args.overwrite)
    except (StoreError, FileNotFoundError, PermissionError) as e:
        _log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
