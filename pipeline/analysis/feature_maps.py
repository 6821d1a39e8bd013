"""Where feature maps for pictures and quick checks come from: a store's rows or images run through a model.

A *source* is a named set of feature maps of the same images: ``raw`` (the backbone), ``stage-1`` (a
store's ``clean`` array, the neural field ``F``) and ``stage-2`` (a store written by the apply job, whose
``clean`` holds the denoiser's output, or a denoiser run on the fly). Maps come from a feature store
(:func:`load_store_rows`) or are computed from images (:func:`features_from_images`). ``dvt show`` draws
them; the evaluation harness (:mod:`pipeline.eval`) measures them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..vit.backbone import FeatureBackbone
from ..io.decode import decode_image, resize_to_tensor
from .metrics import FeatureFn
from ..io.storage import filesystem

__all__ = ["FeatureSet", "load_store_rows", "load_image", "features_from_images", "stage1_maps", "load_models"]

_log = logging.getLogger(__name__)

@dataclass
class FeatureSet:
    """Feature maps ``(N, gh, gw, C)`` of ``N`` images, each ``None`` when the source lacks it.

    Attributes:
        raw, clean, artifact: backbone features, denoised features, the stage-1 artifact map ``G``.
        images: ``(N, 3, S, S)`` pixels in ``[0, 1]`` at the features' input size (``None`` rows are images
            that could not be read).
        titles: a short name per image.
        uris: where each image came from.
    """

    raw: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    artifact: torch.Tensor | None = None
    images: list[torch.Tensor | None] | None = None
    titles: list[str] = field(default_factory=list)
    clean_fine: torch.Tensor | None = None  # (N, gh', gw', C): a store's clean_x2 / clean_x4, when it has one
    uris: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.titles)


def load_image(uri: str, size: int) -> torch.Tensor:
    """Read, decode and resize one image to ``(3, size, size)`` in ``[0, 1]``."""
    fs, path = filesystem(uri)
    return resize_to_tensor(decode_image(fs.cat_file(path)).pixels, size)


def _title(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def load_store_rows(url: str, rows: Sequence[int] | None = None, *, limit: int | None = None,
                    images: bool = True, arrays: Sequence[str] | None = None) -> FeatureSet:
    """Rows of a feature store (default: every finished row, at most ``limit``) and, on request, their images
    read from the manifest's URIs and resized to the store's input size (``None`` where unreadable)."""
    from ..store import FeatureStore, upsample_factor

    store = FeatureStore.open(url)
    ids = np.asarray(rows if rows is not None else store.ids(), dtype=np.int64)
    if limit is not None:
        ids = ids[:limit]
    if not len(ids):
        raise ValueError(f"{url} has no finished rows to evaluate.")
    names = [a for a in (arrays or ("raw", "clean", "artifact")) if a in store.layout.arrays]
    data = store.get(ids, names, as_torch=True)
    listing = store.listing()
    uri_of = dict(zip(listing["image_id"].to_pylist(), listing["uri"].to_pylist()))
    uris = [str(uri_of.get(int(i), f"row {i}")) for i in ids]
    pictures: list[torch.Tensor | None] | None = None
    if images:
        pictures = []
        for uri in uris:
            try:
                pictures.append(load_image(uri, store.layout.input_size[0]))
            except Exception as e:  # noqa: BLE001 - a missing picture leaves its panel blank
                _log.warning("cannot read image %s (%s); its picture is left blank", uri, e)
                pictures.append(None)
    fine = [a for a in store.layout.arrays if upsample_factor(a) > 1]
    return FeatureSet(raw=data.get("raw"), clean=data.get("clean"), artifact=data.get("artifact"), images=pictures,
                      titles=[f"{int(i)}: {_title(u)}" for i, u in zip(ids, uris)], uris=uris,
                      clean_fine=store.read(fine[0], ids, as_torch=True) if fine and arrays is None else None)


@torch.no_grad()
def features_from_images(uris: Sequence[str], size: int, raw_fn: FeatureFn | None = None,
                         clean_fn: FeatureFn | None = None, batch: int = 8) -> FeatureSet:
    """Decode ``uris`` at ``size`` pixels and run the feature functions over them (``raw_fn``: the backbone;
    ``clean_fn``: e.g. a stage-2 :class:`pipeline.stage2.denoiser.DenoisedViT`)."""
    pixels = torch.stack([load_image(u, size) for u in uris])

    def run(fn: FeatureFn | None) -> torch.Tensor | None:
        if fn is None:
            return None
        return torch.cat([fn(pixels[i:i + batch]).float().cpu() for i in range(0, len(pixels), batch)])

    return FeatureSet(raw=run(raw_fn), clean=run(clean_fn), images=list(pixels), titles=[_title(u) for u in uris],
                      uris=list(uris))


def stage1_maps(backbone: FeatureBackbone, pixels: torch.Tensor, preset: str = "ci", seed: int = 0,
                batch: int = 4) -> dict[str, torch.Tensor]:
    """Fit stage 1 to ``pixels`` ``(N, 3, S, S)`` with a named preset: ``raw``, ``clean`` and ``artifact``."""
    from ..stage1.fit import Stage1Config, fit_images

    config = Stage1Config.preset(preset)
    out: dict[str, list[torch.Tensor]] = {"raw": [], "clean": [], "artifact": []}
    for start in range(0, len(pixels), batch):
        ids = list(range(start, min(start + batch, len(pixels))))
        for r in fit_images(backbone, pixels[ids[0]:ids[-1] + 1], config, image_ids=ids, seed=seed):
            out["raw"].append(r.raw)
            out["clean"].append(r.clean)
            out["artifact"].append(r.artifact)
    return {k: torch.stack(v) for k, v in out.items()}


def load_models(model: str, weights: str, input_size: int, *, block: int = -1, stride: int | None = None,
                denoiser: str | None = None) -> tuple[Any, Any]:
    """The backbone, and a stage-2 :class:`pipeline.stage2.denoiser.DenoisedViT` over it when ``denoiser`` names a file
    (``None`` otherwise)."""
    from ..vit.backbone import BackboneConfig, create_backbone

    backbone = create_backbone(BackboneConfig(model=model, weights=weights, block=block, stride=stride,
                                              img_size=input_size))
    if not denoiser:
        return backbone, None
    try:
        from ..stage2.denoiser import DenoisedViT
    except ImportError as e:
        raise ValueError(f"--denoiser needs the stage-2 module pipeline.stage2.denoiser ({e}).") from None
    return backbone, DenoisedViT.from_file(denoiser, backbone=backbone).eval()
