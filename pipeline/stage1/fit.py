"""Stage 1: per-image neural-field denoising (DVT), fitting a batch of images at once.

For each image: backbone features of random views (:mod:`pipeline.stage1.view_features`), then the noise model
``raw = F(x) + G(p) + h(raw)`` (:mod:`pipeline.stage1.noise_model`) is fitted with Adam, warm-up then cosine
learning rate, ``G`` trained for the first part of the schedule and then frozen while ``h`` switches on.
The clean output is ``F`` on the full image's patch grid.

``B`` images are fitted together: their fields, maps and residual nets live in batched tensors and every
step is one set of batched ops, and each image's initial values, views and token draws come from its own
generator (seeded by ``(image_id, seed)``), so an image's result does not depend on its batch-mates.

The split of ``F + G`` follows one stated gauge in every preset (:mod:`pipeline.stage1.noise_model`): ``G`` has zero
mean over the view grid and ``F`` keeps everything else, the image's mean feature included, so the clean map
is directly comparable with the raw features. On the full view, ``raw = clean + artifact + residual``.

Presets (``Stage1Config.preset(name)``):

* ``paper``: the reference (768 views, hash grid 16 levels 16..1024 x 8 features, table 2^20, MLP head,
  20k steps of 2048 tokens, lr 0.01 -> 0.001).
* ``default``: the same noise model solved in closed form, where the cost is a few dozen ViT passes: 24 views
  of 30-70% of the image's area (closer to the full view's scale than the reference's 10-50%, so a crop's
  patches see content nearer to what the clean map is read at), ``F`` a dense bilinear grid (two nodes per patch), ``G`` per grid position, fitted by weighted least squares
  in which the full view leads ``F`` (a crop's patch sees finer content than the full view's), DINOv2-style
  high-norm tokens are left to the residual ``h`` (the part ``F + G`` does not explain), and a light membrane
  term fills ``F`` where those tokens were. No gradient steps: on the synthetic families they made the clean
  map worse (``h`` absorbed part of the signal). See ``benchmarks/stage1.py`` for the measurements.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field as _field, replace

import numpy as np
import torch

from ..vit.backbone import FeatureBackbone
from .field import FieldConfig
from .noise_model import LossWeights, NoiseModel
from .view_features import ViewBatch, extract_batch
from ..vit.views import ViewConfig, grid_shape

__all__ = ["STAGE1_VERSION", "Stage1Config", "Stage1Error", "Stage1Result", "PRESETS", "fit_images", "fit_views",
           "fit_generator"]

_log = logging.getLogger(__name__)

#: Version of the stage-1 algorithm: bumped whenever the same config and inputs would give different
#: ``clean`` / ``artifact`` arrays, so stores can refuse to mix rows from two versions. 2: the stated gauge
#: (``F`` keeps the image mean) and the closed-form default.
STAGE1_VERSION = 2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Stage1Error(ValueError):
    """Stage 1 cannot run on this input; the message says why and what to change."""


@dataclass(frozen=True)
class Stage1Config:
    """Everything that decides a stage-1 fit. The field defaults are the reference's settings (the ``paper``
    preset); jobs run ``PRESETS["default"]``, and :func:`fit_images` takes its config explicitly.

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
            if name not in _DTYPES:
                raise ValueError(f"Stage1Config: unknown dtype {name!r}; use one of {sorted(_DTYPES)}.")

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


@dataclass
class Stage1Result:
    """One image's stage-1 output (fp32 tensors, channels last, on the CPU unless the fit was asked to keep them on
    its device: a job converts them to its store's dtype there, and half the bytes cross to the host).

    Attributes:
        clean: ``F`` on the full image's patch grid ``(gh, gw, C)``: the denoised features.
        raw: the backbone's features of the full image ``(gh, gw, C)``.
        artifact: ``G`` on the full view's grid ``(gh, gw, C)``.
        artifact_native: ``G``'s own ``K x K`` nodes ``(K, K, C)`` (equal to ``artifact`` when ``K`` is the grid).
        residual_norm: ``|h(raw)|`` on the full view ``(gh, gw)`` (zeros without ``h``).
        residual_norm_mean, residual_norm_max: ``|h|`` over every view token.
        losses: final per-image losses over every token (``mse``, ``cos``, ``residual``, ``sparsity``, ``total``).
        seconds: wall-clock seconds of the batch (views and fit) divided by its size.
        clean_fine: ``F`` on a ``clean_upsample`` times finer grid, when asked for.
        view_seconds, fit_seconds: ``seconds`` split into the backbone's view extraction and the fit.
    """

    image_id: int
    clean: torch.Tensor
    raw: torch.Tensor
    artifact: torch.Tensor
    artifact_native: torch.Tensor
    residual_norm: torch.Tensor
    residual_norm_mean: float
    residual_norm_max: float
    losses: dict[str, float]
    seconds: float
    clean_fine: torch.Tensor | None = None
    view_seconds: float = 0.0
    fit_seconds: float = 0.0


