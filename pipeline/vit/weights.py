"""Which weights a backbone runs with: checked on the driver before a job starts, and recorded in its stores.

A job's workers build the backbone themselves, so a weights problem found there costs a Ray start and a
traceback per worker. :func:`check_weights` finds the same problems on the driver, reading no weight values:
a file is opened for its header only (names and shapes, on the meta device) and matched against the model; the
hub's files must be in the local cache when ``HF_HUB_OFFLINE=1``.

:func:`weights_identity` is what a store records about the weights, so a resume with other weights is refused
(features from two networks never share a store): a file's SHA-256, the hub's model and tag, or the seed of
the random initialisation (``--weights none`` is seeded, so every run builds the same network).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .backbone import RANDOM_WEIGHTS_SEED, BackboneConfig, BackboneError, load_into, create_backbone, load_state_dict

__all__ = ["check_weights", "weights_identity", "file_sha256"]

_log = logging.getLogger(__name__)

_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (cached per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def _hub_model(model: str) -> tuple[str, Any]:
    from timm.models import get_pretrained_cfg
    from timm.models._registry import split_model_name_tag

    cfg = get_pretrained_cfg(model)
    arch, _ = split_model_name_tag(model)
    tag = getattr(cfg, "tag", None) if cfg is not None else None
    return (f"{arch}.{tag}" if tag else model), cfg


def weights_identity(config: BackboneConfig) -> dict[str, Any]:
    """What decides the backbone's weights, as a JSON-serialisable dict for a store's ``weights`` attribute."""
    weights = config.weights
    custom = ":" in config.model
    if weights == "none" or (custom and weights == "hub"):
        return {"source": "random", "seed": RANDOM_WEIGHTS_SEED}
    if weights == "hub":
        name, cfg = _hub_model(config.model)
        hub = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) if cfg is not None else None
        return {"source": "hub", "model": name, **({"hub_id": hub} if hub else {})}
    if Path(weights).is_file():
        return {"source": "file", "name": Path(weights).name, "sha256": file_sha256(weights)}
    return {"source": "factory", "value": weights}  # a custom factory's own argument, passed through as given


def _check_hub_cached(model: str) -> None:
    """Offline, the hub's files must already be in the local cache (online, the workers download them)."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    name, cfg = _hub_model(model)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return  # weights from a plain URL (torch hub cache); left to the workers
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    files = [getattr(cfg, "hf_hub_filename", None), *_HUB_FILES]
    if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in files if f):
        return
    raise BackboneError(f"Pretrained weights for '{name}' are not in the local Hugging Face cache and "
                        f"HF_HUB_OFFLINE=1 is set: download them once with network access (unset HF_HUB_OFFLINE), "
                        f"or pass --weights /path/to/file, or --weights none for random weights.")


def check_weights(config: BackboneConfig) -> dict[str, Any]:
    """Raise :class:`BackboneError` now for weights the workers could not load (reads no weight values), and
    return their identity (:func:`weights_identity`), so a job resolves its weights once."""
    identity = weights_identity(config)
    if config.weights == "none" or ":" in config.model:
        return identity  # seeded random weights; a custom factory interprets its weights argument itself
    if config.weights == "hub":
        _check_hub_cached(config.model)
        return identity
    state = load_state_dict(config.weights, meta=True)
    meta = dataclasses.replace(config, weights="none")
    with torch.device("meta"):
        model = create_backbone(meta).model
    try:
        load_into(model, state, config)
    except BackboneError:
        raise
    except (NotImplementedError, RuntimeError) as e:  # an op without a meta kernel: the workers will tell
        _log.debug("weights %s not checked on the meta device: %s", config.weights, e)
    return identity
