"""The whole method on one backbone, job by job: images -> ``dvt denoise`` -> ``dvt train`` -> ``dvt apply`` on
held-out images -> ``dvt distill`` -> the student's own features, and the artifact measures of every stage.

Each step is the job's own library call (:func:`pipeline.denoise.job.run_denoise`, ...) on the Ray in use, with the
job's defaults unless :class:`ChainConfig` overrides them, so the chain checks what users run. The images are
square crops of the bundled photographs written as PNG files: the training crops come from some photos and the
held-out crops from others, so stage 2 and the student are measured on pictures no stage has seen.

Measures (:mod:`pipeline.analysis.metrics`), per stage on the images it applies to:

* ``positional_energy``, ``grid_energy``: share of the variance explained by grid position; share of the
  spectral energy at periods under 4 patches (lower is better);
* ``cross_view_consistency``: cosine of two overlapping crops' features at the same image points (higher is
  better; stage 1 is fitted again on every crop for it);
* ``cos_to_raw``: mean token cosine to the raw features of the same images (the method removes an artifact, it
  should not replace the features);
* ``cos_to_reference``: mean token cosine to a reference backbone's features, when one is given (for the test ViT
  of :mod:`pipeline.testing.artifact_vit`: the same weights without the artifact).

:func:`check_targets` compares them with the targets of :data:`TARGETS`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..vit.backbone import FeatureBackbone
from .metrics import ConsistencyConfig, cross_view_consistency, grid_energy, positional_energy

__all__ = ["ChainConfig", "ChainResult", "TARGETS", "write_photo_crops", "run_chain", "measure", "check_targets"]

_log = logging.getLogger(__name__)

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

#: Target -> (what it compares, bound). ``pe`` is positional energy.
TARGETS: dict[str, tuple[str, float]] = {
    "stage-1 pe / raw pe": ("<=", 0.2),
    "stage-2 pe / raw pe (held out)": ("<=", 0.2),
    "student pe / raw pe (held out)": ("<=", 0.2),
    "stage-2 pe (held out) / stage-1 pe (training)": ("<=", 1.5),
    "stage-1 cos to raw": (">=", 0.8),
    "stage-2 cos to raw (held out)": (">=", 0.8),
    "student cos to raw (held out)": (">=", 0.8),
}


@dataclass
class ChainConfig:
    """One chain run.

    Attributes:
        workdir: folder for the images, stores and runs (local).
        model, reference: the backbone (``module:factory`` or timm name, random weights) and an optional
            artifact-free reference backbone for ``cos_to_reference``.
        input_size: every job's square input size.
        train_photos, held_out_photos: bundled photos the training and held-out crops are cut from.
        train_crops, held_out_crops: how many crops of each.
        preset: stage-1 preset.
        train, apply, distill: overrides of the jobs' configs (e.g. ``{"max_steps": 300}``).
        workers: Ray workers of every job.
        consistency_images, consistency_pairs: images and crop pairs per image for the cross-view measure
            (0 images: skip it).
        seed: crops and every job's seed.
    """

    workdir: str
    model: str = "pipeline.testing.artifact_vit:create"
    reference: str | None = "pipeline.testing.artifact_vit:create_reference"
    input_size: int = 224
    train_photos: tuple[str, ...] = ("astronaut.png", "camera.png", "coffee.png")
    held_out_photos: tuple[str, ...] = ("chelsea.png", "rocket.jpg")
    train_crops: int = 48
    held_out_crops: int = 12
    preset: str = "default"
    train: dict[str, Any] = field(default_factory=dict)
    apply: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    consistency_images: int = 4
    consistency_pairs: int = 4
    seed: int = 0


@dataclass
class ChainResult:
    """Measures per stage (``rows``), seconds per job, the jobs' summaries and the targets' outcome."""

    rows: dict[str, dict[str, float]]
    seconds: dict[str, float]
    summaries: dict[str, dict[str, Any]]
    targets: dict[str, dict[str, Any]]


def write_photo_crops(folder: str | Path, photos: tuple[str, ...], n: int, size: int, *, seed: int = 0) -> list[str]:
    """``n`` square crops (half to all of the shorter side, mirrored half the time) cycling through ``photos``,
    resized to ``size`` and written as PNG files named after their photo; returns their paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        name = photos[i % len(photos)]
        with Image.open(SAMPLES / name) as im:
            im = im.convert("RGB")
            side = int(min(im.size) * rng.uniform(0.5, 1.0))
            x0, y0 = (int(rng.integers(0, s - side + 1)) for s in im.size)
            crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{Path(name).stem}-{seed}-{i:04d}.png"
        crop.save(path)
        paths.append(str(path))
    return paths


