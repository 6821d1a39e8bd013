"""Compact stores: feature arrays kept as int8 with per-image, per-channel scale and offset, or as PCA
coefficients, decoded by every read through :class:`FeatureStore` and decodable by hand (``docs/store.md``).

A compact store's layout has ``compact = {"kind": "int8"}`` or ``{"kind": "pca", "k": K,
"explained_variance": {array: share}, "sample": images}``. What is stored, per feature array ``name``:

* ``int8``: ``<name>_int8`` ``(n, gh, gw, C)`` int8, ``<name>_scale`` and ``<name>_offset`` ``(n, C)`` float32;
  ``x = q * scale + offset``. Each channel of each image spans ``[-127, 127]``, so the error is at most half a
  step, ``(max - min) / 508`` of that channel in that image.
* ``pca``: ``<name>_pca`` ``(n, gh, gw, K)`` in the store's dtype, ``<name>_pca_basis`` ``(C, K)`` (orthonormal
  columns) and ``<name>_pca_mean`` ``(C,)`` float32, fitted on a sample before the store is written;
  ``x = coef @ basis.T + mean``.

No array of a compact store carries a feature array's own name, and its ``format_version`` is 2, so a reader
that would take the codes for features fails at once: an older ``dvt`` refuses the format, and a plain Zarr
or xarray read finds no ``raw`` / ``clean`` variable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import StoreError
from .handle import StoreHandle
from .layout import KINDS, StoreLayout, check_compact

__all__ = ["KINDS", "check_compact", "storage_arrays", "stored_names", "encode", "decode", "quantize", "dequantize"]

def description(name: str) -> str | None:
    """What a compact store's array holds (``None`` for a feature array's own name)."""
    for suffix, text in (("_int8", "int8 codes of {}: x = q * scale + offset (per image and channel)"),
                         ("_scale", "per-image, per-channel scale of {}_int8"),
                         ("_offset", "per-image, per-channel offset of {}_int8"),
                         ("_pca_basis", "PCA basis (C, K) of {}: x = coef @ basis.T + mean"),
                         ("_pca_mean", "PCA mean (C,) of {}"),
                         ("_pca", "PCA coefficients of {}: x = coef @ basis.T + mean")):
        if name.endswith(suffix):
            return text.format(name[: -len(suffix)])
    return None


def dimension_names(name: str, ndim: int) -> tuple[str, ...]:
    """xarray's dims of a store array: PCA coefficients run over ``component``, not ``channel``."""
    if name.endswith("_pca_basis"):
        return ("channel", "component")
    if name.endswith("_pca_mean"):
        return ("channel",)
    if name.endswith("_pca"):
        return ("image", "y", "x", "component")
    return ("image", "y", "x", "channel") if ndim == 4 else ("image", "channel")


def storage_arrays(layout: StoreLayout) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """Every Zarr array of a store: ``name -> (shape of one row or of the whole array, dtype, one row per image)``."""
    out: dict[str, tuple[tuple[int, ...], str, bool]] = {}
    kind = (layout.compact or {}).get("kind")
    for name in layout.arrays:
        shape = layout.array_shape(name)
        if kind is None:
            out[name] = (shape, layout.dtype, True)
        elif kind == "int8":
            out[f"{name}_int8"] = (shape, "int8", True)
            out[f"{name}_scale"] = (shape[-1:], "float32", True)
            out[f"{name}_offset"] = (shape[-1:], "float32", True)
        else:
            k = int(layout.compact["k"])
            out[f"{name}_pca"] = ((*shape[:-1], k), layout.dtype, True)
            out[f"{name}_pca_basis"] = ((shape[-1], k), "float32", False)
            out[f"{name}_pca_mean"] = ((shape[-1],), "float32", False)
    return out


def stored_names(layout: StoreLayout, names: Sequence[str]) -> list[str]:
    """The per-image arrays to read for the feature arrays ``names``."""
    kind = (layout.compact or {}).get("kind")
    if kind is None:
        return list(names)
    if kind == "int8":
        return [f"{n}_{part}" for n in names for part in ("int8", "scale", "offset")]
    return [f"{n}_pca" for n in names]


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q int8, scale, offset)`` of ``(n, ..., C)``: per image and channel, the range mapped onto ``[-127, 127]``."""
    x = np.asarray(x, dtype=np.float32)
    axes = tuple(range(1, x.ndim - 1))
    lo, hi = x.min(axes), x.max(axes)
    offset = (hi + lo) / 2
    scale = np.where(hi > lo, (hi - lo) / 254, 1.0).astype(np.float32)
    expand = (slice(None), *([None] * len(axes)), slice(None))
    q = np.clip(np.rint((x - offset[expand]) / scale[expand]), -127, 127).astype(np.int8)
    return q, scale, offset.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, dtype: str = "float32") -> np.ndarray:
    expand = (slice(None), *([None] * (q.ndim - 2)), slice(None))
    return (q.astype(np.float32) * scale[expand] + offset[expand]).astype(dtype)


def _basis(store: StoreHandle, name: str) -> tuple[np.ndarray, np.ndarray]:
    cache = store.__dict__.setdefault("_pca_basis", {})
    if name not in cache:
        basis = np.asarray(store.zarr_arrays[f"{name}_pca_basis"][...], dtype=np.float32)
        mean = np.asarray(store.zarr_arrays[f"{name}_pca_mean"][...], dtype=np.float32)
        if not (np.isfinite(basis).all() and np.isfinite(mean).all()):
            raise StoreError(f"{store.url}: the PCA basis of {name!r} was never written; make PCA stores with "
                             f"`dvt store convert` (pipeline.store.convert.convert_store)")
        cache[name] = (basis, mean)
    return cache[name]


def encode(store: StoreHandle, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feature arrays ``(n, gh, gw, C)`` of a unit -> the arrays the store keeps."""
    kind = store.layout.compact["kind"]
    out: dict[str, np.ndarray] = {}
    for name, x in data.items():
        if kind == "int8":
            out[f"{name}_int8"], out[f"{name}_scale"], out[f"{name}_offset"] = quantize(x)
        else:
            basis, mean = _basis(store, name)
            out[f"{name}_pca"] = ((np.asarray(x, dtype=np.float32) - mean) @ basis).astype(store.layout.dtype)
    return out


def decode(store: StoreHandle, stored: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The stored arrays of a read -> feature arrays ``(n, gh, gw, C)`` in the store's dtype."""
    kind = store.layout.compact["kind"]
    dtype = store.layout.dtype
    if kind == "int8":
        return {n: dequantize(stored[f"{n}_int8"], stored[f"{n}_scale"], stored[f"{n}_offset"], dtype) for n in names}
    out = {}
    for n in names:
        basis, mean = _basis(store, n)
        out[n] = (stored[f"{n}_pca"].astype(np.float32) @ basis.T + mean).astype(dtype)
    return out


def write_basis(store: StoreHandle, bases: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a PCA store's ``(basis (C, K), mean (C,))`` per feature array (driver, before any unit)."""
    missing = set(store.layout.arrays) - set(bases)
    if missing:
        raise StoreError(f"{store.url}: no PCA basis for arrays {sorted(missing)}")
    for name, (basis, mean) in bases.items():
        store.zarr_arrays[f"{name}_pca_basis"][...] = np.asarray(basis, dtype=np.float32)
        store.zarr_arrays[f"{name}_pca_mean"][...] = np.asarray(mean, dtype=np.float32)
    store.__dict__.pop("_pca_basis", None)
