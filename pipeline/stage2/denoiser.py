"""Stage 2: a small Transformer that predicts clean ViT features from raw ones, and the model users call.

The reference denoiser (Yang et al., DVT, ECCV 2024) is one timm ``Block`` (heads ``C // 64``, MLP ratio 4,
qkv bias) over the raw patch features plus a learnable positional embedding. The embedding lives on a
reference grid (37 x 37, ViT-B/14 at 518) and is resampled with timm's ``resample_abs_pos_embed`` to
whatever grid comes in, so one denoiser serves any input size. Like the reference, the block's output *is*
the prediction: ``clean = blocks(raw + pos)``. The block's own skip connections already carry ``raw``
through, so no extra outer residual is added.

A trained denoiser is one ``.safetensors`` file: its weights, and in the file's metadata header a JSON
:class:`DenoiserSpec` naming the backbone, block, input size, stride, channels, the architecture and the
training data. :func:`load_denoiser` reads it back in one call, without Ray::

    model = DenoisedViT.from_file("s3://bucket/denoisers/dinov2-s/denoiser.safetensors")
    clean = model(pixels)  # (B, gh, gw, C) from RGB pixels in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..vit.backbone import Backbone, BackboneConfig, create_backbone

__all__ = ["DenoiserConfig", "DenoiserSpec", "Denoiser", "DenoisedViT", "DenoiserMismatchError",
           "save_denoiser", "load_denoiser", "read_spec", "read_denoiser_bytes", "SPEC_KEY"]

_log = logging.getLogger(__name__)

#: Key of the JSON spec in the safetensors metadata header.
SPEC_KEY = "dvt_denoiser"
FORMAT = "dvt-denoiser"
FORMAT_VERSION = 1


class DenoiserMismatchError(ValueError):
    """A denoiser was paired with features or a backbone it was not trained for."""


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture of a :class:`Denoiser`.

    Attributes:
        channels: feature channels ``C`` of the backbone.
        num_blocks: Transformer blocks (the reference uses 1).
        num_heads: attention heads; ``None`` means ``max(1, C // 64)`` as in the reference.
        mlp_ratio: MLP hidden size over ``C``.
        qkv_bias: bias in the qkv projection.
        pos_embed: add a learnable positional embedding before the blocks.
        pos_grid: grid the positional embedding is stored on; resampled (bicubic) to the input grid.
    """

    channels: int
    num_blocks: int = 1
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: bool = True
    pos_grid: tuple[int, int] = (37, 37)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pos_grid", tuple(int(v) for v in self.pos_grid))
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", max(1, self.channels // 64))
        if self.channels <= 0 or self.num_blocks <= 0:
            raise ValueError(f"channels and num_blocks must be positive, got {self.channels}, {self.num_blocks}")
        if self.channels % self.num_heads:
            raise ValueError(f"{self.channels} channels do not split into {self.num_heads} heads")


