"""Artifact-removal methods behind ``dvt denoise --method NAME``; each writes the same ``clean`` array.

* ``dvt`` (default): stage 1 (:mod:`pipeline.stage1.fit`), ``F + G + h`` fitted per image.
* ``average``: test-time averaging over shifted and flipped copies (:mod:`.average`), a few forward passes.
* ``bias``: subtract a dataset-level artifact map (:mod:`.bias`), one forward pass.
* ``denoiser``: a trained stage-2 denoiser, exactly ``dvt apply`` (:mod:`pipeline.stage2.apply`), one forward pass.

The method and its settings are the store's ``method`` record (part of its identity: a run with another method
or settings is refused unless it allows a configuration change). ``dvt`` keeps the stage-1 configuration as
the record, ``denoiser`` the record ``dvt apply`` writes (so ``dvt apply`` and ``dvt denoise --method
denoiser`` can resume each other's stores), the others ``{"method": NAME, ...settings}``; :func:`store_method`
reads the name back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from ..runtime.job_errors import JobConfigError
from .average import AverageConfig
from .bias import ArtifactFileError, ArtifactMap, check_artifact

__all__ = ["METHODS", "MethodSettings", "AverageConfig", "ArtifactMap", "ArtifactFileError", "store_method",
           "method_record", "check_method", "average_config"]

METHODS = ("dvt", "average", "bias", "denoiser")


class MethodSettings(Protocol):
    """The job settings the methods read: :class:`pipeline.denoise.job.DenoiseConfig` has them (the methods are
    ``dvt denoise --method``), named here so this package needs nothing from the job that uses it."""

    method: str
    copies: int
    max_shift: float
    seed: int
    artifact: str | None
    denoiser: str | None
    compress: str | None
    upsample: int


_OWN_FLAGS = {"artifact": "bias", "denoiser": "denoiser"}


def store_method(attrs: Mapping[str, Any]) -> str:
    """The method that wrote a store, from its attributes."""
    record = attrs.get("method") or {}
    if record.get("stage") == 2:
        return "denoiser"
    return str(record.get("method", "dvt"))


def average_config(config: MethodSettings) -> AverageConfig:
    return AverageConfig(copies=config.copies, max_shift=config.max_shift, seed=config.seed)


def check_method(config: MethodSettings) -> None:
    """Refuse an unknown method, a method without its input, or a flag of another method, in one line."""
    if config.method not in METHODS:
        raise JobConfigError(f"--method {config.method!r} is not a denoising method; choose one of {', '.join(METHODS)}")
    for flag, owner in _OWN_FLAGS.items():
        if getattr(config, flag) and config.method != owner:
            raise JobConfigError(f"--{flag} is only used with --method {owner}, not --method {config.method}")
    if config.method == "bias" and not config.artifact:
        raise JobConfigError("--method bias needs --artifact FILE (make one with `dvt artifact --store STORE`)")
    if config.method == "denoiser" and not config.denoiser:
        raise JobConfigError("--method denoiser needs --denoiser FILE (from `dvt train`)")
    if config.method == "average":
        try:
            average_config(config)
        except ValueError as e:
            raise JobConfigError(f"--copies/--max-shift: {e}") from None
    if config.compress not in (None, "int8"):
        raise JobConfigError(f"--compress {config.compress!r}: a job can write int8 only; PCA needs a basis fitted on "
                             f"features first: write a plain store, then `dvt store convert SRC DST --compress pca`")
    if config.upsample != 1 and config.method != "dvt":
        raise JobConfigError(f"--upsample reads stage 1's continuous field F on a finer grid: it needs --method dvt, "
                             f"not --method {config.method}")


def method_record(config: MethodSettings, geometry: Mapping[str, Any] | None = None,
                  weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The store's ``method`` record for ``average`` and ``bias`` runs; ``bias`` also checks its file against
    the run's ``geometry`` and ``weights`` when given."""
    if config.method == "average":
        return {"method": "average", **dataclasses.asdict(average_config(config))}
    if config.method == "bias":
        amap, sha1 = ArtifactMap.load(config.artifact)
        if geometry is not None:
            check_artifact(amap, config.artifact, geometry, weights)
        return {"method": "bias", "artifact": config.artifact, "sha1": sha1, "images": amap.meta.get("images"),
                "source": amap.meta.get("source")}
    raise ValueError(f"method {config.method!r} has no record of its own")
