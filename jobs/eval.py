"""Measure artifacts and probe downstream tasks for raw, stage-1 and stage-2 features (report.json, report.md).

Feature sources, any combination:

* ``--store URL``: a ``dvt denoise`` store; its ``raw`` and ``clean`` arrays are the ``raw`` and ``stage-1``
  sources.
* ``--stage2-store URL``: a store written by the apply job; its ``clean`` array is the ``stage-2`` source
  (rows matched to ``--store`` by image URI when both are given).
* ``--images PATH`` with ``--model`` / ``--weights``: features computed here (``raw``), plus ``stage-1`` with
  ``--stage1-preset`` and ``stage-2`` with ``--denoiser FILE``. Only this way can the crop-based
  cross-view consistency be measured, since it needs a feature function.

Probes (``--voc ROOT``, ``--depth ROOT``) read features from the stores when ``--store`` is given (the store
must hold the dataset's images) and compute them with the model otherwise. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

from pipeline.metrics import ConsistencyConfig, cross_view_consistency
from pipeline.probes import (ProbeConfig, compute_features, depth_pairs, depth_probe, load_depth, load_images,
                             load_segmentation, segmentation_probe, store_features, voc_pairs)
from pipeline.report import features_from_images, label_free, load_models, load_store_rows, stage1_maps, write_report

_log = logging.getLogger("dvt.eval")

DEFAULT_MODEL = "vit_small_patch14_dinov2.lvd142m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("feature sources")
    src.add_argument("--store", default=None, help="feature store with raw + clean (stage 1)")
    src.add_argument("--stage2-store", default=None, help="store written by the apply job (clean = stage 2)")
    src.add_argument("--images", default=None, help="folder, glob or list of images to compute features for")
    src.add_argument("--limit", type=int, default=None, help="at most N images / store rows")
    model = parser.add_argument_group("model (for --images and for probes without --store)")
    model.add_argument("--model", default=DEFAULT_MODEL, help="timm model name or package.module:factory")
    model.add_argument("--weights", default="hub", help="'hub', 'none' (random) or a local file")
    model.add_argument("--input-size", type=int, default=518, help="square input size in pixels")
    model.add_argument("--block", type=int, default=-1, help="transformer block (default: last)")
    model.add_argument("--stride", type=int, default=None, help="patch stride (default: the patch size)")
    model.add_argument("--denoiser", default=None, help="stage-2 denoiser file: adds the stage-2 source")
    model.add_argument("--stage1-preset", default=None, help="fit stage 1 on --images with this preset (ci, default)")
    meas = parser.add_argument_group("measures")
    meas.add_argument("--no-information", dest="information", action="store_false",
                      help="skip the position-information measure (the slowest one)")
    meas.add_argument("--pairs", type=int, default=8, help="crop pairs per image for cross-view consistency (0: skip)")
    probe = parser.add_argument_group("probes")
    probe.add_argument("--voc", default=None, help="Pascal VOC root (JPEGImages/, SegmentationClass/, ImageSets/)")
    probe.add_argument("--voc-splits", default="train,val", help="train and evaluation split names")
    probe.add_argument("--num-classes", type=int, default=21, help="segmentation classes (VOC: 21)")
    probe.add_argument("--depth", default=None, help="NYU-style depth root (<split>/*_rgb.png + *_depth.png)")
    probe.add_argument("--depth-splits", default="train,val", help="train and evaluation split names")
    probe.add_argument("--depth-scale", type=float, default=1000.0, help="depth PNG units per metre")
    probe.add_argument("--max-train", type=int, default=None, help="at most N training images per probe")
    probe.add_argument("--max-val", type=int, default=None, help="at most N evaluation images per probe")
    probe.add_argument("--label-size", type=int, default=224, help="labels are resized to this square size")
    probe.add_argument("--probe-steps", type=int, default=300, help="Adam steps per probe")
    probe.add_argument("--probe-lr", type=float, default=1e-2, help="probe learning rate")
    parser.add_argument("--out", default="outputs/eval", help="folder for report.json and report.md")
    parser.add_argument("--seed", type=int, default=0, help="seed for crops, fits and probes")


class _Models:
    """The backbone and denoiser, built once, on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._built: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        if self._built is None:
            a = self.args
            self._built = load_models(a.model, a.weights, a.input_size, block=a.block, stride=a.stride,
                                      denoiser=a.denoiser)
        return self._built


def _image_uris(args: argparse.Namespace) -> list[str]:
    from pipeline.listing import iter_uris

    uris = iter_uris(args.images)
    return list(itertools.islice(uris, args.limit) if args.limit else uris)


