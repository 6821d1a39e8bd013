"""Make a compact copy of a finished feature store: int8 codes, or PCA to K channels fitted on a sample.

``dvt store convert SRC DST --compress int8|pca --pca-k K`` (or :func:`convert_store`). The copy has the same
listing, manifest status and geometry; its layout records ``compact`` (:mod:`pipeline.store.compact`), and
every read through :class:`pipeline.store.FeatureStore` returns decoded features, so stage-2 training, apply,
eval and show use it unchanged. ``dvt denoise --compress int8`` writes int8 directly (no fit needed); PCA needs
features to fit its basis on, so it is made from a store (a sample run of ``dvt denoise --limit N`` will do).

PCA is fitted per feature array on the tokens of ``sample`` images drawn at random: the channel covariance is
summed batch by batch (float64), so the sample never sits in memory at once; the basis is its top ``K``
eigenvectors and the explained variance their share of the trace.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from .manifest import STATUS_OK
from . import FeatureStore
from .compact import KINDS, write_basis

__all__ = ["CompactConfig", "fit_pca", "convert_store"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactConfig:
    """How to compact: ``kind`` (``int8`` or ``pca``), ``k`` PCA channels, ``sample`` images to fit PCA on,
    ``batch`` images per read and written unit, ``seed`` of the sample."""

    kind: str = "int8"
    k: int = 64
    sample: int = 256
    batch: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--compress must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.sample < 1 or self.batch < 1:
            raise ValueError(f"--sample and --batch must be at least 1, got {self.sample} and {self.batch}")


def fit_pca(store: FeatureStore, name: str, ids: np.ndarray, k: int, batch: int = 32) -> tuple[np.ndarray, np.ndarray, float]:
    """``(basis (C, K), mean (C,), explained variance share)`` of array ``name`` over the tokens of ``ids``."""
    c = store.layout.channels
    total, outer, count = np.zeros(c), np.zeros((c, c)), 0
    for s in range(0, len(ids), batch):
        x = store.read(name, ids[s:s + batch]).reshape(-1, c).astype(np.float64)
        total += x.sum(0)
        outer += x.T @ x
        count += len(x)
    mean = total / count
    cov = outer / count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    share = float(values[:k].sum() / max(values.sum(), 1e-30))
    return vectors[:, :k].astype(np.float32), mean.astype(np.float32), share


def convert_store(src_url: str, dst_url: str, config: CompactConfig = CompactConfig(), *,
                  overwrite: bool = False) -> FeatureStore:
    """Write a compact copy of the finished rows of ``src_url`` to ``dst_url``; returns the new store."""
    src = FeatureStore.open(src_url)
    if src.layout.compact:
        raise ValueError(f"{src_url} is already compact ({src.layout.compact['kind']}); convert its plain original")
    ids = src.ids()
    if not len(ids):
        raise ValueError(f"{src_url} has no finished images to copy")
    compact: dict = {"kind": config.kind}
    bases = {}
    if config.kind == "pca":
        sample = np.sort(np.random.default_rng(config.seed).choice(ids, min(config.sample, len(ids)), replace=False))
        shares = {}
        for name in src.layout.arrays:
            basis, mean, shares[name] = fit_pca(src, name, sample, config.k, config.batch)
            bases[name] = (basis, mean)
        compact.update(k=config.k, explained_variance=shares, sample=int(len(sample)))
        _log.info("PCA to %d of %d channels on %d images: explained variance %s", config.k, src.layout.channels,
                  len(sample), ", ".join(f"{n} {v:.4f}" for n, v in shares.items()))
    layout = dataclasses.replace(src.layout, compact=compact)
    dst = FeatureStore.create(dst_url, layout, src.listing(), overwrite=overwrite)
    if bases:
        write_basis(dst, bases)
    manifest = src.manifest()
    rows = {int(r["image_id"]): r for r in manifest.to_pylist() if r["status"] == STATUS_OK}
    for s in range(0, len(ids), config.batch):
        part = ids[s:s + config.batch]
        records = [{k: rows[int(i)].get(k) for k in ("image_id", "uri", "width", "height", "seconds")} for i in part]
        dst.write_unit(records, src.get(part))
    _log.info("%s: %d images copied as %s", dst_url, len(ids), config.kind)
    return dst.refresh()