def _store_maps(url: str, array: str) -> tuple[torch.Tensor, list[str]]:
    """A store's ``array`` for every ok image, with the images' URIs, in id order."""
    from ..store import FeatureStore

    store = FeatureStore.open(url)
    ids = store.ids()
    uri_of = dict(zip(store.listing()["image_id"].to_pylist(), store.listing()["uri"].to_pylist()))
    return store.read(array, ids, as_torch=True).float(), [str(uri_of[int(i)]) for i in ids]


@torch.no_grad()
def _run(fn, pixels: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([fn(pixels[i:i + batch]).float() for i in range(0, len(pixels), batch)])


def measure(maps: torch.Tensor, raw: torch.Tensor, reference: torch.Tensor | None = None, *, features_fn=None,
            pixels: torch.Tensor | None = None, size: int = 224, patch: int = 16,
            consistency: ConsistencyConfig | None = None, consistency_images: int = 0) -> dict[str, float]:
    """The measures of one stage's ``maps`` ``(N, gh, gw, C)`` against the raw (and reference) maps of the same
    images; the cross-view measure needs ``features_fn`` and ``pixels``."""
    out = {"positional_energy": positional_energy(maps), "grid_energy": grid_energy(maps),
           "cos_to_raw": float(F.cosine_similarity(maps, raw, dim=-1).mean())}
    if reference is not None:
        out["cos_to_reference"] = float(F.cosine_similarity(maps, reference, dim=-1).mean())
    if features_fn is not None and pixels is not None and consistency_images > 0:
        out["cross_view_consistency"] = cross_view_consistency(
            features_fn, pixels[:consistency_images], size=size, patch=patch, config=consistency)
    return out


def _stage1_fn(backbone: FeatureBackbone, preset: str, seed: int):
    """Stage 1 as a feature function: every crop is fitted on its own (what the per-image method gives it)."""
    from ..stage1.fit import Stage1Config, fit_images

    config = Stage1Config.preset(preset)

    def fn(pixels: torch.Tensor) -> torch.Tensor:
        results = fit_images(backbone, pixels, config, image_ids=list(range(len(pixels))), seed=seed)
        return torch.stack([r.clean for r in results])
    return fn


def check_targets(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each target of :data:`TARGETS`: its value, bound and whether it is met."""
    pe = {k: v["positional_energy"] for k, v in rows.items()}
    cos = {k: v["cos_to_raw"] for k, v in rows.items()}
    values = {
        "stage-1 pe / raw pe": pe["stage-1"] / pe["raw (training)"],
        "stage-2 pe / raw pe (held out)": pe["stage-2"] / pe["raw (held out)"],
        "student pe / raw pe (held out)": pe["student"] / pe["raw (held out)"],
        "stage-2 pe (held out) / stage-1 pe (training)": pe["stage-2"] / max(pe["stage-1"], 1e-12),
        "stage-1 cos to raw": cos["stage-1"], "stage-2 cos to raw (held out)": cos["stage-2"],
        "student cos to raw (held out)": cos["student"]}
    out = {}
    for name, value in values.items():
        op, bound = TARGETS[name]
        out[name] = {"value": value, "target": f"{op} {bound:g}", "met": value <= bound if op == "<=" else value >= bound}
    return out


def run_chain(config: ChainConfig) -> ChainResult:
    """Run the four jobs on ``config.model`` and measure every stage (see the module docstring)."""
    from ..stage2.apply import ApplyConfig, run_apply
    from ..vit.backbone import create_backbone
    from ..denoise.job import DenoiseConfig, run_denoise
    from ..stage2.denoiser import DenoisedViT
    from ..stage3.distill import DistillConfig, run_distillation
    from ..stage3.student import load_student
    from .feature_maps import load_image
    from ..stage2.train import TrainConfig, run_training

    work = Path(config.workdir)
    size, seconds, summaries = config.input_size, {}, {}
    train_dir, held_dir = work / "images" / "train", work / "images" / "held_out"
    write_photo_crops(train_dir, config.train_photos, config.train_crops, size, seed=config.seed)
    write_photo_crops(held_dir, config.held_out_photos, config.held_out_crops, size, seed=config.seed + 1)
    stage1_url, applied_url = str(work / "stage1.zarr"), str(work / "applied.zarr")

    def timed(name: str, fn, job_config) -> Any:
        began = time.perf_counter()
        out = fn(job_config)
        seconds[name] = time.perf_counter() - began
        summaries[name] = {k: v for k, v in asdict(out).items() if k not in ("history",)}
        _log.info("chain: %s done in %.1f s", name, seconds[name])
        return out

    timed("denoise", run_denoise, DenoiseConfig(
        images=str(train_dir), output=stage1_url, model=config.model, weights="none", input_size=size,
        preset=config.preset, workers=config.workers, seed=config.seed, overwrite=True, progress_every_s=60))
    trained = timed("train", run_training, TrainConfig(**{
        "stores": [stage1_url], "output": str(work / "denoiser"), "workers": config.workers, "seed": config.seed,
        "overwrite": True, **config.train}))
    summaries["train"]["history"] = trained.history
    timed("apply", run_apply, ApplyConfig(**{
        "images": str(held_dir), "output": applied_url, "denoiser": trained.denoiser, "weights": "none",
        "workers": config.workers, "overwrite": True, "progress_every_s": 60, **config.apply}))
    distilled = timed("distill", run_distillation, DistillConfig(**{
        "images": str(train_dir), "denoiser": trained.denoiser, "output": str(work / "distill"), "weights": "none",
        "workers": config.workers, "seed": config.seed, "overwrite": True, **config.distill}))
    summaries["distill"]["history"] = distilled.history

    began = time.perf_counter()
    raw_t, uris_t = _store_maps(stage1_url, "raw")
    clean_t, _ = _store_maps(stage1_url, "clean")
    raw_h, uris_h = _store_maps(applied_url, "raw")
    stage2_h, _ = _store_maps(applied_url, "clean")
    pix_t = torch.stack([load_image(u, size) for u in uris_t])
    pix_h = torch.stack([load_image(u, size) for u in uris_h])
    backbone = create_backbone(config.model, weights="none", img_size=size)
    student = load_student(distilled.student)
    denoised = DenoisedViT.from_file(trained.denoiser, backbone=backbone)
    reference = create_backbone(config.reference, weights="none", img_size=size) if config.reference else None
    ref_t = _run(reference.features, pix_t) if reference else None
    ref_h = _run(reference.features, pix_h) if reference else None
    student_h = _run(student.features, pix_h)
    cv = dict(size=size, patch=backbone.patch_size, consistency_images=config.consistency_images,
              consistency=ConsistencyConfig(pairs=config.consistency_pairs, seed=config.seed))
    rows = {
        "raw (training)": measure(raw_t, raw_t, ref_t, features_fn=backbone.features, pixels=pix_t, **cv),
        "stage-1": measure(clean_t, raw_t, ref_t, features_fn=_stage1_fn(backbone, config.preset, config.seed),
                           pixels=pix_t, **cv),
        "raw (held out)": measure(raw_h, raw_h, ref_h, features_fn=backbone.features, pixels=pix_h, **cv),
        "stage-2": measure(stage2_h, raw_h, ref_h, features_fn=denoised.features, pixels=pix_h, **cv),
        "student": measure(student_h, raw_h, ref_h, features_fn=student.features, pixels=pix_h, **cv),
        # what removing each position's mean over these very images gives: a bound for any additive removal
        "raw - position mean (held out)": measure(raw_h - raw_h.mean(0, keepdim=True) + raw_h.mean((0, 1, 2)),
                                                  raw_h, ref_h),
    }
    if reference is not None:
        rows["reference (held out)"] = measure(ref_h, raw_h, ref_h, features_fn=reference.features, pixels=pix_h, **cv)
    seconds["measure"] = time.perf_counter() - began
    return ChainResult(rows=rows, seconds=seconds, summaries=summaries, targets=check_targets(rows))
