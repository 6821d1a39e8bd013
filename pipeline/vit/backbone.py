"""One wrapper for any ViT: timm models by name, or a user's own module through ``package.module:factory``.

``Backbone.features(pixels)`` takes RGB pixels in ``[0, 1]`` (``(B, 3, H, W)``, any ``H, W`` that fit the
patch grid), normalises them with the model's own constants and returns patch features ``(B, gh, gw, C)``
from one transformer block. Positional embeddings are interpolated to the input size (timm's
``dynamic_img_size``), and a stride smaller than the patch size gives denser, overlapping patches, as the
DVT authors' code allows.

A user's own backbone is named ``package.module:factory``. ``factory(weights=...)`` receives the
``weights`` string (``None`` for random weights) and returns an ``nn.Module`` with:

* ``patch_size: int`` and ``embed_dim: int``;
* ``patch_features(x) -> (B, H // patch_size, W // patch_size, embed_dim)`` on normalised images;
* optionally ``num_prefix_tokens: int`` (default 0) and ``mean`` / ``std`` RGB triples (default ImageNet).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .views import grid_shape

__all__ = ["FeatureBackbone", "BackboneConfig", "BackboneError", "Backbone", "create_backbone", "describe_backbone",
           "load_state_dict", "EXAMPLE_MODELS", "RANDOM_WEIGHTS_SEED", "DEFAULT_MODEL"]

_log = logging.getLogger(__name__)

#: The backbone the jobs use when none is named: DINOv2 ViT-S/14, small enough for a CPU.
DEFAULT_MODEL = "vit_small_patch14_dinov2.lvd142m"

#: Seed of the random initialisation (``weights="none"``): every process builds the same network, so a job's
#: workers, a resumed job and a later ``dvt apply`` all see one backbone. Stores record it.
RANDOM_WEIGHTS_SEED = 0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: One timm name per ViT family DVT was shown on (tags select the pretrained weights).
EXAMPLE_MODELS = {
    "dino": "vit_base_patch16_224.dino",
    "dinov2": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "deit3": "deit3_base_patch16_224.fb_in1k",
    "eva02": "eva02_base_patch14_224.mim_in22k",
    "clip": "vit_base_patch16_clip_224.openai",
    "mae": "vit_base_patch16_224.mae",
    "augreg": "vit_base_patch16_224.augreg_in21k",
}


@runtime_checkable
class FeatureBackbone(Protocol):
    """What stage 1 and the reports need of a backbone: patch-token features on a known patch grid.

    :class:`Backbone` is one; so is :class:`pipeline.testing.synthetic.SyntheticBackbone`, whose features have a
    known clean part and artifact.
    """

    patch_size: int
    stride: int

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] -> ``(B, h, w, C)`` patch features."""
        ...


