"""Feature sources: what each column of the evaluation report measures.

A source is a name and either a **store array** (``raw`` or ``clean`` of a ``dvt denoise`` / ``dvt apply``
store, or any store written for a distilled student) or an **encoder** (a backbone, optionally followed by
a stage-2 denoiser) that computes features here. Store sources give the features of the store's square
resize of each image; encoders can also see augmented crops at any size, which the reference probe
protocol needs.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..vit.backbone import IMAGENET_MEAN, IMAGENET_STD
from ..io.storage import is_local, local_path
from .datasets import load_images

__all__ = ["Encoder", "FeatureSource", "parse_source", "store_features", "compute_features", "model_sources",
           "stage1_source"]

_log = logging.getLogger(__name__)



def _uri_key(uri: str) -> str:
    return local_path(uri) if is_local(uri) else uri.rstrip("/")


def store_features(store: Any, image_paths: Sequence[str], array: str = "clean") -> torch.Tensor:
    """Rows of ``store`` (a :class:`pipeline.store.FeatureStore`) for ``image_paths``, matched by URI.

    A path matches a row whose URI is the same file; failing that, a row whose file name is the same (so a
    store made from a copy of the dataset elsewhere still matches when the names are unique).
    """
    listing = store.listing()
    uris = [str(u) for u in listing["uri"].to_pylist()]
    ids = listing["image_id"].to_numpy()
    by_uri = {_uri_key(u): int(i) for u, i in zip(uris, ids)}
    names: dict[str, list[int]] = {}
    for u, i in zip(uris, ids):
        names.setdefault(posixpath.basename(u), []).append(int(i))
    rows, missing = [], []
    for p in image_paths:
        row = by_uri.get(_uri_key(p))
        if row is None and len(names.get(posixpath.basename(p), [])) == 1:
            row = names[posixpath.basename(p)][0]
        if row is None:
            missing.append(p)
        rows.append(row)
    if missing:
        raise KeyError(f"{len(missing)} images are not in {store.url} (first: {missing[0]}); make the store from "
                       "the dataset's images, e.g. dvt denoise --images <root>/JPEGImages.")
    return store.read(array, rows, as_torch=True)


class Encoder:
    """A frozen feature extractor for the probes: patch features and, where the model has one, its class
    token (the reference depth head reads both).

    Args:
        backbone: a :class:`pipeline.vit.backbone.Backbone`.
        denoiser: optional :class:`pipeline.stage2.denoiser.DenoisedViT` over the same backbone (stage 2); its
            features replace the backbone's, the class token stays the backbone's.
        imagenet_norm: normalise pixels with ImageNet's mean and std whatever the model's own are (the
            reference evaluation does so for every model; it differs from timm's for CLIP-family weights).
    """

    def __init__(self, backbone: Any, denoiser: Any = None, imagenet_norm: bool = False):
        self.backbone = backbone
        self.denoiser = denoiser
        self.patch_size = int(backbone.patch_size)
        self.stride = int(backbone.stride)
        own_mean = tuple(float(v) for v in getattr(backbone, "mean", (0.5, 0.5, 0.5)))
        own_std = tuple(float(v) for v in getattr(backbone, "std", (0.25, 0.25, 0.25)))
        self._remap = None
        if imagenet_norm and (own_mean, own_std) != (IMAGENET_MEAN, IMAGENET_STD):
            # pixels p' with (p' - own_mean) / own_std == (p - imagenet_mean) / imagenet_std
            scale = torch.tensor(own_std) / torch.tensor(IMAGENET_STD)
            shift = torch.tensor(own_mean) - scale * torch.tensor(IMAGENET_MEAN)
            self._remap = (scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1))
        self.mean = IMAGENET_MEAN if imagenet_norm else own_mean  # zero after normalising: the padding colour
        self.has_cls = (not getattr(backbone, "custom", True)) and getattr(backbone, "num_prefix_tokens", 0) > 0

    @property
    def device(self) -> torch.device:
        return next(iter(self.backbone.parameters()), torch.zeros(0)).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, with_cls: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> features ``(B, gh, gw, C)`` and class token ``(B, C)`` (or None)."""
        pixels = pixels.to(self.device)
        if self._remap is not None:
            pixels = pixels * self._remap[0].to(pixels) + self._remap[1].to(pixels)
        cls = None
        if with_cls and self.has_cls:
            b = self.backbone
            gh, gw = b.grid(tuple(pixels.shape[-2:]))
            ((spatial, prefix),) = b.model.forward_intermediates(
                b.normalize(pixels), indices=[b.block], norm=b.config.norm, return_prefix_tokens=True,
                output_fmt="NLC", intermediates_only=True, stop_early=True)
            raw, cls = spatial.reshape(len(pixels), gh, gw, -1), prefix[:, 0]
            maps = self.denoiser.denoiser(raw) if self.denoiser is not None else raw
        else:
            maps = (self.denoiser or self.backbone).features(pixels)
        return maps, cls


def compute_features(encoder: Encoder, images: torch.Tensor, batch: int = 8,
                     dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Features of ``images`` ``(N, 3, S, S)`` in batches: ``(N, gh, gw, C)`` kept on the CPU as ``dtype``."""
    return torch.cat([encoder.encode(images[i:i + batch])[0].to("cpu", dtype) for i in range(0, len(images), batch)])


@dataclass
class FeatureSource:
    """One column of the report.

    Attributes:
        name: the column title (``raw``, ``stage-1``, ``stage-2``, ``student``, ...).
        url, array: a feature store and the array to read (store sources).
        encoder, input_size: a model and the square size it sees (encoder sources).
        fixed: maps computed elsewhere and the image URIs they belong to (e.g. a stage-1 fit run here).
    """

    name: str
    url: str | None = None
    array: str | None = None
    encoder: Encoder | None = None
    input_size: int | None = None
    fixed: tuple[torch.Tensor, list[str]] | None = None
    _store: Any = field(default=None, repr=False)

    @property
    def store(self) -> Any:
        if self._store is None and self.url:
            from ..store import FeatureStore

            self._store = FeatureStore.open(self.url)
            if self.array is None:
                self.array = "clean" if "clean" in self._store.layout.arrays else "raw"
            if self.array not in self._store.layout.arrays:
                raise ValueError(f"source {self.name}: store {self.url} has no array {self.array!r} (it has "
                                 f"{', '.join(self._store.layout.arrays)}).")
        return self._store

    def describe(self) -> dict[str, Any]:
        if self.fixed is not None:
            return {"kind": "computed here", "images": len(self.fixed[1])}
        if self.url:
            layout = self.store.layout
            return {"kind": "store", "url": self.url, "array": self.array, "backbone": layout.backbone,
                    "input_size": list(layout.input_size), "grid": list(layout.grid)}
        return {"kind": "model", "model": self.encoder.backbone.name, "denoiser": self.encoder.denoiser is not None,
                "input_size": self.input_size}

    def maps(self, image_paths: Sequence[str]) -> torch.Tensor:
        """Features ``(N, gh, gw, C)`` of these dataset images (the store's rows, or computed at ``input_size``)."""
        if self.fixed is not None:
            row = {_uri_key(u): i for i, u in enumerate(self.fixed[1])}
            missing = [p for p in image_paths if _uri_key(p) not in row]
            if missing:
                raise KeyError(f"source {self.name} has no features for {missing[0]}.")
            return self.fixed[0][[row[_uri_key(p)] for p in image_paths]]
        if self.url:
            return store_features(self.store, image_paths, self.array)
        return compute_features(self.encoder, load_images(image_paths, self.input_size))

    def first_rows(self, limit: int) -> tuple[torch.Tensor, list[str]]:
        """The first ``limit`` finished rows of a store source (or fixed maps), with their URIs."""
        if self.fixed is not None:
            return self.fixed[0][:limit], list(self.fixed[1][:limit])
        if not self.url:
            raise ValueError(f"source {self.name} computes features of given images only: pass --images.")
        store = self.store
        ids = store.ids()[:limit]
        if not len(ids):
            raise ValueError(f"{self.url} has no finished rows to evaluate.")
        listing = store.listing()
        uri_of = dict(zip(listing["image_id"].to_pylist(), listing["uri"].to_pylist()))
        return store.read(self.array, ids, as_torch=True), [str(uri_of[int(i)]) for i in ids]


def parse_source(spec: str) -> FeatureSource:
    """``NAME=URL`` or ``NAME:ARRAY=URL`` (e.g. ``stage-1:clean=s3://bucket/voc.zarr``) -> a store source."""
    if "=" not in spec:
        raise ValueError(f"--source {spec!r}: expected NAME=URL or NAME:ARRAY=URL, e.g. raw:raw=s3://bucket/voc.zarr.")
    head, url = spec.split("=", 1)
    name, _, array = head.partition(":")
    if not name or not url:
        raise ValueError(f"--source {spec!r}: both a name and a store URL are needed.")
    return FeatureSource(name=name, url=url, array=array or None)


def model_sources(model: str, weights: str, input_size: int, *, block: int = -1, stride: int | None = None,
                  denoiser: str | None = None, student: str | None = None, imagenet_norm: bool = False,
                  device: str = "cpu") -> list[FeatureSource]:
    """Encoder sources of a model: ``raw`` (the backbone), ``stage-2`` with a denoiser file, and ``student``
    with the weights a ``dvt distill`` run exported for the same architecture."""
    from ..vit.backbone import BackboneConfig, create_backbone
    from ..analysis.feature_maps import load_models

    backbone, denoised = load_models(model, weights, input_size, block=block, stride=stride, denoiser=denoiser)
    backbone = backbone.to(device)
    out = [FeatureSource("raw", encoder=Encoder(backbone, imagenet_norm=imagenet_norm), input_size=input_size)]
    if denoised is not None:
        out.append(FeatureSource("stage-2", encoder=Encoder(backbone, denoised.to(device), imagenet_norm),
                                 input_size=input_size))
    if student:
        distilled = create_backbone(BackboneConfig(model=model, weights=student, block=block, stride=stride,
                                                   img_size=input_size)).to(device)
        out.append(FeatureSource("student", encoder=Encoder(distilled, imagenet_norm=imagenet_norm),
                                 input_size=input_size))
    return out


def stage1_source(source: FeatureSource, uris: Sequence[str], preset: str, seed: int = 0) -> FeatureSource:
    """``stage-1``: a stage-1 fit (``preset``) of ``source``'s backbone on ``uris``, run here."""
    from ..analysis.feature_maps import stage1_maps

    pixels = load_images(list(uris), source.input_size)
    maps = stage1_maps(source.encoder.backbone, pixels.to(source.encoder.device), preset, seed=seed)["clean"]
    return FeatureSource("stage-1", fixed=(maps.float().cpu(), list(uris)), input_size=source.input_size)
