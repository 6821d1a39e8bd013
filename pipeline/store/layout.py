"""What a store holds: :class:`StoreLayout`, the format constants, and reading and checking the root attributes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..io.storage import filesystem, missing_bucket, storage_errors, strip_protocol
from .errors import StoreError, StoreNotFoundError

__all__ = ["FORMAT", "FORMAT_VERSION", "DIMS", "DESCRIPTIONS", "StoreLayout", "describe_weights", "upsample_factor",
           "field_differences", "KINDS", "check_compact", "upgrade_attrs"]

FORMAT = "dvt-feature-store"
FORMAT_VERSION = 2  # 2: compact stores (pipeline.store.compact); plain stores are still written as 1
DIMS = ("image", "y", "x", "channel")
DESCRIPTIONS = {
    "raw": "backbone features as computed, artifacts included",
    "clean": "denoised features (stage-1 neural field F)",
    "artifact": "position-dependent artifact term (stage-1 G)",
}
#: ``clean_x2``, ``clean_x4``: stage 1's clean field F read out on a grid that many times finer (``--upsample``).
FINE_ARRAY = re.compile(r"^clean_x([0-9]+)$")


def upsample_factor(name: str) -> int:
    """How many times finer than the patch grid an array is: ``k`` for ``clean_x<k>``, else 1."""
    match = FINE_ARRAY.match(name)
    return int(match.group(1)) if match else 1


KINDS = ("int8", "pca")


def check_compact(compact: Mapping[str, Any] | None, channels: int) -> None:
    """Refuse an unknown kind or a PCA rank outside ``[1, C)``, in one line."""
    if compact is None:
        return
    kind = compact.get("kind")
    if kind not in KINDS:
        raise ValueError(f"compact kind must be one of {KINDS}, got {kind!r}")
    if kind == "pca" and not 1 <= int(compact.get("k", 0)) < channels:
        raise ValueError(f"--pca K must be between 1 and {channels - 1} (the features have {channels} channels), "
                         f"got {compact.get('k')}")


@dataclass(frozen=True)
class StoreLayout:
    """What a store holds and which run settings it must match.

    Attributes:
        backbone: backbone name (timm name or ``package.module:factory``).
        block: transformer block the features come from (non-negative index).
        input_size: ``(height, width)`` in pixels the backbone sees.
        patch_size, stride: ViT patch size and stride in pixels.
        grid: feature grid ``(gh, gw)``.
        channels: feature channels ``C``.
        dtype: ``"float16"`` (default, half the bytes) or ``"float32"``.
        arrays: array names; ``clean`` always, ``raw`` (needed to train on the store), ``artifact`` and more
            optionally.
        compressor: ``None`` (chunk object = raw little-endian bytes) or ``"zstd"``.
        compact: ``None``, or how the feature arrays are kept smaller (:mod:`pipeline.store.compact`).
        method: how the rows were computed, recorded as given (JSON-serialisable): the stage-1 configuration
            (``dvt denoise``), another method's record (``{"method": "average", ...}``, ``docs/methods.md``), or
            the stage-2 denoiser (``{"stage": 2, ...}``: file, SHA-1, architecture) in ``dvt apply`` stores.
            Stores written before this name was chosen call it ``stage1``; :func:`upgrade_attrs` reads both.
        weights: the backbone's weights identity (:func:`pipeline.vit.weights.weights_identity`); never mixed.
        seed: the seed of views and random draws (stage 1).
        stage1_version: :data:`pipeline.stage1.fit.STAGE1_VERSION` of the algorithm that wrote the rows.
    """

    backbone: str
    block: int
    input_size: tuple[int, int]
    patch_size: int
    stride: int
    grid: tuple[int, int]
    channels: int
    dtype: str = "float16"
    arrays: tuple[str, ...] = ("raw", "clean")
    compressor: str | None = None
    method: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    weights: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    seed: int | None = field(default=None, compare=False)
    stage1_version: int | None = field(default=None, compare=False)
    compact: Mapping[str, Any] | None = None

    #: Settings that decide what the numbers in the arrays mean; never mixed within one store.
    GEOMETRY = ("backbone", "block", "input_size", "patch_size", "stride", "grid", "channels")
    #: Never mixed either: a store holds features of one network, in one storage type.
    FIXED = (*GEOMETRY, "dtype", "arrays", "weights", "compact")
    #: How the rows were computed: another value is refused unless a run allows a configuration change.
    RUN = ("method", "seed", "stage1_version")

    def __post_init__(self) -> None:
        size = self.input_size if isinstance(self.input_size, Sequence) else (self.input_size, self.input_size)
        object.__setattr__(self, "input_size", tuple(int(v) for v in size))
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        object.__setattr__(self, "arrays", tuple(self.arrays))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "method", jsonable(self.method))
        object.__setattr__(self, "weights", jsonable(self.weights or {}))
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype}")
        if "clean" not in self.arrays or len(set(self.arrays)) != len(self.arrays):
            raise ValueError(f"arrays must name 'clean' and each array once, got {self.arrays}")
        bad = [a for a in self.arrays if not a.isidentifier() or a == "manifest"]
        if bad:
            raise ValueError(f"array names must be identifiers other than 'manifest': {bad}")
        if self.compact is not None:
            object.__setattr__(self, "compact", jsonable(dict(self.compact)))
            check_compact(self.compact, self.channels)
        if self.compressor not in (None, "zstd"):
            raise ValueError(f"compressor must be None or 'zstd', got {self.compressor!r}")

    @classmethod
    def from_backbone(cls, backbone: Any, input_size: int | tuple[int, int], **kwargs: Any) -> StoreLayout:
        """Layout for a :class:`pipeline.vit.backbone.Backbone` fed ``input_size`` pixels."""
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        p, s = backbone.patch_size, backbone.stride
        return cls(backbone=backbone.name, block=backbone.block, input_size=(h, w), patch_size=p, stride=s,
                   grid=((h - p) // s + 1, (w - p) // s + 1), channels=backbone.embed_dim, **kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image's entry in every array: ``(gh, gw, C)``."""
        return (*self.grid, self.channels)

    def array_shape(self, name: str) -> tuple[int, int, int]:
        """Shape of one image's entry in array ``name``: :attr:`image_shape`, or for ``clean_x<k>`` the fine grid
        ``(k * (gh - 1) + 1, k * (gw - 1) + 1, C)`` spanning the first to the last patch centre."""
        k = upsample_factor(name)
        if k == 1:
            return self.image_shape
        gh, gw = self.grid
        return (k * (gh - 1) + 1, k * (gw - 1) + 1, self.channels)

    def fine_geometry(self, name: str) -> dict[str, Any]:
        """Where the nodes of a ``clean_x<k>`` array lie, in image coordinates (``[0, 1]``, ``(x, y)``, the
        convention of :mod:`pipeline.vit.views`): node ``(i, j)`` is at ``first + (j, i) * step``."""
        k = upsample_factor(name)
        (h, w), p, s = self.input_size, self.patch_size, self.stride
        return {"upsample": k, "grid": list(self.array_shape(name)[:2]), "first": [p / 2 / w, p / 2 / h],
                "step": [s / k / w, s / k / h]}

    @property
    def image_nbytes(self) -> int:
        """Bytes of one image in one array (one chunk, before compression)."""
        return math.prod(self.image_shape) * np.dtype(self.dtype).itemsize

    def geometry(self) -> dict[str, Any]:
        return {k: jsonable(getattr(self, k)) for k in self.GEOMETRY}

    def to_attrs(self) -> dict[str, Any]:
        d = jsonable(asdict(self))
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreLayout:
        """The layout in a store's attributes as its readers return them (:func:`read_attrs`,
        ``FeatureStore.attrs``: older names already upgraded)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in attrs.items() if k in names})


def upgrade_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A store's attributes under today's names: ``method`` was called ``stage1`` before it also held the records
    of other methods and of stage 2 (stores written then keep that key; it reads as ``method``)."""
    out = dict(attrs)
    if "method" not in out and "stage1" in out:
        out["method"] = out.pop("stage1")
    return out