class BackboneError(ValueError):
    """A backbone could not be built or fed; the message says what to do."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which ViT to run and which features to take from it.

    Attributes:
        model: a timm model name (``vit_base_patch14_dinov2.lvd142m``) or ``package.module:factory``.
        weights: ``"hub"`` (timm's pretrained weights), ``"none"`` (random init, seeded with
            :data:`RANDOM_WEIGHTS_SEED`), or a local file
            (``.safetensors`` or a torch checkpoint, read with ``weights_only=True``).
        block: transformer block whose output is taken; negative counts from the end (-1: last).
        stride: patch stride in pixels; ``None`` means the patch size (no overlap).
        norm: apply the model's final norm layer to the block output (what DVT denoises).
        img_size: size the model is built for; pretrained position embeddings are resampled to it once.
    """

    model: str = "vit_base_patch14_dinov2.lvd142m"
    weights: str = "hub"
    block: int = -1
    stride: int | None = None
    norm: bool = True
    img_size: int | None = None


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    """Names and shapes of a safetensors file as meta tensors: its header only, no weight values."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def load_state_dict(path: str | os.PathLike, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code: safetensors, or a torch file with ``weights_only=True``.

    Checkpoints that wrap the weights (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped, and a
    ``module.`` prefix left by DistributedDataParallel is removed. With ``meta=True`` only names and shapes are
    read (tensors on the meta device), enough to check that a file fits a model.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"Weights file {path} does not exist: pass an existing file, 'hub' or 'none'.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = _safetensors_header(path) if meta else load_file(str(path))
        else:
            state = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise BackboneError(f"Could not read weights file {path} ({type(e).__name__}: {e}); "
                            "pass a .safetensors file or a torch state dict saved with torch.save.") from e
    for key in ("state_dict", "model", "module", "student", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"Weights file {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unknown_model_message(name: str) -> str:
    import timm

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"Unknown model '{name}': not a timm model name and not 'package.module:factory'.{hint} "
            "List timm ViTs with `python -c \"import timm; print(timm.list_models('vit_*'))\"`.")


def _create_timm(config: BackboneConfig) -> nn.Module:
    import timm

    if not timm.is_model(config.model):
        raise BackboneError(_unknown_model_message(config.model))
    kwargs: dict = dict(num_classes=0, dynamic_img_size=True)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    if config.weights == "hub":
        try:
            return timm.create_model(config.model, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - network, hub and cache errors all end here
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise BackboneError(
                f"Could not get pretrained weights for '{config.model}' from the hub"
                f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''}: {type(e).__name__}: {e}. "
                "Download them on a machine with network access and pass --weights /path/to/file, "
                "or pass --weights none for random weights."
            ) from e
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = timm.create_model(config.model, pretrained=False, **kwargs)
    except TypeError as e:
        raise BackboneError(f"timm model '{config.model}' is not a ViT this wrapper supports ({e}); "
                            "use a vision transformer (vit_*, deit3_*, eva02_*) or a module:factory.") from e
    if config.weights != "none":
        load_into(model, load_state_dict(config.weights), config)
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], config: BackboneConfig) -> None:
    """Load ``state`` with timm's own key/shape adaptation for the model's family, strictly."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # noqa: BLE001
            raise BackboneError(f"Weights file {config.weights} does not match model '{config.model}' "
                                f"({type(e).__name__}: {e}).") from e
    own = model.state_dict()
    # The wrapper builds models without a classifier (num_classes=0); a checkpoint's head is not ours to load.
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if classifier and getattr(model, "num_classes", None) == 0:
        heads = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        state = {k: v for k, v in state.items()
                 if k in own or not any(k == h or k.startswith(f"{h}.") for h in heads)}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if wrong or missing or extra:
        details = "; ".join(filter(None, [
            f"{len(wrong)} shape mismatches (first: {wrong[0]})" if wrong else "",
            f"{len(missing)} missing keys (first: {missing[0]})" if missing else "",
            f"{len(extra)} unexpected keys (first: {extra[0]})" if extra else "",
        ]))
        raise BackboneError(f"Weights file {config.weights} does not match model '{config.model}': {details}. "
                            "Check that --model names the architecture the weights were trained with.")
    model.load_state_dict(state, strict=True)


def _create_custom(config: BackboneConfig) -> nn.Module:
    module_name, _, attr = config.model.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise BackboneError(f"Cannot import backbone factory '{config.model}' ({e}); "
                            "make the module importable (on PYTHONPATH) and name an existing callable.") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = factory(weights=None if config.weights in ("none", "hub") else config.weights)
    for attr_name in ("patch_size", "embed_dim", "patch_features"):
        if not hasattr(model, attr_name):
            raise BackboneError(f"Backbone from '{config.model}' has no '{attr_name}'; "
                                "see pipeline/vit/backbone.py for the interface a custom backbone provides.")
    # A custom backbone is one block whose stride is its patch size: block -1 and 0 (the index a denoiser or
    # student records) both name it, and so does an explicit stride equal to the patch size.
    if config.stride not in (None, _as_int(model.patch_size)) or config.block not in (-1, 0):
        raise BackboneError(f"Custom backbone '{config.model}' has one block (--block -1 or 0) and stride "
                            f"{_as_int(model.patch_size)} (its patch size); choose other features inside its "
                            f"factory (got block {config.block}, stride {config.stride}).")
    return model


