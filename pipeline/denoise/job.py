"""Dataset-scale stage 1 on Ray Data: an image corpus in, a feature store of clean and raw features out.

The pipeline (shared with ``dvt apply``, see :mod:`pipeline.runtime.image_job`), streamed with backpressure so memory
stays bounded whatever the corpus size::

    listing (ids the store has not finished)  ->  fetch bytes (light CPU tasks, fsspec)
        ->  Stage1Worker actors (decode, resize, batched stage-1 fit, write one store unit per batch)
        ->  status rows back to the driver (progress, summary)

Each actor loads the backbone once. Each batch of images is one work unit of the store: its array chunks
are written first and its manifest part last, so a killed worker leaves nothing a reader trusts, and
Ray's actor restarts and task retries redo the unit elsewhere (rewriting the same rows is harmless).
Per-image problems (unreadable, undecodable, non-finite features) become ``failed`` manifest rows and the
job goes on. A re-run skips images already committed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import torch

from ..runtime.batching import images_per_pass, stage1_bytes_per_image
from ..runtime.checks import nothing_to_do
from ..runtime.job_errors import JobConfigError
from ..runtime.image_job import ImageJobConfig, JobSummary, JobWorker, fetch_bytes, list_inputs
from ..runtime.plan import ImageJobPlan, open_plan_store, run_plan
from ..stage1 import STAGE1_VERSION, Stage1Config, fit_images
from ..stage2.apply import ApplyConfig, plan_apply
from ..store import FeatureStore, StoreLayout, check_store
from ..vit.backbone import DEFAULT_MODEL, Backbone, BackboneConfig, create_backbone, describe_backbone
from ..vit.weights import check_weights
from .method_worker import MethodWorker
from .methods import check_method, method_record

__all__ = ["DenoiseConfig", "DenoiseSummary", "Stage1Worker", "fetch_bytes", "store_layout", "plan_denoise",
           "prepare_store", "run_denoise"]

_log = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(kw_only=True)
class DenoiseConfig(ImageJobConfig):
    """Everything a denoise run needs; the CLI flags of ``dvt denoise`` map one to one onto these fields (with
    those of :class:`pipeline.runtime.image_job.ImageJobConfig`, the settings every image-to-store job has).

    Attributes:
        model, weights, block, stride: the backbone (see :class:`pipeline.vit.backbone.BackboneConfig`).
        input_size: square size images are resized to before the ViT (518 for patch 14 in the paper).
        preset: stage-1 preset (``default``, ``paper``, ``ci``); ``views`` and ``steps`` override it.
        images_per_batch: images per store unit, fitted together; ``None`` chooses per device
            (:mod:`pipeline.runtime.batching`: 4 on CPUs; on GPUs units of 16 fitted in passes that fit the memory;
            the forward-only methods ``average`` and ``bias`` take ``dvt apply``'s sizes, 16 and 64).
        seed: fixes every image's views and random draws (with its image id).
        amp: autocast dtype (``"bfloat16"``) for the backbone and the fit on top of the preset's; ``None``
            keeps the preset's (fp32 in every preset).
        allow_config_change: add to a store made with another stage-1 configuration.
        keep_artifact: also store ``G`` on the full-image grid (array ``artifact``).
        method: ``dvt`` (stage 1), ``average``, ``bias`` or ``denoiser`` (:mod:`pipeline.denoise.methods`).
        copies, max_shift: ``average``'s forward passes per image and largest shift in patches.
        artifact: ``bias``'s artifact file (from ``dvt artifact``).
        denoiser: ``denoiser``'s file (from ``dvt train``); the run is then exactly ``dvt apply``.
        compress: ``"int8"`` keeps the store's features as int8 codes (:mod:`pipeline.store.compact`).
        upsample: also store ``F`` on a grid this many times finer (array ``clean_x2`` or ``clean_x4``, ``dvt``
            only; :meth:`pipeline.store.StoreLayout.fine_geometry` says where its nodes lie).
    """

    model: str = DEFAULT_MODEL
    weights: str = "hub"
    block: int = -1
    stride: int | None = None
    input_size: int = 518
    preset: str = "default"
    views: int | None = None
    steps: int | None = None
    seed: int = 0
    keep_artifact: bool = True
    method: str = "dvt"
    copies: int = 8
    max_shift: float = 2.0
    artifact: str | None = None
    denoiser: str | None = None
    upsample: int = 1
    compress: str | None = None

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(model=self.model, weights=self.weights, block=self.block, stride=self.stride,
                              img_size=self.input_size)

    def stage1_config(self) -> Stage1Config:
        config = Stage1Config.preset(self.preset)
        if self.views is not None:
            config = config.replace(views=dataclasses.replace(config.views, num_views=self.views))
        if self.steps is not None:
            config = config.replace(steps=self.steps)
        if self.amp is not None:
            config = config.replace(amp_dtype=self.amp)
        if self.upsample != 1:
            config = config.replace(clean_upsample=self.upsample)
        return config

    def arrays(self) -> tuple[str, ...]:
        if self.method != "dvt":
            return ("raw", "clean")
        arrays = ("raw", "clean", "artifact") if self.keep_artifact else ("raw", "clean")
        return arrays + ((f"clean_x{self.upsample}",) if self.upsample > 1 else ())

    def apply_config(self) -> ApplyConfig:
        """``dvt denoise --method denoiser`` as the ``dvt apply`` run it is.

        ``--model`` and ``--input-size`` left at ``dvt denoise``'s defaults mean what the denoiser was trained with.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(DenoiseConfig)}
        return ApplyConfig(
            images=self.images, output=self.output, image_column=self.image_column, keep_columns=self.keep_columns,
            denoiser=self.denoiser, weights=self.weights,
            model=None if self.model == DEFAULT_MODEL else self.model,
            input_size=None if self.input_size == defaults["input_size"] else self.input_size,
            images_per_batch=self.images_per_batch, amp=self.amp, keep_raw=True, workers=self.workers,
            gpus_per_worker=self.gpus_per_worker, cpus_per_worker=self.cpus_per_worker, limit=self.limit,
            overwrite=self.overwrite, retry_failed=self.retry_failed, allow_config_change=self.allow_config_change,
            dtype=self.dtype, progress_every_s=self.progress_every_s, dashboard=self.dashboard, decode=self.decode,
            decode_tasks=self.decode_tasks, decode_cpus=self.decode_cpus, decode_threads=self.decode_threads,
            fast_decode=self.fast_decode)


#: What a denoise run did (the shared :class:`pipeline.runtime.image_job.JobSummary`).
DenoiseSummary = JobSummary


# ---------------------------------------------------------------------------------------------- pipeline steps

class Stage1Worker(JobWorker):
    """A Ray Data actor: one backbone per process, one stage-1 fit and one store unit per batch of images."""

    stage = "stage 1"
    config: DenoiseConfig

    def setup(self) -> None:
        backbone = self.settings.get("backbone") or self.config.backbone_config()
        self.backbone: Backbone = create_backbone(backbone).to(self.device)
        self.stage1: Stage1Config = self.settings.get("stage1") or self.config.stage1_config()
        self.images_per_pass = self.config.images_per_batch or images_per_pass(
            "denoise", self.device, stage1_bytes_per_image(
                views=self.stage1.views.num_views, grid=self.backbone.grid(self.config.input_size),
                channels=self.backbone.embed_dim, feature_bytes=_DTYPE_BYTES[self.stage1.feature_dtype],
                batch_tokens=self.stage1.batch_tokens))

    def process(self, ids: list[int], images: torch.Tensor) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        # results stay on the device until converted to the store's dtype (on a GPU: half the bytes to copy)
        results = fit_images(self.backbone, images, self.stage1, image_ids=ids, seed=self.config.seed,
                             keep_on_device=True)
        fine = f"clean_x{self.stage1.clean_upsample}"
        out = []
        for r in results:
            raw, clean, artifact, clean_fine = self.to_store(r.raw, r.clean, r.artifact, r.clean_fine)
            out.append(({"seconds": r.seconds, "losses": r.losses,
                         "stats": {"residual_norm_mean": r.residual_norm_mean,
                                   "residual_norm_max": r.residual_norm_max}},
                        {"raw": raw, "clean": clean, "artifact": artifact, fine: clean_fine}))
        return out


# ---------------------------------------------------------------------------------------------- driver

def store_layout(config: DenoiseConfig, backbone: Backbone, weights: dict[str, Any],
                 stage1: Stage1Config | None) -> StoreLayout:
    """What the run's store holds, and what decides its features: geometry, weights, the method's record (the
    stage-1 settings for ``dvt``; for ``bias`` this also checks the artifact file against the geometry and
    weights). :func:`plan_denoise` builds the arguments once."""
    if config.method == "dvt":
        record, version = stage1.record(), STAGE1_VERSION
    else:  # the method's own record; the geometry it is checked against is the layout's
        geometry = StoreLayout.from_backbone(backbone, config.input_size, arrays=config.arrays()).geometry()
        record, version = method_record(config, geometry, weights), None
    return StoreLayout.from_backbone(backbone, config.input_size, arrays=config.arrays(), dtype=config.dtype,
                                     method=record, weights=weights, seed=config.seed, stage1_version=version,
                                     compact={"kind": config.compress} if config.compress else None)


def _stage1_settings(config: DenoiseConfig) -> Stage1Config:
    """The run's stage-1 configuration (preset + overrides), refused in one line when it cannot run."""
    if config.views is not None and config.views < 1:
        raise JobConfigError(f"--views must be at least 1 (stage 1 fits random views besides the full one), "
                             f"got {config.views}")
    if config.steps is not None and config.steps < 0:
        raise JobConfigError(f"--steps must be 0 or more, got {config.steps}")
    try:
        stage1 = config.stage1_config()
    except (ValueError, KeyError) as e:
        raise JobConfigError(f"stage-1 settings: {e}") from None
    if stage1.views.num_views < 1 or not stage1.views.include_full:
        raise JobConfigError(f"preset {config.preset!r} has no random views; pass --views 1 or more")
    return stage1


def plan_denoise(config: DenoiseConfig) -> ImageJobPlan:
    """Check everything a run can check before Ray starts or anything is written, once and in this order: flags,
    the method and its inputs, ``--limit 0``, stage-1 settings, backbone and geometry, weights, the store's
    layout, the image listing, and the output location (a store there must have been made with the same settings).

    ``--method denoiser`` is exactly ``dvt apply``: its plan is :func:`pipeline.stage2.apply.plan_apply`'s.
    """
    started = time.monotonic()
    config.check_flags()
    check_method(config)
    if config.method == "denoiser":
        return plan_apply(config.apply_config(), started=started)
    if nothing_to_do(config.limit):
        return ImageJobPlan.nothing("denoise", config, started)
    stage1 = _stage1_settings(config) if config.method == "dvt" else None
    backbone_config = config.backbone_config()
    backbone = describe_backbone(backbone_config)
    try:
        backbone.grid(config.input_size)
    except ValueError as e:
        raise JobConfigError(f"--input-size {config.input_size}: {e}") from None
    weights = check_weights(backbone_config)
    layout = store_layout(config, backbone, weights, stage1)
    uris = list_inputs(config)
    existed = check_store(config.output, layout, overwrite=config.overwrite,
                          allow_config_change=config.allow_config_change)
    worker = Stage1Worker if config.method == "dvt" else MethodWorker
    settings = {"backbone": backbone_config, **({"stage1": stage1} if stage1 is not None else {})}
    return ImageJobPlan(job="denoise", config=config, layout=layout, uris=uris, existed=existed, worker=worker,
                        settings=MappingProxyType(settings), started=started)


def prepare_store(config: DenoiseConfig) -> tuple[FeatureStore, int, pa.Table]:
    """Plan the run and create or reopen its store, without a lease or Ray (for callers that run one job at a time
    themselves). Returns the store, how many images this run covers, and the listing rows it still has to do."""
    return open_plan_store(plan_denoise(config))


def run_denoise(config: DenoiseConfig) -> DenoiseSummary:
    """Run stage 1 (or another ``--method``) over ``config.images`` into ``config.output`` on the Ray cluster in use
    (or a local one): :func:`plan_denoise`, then :func:`pipeline.runtime.plan.run_plan`. The store's lease is held
    while the job runs (another job on the same store is refused)."""
    return run_plan(plan_denoise(config))