@dataclass
class DenoiserSpec:
    """Everything needed to use a trained denoiser: what it was trained on and how it is built.

    Attributes:
        denoiser: the architecture.
        backbone: backbone name (timm name or ``package.module:factory``) the features came from.
        block: transformer block of the backbone (non-negative index).
        input_size: ``(height, width)`` the training features were computed at (the default for inference).
        patch_size, stride: of the backbone, in pixels.
        training: free-form record of the training run (stores, image counts, epochs, validation metrics).
    """

    denoiser: DenoiserConfig
    backbone: str
    block: int
    input_size: tuple[int, int]
    patch_size: int
    stride: int
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.denoiser.channels

    @classmethod
    def from_layout(cls, layout: Any, denoiser: DenoiserConfig, **training: Any) -> DenoiserSpec:
        """A spec for features of a :class:`pipeline.store.StoreLayout`."""
        if denoiser.channels != layout.channels:
            raise DenoiserMismatchError(f"denoiser has {denoiser.channels} channels, the features {layout.channels}")
        return cls(denoiser=denoiser, backbone=layout.backbone, block=layout.block, input_size=tuple(layout.input_size),
                   patch_size=layout.patch_size, stride=layout.stride, training=dict(training))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "channels": self.channels,
                                      **d}, default=str))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DenoiserSpec:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a DVT denoiser spec (format {d.get('format')!r}, expected {FORMAT!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"denoiser format {d['format_version']} is newer than this package reads "
                             f"({FORMAT_VERSION}); upgrade dvt-pipeline")
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["denoiser"] = DenoiserConfig(**kwargs["denoiser"])
        kwargs["input_size"] = tuple(kwargs["input_size"])
        return cls(**kwargs)

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise :class:`DenoiserMismatchError` naming both sides unless ``backbone`` makes the features we expect."""
        ours = {"backbone": self.backbone, "block": self.block, "channels": self.channels,
                "patch_size": self.patch_size, "stride": self.stride}
        theirs = {"backbone": backbone.name, "block": backbone.block, "channels": backbone.embed_dim,
                  "patch_size": backbone.patch_size, "stride": backbone.stride}
        diff = [k for k in ours if ours[k] != theirs[k]]
        if diff:
            raise DenoiserMismatchError(
                "denoiser was trained for other features than this backbone gives: "
                + "; ".join(f"{k}: denoiser {ours[k]!r}, backbone {theirs[k]!r}" for k in diff)
                + ". Use the denoiser trained for this backbone, or build the backbone the denoiser names.")

    def backbone_config(self, weights: str = "hub", input_size: int | None = None) -> BackboneConfig:
        size = input_size or self.input_size[0]
        return BackboneConfig(model=self.backbone, weights=weights, block=self.block, stride=self.stride,
                              img_size=size)


class Denoiser(nn.Module):
    """``clean = blocks(raw + pos_embed)`` on ``(B, gh, gw, C)`` features (any grid)."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.config = config
        c = config.channels
        self.pos_embed = nn.Parameter(torch.randn(1, config.pos_grid[0] * config.pos_grid[1], c) * 0.02) \
            if config.pos_embed else None
        self.blocks = nn.Sequential(*[
            Block(dim=c, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                  norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            for _ in range(config.num_blocks)])

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The positional embedding resampled to ``grid``: ``(1, gh * gw, C)``."""
        if self.pos_embed is None:
            return None
        if tuple(grid) == self.config.pos_grid:
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.pos_embed, list(grid), old_size=list(self.config.pos_grid),
                                      num_prefix_tokens=0)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.ndim != 4 or raw.shape[-1] != self.config.channels:
            raise DenoiserMismatchError(f"denoiser expects features (B, gh, gw, {self.config.channels}), "
                                        f"got {tuple(raw.shape)}")
        b, h, w, c = raw.shape
        x = raw.reshape(b, h * w, c)
        pos = self.pos_embed_for((h, w))
        if pos is not None:
            x = x + pos.to(x.dtype)
        return self.blocks(x).reshape(b, h, w, c)


class DenoisedViT(nn.Module):
    """A frozen backbone followed by a denoiser: images in, denoised patch features out.

    Args:
        backbone: a :class:`pipeline.vit.backbone.Backbone`.
        denoiser: a trained :class:`Denoiser`.
        spec: its :class:`DenoiserSpec`; when given, the backbone is checked against it.
    """

    def __init__(self, backbone: Backbone, denoiser: Denoiser, spec: DenoiserSpec | None = None):
        super().__init__()
        if spec is not None:
            spec.check_backbone(backbone)
        if backbone.embed_dim != denoiser.config.channels:
            raise DenoiserMismatchError(f"backbone {backbone.name} gives {backbone.embed_dim} channels, the "
                                        f"denoiser takes {denoiser.config.channels}")
        self.backbone = backbone
        self.denoiser = denoiser
        self.spec = spec

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, return_raw: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Denoised features ``(B, gh, gw, C)`` of RGB ``pixels`` in ``[0, 1]`` (and the raw ones on request)."""
        raw = self.backbone.features(pixels)
        clean = self.denoiser(raw)
        return (raw, clean) if return_raw else clean

    forward = features

    @classmethod
    def from_file(cls, path: str, weights: str = "hub", *, backbone: Backbone | None = None,
                  input_size: int | None = None, device: str | torch.device = "cpu") -> DenoisedViT:
        """Load a denoiser file and build (or check) its backbone.

        Args:
            path: denoiser file (local path or fsspec URL).
            weights: backbone weights when the backbone is built here: ``"hub"``, ``"none"`` or a file.
            backbone: use this backbone instead; it must match the one the denoiser names.
            input_size: square input size the backbone is built for (default: the training size).
        """
        denoiser, spec = load_denoiser(path, device=device)
        if backbone is None:
            backbone = create_backbone(spec.backbone_config(weights, input_size))
        return cls(backbone, denoiser, spec).to(device).eval()


# ------------------------------------------------------------------------------------------------ file format

def save_denoiser(path: str, denoiser: Denoiser, spec: DenoiserSpec) -> str:
    """Write weights and spec to one ``.safetensors`` file at ``path`` (local or fsspec URL); returns ``path``."""
    from safetensors.torch import save

    from ..io.storage import filesystem

    if spec.denoiser != denoiser.config:
        raise ValueError(f"spec architecture {spec.denoiser} differs from the model's {denoiser.config}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in denoiser.state_dict().items()}
    data = save(state, metadata={SPEC_KEY: json.dumps(spec.to_dict(), sort_keys=True)})
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(p, data)
    _log.info("saved denoiser (%s, %d block(s), %d channels) to %s", spec.backbone, spec.denoiser.num_blocks,
              spec.channels, path)
    return path


def _header(data: bytes, path: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None


def read_denoiser_bytes(path: str) -> bytes:
    """The bytes of a denoiser file (local path or fsspec URL), with a clear error when it is missing."""
    from ..io.storage import filesystem, storage_errors

    fs, p = filesystem(str(path))
    with storage_errors(str(path)):
        if not fs.exists(p):
            raise FileNotFoundError(f"denoiser file {path} does not exist; train one with `dvt train` "
                                    f"(it writes <output>/denoiser.safetensors)")
        return fs.cat_file(p)


def read_spec(path: str, data: bytes | None = None) -> DenoiserSpec:
    """The :class:`DenoiserSpec` of a denoiser file."""
    data = read_denoiser_bytes(path) if data is None else data
    meta = _header(data, path).get("__metadata__") or {}
    if SPEC_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not a DVT denoiser (no {SPEC_KEY!r} metadata)")
    return DenoiserSpec.from_dict(json.loads(meta[SPEC_KEY]))


def load_denoiser(path: str, device: str | torch.device = "cpu") -> tuple[Denoiser, DenoiserSpec]:
    """Read a denoiser file: ``(model in eval mode, spec)``. Works on local paths and fsspec URLs, without Ray."""
    from safetensors.torch import load

    data = read_denoiser_bytes(path)
    spec = read_spec(path, data)
    model = Denoiser(spec.denoiser)
    model.load_state_dict(load(data), strict=True)
    return model.to(device).eval(), spec
