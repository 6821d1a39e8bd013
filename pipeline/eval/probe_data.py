"""Plumbing shared by the probes: seeded sample order, a loader of augmented samples, and centre padding.

Sample ``k`` of a run (``k = iteration * batch + slot``) is image ``perm_e[k mod N]`` of epoch
``e = k div N`` (a fresh seeded permutation per epoch, as a shuffling sampler) augmented with
``numpy.random.default_rng([seed, k])``: a run depends only on its seed, not on the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["sample_order", "SampleSet", "batches", "center_pad", "padded_size"]


def sample_order(n: int, seed: int) -> Callable[[int], int]:
    """``k -> image index`` for an endless seeded shuffle over ``n`` items."""
    cache: dict[int, np.ndarray] = {}

    def index(k: int) -> int:
        epoch = k // n
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, 7919, epoch]).permutation(n)
        return int(cache[epoch][k % n])

    return index


class SampleSet(Dataset):
    """Sample ``k`` = ``make(item_index, rng)`` for the ``k``-th draw of a seeded run."""

    def __init__(self, n: int, make: Callable[[int, np.random.Generator], Any], seed: int):
        self.n, self.make, self.seed = n, make, seed
        self.order = sample_order(n, seed)

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, k: int) -> Any:
        return self.make(self.order(k), np.random.default_rng([self.seed, k]))


class _Counter(Sampler):
    def __init__(self, total: int):
        self.total = total

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.total))

    def __len__(self) -> int:
        return self.total


def batches(dataset: SampleSet, iters: int, batch: int, workers: int = 0) -> Iterator[Any]:
    """``iters`` collated batches of ``batch`` samples, in order, loaded by ``workers`` processes."""
    return iter(DataLoader(dataset, batch_size=batch, sampler=_Counter(iters * batch), num_workers=workers,
                           persistent_workers=False, prefetch_factor=4 if workers else None))


def padded_size(size: int, patch: int, stride: int) -> int:
    """Smallest size ``>= size`` that the patch grid tiles exactly."""
    if size <= patch:
        return patch
    return patch + math.ceil((size - patch) / stride) * stride


def center_pad(pixels: torch.Tensor, patch: int, stride: int, fill: tuple[float, float, float]) -> torch.Tensor:
    """Pad ``(B, 3, H, W)`` evenly on both sides to a size the patch grid tiles (the reference's
    ``CenterPadding``). The fill is the normalisation mean, i.e. zero after normalising, as there."""
    h, w = pixels.shape[-2:]
    ph, pw = padded_size(h, patch, stride) - h, padded_size(w, patch, stride) - w
    if ph == 0 and pw == 0:
        return pixels
    out = F.pad(pixels, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mask = F.pad(torch.ones_like(pixels[:, :1]), (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    colour = torch.tensor(fill, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return out * mask + colour * (1 - mask)
