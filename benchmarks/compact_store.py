"""Compact stores against plain float16: bytes per image, what each loses, and throughput.

Variants: ``float16`` (plain), ``float16 + zstd``, ``int8``, ``int8 + zstd``, ``pca K`` (and ``+ zstd``),
written through :class:`pipeline.store.FeatureStore` to a local folder and read back decoded. Measured:

* bytes per image on storage (every object of the arrays, per feature array);
* reconstruction: relative L2 error and ``1 - mean token cosine`` against the float16 features;
* KNN segmentation (:func:`pipeline.eval.knn.knn_segmentation`) on labelled shape images (``tests/eval_data.py``)
  featurised by the artifact ViT (``create_small``: 192 channels, 8 x 8 grid): mIoU from the decoded store
  against mIoU from the float16 one;
* stage 2: a denoiser trained (``--steps`` AdamW steps, 80 by default) on ``(raw, clean)`` pairs read from each store
  (:func:`pipeline.testing.synthetic_pairs.synthetic_pairs`, 192 channels, 8 x 8 grid), scored on
  held-out images against the float16 targets (``MSE + 1 - cos``, as ``dvt train`` reports);
* write and read cost in CPU milliseconds per image (this process's CPU time, zarr's I/O threads included:
  encode + write, PCA fit included; read + decode), local folder. CPU time rather than wall time, so a busy
  machine does not decide the comparison.

``+ zstd`` variants decode to exactly the values of the variant without it, so their KNN and stage-2 columns
are that variant's.

    python benchmarks/compact_store.py                    # table under outputs/benchmarks/compact_store.md
    python benchmarks/compact_store.py --pca-k 32 --images 64
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.vit.backbone import create_backbone  # noqa: E402
from pipeline.store.convert import fit_pca  # noqa: E402
from pipeline.eval.knn import knn_segmentation  # noqa: E402
from pipeline.store import FeatureStore, StoreLayout  # noqa: E402
from pipeline.store.compact import write_basis  # noqa: E402
from pipeline.testing.synthetic_pairs import synthetic_pairs  # noqa: E402
from methods import train_denoiser  # noqa: E402  (the same stage-2 loop as the methods benchmark)
from pipeline.runtime.ray_train import denoising_loss  # noqa: E402
from tests.eval_data import shapes_image  # noqa: E402

_log = logging.getLogger("benchmarks.compact_store")


def variants(k: int) -> dict[str, tuple[dict | None, str | None]]:
    return {"float16": (None, None), "float16 + zstd": (None, "zstd"), "int8": ({"kind": "int8"}, None),
            "int8 + zstd": ({"kind": "int8"}, "zstd"), f"pca {k}": ({"kind": "pca", "k": k}, None),
            f"pca {k} + zstd": ({"kind": "pca", "k": k}, "zstd")}


def write_variant(url: str, layout: StoreLayout, data: dict[str, np.ndarray], plain: FeatureStore | None,
                  sample: int, unit: int = 16) -> tuple[FeatureStore, float]:
    """A store of ``data`` with ``layout`` (PCA fitted on ``sample`` images of ``plain``); seconds to write."""
    n = len(next(iter(data.values())))
    t = time.process_time()
    bases = {}
    if layout.compact and layout.compact["kind"] == "pca":
        ids = np.arange(min(sample, n))
        shares = {}
        for name in layout.arrays:
            basis, mean, shares[name] = fit_pca(plain, name, ids, layout.compact["k"])
            bases[name] = (basis, mean)
        layout = dataclasses.replace(layout, compact={**layout.compact, "explained_variance": shares, "sample": len(ids)})
    store = FeatureStore.create(url, layout, [f"img{i}.png" for i in range(n)], overwrite=True)
    if bases:
        write_basis(store, bases)
    for s in range(0, n, unit):
        ids = list(range(s, min(n, s + unit)))
        store.write_unit([{"image_id": i} for i in ids], {a: v[ids] for a, v in data.items()})
    return store.refresh(), time.process_time() - t


def bytes_per_image(store: FeatureStore) -> float:
    files = [p for p in Path(store.root).rglob("*") if p.is_file() and "manifest" not in p.parts
             and p.name != "zarr.json"]
    return sum(p.stat().st_size for p in files) / store.num_rows / len(store.layout.arrays)


def read_all(store: FeatureStore, batch: int = 16) -> tuple[dict[str, np.ndarray], float]:
    t = time.process_time()
    ids = store.ids()
    parts = [store.get(ids[s:s + batch]) for s in range(0, len(ids), batch)]
    out = {a: np.concatenate([p[a] for p in parts]) for a in store.layout.arrays}
    return out, time.process_time() - t


def reconstruction(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    x, y = x.astype(np.float32), y.astype(np.float32)
    cos = F.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y), dim=-1).mean()
    return float(np.linalg.norm(y - x) / np.linalg.norm(x)), float(1 - cos)


def shape_features(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Artifact-ViT features of ``n`` shape images (64 px, resized to 128) and their label maps."""
    backbone = create_backbone("pipeline.testing.artifact_vit:create_small", weights="none")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        img, lab, _ = shapes_image(rng)
        images.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
        labels.append(lab)
    pixels = F.interpolate(torch.stack(images), size=128, mode="bilinear", align_corners=False)
    with torch.no_grad():
        feats = torch.cat([backbone.features(pixels[s:s + 16]) for s in range(0, n, 16)])
    return feats.numpy().astype(np.float16), labels