def _as_int(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


class Backbone(nn.Module):
    """A frozen-by-default ViT feature extractor with the metadata every stage needs.

    Attributes:
        patch_size, stride, embed_dim, num_prefix_tokens, num_blocks, block (non-negative index), mean, std.
    """

    def __init__(self, model: nn.Module, config: BackboneConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.custom = ":" in config.model
        self.patch_size = _as_int(getattr(model, "patch_size", None) or model.patch_embed.patch_size)
        self.embed_dim = int(getattr(model, "embed_dim", 0) or model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.num_blocks = 1 if self.custom else len(model.blocks)
        block = config.block if config.block >= 0 else self.num_blocks + config.block
        if not 0 <= block < self.num_blocks:
            raise BackboneError(f"Block {config.block} does not exist in '{config.model}', which has "
                                f"{self.num_blocks} blocks: pass --block between {-self.num_blocks} and {self.num_blocks - 1}.")
        self.block = block
        self.stride = config.stride or self.patch_size
        if not 1 <= self.stride <= self.patch_size:
            raise BackboneError(f"Stride {self.stride} must be between 1 and the patch size {self.patch_size}.")
        if self.stride != self.patch_size:
            model.patch_embed.proj.stride = (self.stride, self.stride)
        data_cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(getattr(model, "mean", None) or data_cfg.get("mean") or IMAGENET_MEAN)
        std = tuple(getattr(model, "std", None) or data_cfg.get("std") or IMAGENET_STD)
        self.mean, self.std = mean, std
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        return self.config.model

    def grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """Feature grid ``(gh, gw)`` for an input of ``size`` pixels (raises a clear error if it does not fit)."""
        try:
            return grid_shape(size, self.patch_size, self.stride)
        except ValueError as e:
            raise BackboneError(f"{self.name}: {e}") from None

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        # the division in place on the fresh difference: the same numbers, one image-sized buffer fewer
        return (pixels - self._mean.to(pixels.dtype)).div_(self._std.to(pixels.dtype))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, gh, gw, C)`` of RGB ``pixels`` in ``[0, 1]`` of shape ``(B, 3, H, W)``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise BackboneError(f"{self.name}: expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}.")
        gh, gw = self.grid(tuple(pixels.shape[-2:]))
        x = self.normalize(pixels)
        if self.custom:
            out = self.model.patch_features(x)
        else:
            (out,) = self.model.forward_intermediates(
                x, indices=[self.block], norm=self.config.norm, stop_early=True,
                output_fmt="NLC", intermediates_only=True)
        out = out.reshape(x.shape[0], gh, gw, -1)
        return out

    forward = features


def create_backbone(config: BackboneConfig | str | None = None, **overrides) -> Backbone:
    """Build a :class:`Backbone` from a config or a model name (keyword arguments override fields)."""
    if config is None or isinstance(config, str):
        config = BackboneConfig(**({"model": config} if config else {}), **overrides)
    elif overrides:
        config = BackboneConfig(**{**config.__dict__, **overrides})
    model = _create_custom(config) if ":" in config.model else _create_timm(config)
    backbone = Backbone(model, config)
    backbone.eval().requires_grad_(False)
    _log.info("backbone %s: patch %d, stride %d, dim %d, block %d/%d, %d prefix tokens", config.model,
              backbone.patch_size, backbone.stride, backbone.embed_dim, backbone.block, backbone.num_blocks,
              backbone.num_prefix_tokens)
    return backbone


def describe_backbone(config: BackboneConfig) -> Backbone:
    """The backbone's metadata without its weights (built on the meta device: no memory, no download)."""
    meta = replace(config, weights="none")
    try:
        with torch.device("meta"):
            return create_backbone(meta)
    except Exception:  # noqa: BLE001 - some custom factories cannot build on meta; fall back to CPU
        return create_backbone(meta)