def jsonable(value: Any) -> Any:
    """JSON round trip: tuples become lists, numpy scalars plain numbers, so comparisons are stable."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if hasattr(v, "__dataclass_fields__"):
        return asdict(v)
    return str(v)


def describe_diff(ours: Mapping[str, Any], theirs: Mapping[str, Any], keys: Sequence[str]) -> str:
    """The settings ``keys`` in which a store (``ours``) differs from what was expected, for an error message."""
    return "; ".join(f"{k}: store has {ours.get(k)!r}, expected {theirs.get(k)!r}" for k in keys)


def describe_weights(identity: Mapping[str, Any] | None) -> str:
    """One short phrase for a weights identity (messages, ``dvt store info``)."""
    if not identity:
        return "not recorded"
    source = identity.get("source")
    if source == "random":
        return f"random init (seed {identity.get('seed')})"
    if source == "hub":
        return f"hub {identity.get('model')}"
    if source == "file":
        return f"file {identity.get('name')} (sha256 {str(identity.get('sha256'))[:12]})"
    return f"{source} {identity.get('value', '')}".strip()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``, so a difference deep in a configuration is named by its path."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field_differences(store: Mapping[str, Any], run: Mapping[str, Any], keys: Sequence[str],
                      limit: int = 4) -> tuple[list[str], str]:
    """The fields among ``keys`` where ``store`` and ``run`` differ (nested ones by dotted path), and a message
    naming at most ``limit`` of them with both values."""
    names: list[str] = []
    parts: list[str] = []
    for key in keys:
        a, b = jsonable(store.get(key)), jsonable(run.get(key))
        if a == b:
            continue
        if key == "weights":
            names.append(key)
            parts.append(f"weights: store has {describe_weights(a)}, this run {describe_weights(b)}")
            continue
        flat_a, flat_b = _flatten(a, key), _flatten(b, key)
        for path in sorted(set(flat_a) | set(flat_b)):
            if flat_a.get(path) != flat_b.get(path):
                names.append(path)
                parts.append(f"{path.removeprefix('method.')}: store has {_short(flat_a.get(path))}, "
                             f"this run {_short(flat_b.get(path))}")
    text = "; ".join(parts[:limit]) + (f"; and {len(parts) - limit} more" if len(parts) > limit else "")
    return names, text


def geometry_diff(store: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The keys of ``expected`` whose values the store's attributes do not match."""
    return [k for k in expected if jsonable(store.get(k)) != jsonable(expected[k])]