def train_and_score(store: FeatureStore, train_ids: np.ndarray, val: tuple[np.ndarray, np.ndarray],
                    steps: int, batch: int) -> float:
    """Held-out ``MSE + 1 - cos`` of a denoiser trained on pairs read (decoded) from ``store``."""
    raw, clean = store.get(train_ids, ("raw", "clean"), as_torch=True).values()
    raw, clean = raw.float(), clean.float()
    model = train_denoiser(raw, clean, steps, batch, lr=2e-3)
    with torch.no_grad():
        loss, _ = denoising_loss(model(torch.from_numpy(val[0]).float()), torch.from_numpy(val[1]).float())
    return float(loss)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96, help="images per store (KNN: 3/4 train, 1/4 val)")
    p.add_argument("--pca-k", type=int, default=64)
    p.add_argument("--sample", type=int, default=64, help="images the PCA is fitted on")
    p.add_argument("--steps", type=int, default=80, help="stage-2 training steps per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/compact_store.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images
    feats, labels = shape_features(n, args.seed)
    raw_p, clean_p = synthetic_pairs(n, (8, 8), 192, seed=args.seed)
    pairs = {"raw": raw_p.astype(np.float16), "clean": clean_p.astype(np.float16)}
    vit_layout = StoreLayout(backbone="pipeline.testing.artifact_vit:create_small", block=3, input_size=(128, 128),
                             patch_size=16, stride=16, grid=(8, 8), channels=192, arrays=("clean",))
    pair_layout = StoreLayout(backbone="synthetic", block=0, input_size=(112, 112), patch_size=14, stride=14,
                              grid=(8, 8), channels=192, arrays=("raw", "clean"))
    n_train = 3 * n // 4
    train_ids, val_ids = np.arange(n_train), np.arange(n_train, n)
    folder = Path(tempfile.mkdtemp(prefix="dvt-compact-"))
    rows = []
    try:
        write_variant(str(folder / "warm-up.zarr"), vit_layout, {"clean": feats}, None, args.sample)  # first-call costs
        plain_vit = plain_pairs = None
        for name, (compact, compressor) in variants(args.pca_k).items():
            _log.info("variant %s", name)
            slug = name.replace(" ", "").replace("+", "_")
            lv = dataclasses.replace(vit_layout, compact=compact, compressor=compressor)
            lp = dataclasses.replace(pair_layout, compact=compact, compressor=compressor)
            vit, write_s = write_variant(str(folder / f"vit-{slug}.zarr"), lv, {"clean": feats}, plain_vit, args.sample)
            pair_store, _ = write_variant(str(folder / f"pairs-{slug}.zarr"), lp, pairs, plain_pairs, args.sample)
            plain_vit, plain_pairs = plain_vit or vit, plain_pairs or pair_store
            decoded, read_s = read_all(vit)
            err, cos_loss = reconstruction(feats, decoded["clean"])
            if compressor == "zstd":  # lossless on top: the same decoded values as the variant without it
                miou, held_out = rows[-1]["miou"], rows[-1]["held_out"]
            else:
                maps = torch.from_numpy(decoded["clean"].astype(np.float32))
                miou = knn_segmentation(maps[:n_train], labels[:n_train], maps[n_train:], labels[n_train:],
                                        num_classes=4)["miou"]
                held_out = train_and_score(pair_store, train_ids, (pairs["raw"][val_ids], pairs["clean"][val_ids]),
                                           args.steps, 8)
            shares = (vit.layout.compact or {}).get("explained_variance", {})
            rows.append(dict(variant=name, bytes=bytes_per_image(vit), error=err, cos_loss=cos_loss,
                             explained=shares.get("clean"), miou=miou, held_out=held_out,
                             write=1000 * write_s / n, read=1000 * read_s / n))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = rows[0]
    lines = ["| variant | bytes / image (8x8x192) | vs float16 | rel. L2 error | 1 - cosine | explained var. | "
             "KNN mIoU (change) | stage-2 held-out loss (change) | write CPU ms/image | read CPU ms/image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ev = "-" if r["explained"] is None else f"{r['explained']:.4f}"
        lines.append(f"| {r['variant']} | {r['bytes']:.0f} | {r['bytes'] / base['bytes']:.2f}x | {r['error']:.4f} | "
                     f"{r['cos_loss']:.2e} | {ev} | {r['miou']:.4f} ({r['miou'] - base['miou']:+.4f}) | "
                     f"{r['held_out']:.4f} ({r['held_out'] - base['held_out']:+.4f}) | {r['write']:.2f} | {r['read']:.2f} |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
