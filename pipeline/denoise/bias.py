"""A dataset-level artifact map: the mean of stage-1 ``G`` over many images, subtracted at one forward pass.

Stage 1 fits an artifact map ``G`` per image. Where the artifact is the same in every image (a positional
embedding leaking through), their mean estimates it with the per-image noise averaged away, and
``clean = raw - mean G`` removes it at the cost of the backbone alone. What it cannot remove is what changes
from image to image (content-dependent high-norm tokens): ``dvt`` or a trained denoiser does that.

The map lives in a small artifact file (``.npz``: the map and a JSON record of the backbone, weights, block,
input size, patch grid and where the map came from), made by :func:`from_store` (a finished ``dvt`` store, e.g.
``dvt denoise --limit 64`` over a sample) or :func:`from_images`, and checked against the run's backbone and
grid before it is applied (:func:`check_artifact`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.storage import filesystem

__all__ = ["ArtifactFileError", "ArtifactMap", "from_store", "from_images", "check_artifact", "ARTIFACT_KEYS"]

_log = logging.getLogger(__name__)

#: Geometry fields an artifact file records and a run must match (the store layout's names).
ARTIFACT_KEYS = ("backbone", "block", "input_size", "patch_size", "stride", "grid", "channels")


class ArtifactFileError(ValueError):
    """An artifact file that cannot be read or does not fit the run; the message says what to do."""


@dataclass
class ArtifactMap:
    """A dataset-level artifact map ``(gh, gw, C)`` and what it was made for.

    Attributes:
        map: float32 ``(gh, gw, C)``.
        meta: the geometry (:data:`ARTIFACT_KEYS`), ``weights`` (identity), ``images`` (how many maps were
            averaged), ``source`` (a store URL or ``"images"``), ``stage1_version``.
    """

    map: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, url: str) -> str:
        """Write the ``.npz`` (local path or URL); returns its SHA-1."""
        buf = io.BytesIO()
        np.savez(buf, map=self.map.astype(np.float32), meta=np.array(json.dumps(self.meta, sort_keys=True)))
        data = buf.getvalue()
        fs, path = filesystem(url)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and not url.startswith(("s3://", "s3a://", "gs://", "memory://")):
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        _log.info("artifact map %s: %s over %d images from %s", url, "x".join(map(str, self.map.shape)),
                  self.meta.get("images", 0), self.meta.get("source"))
        return hashlib.sha1(data).hexdigest()

    @classmethod
    def load(cls, url: str) -> tuple[ArtifactMap, str]:
        """The map in ``url`` and the file's SHA-1 (recorded in the stores it makes)."""
        fs, path = filesystem(url)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactFileError(f"artifact file {url} does not exist: make one with `dvt artifact --store "
                                    f"STORE --output {url}` from a finished `dvt denoise` store") from None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                amap, meta = z["map"].astype(np.float32), json.loads(str(z["meta"]))
        except (ValueError, KeyError, OSError) as e:
            raise ArtifactFileError(f"{url} is not an artifact file from `dvt artifact` ({e})") from None
        return cls(amap, meta), hashlib.sha1(data).hexdigest()

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw - map`` for features ``(B, gh, gw, C)``."""
        return raw - torch.as_tensor(self.map, device=raw.device, dtype=raw.dtype)


def _geometry(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.loads(json.dumps(meta.get(k))) for k in ARTIFACT_KEYS}


def check_artifact(amap: ArtifactMap, url: str, geometry: Mapping[str, Any],
                   weights: Mapping[str, Any] | None = None) -> None:
    """Refuse a map made for another backbone, block, input size or grid (or other weights), in one line."""
    ours, theirs = _geometry(amap.meta), _geometry(geometry)
    diff = [k for k in ARTIFACT_KEYS if ours[k] != theirs[k]]
    if not diff and weights is not None and amap.meta.get("weights") and \
            json.loads(json.dumps(dict(weights))) != amap.meta["weights"]:
        diff = ["weights"]
        ours["weights"], theirs["weights"] = amap.meta["weights"], dict(weights)
    if diff:
        detail = "; ".join(f"{k}: file has {ours[k]!r}, this run {theirs[k]!r}" for k in diff)
        raise ArtifactFileError(f"artifact file {url} was made for other features ({detail}): make one for this "
                                f"backbone and input size with `dvt artifact --store STORE` from a `dvt denoise` "
                                f"store of it")
    if tuple(amap.map.shape) != (*theirs["grid"], theirs["channels"]):
        raise ArtifactFileError(f"artifact file {url} holds a map of shape {tuple(amap.map.shape)}, its record says "
                                f"{(*theirs['grid'], theirs['channels'])}: the file is damaged; make it again")


def from_store(url: str, *, limit: int | None = None, batch: int = 64) -> ArtifactMap:
    """The mean of the ``artifact`` array (stage-1 ``G``) over a ``dvt`` store's ok images (the first ``limit``)."""
    from ..store import FeatureStore

    store = FeatureStore.open(url)
    if "artifact" not in store.layout.arrays:
        raise ArtifactFileError(f"{url} holds no artifact array (G): make the store with `dvt denoise --method dvt` "
                                f"without --no-artifact")
    method = store.attrs.get("method", {}).get("method", "dvt")
    if method != "dvt" or store.attrs.get("method", {}).get("stage") == 2:
        raise ArtifactFileError(f"{url} was not made by stage 1 (method {method!r}); use a `dvt denoise` store")
    ids = store.ids()[:limit] if limit else store.ids()
    if not len(ids):
        raise ArtifactFileError(f"{url} has no finished images to average")
    total = np.zeros(store.layout.image_shape, dtype=np.float64)
    for s in range(0, len(ids), batch):
        total += store.read("artifact", ids[s:s + batch]).astype(np.float64).sum(0)
    meta = {**store.layout.geometry(), "weights": store.attrs.get("weights") or {}, "images": int(len(ids)),
            "source": store.url, "stage1_version": store.attrs.get("stage1_version")}
    return ArtifactMap((total / len(ids)).astype(np.float32), meta)


def from_images(backbone, images: torch.Tensor, stage1=None, *, image_ids: Sequence[int] | None = None,
                seed: int = 0, batch: int = 4, weights: Mapping[str, Any] | None = None) -> ArtifactMap:
    """Stage 1 on ``images`` ``(N, 3, S, S)`` here (no store), and the mean of its ``G`` maps."""
    from ..stage1.fit import STAGE1_VERSION, fit_images

    ids = list(range(len(images))) if image_ids is None else list(image_ids)
    total = None
    for s in range(0, len(images), batch):
        for r in fit_images(backbone, images[s:s + batch], stage1, image_ids=ids[s:s + batch], seed=seed):
            total = r.artifact.double() if total is None else total + r.artifact.double()
    size = images.shape[-1]
    grid = backbone.grid(size) if hasattr(backbone, "grid") else tuple(total.shape[:2])
    meta = {"backbone": getattr(backbone, "name", type(backbone).__name__), "block": getattr(backbone, "block", -1),
            "input_size": [size, size], "patch_size": backbone.patch_size, "stride": backbone.stride,
            "grid": list(grid), "channels": int(total.shape[-1]), "weights": dict(weights or {}),
            "images": len(images), "source": "images", "stage1_version": STAGE1_VERSION}
    return ArtifactMap((total / len(images)).float().numpy(), meta)
