"""Measure feature stores and models side by side as the DVT paper does (report.md, report.json, PNG charts).

Sources (the report's columns), any number:

* ``--source NAME[:ARRAY]=URL``: an array of a feature store (default array: ``clean``), e.g.
  ``--source raw:raw=s3://b/voc.zarr --source stage-1:clean=s3://b/voc.zarr --source student:raw=...``;
* ``--store URL`` (``raw`` and ``stage-1`` of a ``dvt denoise`` store), ``--stage2-store URL`` (``stage-2``);
* ``--model NAME`` (``raw``, computed here), ``--denoiser FILE`` (``stage-2``) and ``--student FILE`` (the
  distilled ViT): the only sources that the probes can train on augmented crops, i.e. the paper's
  reference protocol.

Measures: MIC (always), KNN and linear probes (``--voc``, ``--ade20k``, ``--nyu``), LOST (``--lost-voc07``,
``--lost-voc12``). See docs/evaluation.md for protocols, data layouts and the paper's numbers.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys

from pipeline.vit.backbone import DEFAULT_MODEL
from pipeline.eval import EvalConfig, parse_source, run_evaluation, write_report
from pipeline.eval.knn import KNNConfig
from pipeline.eval.mic import MineConfig
from pipeline.eval.position_mic import PositionMICConfig
from pipeline.eval.sources import FeatureSource, model_sources, stage1_source

_log = logging.getLogger("dvt.eval")


def _pair(text: str) -> tuple[str, str]:
    a, _, b = text.partition(",")
    if not a or not b:
        raise argparse.ArgumentTypeError(f"expected TRAIN,EVAL split names, got {text!r}")
    return a, b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("sources")
    src.add_argument("--source", action="append", default=[], metavar="NAME[:ARRAY]=URL", help="a store array")
    src.add_argument("--store", default=None, help="a dvt denoise store: raw and stage-1 sources")
    src.add_argument("--stage2-store", default=None, help="a dvt apply store: the stage-2 source")
    src.add_argument("--model", default=None, help=f"compute raw features here (timm name or module:factory; "
                                                   f"{DEFAULT_MODEL} when only --images is given)")
    src.add_argument("--weights", default="hub", help="'hub', 'none' (random) or a local file")
    src.add_argument("--input-size", type=int, default=518, help="square input size for computed features")
    src.add_argument("--block", type=int, default=-1, help="transformer block (default: last)")
    src.add_argument("--stride", type=int, default=None, help="patch stride (default: the patch size)")
    src.add_argument("--denoiser", default=None, help="stage-2 denoiser file: adds a computed stage-2 source")
    src.add_argument("--student", default=None, help="weights exported by dvt distill: adds a computed student source")
    src.add_argument("--imagenet-norm", action="store_true",
                     help="computed sources: ImageNet mean/std for every model, as the reference evaluation")
    src.add_argument("--stage1-preset", default=None, help="fit stage 1 on --images here (ci, default)")
    lf = parser.add_argument_group("label-free measures")
    lf.add_argument("--images", default=None, help="images for the label-free measures (default: store rows)")
    lf.add_argument("--limit", type=int, default=8, help="at most N images for the label-free measures")
    lf.add_argument("--no-mic", dest="mic", action="store_false", help="skip the paper's MIC measure")
    lf.add_argument("--mic-channels", type=int, default=None, help="MIC over N random channels (default: all)")
    lf.add_argument("--no-extras", dest="extras", action="store_false", help="skip the other label-free measures")
    lf.add_argument("--no-information", dest="information", action="store_false",
                    help="skip the extra position-information measure (the slowest extra)")
    lf.add_argument("--pairs", type=int, default=8, help="crop pairs per image for cross-view consistency")
    data = parser.add_argument_group("datasets")
    data.add_argument("--voc", default=None, help="VOC2012 root: KNN and the segmentation probe")
    data.add_argument("--voc-splits", type=_pair, default=("train", "val"), help="TRAIN,EVAL split names")
    data.add_argument("--num-classes", type=int, default=None, help="classes of a VOC-layout dataset (VOC: 21)")
    data.add_argument("--ade20k", default=None, help="ADEChallengeData2016 root: the segmentation probe")
    data.add_argument("--ade20k-splits", type=_pair, default=("training", "validation"), help="TRAIN,EVAL folders")
    data.add_argument("--nyu", "--depth", dest="nyu", default=None, help="NYUv2 root: the depth probe")
    data.add_argument("--nyu-splits", "--depth-splits", dest="nyu_splits", type=_pair, default=("train", "val"),
                      help="TRAIN,EVAL: list files <root>/<split>.txt or folders (reference: nyu_train,nyu_test)")
    data.add_argument("--depth-scale", type=float, default=1000.0, help="depth PNG units per metre")
    data.add_argument("--lost-voc07", default=None, help="VOC2007 root: LOST CorLoc")
    data.add_argument("--lost-voc12", default=None, help="VOC2012 root: LOST CorLoc")
    data.add_argument("--lost-split", default="trainval", help="ImageSets/Main split for LOST")
    data.add_argument("--lost-images", type=int, default=None, help="at most N images for LOST")
    data.add_argument("--max-train", type=int, default=None, help="at most N training images per dataset")
    data.add_argument("--max-val", type=int, default=None, help="at most N evaluation images per dataset")
    probe = parser.add_argument_group("probes")
    probe.add_argument("--quick", action="store_true", help="short probes on frozen features (minutes)")
    probe.add_argument("--no-knn", dest="knn", action="store_false", help="skip KNN segmentation")
    probe.add_argument("--knn-k", type=int, default=20, help="neighbours for KNN segmentation")
    probe.add_argument("--no-probes", dest="probes", action="store_false", help="skip the linear probes")
    probe.add_argument("--seeds", default="0,1,2", help="one probe run per seed")
    probe.add_argument("--probe-iters", "--probe-steps", dest="iters", type=int, default=None,
                       help="override the probes' iterations")
    probe.add_argument("--probe-lr", dest="lr", type=float, default=None, help="override the probes' learning rate")
    probe.add_argument("--probe-batch", dest="batch", type=int, default=None, help="override images per iteration")
    probe.add_argument("--workers", type=int, default=4, help="data-loading processes (reference probes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="outputs/eval", help="folder for report.md, report.json and PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed for crops and channel sampling")


def _sources(args: argparse.Namespace, images: list[str] | None) -> list[FeatureSource]:
    sources = []
    if args.store:
        sources += [FeatureSource("raw", url=args.store, array="raw"),
                    FeatureSource("stage-1", url=args.store, array="clean")]
    if args.stage2_store:
        sources.append(FeatureSource("stage-2", url=args.stage2_store, array="clean"))
    sources += [parse_source(s) for s in args.source]
    if args.model or args.denoiser or args.student or (args.images and not sources):
        taken = {s.name for s in sources}
        computed = model_sources(args.model or DEFAULT_MODEL, args.weights, args.input_size, block=args.block,
                                 stride=args.stride, denoiser=args.denoiser, student=args.student,
                                 imagenet_norm=args.imagenet_norm, device=args.device)
        for s in computed:
            s.name = f"{s.name} (computed)" if s.name in taken else s.name
        if args.stage1_preset:
            if not images:
                raise ValueError("--stage1-preset fits stage 1 on --images: pass --images.")
            computed.insert(1, stage1_source(computed[0], images, args.stage1_preset, seed=args.seed))
        sources += computed
    return sources


def run(args: argparse.Namespace) -> int:
    images = None
    if args.images:
        from pipeline.io.listing import iter_uris

        images = list(itertools.islice(iter_uris(args.images), args.limit))
    config = EvalConfig(
        sources=_sources(args, images), images=images, limit=args.limit,
        mic=PositionMICConfig(MineConfig(), images=args.limit, channels=args.mic_channels, seed=args.seed,
                              device=args.device) if args.mic else None,
        extras=args.extras, information=args.information, consistency_pairs=args.pairs, voc=args.voc,
        voc_splits=args.voc_splits,
        num_classes=args.num_classes, ade20k=args.ade20k, ade20k_splits=args.ade20k_splits, nyu=args.nyu,
        nyu_splits=args.nyu_splits, depth_scale=args.depth_scale,
        lost={k: v for k, v in (("voc07", args.lost_voc07), ("voc12", args.lost_voc12)) if v},
        lost_split=args.lost_split, lost_images=args.lost_images,
        knn=KNNConfig(k=args.knn_k) if args.knn else None, probes=args.probes, quick=args.quick,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()), iters=args.iters, lr=args.lr,
        batch=args.batch, max_train=args.max_train, max_val=args.max_val, device=args.device, workers=args.workers,
        seed=args.seed)
    report = run_evaluation(config)
    paths = write_report(report, args.out)
    _log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    sys.stdout.write(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