def _artifacts(args: argparse.Namespace, models: _Models, report: dict[str, Any]) -> None:
    sources: dict[str, torch.Tensor] = {}
    if args.store:
        fs = load_store_rows(args.store, limit=args.limit, images=False, arrays=("raw", "clean"))
        sources.update({"raw": fs.raw, "stage-1": fs.clean})
        if args.stage2_store:
            from pipeline.store import FeatureStore

            sources["stage-2"] = store_features(FeatureStore.open(args.stage2_store), fs.uris, "clean")
    elif args.stage2_store:
        sources["stage-2"] = load_store_rows(args.stage2_store, limit=args.limit, images=False,
                                             arrays=("clean",)).clean
    consistency: dict[str, float] = {}
    if args.images:
        backbone, denoised = models.get()
        uris = _image_uris(args)
        fs = features_from_images(uris, args.input_size, backbone.features, denoised.features if denoised else None)
        pixels = torch.stack(fs.images)
        if not args.store:
            sources["raw"] = fs.raw
            if args.stage1_preset:
                sources["stage-1"] = stage1_maps(backbone, pixels, args.stage1_preset, seed=args.seed)["clean"]
            if fs.clean is not None:
                sources["stage-2"] = fs.clean
        if args.pairs > 0:
            cfg = ConsistencyConfig(pairs=args.pairs, seed=args.seed)
            fns = {"raw": backbone.features, **({"stage-2": denoised.features} if denoised else {})}
            for name, fn in fns.items():
                consistency[name] = cross_view_consistency(fn, pixels, size=args.input_size,
                                                           patch=backbone.patch_size, stride=backbone.stride,
                                                           config=cfg)
                _log.info("%s: cross-view consistency %.3f", name, consistency[name])
        report["inputs"]["images"] = f"{args.images} ({len(uris)} images)"
    if not sources:
        return
    results = label_free(sources, information=args.information)
    for name, value in consistency.items():
        results.setdefault(name, {})["cross_view_consistency"] = value
    report["artifacts"] = results
    if "stage-1" in results:
        report["notes"].append("stage-1 features exist on the full-image grid only, so their cross-view "
                               "consistency is not defined (n/a).")
    if not args.images:
        report["notes"].append("cross-view consistency needs a feature function: pass --images with --model "
                               "(and --denoiser for stage 2).")


def _probe_features(args: argparse.Namespace, models: _Models, paths: list[str]) -> dict[str, torch.Tensor]:
    """Features of ``paths`` from each available source, in the order given."""
    if args.store or args.stage2_store:
        from pipeline.store import FeatureStore

        out = {}
        if args.store:
            store = FeatureStore.open(args.store)
            out.update(raw=store_features(store, paths, "raw"), **{"stage-1": store_features(store, paths, "clean")})
        if args.stage2_store:
            out["stage-2"] = store_features(FeatureStore.open(args.stage2_store), paths, "clean")
        return out
    backbone, denoised = models.get()
    pixels = load_images(paths, args.input_size)
    out = {"raw": compute_features(backbone.features, pixels)}
    if denoised is not None:
        out["stage-2"] = compute_features(denoised.features, pixels)
    return out


def _split(pairs: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    return pairs[:limit] if limit else pairs


def _probes(args: argparse.Namespace, models: _Models, report: dict[str, Any]) -> None:
    config = ProbeConfig(steps=args.probe_steps, lr=args.probe_lr, seed=args.seed)
    tasks = []
    if args.voc:
        tr, va = args.voc_splits.split(",")
        tasks.append(("segmentation", args.voc, voc_pairs(args.voc, tr), voc_pairs(args.voc, va)))
    if args.depth:
        tr, va = args.depth_splits.split(",")
        tasks.append(("depth", args.depth, depth_pairs(args.depth, tr), depth_pairs(args.depth, va)))
    for task, root, train, val in tasks:
        train, val = _split(train, args.max_train), _split(val, args.max_val)
        size = args.label_size
        if task == "segmentation":
            labels = [load_segmentation([p for _, p in s], size) for s in (train, val)]
        else:
            labels = [load_depth([p for _, p in s], size, args.depth_scale) for s in (train, val)]
        feats = [_probe_features(args, models, [p for p, _ in s]) for s in (train, val)]
        res: dict[str, Any] = {"dataset": {"root": root, "train": len(train), "val": len(val), "label_size": size}}
        for name in feats[0]:
            t0 = time.perf_counter()
            if task == "segmentation":
                res[name] = segmentation_probe(feats[0][name], labels[0], feats[1][name], labels[1],
                                               num_classes=args.num_classes, config=config)
            else:
                res[name] = depth_probe(feats[0][name], labels[0], feats[1][name], labels[1], config=config)
            _log.info("%s probe, %s: %s (%.1fs)", task, name,
                      ", ".join(f"{k} {v:.3f}" for k, v in res[name].items() if isinstance(v, float)),
                      time.perf_counter() - t0)
        report["probes"][task] = res


def run(args: argparse.Namespace) -> int:
    if not (args.store or args.stage2_store or args.images):
        raise ValueError("nothing to evaluate: pass --store, --stage2-store and/or --images.")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "inputs": {k: getattr(args, k) for k in ("store", "stage2_store", "denoiser", "voc", "depth")},
        "artifacts": {}, "probes": {}, "notes": []}
    if args.images or not args.store:
        report["inputs"].update(model=args.model, weights=args.weights, input_size=args.input_size)
    models = _Models(args)
    _artifacts(args, models, report)
    _probes(args, models, report)
    report["written"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["seconds"] = round(time.perf_counter() - started, 2)
    json_path, md_path = write_report(report, args.out)
    _log.info("wrote %s and %s", json_path, md_path)
    sys.stdout.write(md_path.read_text())
    return 0


if __name__ == "__main__":
    from pipeline.cli import job_main

    sys.exit(job_main(__name__))
