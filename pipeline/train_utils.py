"""Pieces both Ray Train jobs (stage 2 training, stage 3 distillation) use: the loss, the schedule, the
learning-rate rule, the held-out rule and the plateau rule, Ray Train storage for any fsspec URL, and a small
all-reduce."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .storage import filesystem, is_local, local_path

__all__ = ["denoising_loss", "lr_lambda", "scaled_lr", "per_worker_batch", "Plateau", "uri_fraction", "ray_storage",
           "all_reduce"]


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``MSE + (1 - cos)`` over ``(..., C)`` features; cosine per token, both averaged."""
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    return mse + (1 - cos), {"mse": mse.detach(), "cos": cos.detach()}


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak rate: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """``base_lr * sqrt(global batch / 256)``: the square-root rule of the reference scripts, on the global batch
    only, so the same run on more or fewer workers takes the same steps at the same rate."""
    return base_lr * math.sqrt(global_batch / 256)


def per_worker_batch(global_batch: int, workers: int, flag: str = "--batch-size") -> int:
    """The batch each of ``workers`` ranks takes for a ``global_batch``; it must divide evenly."""
    if workers < 1 or global_batch < workers or global_batch % workers:
        raise ValueError(f"{flag} {global_batch} is the global batch: it must be a multiple of --workers ({workers}); "
                         f"pass e.g. {flag} {max(1, global_batch // max(1, workers)) * max(1, workers)}")
    return global_batch // workers


@dataclass
class Plateau:
    """Early stopping on a held-out loss: stop after ``patience`` evaluations in a row that did not beat the best
    by more than ``min_delta`` (relative). ``patience = 0`` never stops. Plain fields, so it rides in checkpoints.
    """

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = -1
    bad: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Record the loss at ``step``; returns whether it is the new best (the weights worth keeping)."""
        if not math.isfinite(loss):
            self.bad += 1
            return False
        improved = loss < self.best * (1 - self.min_delta) if math.isfinite(self.best) else True
        if loss < self.best:
            self.best, self.best_step = loss, step
        self.bad = 0 if improved else self.bad + 1
        return self.best_step == step

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uri_fraction(uri: str) -> float:
    """An image's fixed position in [0, 1): held-out sets are the images below a fraction.

    Only the file name is hashed, so an image keeps its side of the split wherever the dataset lives: copied from
    a disk to a bucket, listed from another working directory, or read back from a store's manifest. Images
    that share a file name in different folders fall on the same side.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2 ** 64


def ray_storage(output: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train: local paths as they are, else our fsspec filesystem
    (with its retry and endpoint settings) wrapped for pyarrow, and the path without its scheme."""
    if is_local(output):
        return local_path(output), None
    import pyarrow.fs as pafs

    fs, path = filesystem(output)
    return path.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()
