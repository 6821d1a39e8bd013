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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..vit.backbone import FeatureBackbone
from .config import DTYPES, ADDED_LATER, PRESETS, STAGE1_VERSION, Stage1Config
from .noise_model import NoiseModel
from .view_features import ViewBatch, extract_batch
from ..vit.views import grid_shape

__all__ = ["ADDED_LATER", "STAGE1_VERSION", "Stage1Config", "Stage1Error", "Stage1Result", "PRESETS", "fit_images",
           "fit_views", "fit_generator"]  # the settings live in .config; re-exported here

_log = logging.getLogger(__name__)


class Stage1Error(ValueError):
    """Stage 1 cannot run on this input; the message says why and what to change."""


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
    amp = DTYPES[config.amp_dtype] if config.amp_dtype else None
    try:
        batch = extract_batch(backbone, images, config.views, image_ids=image_ids, seed=seed,
                              chunk=config.view_chunk, dtype=DTYPES[config.feature_dtype], autocast_dtype=amp)
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
    amp = DTYPES[config.amp_dtype] if config.amp_dtype else None
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
