"""Draw feature panels like the DVT paper's figure (PCA, K-means, norm, G, residual) as PNGs.

From a store: ``dvt show --store URL --rows 0,1,2`` (raw, stage-1 clean, G and the residual from the store;
``--stage2-store URL`` shows a stage-2 store's ``clean`` as the denoised columns instead). From images:
``dvt show --images PATH --model NAME --weights none`` computes the raw features, and the denoised ones with
a quick stage-1 fit (``--preset``, default ``ci``) or a stage-2 ``--denoiser FILE``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
from pathlib import Path

import torch

from pipeline.vit.backbone import DEFAULT_MODEL
from pipeline.analysis.feature_maps import FeatureSet, features_from_images, load_models, load_store_rows, stage1_maps
from pipeline.analysis.panels import PanelConfig, PanelRow, render_panels

_log = logging.getLogger("dvt.show")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("features")
    src.add_argument("--store", default=None, help="feature store to draw rows of")
    src.add_argument("--rows", default=None, help="comma-separated store rows (default: the first --limit done)")
    src.add_argument("--stage2-store", default=None, help="show this store's clean (stage 2) as the denoised columns")
    src.add_argument("--images", default=None, help="folder, glob or list of images (features computed here)")
    src.add_argument("--limit", type=int, default=8, help="at most N images (default 8: every bundled sample)")
    model = parser.add_argument_group("model (for --images)")
    model.add_argument("--model", default=DEFAULT_MODEL, help="timm model name or package.module:factory")
    model.add_argument("--weights", default="hub", help="'hub', 'none' (random) or a local file")
    model.add_argument("--input-size", type=int, default=518, help="square input size in pixels")
    model.add_argument("--block", type=int, default=-1, help="transformer block (default: last)")
    model.add_argument("--stride", type=int, default=None, help="patch stride (default: the patch size)")
    model.add_argument("--denoiser", default=None, help="stage-2 denoiser file for the denoised columns")
    model.add_argument("--preset", default="ci", help="stage-1 preset for the denoised columns without --denoiser")
    model.add_argument("--seed", type=int, default=0, help="seed for the stage-1 fit and K-means")
    look = parser.add_argument_group("pictures")
    look.add_argument("--out", default="outputs/show", help="folder for the PNGs")
    look.add_argument("--per-image", action="store_true", help="also one PNG per image")
    look.add_argument("--clusters", type=int, default=8, help="K-means clusters")
    look.add_argument("--cell", type=int, default=160, help="pixel size of one panel")


def _from_store(args: argparse.Namespace) -> tuple[FeatureSet, str]:
    rows = [int(r) for r in args.rows.split(",")] if args.rows else None
    features = load_store_rows(args.store, rows, limit=None if rows else args.limit)
    label = "stage-1"
    if args.stage2_store:
        from pipeline.eval.sources import store_features
        from pipeline.store import FeatureStore

        features.clean = store_features(FeatureStore.open(args.stage2_store), features.uris, "clean")
        features.artifact = features.clean_fine = None  # G, the residual and the fine grid belong to stage 1
        label = "stage-2"
    return features, label


def _from_images(args: argparse.Namespace) -> tuple[FeatureSet, str]:
    from pipeline.io.listing import iter_uris

    uris = list(itertools.islice(iter_uris(args.images), args.limit))
    backbone, denoised = load_models(args.model, args.weights, args.input_size, block=args.block,
                                     stride=args.stride, denoiser=args.denoiser)
    features = features_from_images(uris, args.input_size, backbone.features, denoised.features if denoised else None)
    if denoised is not None:
        return features, "stage-2"
    maps = stage1_maps(backbone, torch.stack(features.images), args.preset, seed=args.seed)
    features.raw, features.clean, features.artifact = maps["raw"], maps["clean"], maps["artifact"]
    return features, f"stage-1 ({args.preset})"


def _slug(text: str) -> str:
    stem = text.rsplit(".", 1)[0] if "." in text[-6:] else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_")[:60] or "image"


def run(args: argparse.Namespace) -> int:
    if bool(args.store) == bool(args.images):
        raise ValueError("pass either --store (with --rows) or --images (with --model).")
    features, label = _from_store(args) if args.store else _from_images(args)
    rows = [PanelRow(raw=features.raw[i], clean=None if features.clean is None else features.clean[i],
                     artifact=None if features.artifact is None else features.artifact[i],
                     image=features.images[i] if features.images else None, title=features.titles[i],
                     clean_fine=None if features.clean_fine is None else features.clean_fine[i])
            for i in range(len(features))]
    config = PanelConfig(clusters=args.clusters, cell=args.cell, denoised_label=label, seed=args.seed)
    out = Path(args.out)
    source = args.store or args.images
    written = [out / "features.png"]
    render_panels(rows, written[0], config, title=f"{source}: raw vs {label}")
    if args.per_image:
        # a single-image PNG fits its own PCA basis and clusters (raw and denoised on the same basis, as in
        # features.png); features.png shares them across images
        for row in rows:
            written.append(out / f"{_slug(row.title)}.png")
            render_panels([row], written[-1], config, title=f"{row.title}: raw vs {label}")
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
