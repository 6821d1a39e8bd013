"""Cost of each evaluation measure on a synthetic store of realistic geometry (seconds, CPU or GPU).

Writes a store of synthetic (raw, clean) pairs (:func:`pipeline.testing.synthetic_pairs.write_synthetic_store`:
clean smooth fields + one fixed positional pattern in raw) with ``--grid`` x ``--grid`` tokens of
``--channels`` channels (default 37 x 37 x 768: ViT-B/14 at 518 px), reads it back, and times each measure
on it as ``dvt eval`` runs it: MIC (per image, all channels), the extras, KNN segmentation, the frozen
segmentation probe (per iteration) and LOST (per image). Labels for KNN and the probe are random blobs
made here. Wall and process-CPU seconds are printed as one JSON line per measure and a Markdown table.

    python benchmarks/eval_measures.py --images 8 --mic-images 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.datasets import VOC2012, BoxAnnotation  # noqa: E402
from pipeline.eval.knn import KNNConfig, knn_segmentation  # noqa: E402
from pipeline.eval.lost import lost_corloc  # noqa: E402
from pipeline.eval.position_mic import PositionMICConfig, position_mic  # noqa: E402
from pipeline.eval.seg_probe import SegProbeConfig, probe_segmentation_frozen  # noqa: E402
from pipeline.eval.probe_training import Schedule  # noqa: E402
from pipeline.analysis.metrics import artifact_metrics  # noqa: E402
from pipeline.testing.synthetic_pairs import write_synthetic_store  # noqa: E402


def _blobs(n: int, size: int, classes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        lab = np.zeros((size, size), np.uint8)
        for c in rng.integers(1, classes, 3):
            cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 10, size // 4))]
            lab[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = c
        out.append(lab)
    return out


def _timed(name: str, fn, rows: list, **info) -> object:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    row = {"measure": name, "wall_s": round(time.perf_counter() - wall, 2),
           "cpu_s": round(time.process_time() - cpu, 2), **info}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="store rows (KNN: 3/4 train, 1/4 evaluation)")
    p.add_argument("--grid", type=int, default=37)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--mic-images", type=int, default=1)
    p.add_argument("--mic-channels", type=int, default=None, help="MIC over this many channels (default: all)")
    p.add_argument("--probe-iters", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/bench.zarr"
        _timed("write store", lambda: write_synthetic_store(url, args.images, grid=(args.grid, args.grid),
                                                            channels=args.channels), rows, images=args.images)
        from pipeline.store import FeatureStore

        store = FeatureStore.open(url)
        raw = store.read("raw", store.ids(), as_torch=True).float()
        clean = store.read("clean", store.ids(), as_torch=True).float()
    n, g, c = len(raw), args.grid, args.channels
    mic_cfg = PositionMICConfig(images=args.mic_images, channels=args.mic_channels, device=args.device)
    for name, maps in (("raw", raw), ("clean", clean)):
        _timed(f"MIC ({name})", lambda m=maps: position_mic(m, mic_cfg), rows, images=args.mic_images,
               channels=args.mic_channels or c)
    _timed("extras (3 measures)", lambda: artifact_metrics(raw), rows, images=n)
    labels = _blobs(n, 14 * g, 21, seed=0)
    split = max(1, 3 * n // 4)
    _timed("KNN segmentation", lambda: knn_segmentation(raw[:split], labels[:split], raw[split:], labels[split:],
                                                             21, KNNConfig(device=args.device)),
               rows, train=split, val=n - split)
    cfg = SegProbeConfig.quick(device=args.device,
                               schedule=Schedule(iters=args.probe_iters, lr=1e-2, weight_decay=1e-4))
    for size in (224, 14 * g):
        _timed(f"segmentation probe (frozen, labels {size} px)", lambda s=size: probe_segmentation_frozen(
            raw[:split], labels[:split], raw[split:], labels[split:], replace(VOC2012), cfg, s), rows,
            iterations=args.probe_iters, batch=cfg.batch)
    anns = [BoxAnnotation("x", np.array([[0, 0, 100, 100.0]]), 500, 375, np.array([False])) for _ in range(n)]
    _timed("LOST", lambda: lost_corloc(raw, anns), rows, images=n)
    print("\n| measure | wall s | CPU s | size |\n|---|---|---|---|")
    for row in rows:
        size = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("measure", "wall_s", "cpu_s"))
        print(f"| {row['measure']} | {row['wall_s']} | {row['cpu_s']} | {size} |")


if __name__ == "__main__":
    main()
