"""Run every requested measure on every feature source and gather one side-by-side report.

Measures (each optional; see docs/evaluation.md for the protocols and the paper's numbers):

* ``mic``: the paper's artifact measure (:mod:`.position_mic`), plus the label-free extras
  (:mod:`pipeline.analysis.metrics`) on the same maps;
* ``knn_voc2012``: KNN segmentation (:mod:`.knn`);
* ``probe_voc2012`` / ``probe_ade20k`` / ``probe_nyu``: linear probes, one run per seed, mean and spread
  (:mod:`.seg_probe`, :mod:`.depth_probe`); encoder sources run the reference protocol unless ``quick``,
  store sources the frozen form;
* ``lost_voc07`` / ``lost_voc12``: LOST CorLoc (:mod:`.lost`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import torch

from ..analysis.metrics import ConsistencyConfig, artifact_metrics, cross_view_consistency
from .datasets import (ADE20K, VOC2012, SegmentationSet, ade20k_pairs, depth_pairs, load_images, read_depth,
                       read_label, voc_boxes, voc_pairs)
from .depth_probe import DepthProbeConfig, probe_depth_frozen, probe_depth_online
from .knn import KNNConfig, knn_segmentation
from .lost import LOSTConfig, lost_corloc
from .position_mic import PositionMICConfig, position_mic
from .seg_probe import SegProbeConfig, probe_segmentation_frozen, probe_segmentation_online
from .sources import FeatureSource
from .probe_training import summarize_runs

__all__ = ["EvalConfig", "run_evaluation", "MEASURES"]

_log = logging.getLogger(__name__)

QUICK_LABEL_SIZE = 224  # training labels of the quick form (the frozen form uses the features' input size)

#: measure -> (title, direction of "better" per metric); the report shows these metrics, in this order.
MEASURES: dict[str, tuple[str, dict[str, str]]] = {
    "mic": ("Artifacts: MIC between features and patch coordinates (the paper's measure)",
            {"mic": "lower", "mic_x": "lower", "mic_y": "lower"}),
    "extras": ("Artifacts: further label-free measures", {"positional_energy": "lower", "grid_energy": "lower",
               "position_information": "lower", "cross_view_consistency": "higher"}),
    "knn_voc2012": ("KNN segmentation, VOC 2012", {"miou": "higher", "aacc": "higher"}),
    "probe_voc2012": ("Linear segmentation probe, VOC 2012", {"miou": "higher", "macc": "higher", "aacc": "higher"}),
    "probe_ade20k": ("Linear segmentation probe, ADE20k", {"miou": "higher", "macc": "higher", "aacc": "higher"}),
    "probe_nyu": ("Linear depth probe, NYUv2", {"rmse": "lower", "abs_rel": "lower", "a1": "higher"}),
    "lost_voc07": ("Object discovery (LOST), VOC07 trainval", {"corloc": "higher"}),
    "lost_voc12": ("Object discovery (LOST), VOC12 trainval", {"corloc": "higher"}),
}


@dataclass
class EvalConfig:
    """What to measure, on which sources and data.

    Attributes:
        sources: the report's columns.
        images: image URIs for the label-free measures (default: the first store source's first rows).
        limit: at most this many images for the label-free measures.
        mic: the paper's MIC measure (``None`` to skip); extras: the other label-free measures
            (information: include their equal-frequency position information).
        consistency_pairs: crop pairs per image for cross-view consistency (encoder sources; 0 skips).
        voc, ade20k, nyu: dataset roots (``None`` skips); ``*_splits``: (train, evaluation) split names.
        num_classes: override the VOC class count (a VOC-layout dataset with other classes).
        lost: ``{"voc07": root, "voc12": root}`` for object discovery; lost_split: its image set.
        knn: KNN settings (``None`` skips); probes: run the linear probes.
        quick: the short probe form for every source; seeds: one probe run per seed.
        iters, lr, batch: override the probe schedule's length, learning rate and batch.
        max_train, max_val, lost_images: cap the images used (for trying things out).
        device, workers: where models and heads run; data-loading processes of the reference probes.
        seed: crop pairs of cross-view consistency (the probes use ``seeds``).
    """

    sources: list[FeatureSource]
    images: list[str] | None = None
    limit: int = 8
    mic: PositionMICConfig | None = field(default_factory=PositionMICConfig)
    extras: bool = True
    information: bool = True
    consistency_pairs: int = 8
    voc: str | None = None
    voc_splits: tuple[str, str] = ("train", "val")
    num_classes: int | None = None
    ade20k: str | None = None
    ade20k_splits: tuple[str, str] = ("training", "validation")
    nyu: str | None = None
    nyu_splits: tuple[str, str] = ("train", "val")
    depth_scale: float = 1000.0
    lost: dict[str, str] = field(default_factory=dict)
    lost_split: str = "trainval"
    lost_images: int | None = None
    knn: KNNConfig | None = field(default_factory=KNNConfig)
    probes: bool = True
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    iters: int | None = None
    lr: float | None = None
    batch: int | None = None
    max_train: int | None = None
    max_val: int | None = None
    device: str = "cpu"
    workers: int = 0
    seed: int = 0


class _Run:
    """One evaluation: the report being filled and a cache of dataset features per source."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.report: dict[str, Any] = {"sources": {}, "measures": {}, "notes": []}
        self._maps: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self.dataset_sources = [s for s in config.sources if s.fixed is None]
        wants_data = config.voc or config.ade20k or config.nyu or config.lost
        for s in config.sources:
            if s.fixed is not None and wants_data:
                self.report["notes"].append(f"{s.name}: features exist for the label-free images only, so it "
                                            "takes no part in the dataset measures.")

    def maps(self, source: FeatureSource, paths: list[str]) -> torch.Tensor:
        key = (source.name, tuple(paths))
        if key not in self._maps:
            self._maps[key] = source.maps(paths)
        return self._maps[key]

    def put(self, measure: str, source: str, result: dict, protocol: dict | None = None) -> None:
        title, metrics = MEASURES[measure]
        entry = self.report["measures"].setdefault(measure, {"title": title, "better": metrics, "results": {}})
        if protocol is not None:
            entry["protocol"] = protocol
        entry["results"][source] = result


def _cap(items: list, limit: int | None) -> list:
    return items[:limit] if limit else items


def _label_free(run: _Run) -> None:
    cfg = run.config
    uris = cfg.images
    if uris is None:
        store = next((s for s in cfg.sources if s.url), None)
        if store is None:
            return
        _, uris = store.first_rows(cfg.limit)
    uris = uris[: cfg.limit]
    for src in cfg.sources:
        try:
            maps = src.maps(uris)
        except KeyError:
            maps, own = src.first_rows(cfg.limit)
            run.report["notes"].append(f"{src.name}: the label-free measures use its own first {len(own)} rows "
                                       "(it does not hold the other sources' images).")
        maps = maps.float()
        if cfg.mic is not None:
            n_img = min(len(maps), cfg.mic.images or len(maps))
            channels = min(maps.shape[-1], cfg.mic.channels or maps.shape[-1])
            _log.info("%s: MIC of %d images x %d channels on %s (a CPU takes about %.0f s)", src.name, n_img,
                      channels, cfg.mic.device, 0.13 * n_img * channels * (maps.shape[1] * maps.shape[2] / 1369) ** 1.8)
            result = position_mic(maps, cfg.mic)
            run.put("mic", src.name, result, {"alpha": cfg.mic.mine.alpha, "c": cfg.mic.mine.c,
                                              "images": result["images"], "channels": cfg.mic.channels or "all"})
            _log.info("%s: MIC %.3f (x %.3f, y %.3f) over %d images, %.1f s", src.name, result["mic"],
                      result["mic_x"], result["mic_y"], result["images"], result["seconds"])
        if cfg.extras:
            t0 = time.perf_counter()
            extras = artifact_metrics(maps, information=cfg.information)
            if src.encoder is not None and cfg.consistency_pairs > 0:
                pixels = load_images(uris, src.input_size)
                extras["cross_view_consistency"] = cross_view_consistency(
                    lambda x: src.encoder.encode(x)[0].float(), pixels, size=src.input_size,
                    patch=src.encoder.patch_size, stride=src.encoder.stride,
                    config=ConsistencyConfig(pairs=cfg.consistency_pairs, seed=cfg.seed))
            run.put("extras", src.name, extras | {"seconds": round(time.perf_counter() - t0, 2)})


def _seg_sets(cfg: EvalConfig) -> list[tuple[str, SegmentationSet, list, list]]:
    out = []
    if cfg.voc:
        voc = replace(VOC2012, num_classes=cfg.num_classes) if cfg.num_classes else VOC2012
        out.append(("voc2012", voc, voc_pairs(cfg.voc, cfg.voc_splits[0]), voc_pairs(cfg.voc, cfg.voc_splits[1])))
    if cfg.ade20k:
        out.append(("ade20k", ADE20K, ade20k_pairs(cfg.ade20k, cfg.ade20k_splits[0]),
                    ade20k_pairs(cfg.ade20k, cfg.ade20k_splits[1])))
    return [(n, d, _cap(tr, cfg.max_train), _cap(va, cfg.max_val)) for n, d, tr, va in out]


def _schedule_overrides(cfg: EvalConfig, probe_cfg: Any) -> Any:
    sched = probe_cfg.schedule
    if cfg.iters is not None:
        sched = replace(sched, iters=cfg.iters, warmup_iters=min(sched.warmup_iters, cfg.iters // 4))
    if cfg.lr is not None:
        sched = replace(sched, lr=cfg.lr)
    return replace(probe_cfg, schedule=sched, **({"batch": cfg.batch} if cfg.batch else {}))


def _label_size(src: FeatureSource, quick: bool) -> int:
    """Square size of the training labels in the frozen form: the features' input size (224 when quick)."""
    if quick:
        return QUICK_LABEL_SIZE
    return int(src.store.layout.input_size[0]) if src.url else int(src.input_size)


def _segmentation(run: _Run) -> None:
    cfg = run.config
    for name, dataset, train, val in _seg_sets(cfg):
        truth = {split: [read_label(lab, dataset) for _, lab in pairs]
                 for split, pairs in (("train", train), ("val", val))}
        for src in run.dataset_sources:
            online = src.encoder is not None and not cfg.quick
            needs_maps = (cfg.knn is not None and name == "voc2012") or (cfg.probes and not online)
            maps = {s: run.maps(src, [p for p, _ in pairs]) for s, pairs in (("train", train), ("val", val))} \
                if needs_maps else {}
            if cfg.knn is not None and name == "voc2012":
                t0 = time.perf_counter()
                knn = knn_segmentation(maps["train"], truth["train"], maps["val"], truth["val"], dataset.num_classes,
                                       replace(cfg.knn, device=cfg.device))
                knn["seconds"] = round(time.perf_counter() - t0, 2)
                run.put("knn_voc2012", src.name, knn, knn.pop("settings"))
                _log.info("%s: KNN mIoU %.3f", src.name, knn["miou"])
            if not cfg.probes:
                continue
            base = SegProbeConfig.quick() if cfg.quick else SegProbeConfig()
            base = _schedule_overrides(cfg, replace(base, device=cfg.device, workers=cfg.workers))
            runs = []
            for seed in cfg.seeds:
                pc = replace(base, seed=seed)
                if online:
                    runs.append(probe_segmentation_online(src.encoder, train, val, dataset, pc))
                else:
                    runs.append(probe_segmentation_frozen(maps["train"], truth["train"], maps["val"], truth["val"],
                                                          dataset, pc, label_size=_label_size(src, cfg.quick)))
                _log.info("%s: %s probe, seed %d: mIoU %.3f (%.0f s)", src.name, name, seed, runs[-1]["miou"],
                          runs[-1]["seconds"])
            summary = summarize_runs(runs, ("miou", "macc", "aacc"))
            summary["seconds"] = round(sum(r["seconds"] for r in runs), 1)
            protocol = {"form": "reference" if online else ("quick" if cfg.quick else "frozen features"),
                        "train_images": len(train), "val_images": len(val), "seeds": list(cfg.seeds),
                        **base.describe(online)}
            run.put(f"probe_{name}", src.name, summary, protocol)


def _depth(run: _Run) -> None:
    cfg = run.config
    if not (cfg.nyu and cfg.probes):
        return
    train = _cap(depth_pairs(cfg.nyu, cfg.nyu_splits[0]), cfg.max_train)
    val = _cap(depth_pairs(cfg.nyu, cfg.nyu_splits[1]), cfg.max_val)
    truth = {s: [read_depth(d, cfg.depth_scale) for _, d in pairs] for s, pairs in (("train", train), ("val", val))}
    for src in run.dataset_sources:
        online = src.encoder is not None and not cfg.quick
        base = DepthProbeConfig.quick() if cfg.quick else DepthProbeConfig()
        base = _schedule_overrides(cfg, replace(base, device=cfg.device, workers=cfg.workers,
                                                depth_scale=cfg.depth_scale))
        runs = []
        for seed in cfg.seeds:
            pc = replace(base, seed=seed)
            if online:
                runs.append(probe_depth_online(src.encoder, train, val, pc))
            else:
                maps = [run.maps(src, [p for p, _ in pairs]) for pairs in (train, val)]
                runs.append(probe_depth_frozen(maps[0], truth["train"], maps[1], truth["val"], pc,
                                               label_size=_label_size(src, cfg.quick)))
            _log.info("%s: depth probe, seed %d: RMSE %.3f (%.0f s)", src.name, seed, runs[-1]["rmse"],
                      runs[-1]["seconds"])
        summary = summarize_runs(runs, ("rmse", "abs_rel", "a1", "a2", "a3", "rmse_log", "log_10", "silog", "sq_rel"))
        summary["seconds"] = round(sum(r["seconds"] for r in runs), 1)
        protocol = {"form": "reference" if online else ("quick" if cfg.quick else "frozen features"),
                    "class_token": runs[0]["class_token"], "train_images": len(train), "val_images": len(val),
                    "seeds": list(cfg.seeds),
                    **base.describe(online)}
        run.put("probe_nyu", src.name, summary, protocol)


def _lost(run: _Run) -> None:
    cfg = run.config
    for name, root in cfg.lost.items():
        annotations = _cap(voc_boxes(root, cfg.lost_split), cfg.lost_images)
        for src in run.dataset_sources:
            result = lost_corloc(run.maps(src, [a.image for a in annotations]), annotations, LOSTConfig())
            run.put(f"lost_{name}", src.name, result, result.pop("settings") | {"split": cfg.lost_split})
            _log.info("%s: LOST CorLoc on %s %.3f (%d images)", src.name, name, result["corloc"], result["images"])


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Every requested measure for every source: the report as a JSON-ready dict."""
    if not config.sources:
        raise ValueError("nothing to evaluate: give at least one source (a store, or a model).")
    names = [s.name for s in config.sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}.")
    started = time.perf_counter()
    run = _Run(config)
    run.report["sources"] = {s.name: s.describe() for s in config.sources}
    for step in (_label_free, _segmentation, _depth, _lost):
        t0 = time.perf_counter()
        step(run)
        _log.debug("%s took %.1f s", step.__name__, time.perf_counter() - t0)
    run.report["written"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.report["seconds"] = round(time.perf_counter() - started, 1)
    return run.report
