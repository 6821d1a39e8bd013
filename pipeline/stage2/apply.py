"""Stage 2 at dataset scale: images -> backbone -> trained denoiser -> feature store, on Ray Data.

The same pipeline as ``dvt denoise`` (:mod:`pipeline.runtime.image_job`): a listing, fetched bytes, actors that decode,
resize and run the model on a batch, one store unit per batch with ``failed`` rows for bad images, progress,
a summary and resume. Only the model differs: one forward pass of :class:`pipeline.stage2.denoiser.DenoisedViT`
instead of a stage-1 fit, so a corpus of any size becomes a clean feature dataset at the backbone's speed.

The store has the usual layout: ``clean`` holds the denoiser's output and ``raw`` the backbone's features
(the store format keeps both). Its ``stage1`` attribute records the denoiser (file, SHA-1, architecture,
training stores) and the backbone's weights: adding to the store with another denoiser is refused unless asked
for, with other backbone weights always.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from ..runtime.batching import forward_bytes_per_image, images_per_pass
from ..runtime.checks import nothing_to_do
from ..runtime.job_errors import JobConfigError
from ..runtime.image_job import ImageJobConfig, JobSummary, JobWorker, list_inputs
from ..runtime.plan import ImageJobPlan, open_plan_store, run_plan
from ..store import FeatureStore, StoreLayout, check_store
from ..vit.backbone import Backbone, BackboneConfig, describe_backbone
from ..vit.weights import check_weights
from .denoiser import DenoisedViT, DenoiserMismatchError, DenoiserSpec, read_denoiser_bytes, read_spec

__all__ = ["ApplyConfig", "ApplyWorker", "plan_apply", "prepare_apply_store", "run_apply"]

_log = logging.getLogger(__name__)

_AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class ApplyConfig(ImageJobConfig):
    """An apply run; the CLI flags of ``dvt apply`` map one to one onto these fields (with those of
    :class:`pipeline.runtime.image_job.ImageJobConfig`, the settings every image-to-store job has).

    Attributes:
        denoiser: denoiser file from ``dvt train`` (local path or URL).
        weights: backbone weights: ``"hub"``, ``"none"`` or a local file.
        model: the backbone the caller expects; a denoiser trained for another one is refused.
        input_size: square size images are resized to; ``None`` means the size the denoiser was trained at.
        images_per_batch: images per forward pass and per store unit; ``None`` chooses per device
            (:mod:`pipeline.runtime.batching`: 16 on CPUs; on GPUs units of 64 in passes that fit the memory).
        amp: autocast dtype (``"bfloat16"``) for the backbone and the denoiser; ``None``: fp32.
        allow_config_change: add to a store made with another denoiser.
        keep_raw: also store the backbone's raw features (array ``raw``); off halves the store.
    """

    denoiser: str
    weights: str = "hub"
    model: str | None = None
    input_size: int | None = None
    keep_raw: bool = True


class ApplyWorker(JobWorker):
    """A Ray Data actor: the backbone and denoiser loaded once, one forward pass and one store unit per batch."""

    stage = "denoiser"
    config: ApplyConfig

    def setup(self) -> None:
        self.model = DenoisedViT.from_file(self.config.denoiser, self.config.weights, input_size=self.config.input_size,
                                           device=self.device)
        backbone = self.model.backbone
        self.images_per_pass = self.config.images_per_batch or images_per_pass(
            "apply", self.device, forward_bytes_per_image(grid=backbone.grid(self.config.input_size),
                                                          channels=backbone.embed_dim,
                                                          prefix_tokens=backbone.num_prefix_tokens))

    @torch.no_grad()
    def process(self, ids: list[int], images: torch.Tensor) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        started = time.perf_counter()
        amp = _AMP[self.config.amp] if self.config.amp else None
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            raw, clean = self.model.features(images, return_raw=True)
        # One copy per array to the host, in the store's dtype (a GPU works asynchronously: this also makes the
        # time the model's own).
        if not self.config.keep_raw:
            clean, = self.to_store(clean)
            seconds = (time.perf_counter() - started) / len(ids)
            return [({"seconds": seconds}, {"clean": clean[j]}) for j in range(len(ids))]
        raw, clean = self.to_store(raw, clean)
        seconds = (time.perf_counter() - started) / len(ids)
        return [({"seconds": seconds}, {"raw": raw[j], "clean": clean[j]}) for j in range(len(ids))]


def _check_backbone(config: ApplyConfig, spec: DenoiserSpec, backbone: Backbone) -> None:
    if config.model and config.model != spec.backbone:
        raise DenoiserMismatchError(f"denoiser {config.denoiser} was trained for backbone {spec.backbone!r}, not "
                                    f"{config.model!r}: use a denoiser trained on {config.model!r} features, or drop "
                                    f"--model to run the backbone the denoiser names")
    spec.check_backbone(backbone)


def _apply_layout(config: ApplyConfig) -> tuple[ApplyConfig, StoreLayout, DenoiserSpec, BackboneConfig]:
    """Check the denoiser against the backbone and the weights: the config with its defaults resolved, the store's
    layout, the denoiser's spec and the backbone's config."""
    if config.amp is not None and config.amp not in _AMP:
        raise JobConfigError(f"--amp {config.amp!r}: unknown autocast dtype; use one of {sorted(_AMP)} or none")
    data = read_denoiser_bytes(config.denoiser)
    spec = read_spec(config.denoiser, data)
    if config.input_size is None:
        config = dataclasses.replace(config, input_size=int(spec.input_size[0]))
    backbone_config = spec.backbone_config(config.weights, config.input_size)
    backbone = describe_backbone(backbone_config)
    _check_backbone(config, spec, backbone)
    weights = check_weights(backbone_config)
    record = {"stage": 2, "denoiser": config.denoiser, "sha1": hashlib.sha1(data).hexdigest(),
              "architecture": dataclasses.asdict(spec.denoiser), "trained_on": spec.training.get("stores")}
    arrays = ("raw", "clean") if config.keep_raw else ("clean",)
    layout = StoreLayout.from_backbone(backbone, config.input_size, arrays=arrays, dtype=config.dtype,
                                       method=record, weights=weights)
    return config, layout, spec, backbone_config


def plan_apply(config: ApplyConfig, *, started: float | None = None) -> ImageJobPlan:
    """Check everything a run can check before Ray starts or anything is written, once and in the order
    :func:`pipeline.denoise.job.plan_denoise` uses: flags, ``--limit 0``, the denoiser and the backbone it names,
    weights, the store's layout, the listing and the output location."""
    started = time.monotonic() if started is None else started
    config.check_flags()
    if nothing_to_do(config.limit):
        return ImageJobPlan.nothing("apply", config, started)
    config, layout, _, _ = _apply_layout(config)
    uris = list_inputs(config)
    existed = check_store(config.output, layout, overwrite=config.overwrite,
                          allow_config_change=config.allow_config_change)
    return ImageJobPlan(job="apply", config=config, layout=layout, uris=uris, existed=existed, worker=ApplyWorker,
                        started=started)


def prepare_apply_store(config: ApplyConfig) -> tuple[FeatureStore, int, pa.Table, ApplyConfig]:
    """Plan the run and create or reopen its store, without a lease or Ray. Returns the store, how many images this
    run covers, the listing rows still to do, and the config with its defaults resolved (input size)."""
    plan = plan_apply(config)
    return (*open_plan_store(plan), plan.config)


def run_apply(config: ApplyConfig) -> JobSummary:
    """Run backbone + denoiser over ``config.images`` into the store ``config.output`` (resumable):
    :func:`plan_apply`, then :func:`pipeline.runtime.plan.run_plan`."""
    return run_plan(plan_apply(config))