# --------------------------------------------------------------------------------------------------- root attributes

def read_attrs(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Root group attributes, or None when there is no Zarr v3 group at ``url``.

    Read from ``zarr.json`` with one plain GET rather than through zarr, whose concurrent requests, when storage
    does not answer, leave coroutines behind that print tracebacks at interpreter exit: the first request of
    every open is this one, so an unreachable endpoint fails here, cleanly, in one line.
    """
    fs, root = filesystem(url, **dict(storage_options or {}))
    with storage_errors(url):
        try:
            meta = json.loads(fs.cat_file(f"{root.rstrip('/')}/zarr.json"))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except ValueError:  # not JSON: not a Zarr node
            return None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return None
    return upgrade_attrs(meta.get("attributes") or {})


def raise_missing(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Raise the error that says why there is no store at ``url`` (no bucket, or nothing there)."""
    fs, root = filesystem(url, **dict(storage_options or {}))
    if url.startswith(("s3://", "s3a://")):
        with storage_errors(url):
            if not fs.exists(strip_protocol(url).split("/", 1)[0]):
                raise missing_bucket(url)
    raise StoreNotFoundError(f"{url} is not a DVT feature store: there is no zarr.json there. Create one with "
                             f"FeatureStore.create (stage 1 does) or check the URL.")


def check_format(url: str, attrs: Mapping[str, Any]) -> None:
    """Refuse a group that is not a feature store, or of a format version this package cannot read."""
    if attrs.get("format") != FORMAT:
        raise StoreNotFoundError(f"{url} is a Zarr group but not a DVT feature store (its attributes have no "
                                 f"'format': '{FORMAT}')")
    if attrs.get("creating"):
        raise StoreNotFoundError(f"{url}: creating this store did not finish; run FeatureStore.create again")
    version = int(attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise StoreError(f"{url} has store format {version}; this dvt {__version__} reads up to {FORMAT_VERSION}: "
                         f"upgrade the package")
