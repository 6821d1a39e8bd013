"""Stage 1's settings: :class:`Stage1Config`, the named presets (:data:`PRESETS`) and the algorithm version stores
record. How they were chosen is in ``docs/stage1.md``; the fit that uses them is :mod:`pipeline.stage1.fit`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field as _field, replace

import torch

from ..vit.views import ViewConfig
from .field import FieldConfig
from .noise_model import LossWeights

__all__ = ["STAGE1_VERSION", "Stage1Config", "PRESETS", "ADDED_LATER"]

#: Version of the stage-1 algorithm: bumped whenever the same config and inputs would give different
#: ``clean`` / ``artifact`` arrays, so stores can refuse to mix rows from two versions. 2: the stated gauge
#: (``F`` keeps the image mean) and the closed-form default.
STAGE1_VERSION = 2

#: Storage and autocast dtypes the settings may name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Stage1Config:
    """Everything that decides a stage-1 fit. The field defaults are the reference's settings (the ``paper``
    preset); jobs run ``PRESETS["default"]``, and :func:`pipeline.stage1.fit.fit_images` takes its config explicitly.

    Attributes:
        views: random views per image (the full view is added first when ``views.include_full``).
        field: parametrisation of the clean field ``F``.
        steps: optimiser steps.
        batch_tokens: tokens drawn per image per step (reference 2048); 0 uses every token every step.
        lr, min_lr, warmup, betas, eps, weight_decay: Adam with linear warm-up over ``warmup * steps`` steps,
            then half-cosine from ``lr`` to ``min_lr``.
        freeze_artifact_at: fraction of ``steps`` after which ``G`` is frozen and ``h`` switched on.
        residual: use the residual net ``h`` at all.
        residual_lr_scale: ``h``'s learning rate relative to ``lr`` (1 in the reference).
        loss: loss weights (reference: 1, 1, 0.1, 0.02).
        g_init_std: ``G``'s random start (reference 0.02).
        linear_solve_iters: alternating closed-form ``F``/``G`` iterations before Adam (needs
            ``field.kind == "grid"``; 0 disables).
        full_view_weight: in that solve, weight of a full-view token in ``F``'s fit relative to a crop's.
        near_full_weight: in that solve, weight of a token of a near-full view (``views.near_full_share``)
            relative to a zoomed-in crop's.
        near_full_rule: ``k`` of a per-image share of the near-full and full-view weights: a first solve at weight
            1 for every view, then ``s = clamp(k d, 0, 1)`` from the zoomed-in crops' extra disagreement ``d``
            (:meth:`pipeline.stage1.noise_model.NoiseModel.zoomed_crop_disagreement`), and the solve again from
            its start with the weights ``1 + s (w - 1)``: every view counts the same where zoomed-in crops see
            the same content (they then average noise too), the full weights where they do not. 0 keeps the
            weights for every image.
        full_view_rule: ``k`` of a full-view weight chosen per image
            (:meth:`pipeline.stage1.noise_model.NoiseModel.full_view_weights`): the solve runs at
            ``full_view_weight``, then again from its start at each image's weight (twice the solve's cost).
            0 (the default) keeps ``full_view_weight`` for every image.
        high_norm: in that solve, tokens whose centred norm exceeds this many medians are left to ``h``
            (0 keeps every token).
        field_smooth: in that solve, membrane smoothing of a grid ``F`` relative to its mean node weight.
        view_chunk: views per backbone pass (bounds memory).
        feature_dtype: storage of the view features (``"bfloat16"`` halves their memory).
        amp_dtype: autocast dtype for the backbone and the fit (``None``: fp32).
        clean_upsample: also return ``F`` on a grid this many times finer than the patch grid.
    """

    views: ViewConfig = _field(default_factory=lambda: ViewConfig(num_views=768))
    field: FieldConfig = _field(default_factory=FieldConfig)
    steps: int = 20000
    batch_tokens: int = 2048
    lr: float = 0.01
    min_lr: float = 0.001
    warmup: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 1e-5
    freeze_artifact_at: float = 0.5
    residual: bool = True
    residual_lr_scale: float = 1.0
    loss: LossWeights = _field(default_factory=LossWeights)
    g_init_std: float = 0.02
    linear_solve_iters: int = 0
    full_view_weight: float = 1.0
    near_full_weight: float = 1.0
    near_full_rule: float = 0.0
    full_view_rule: float = 0.0
    high_norm: float = 0.0
    field_smooth: float = 0.0
    view_chunk: int = 32
    feature_dtype: str = "float32"
    amp_dtype: str | None = None
    clean_upsample: int = 1

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_tokens < 0 or self.view_chunk < 1 or self.clean_upsample < 1:
            raise ValueError(f"Stage1Config: steps, batch_tokens >= 0, view_chunk, clean_upsample >= 1 ({self}).")
        if not 0 <= self.freeze_artifact_at <= 1 or not 0 <= self.warmup < 1:
            raise ValueError("Stage1Config: freeze_artifact_at must be in [0, 1] and warmup in [0, 1).")
        if self.linear_solve_iters and self.field.kind != "grid":
            raise ValueError("Stage1Config.linear_solve_iters needs field.kind='grid' (a linear F).")
        if self.full_view_rule < 0 or (self.full_view_rule and not self.linear_solve_iters):
            raise ValueError("Stage1Config.full_view_rule must be 0 or more, and needs linear_solve_iters > 0 (it "
                             "chooses the closed-form solve's full-view weight).")
        both = 0 < self.views.near_full_views < self.views.num_views  # near-full views and zoomed-in crops
        if self.near_full_rule < 0 or (self.near_full_rule and not (self.linear_solve_iters and both)):
            raise ValueError("Stage1Config.near_full_rule must be 0 or more, and needs linear_solve_iters > 0 and "
                             "both near-full views and zoomed-in crops (0 < views.near_full_share < 1).")
        if self.near_full_rule and self.full_view_rule:
            raise ValueError("Stage1Config: near_full_rule and full_view_rule both choose the full view's weight; "
                             "set one of them.")
        if self.near_full_weight <= 0 or (self.near_full_weight != 1 and not self.linear_solve_iters):
            raise ValueError("Stage1Config.near_full_weight must be above 0, and needs linear_solve_iters > 0 to "
                             "differ from 1 (it weighs the closed-form solve's tokens).")
        for name in (self.feature_dtype, self.amp_dtype or "float32"):
            if name not in DTYPES:
                raise ValueError(f"Stage1Config: unknown dtype {name!r}; use one of {sorted(DTYPES)}.")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Stage1Config":
        """A named preset (``paper``, ``default``, ``quality``, ``ci``) with fields overridden."""
        if name not in PRESETS:
            raise KeyError(f"Unknown stage-1 preset {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(PRESETS[name], **overrides)

    def replace(self, **overrides) -> "Stage1Config":
        return replace(self, **overrides)

    def record(self) -> dict:
        """The settings as a store records them (``dataclasses.asdict``), less the fields added after stores were
        first written while they hold the value that reproduces the older behaviour (:data:`ADDED_LATER`): a
        store written before such a field existed still resumes with the same settings."""
        out = asdict(self)
        for path, old in ADDED_LATER.items():
            *parents, name = path.split(".")
            holder = out
            for key in parents:
                holder = holder[key]
            if holder.get(name) == old:
                del holder[name]
        return out

    def lr_at(self, step: int) -> float:
        warm = int(self.warmup * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, self.steps - warm)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


#: Fields added to :class:`Stage1Config` (dotted: of its parts) after stores recorded it, with the value that
#: behaves as before.
ADDED_LATER: dict[str, object] = {"full_view_rule": 0.0, "near_full_weight": 1.0, "near_full_rule": 0.0,
                                  "views.near_full_share": 0.0, "views.near_full_scale": (0.9, 1.0)}

PRESETS: dict[str, Stage1Config] = {
    "paper": Stage1Config(),
    "default": Stage1Config(
        views=ViewConfig(num_views=24, scale=(0.3, 0.7)), field=FieldConfig(kind="grid", grid_factor=2), steps=0,
        linear_solve_iters=30, full_view_weight=10.0, high_norm=3.0, field_smooth=0.03),
    # More views, 40% of them near the full view's scale to average its noise, and a finer F: better than the
    # paper preset's full schedule on every family of the evaluation images, at 96 ViT passes an image instead
    # of 769 (docs/stage1.md).
    "quality": Stage1Config(
        views=ViewConfig(num_views=95, scale=(0.3, 0.7), near_full_share=0.4),
        field=FieldConfig(kind="grid", grid_factor=3), steps=0, linear_solve_iters=30, full_view_weight=10.0,
        near_full_weight=3.0, near_full_rule=3.0, high_norm=3.0, field_smooth=0.03),
    # A tiny schedule for tests and smoke runs (seconds on a CPU).
    "ci": Stage1Config(
        views=ViewConfig(num_views=10), field=FieldConfig(kind="grid", grid_factor=2), steps=0,
        linear_solve_iters=20, full_view_weight=5.0, high_norm=3.0, field_smooth=0.03),
}
