"""The Ray Data actor of the forward-pass methods (``average``, ``bias``) of ``dvt denoise``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ..vit.backbone import BackboneConfig, create_backbone
from ..runtime.batching import forward_bytes_per_image, images_per_pass
from ..runtime.image_job import JobWorker
from .methods import MethodSettings, average_config
from .average import average_features
from .bias import ArtifactMap

__all__ = ["MethodWorker"]


class MethodJob(MethodSettings, Protocol):
    """What the worker reads of its job's config (:class:`pipeline.denoise.job.DenoiseConfig` has it)."""

    input_size: int
    images_per_batch: int | None
    amp: str | None

    def backbone_config(self) -> BackboneConfig: ...


class MethodWorker(JobWorker):
    """One backbone per process; per batch, ``raw`` and the method's ``clean`` into one store unit."""

    config: MethodJob
    #: A forward pass per image (``average`` with a few copies, ``bias``), not a fit: ``dvt apply``'s unit sizes.
    unit_job = "apply"

    def __init__(self, config: MethodJob, layout: dict[str, Any], settings: Mapping[str, Any] | None = None):
        super().__init__(config, layout, settings)
        self.stage = config.method

    def setup(self) -> None:
        backbone = self.settings.get("backbone") or self.config.backbone_config()
        self.backbone = create_backbone(backbone).to(self.device)
        copies = 1
        if self.config.method == "bias":
            self.artifact, _ = ArtifactMap.load(self.config.artifact)  # checked against the run on the driver
        else:
            self.average = average_config(self.config)
            copies = self.average.copies
        per_image = copies * forward_bytes_per_image(grid=self.backbone.grid(self.config.input_size),
                                                     channels=self.backbone.embed_dim,
                                                     prefix_tokens=self.backbone.num_prefix_tokens)
        self.images_per_pass = self.config.images_per_batch or images_per_pass("apply", self.device, per_image)

    @torch.no_grad()
    def process(self, ids: list[int], images: torch.Tensor) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        started = time.perf_counter()
        amp = torch.bfloat16 if self.config.amp == "bfloat16" else None
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if self.config.method == "bias":
                raw = self.backbone.features(images).float()
                clean = self.artifact.apply(raw)
            else:
                raw, clean = average_features(self.backbone, images, self.average)
        raw, clean = self.to_store(raw, clean)
        seconds = (time.perf_counter() - started) / len(ids)
        return [({"seconds": seconds}, {"raw": raw[j], "clean": clean[j]}) for j in range(len(ids))]