def fit_generator(image_id: int, seed: int) -> torch.Generator:
    """CPU generator for an image's initial values and token draws (independent of its view generator)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF, 0x5157]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def _validate(backbone: FeatureBackbone, images: torch.Tensor, image_ids: Sequence[int], config: Stage1Config) -> tuple[int, int]:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise Stage1Error(f"fit_images expects square RGB images (B, 3, S, S), got {tuple(images.shape)}.")
    if len(image_ids) != images.shape[0]:
        raise Stage1Error(f"{len(image_ids)} image_ids for {images.shape[0]} images: pass one id per image.")
    if len(set(image_ids)) != len(image_ids):
        raise Stage1Error("image_ids must be distinct (they seed each image's views and fit).")
    if not torch.isfinite(images).all():
        raise Stage1Error("images contain NaN or Inf.")
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise Stage1Error(f"images must be RGB in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}].")
    try:
        grid = grid_shape(images.shape[-1], backbone.patch_size, backbone.stride)
    except ValueError as e:
        raise Stage1Error(f"image size does not match the backbone: {e}") from None
    if not config.views.include_full:
        raise Stage1Error("stage 1 needs the full view among the views (views.include_full=True): the raw "
                          "full-image features are part of its output and anchor F on the full grid.")
    if config.views.num_views < 1:
        raise Stage1Error("stage 1 needs at least one random view besides the full view: with one view the "
                          "clean field F and the artifact map G cannot be told apart (they do not overlap at "
                          "different view positions). Set views.num_views >= 1.")
    return grid


def _draw(gens: Sequence[torch.Generator], n: int, k: int, steps: int, device: torch.device) -> torch.Tensor:
    """Token indices ``(steps, B, k)``: image ``b``'s draws come from its own (CPU) generator only, so a fit
    is the same on every device; on a GPU they travel from pinned memory without stalling the fit."""
    draws = torch.stack([torch.randint(n, (steps, k), generator=g) for g in gens], 1)
    if device.type == "cuda":
        return draws.pin_memory().to(device, non_blocking=True)
    return draws


def _adam(model: torch.nn.Module, config: Stage1Config) -> torch.optim.Adam:
    """One Adam over every image's parameters (element-wise, so images stay independent); fused when the
    device supports it (half the time of the foreach kernels on a CPU for the 20M-entry hash tables)."""
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    h = list(model.residual.parameters()) if model.residual is not None else []
    ids = {id(p) for p in h}
    groups = [dict(params=[p for p in model.parameters() if id(p) not in ids], lr_scale=1.0)]
    if h:
        groups.append(dict(params=h, lr_scale=config.residual_lr_scale))
    try:
        return torch.optim.Adam(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, **kwargs)


def fit_images(backbone: FeatureBackbone, images: torch.Tensor, config: Stage1Config, *, image_ids: Sequence[int],
               seed: int = 0, progress: Callable[[int, int, dict[str, float]], None] | None = None,
               g_init: torch.Tensor | None = None, keep_on_device: bool = False) -> list[Stage1Result]:
    """Fit stage 1 to ``images`` ``(B, 3, S, S)`` in ``[0, 1]`` together; one result per image.

    Args:
        backbone: anything with ``features(pixels) -> (B, gh, gw, C)``, ``patch_size`` and ``stride``.
        config: the fit's settings, usually a preset (``Stage1Config.preset("default")`` is what jobs run).
        image_ids: one distinct id per image; with ``seed`` they fix the image's views and random draws.
        progress: called as ``progress(step, steps, losses)`` every ~5% of the schedule.
        g_init: optional starting ``G`` ``(C, gh, gw)`` shared by all images (a model-level estimate).
        keep_on_device: leave the result tensors where the fit ran instead of copying them to the CPU.
    """
    _validate(backbone, images, image_ids, config)
    amp = _DTYPES[config.amp_dtype] if config.amp_dtype else None
    try:
        batch = extract_batch(backbone, images, config.views, image_ids=image_ids, seed=seed,
                              chunk=config.view_chunk, dtype=_DTYPES[config.feature_dtype], autocast_dtype=amp)
    except ValueError as e:
        raise Stage1Error(str(e)) from None
    return fit_views(batch, config, seed=seed, progress=progress, g_init=g_init, keep_on_device=keep_on_device)


def fit_views(batch: ViewBatch, config: Stage1Config, *, seed: int = 0,
              progress: Callable[[int, int, dict[str, float]], None] | None = None,
              g_init: torch.Tensor | None = None, keep_on_device: bool = False) -> list[Stage1Result]:
    """Fit stage 1 to view features already extracted (:func:`pipeline.stage1.view_features.extract_batch`)."""
    t0 = time.perf_counter()
    raw, xy, views, full_coords = batch.raw, batch.xy, batch.views, batch.full_coords
    device, (b, n, channels) = raw.device, raw.shape
    per_view = n // views
    amp = _DTYPES[config.amp_dtype] if config.amp_dtype else None
    gens = [fit_generator(i, seed) for i in batch.image_ids]
    # Without gradient steps (the closed-form presets) the solve overwrites G's start before reading it and h is
    # never used: neither is drawn (host work of about 8 ms an image at ViT-B/14's shapes). Nothing is drawn from
    # the generators after them, so every other value is the same as with the draws.
    closed_form = config.linear_solve_iters > 0 and config.steps == 0
    model = NoiseModel(config.field, channels, full_coords, full_coords, gens,
                       g_init_std=0.0 if closed_form else config.g_init_std,
                       g_init=None if g_init is None else g_init.to(device, torch.float32),
                       residual=config.residual and config.steps > 0, device=device).to(device)
    if config.linear_solve_iters:
        _solve_closed_form(model, raw, xy, views, config)
        model.fix_gauge()
    opt = _adam(model, config) if config.steps else None
    freeze_step = int(config.freeze_artifact_at * config.steps)
    full_batch = config.batch_tokens == 0 or config.batch_tokens >= n
    # full batch: every token every step, view by view, so G is broadcast over views and a grid F's bilinear
    # weights are computed once
    interp = model.interpolation(xy) if full_batch and config.steps else None
    draws, chunk_steps, log_every = None, 256, max(1, config.steps // 20)
    for step in range(config.steps):
        phase2 = step >= freeze_step and config.residual
        if step == freeze_step:
            model.freeze_artifact()
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step) * group["lr_scale"]
        if full_batch:
            tok_raw, tok_xy, tok_pos = raw, xy, None
        else:
            if step % chunk_steps == 0:
                draws = _draw(gens, n, config.batch_tokens, min(chunk_steps, config.steps - step), device)
            idx = draws[step % chunk_steps]
            tok_raw = torch.gather(raw, 1, idx[..., None].expand(-1, -1, channels))
            tok_xy = torch.gather(xy, 1, idx[..., None].expand(-1, -1, 2))
            tok_pos = idx % per_view
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = model.losses(tok_raw, tok_xy, tok_pos, use_residual=phase2, weights=config.loss,
                                  interp=interp)
        opt.zero_grad(set_to_none=True)
        losses["total"].sum().backward()
        opt.step()
        # Reading the losses waits for the device: only at log steps, and only for a caller who asked.
        if progress is not None and (step % log_every == 0 or step == config.steps - 1):
            progress(step, config.steps, {k: float(v.detach().mean()) for k, v in losses.items()})
    model.fix_gauge()  # the stated split: G has zero mean over the view grid, F keeps the image mean
    del interp
    results = _readout(model, raw, xy, full_coords, views, config, batch.image_ids,
                       use_residual=config.residual and config.steps > freeze_step, keep_on_device=keep_on_device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = time.perf_counter() - t0
    for r in results:
        r.view_seconds, r.fit_seconds = batch.seconds / b, fit_seconds / b
        r.seconds = r.view_seconds + r.fit_seconds
    _log.info("stage 1: %d images, %d views, %d steps in %.2fs (views %.2fs)", b, views, config.steps,
              batch.seconds + fit_seconds, batch.seconds)
    return results


def _solve_closed_form(model: NoiseModel, raw: torch.Tensor, xy: torch.Tensor, views: int,
                       config: Stage1Config) -> None:
    """The closed-form weighted least-squares solve of ``F`` and ``G`` with the config's view weights, and the
    per-image rules that choose them from a first solve (``near_full_rule``, ``full_view_rule``)."""
    device, b = raw.device, raw.shape[0]
    rule = config.full_view_rule or config.near_full_rule
    start = (model.field.grid.data.clone(), model.artifact.grid.data.clone()) if rule else None
    near = config.views.near_full_views  # the last views (views.sample_boxes)
    full_weight, view_weights, artifact_views = config.full_view_weight, None, None
    if near:  # they weigh in F's fit; G is left to the full view and the zoomed-in crops
        artifact_views = torch.ones(views, device=device)
        artifact_views[views - near:] = 0
        view_weights = torch.ones(views, device=device)
        view_weights[views - near:] = config.near_full_weight
    if config.near_full_rule:  # a first solve at weight 1, then each image's share of the weights above 1
        keep = model.solve_linear(raw, xy, views, config.linear_solve_iters, high_norm=config.high_norm,
                                  smooth=config.field_smooth, artifact_views=artifact_views)
        share = (config.near_full_rule * model.zoomed_crop_disagreement(raw, xy, views, keep, near)).clamp(0, 1)
        full_weight = 1 + share * (config.full_view_weight - 1)
        view_weights = torch.ones(b, views, device=device)
        view_weights[:, views - near:] = (1 + share * (config.near_full_weight - 1))[:, None]
        model.field.grid.data.copy_(start[0])
        model.artifact.grid.data.copy_(start[1])
    keep = model.solve_linear(raw, xy, views, config.linear_solve_iters, full_weight=full_weight,
                              high_norm=config.high_norm, smooth=config.field_smooth, view_weights=view_weights,
                              artifact_views=artifact_views)
    if config.full_view_rule:  # again from the same start, at each image's own full-view weight
        weight = model.full_view_weights(raw, xy, views, keep, config.full_view_rule)
        model.field.grid.data.copy_(start[0])
        model.artifact.grid.data.copy_(start[1])
        model.solve_linear(raw, xy, views, config.linear_solve_iters, full_weight=weight,
                           high_norm=config.high_norm, smooth=config.field_smooth, view_weights=view_weights,
                           artifact_views=artifact_views)


@torch.no_grad()
def _readout(model: NoiseModel, raw: torch.Tensor, xy: torch.Tensor, full_coords: torch.Tensor,
             views: int, config: Stage1Config, image_ids: Sequence[int], *, use_residual: bool,
             keep_on_device: bool = False, chunk: int = 16384) -> list[Stage1Result]:
    b, n, c = raw.shape
    gh, gw = full_coords.shape[:2]
    chunk = max(1, chunk // (gh * gw)) * gh * gw  # whole views per chunk
    full = full_coords.reshape(1, -1, 2).expand(b, -1, -1)
    clean = model.field(full).float().reshape(b, gh, gw, c)
    fine = None
    if config.clean_upsample > 1:
        k = config.clean_upsample
        xs = torch.linspace(float(full_coords[0, 0, 0]), float(full_coords[0, -1, 0]), k * (gw - 1) + 1,
                            device=raw.device)
        ys = torch.linspace(float(full_coords[0, 0, 1]), float(full_coords[-1, 0, 1]), k * (gh - 1) + 1,
                            device=raw.device)
        fxy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
        fine = model.field(fxy.reshape(1, -1, 2).expand(b, -1, -1)).float().reshape(b, *fxy.shape[:2], c)
    artifact = model.artifact_tokens().detach().reshape(b, gh, gw, c)
    native = model.artifact.grid.permute(0, 2, 3, 1)
    raw_full = _full_view(raw, full_coords.shape[:2])
    sums: dict[str, torch.Tensor] = {}
    norms = []
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        interp = model.interpolation(xy[:, sl])
        part = model.losses(raw[:, sl], xy[:, sl], None, use_residual=use_residual, weights=config.loss,
                            interp=interp)
        for k, v in part.items():
            sums[k] = sums.get(k, 0) + v * (min(n, s + chunk) - s)
        if use_residual:
            norms.append(model.residual(raw[:, sl].float()).float().norm(dim=-1))
        else:  # no trained h: the residual is what F + G leaves unexplained
            base = model.explain(min(n, s + chunk) - s, xy[:, sl], None, interp=interp)
            norms.append((raw[:, sl].float() - base).norm(dim=-1))
    losses = {k: v / n for k, v in sums.items()}
    tok_norm = torch.cat(norms, 1)
    if use_residual:
        full_norm = model.residual(raw_full.reshape(b, -1, c).float()).float().norm(dim=-1).reshape(b, gh, gw)
    else:
        full_norm = tok_norm[:, : gh * gw].reshape(b, gh, gw)
    host = (lambda t: t) if keep_on_device else (lambda t: t.cpu())
    # the scalars of every image in one device read each, not one per image
    norm_mean, norm_max = tok_norm.mean(1).tolist(), tok_norm.amax(1).tolist()
    per_image_losses = {k: v.float().tolist() for k, v in losses.items()}
    out = []
    for i, image_id in enumerate(image_ids):
        out.append(Stage1Result(
            image_id=int(image_id), clean=host(clean[i]), raw=host(raw_full[i].float()), artifact=host(artifact[i]),
            artifact_native=host(native[i].detach().float()), residual_norm=host(full_norm[i]),
            residual_norm_mean=norm_mean[i], residual_norm_max=norm_max[i],
            losses={k: v[i] for k, v in per_image_losses.items()}, seconds=0.0,
            clean_fine=None if fine is None else host(fine[i])))
    return out


def _full_view(raw: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """View 0's features ``(B, gh, gw, C)``: the full view when ``views.include_full`` (jobs refuse settings
    without it)."""
    b, _, c = raw.shape
    gh, gw = grid
    return raw[:, : gh * gw].reshape(b, gh, gw, c)
