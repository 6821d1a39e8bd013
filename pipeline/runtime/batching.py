"""How many images a worker puts through its model at once, chosen from the device it runs on.

The rule (:func:`images_per_pass`):

* on a CPU, the fixed defaults the jobs always had (4 images per stage-1 fit, 16 per apply pass): a CPU's
  throughput hardly depends on the batch, and a small batch keeps the store's units small;
* on a GPU, as many images as fill half of the device's free memory at an estimated peak of bytes per image
  (:func:`stage1_bytes_per_image`, :func:`forward_bytes_per_image`), at least 1 and at most a cap (16 for stage 1,
  64 for apply: past those the GPU's throughput no longer grows, and the unit of work a failure repeats does).

Only the worker knows its device, and a cluster's driver usually has none, so the two sizes are separate: the
driver cuts the listing into store units of :func:`unit_size` images (the CPU default, or the GPU cap when the
cluster has GPUs), and each worker fits a unit in passes of :func:`images_per_pass` images. An explicit
``--images-per-batch`` sets both, as before.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CPU_DEFAULT", "GPU_CAP", "MEMORY_SHARE", "unit_size", "images_per_pass", "stage1_bytes_per_image",
           "forward_bytes_per_image"]

#: Images per pass on a CPU, per job (the defaults before devices were considered).
CPU_DEFAULT = {"denoise": 4, "apply": 16}
#: Most images per pass on a GPU, per job.
GPU_CAP = {"denoise": 16, "apply": 64}
#: Share of the GPU's free memory a pass may plan to use (the rest: allocator slack, the estimate's error).
MEMORY_SHARE = 0.5

# Live fp32 copies of the (tokens, channels) features while the stage-1 losses and their gradients are
# computed (F, G, F + G, h and its hidden layers, residuals, squares, the cosine's terms, their gradients).
_FIT_COPIES = 16
# Live fp32 copies of one image's (tokens, channels) activations in a ViT block at inference (q, k, v, the
# MLP's 4x hidden layer, the residual stream), plus the denoiser's block.
_FORWARD_COPIES = 16


def unit_size(job: str, cluster_has_gpus: bool) -> int:
    """Images per store unit (one Ray Data batch) when ``--images-per-batch`` is not given."""
    return GPU_CAP[job] if cluster_has_gpus else CPU_DEFAULT[job]


def images_per_pass(job: str, device: torch.device, bytes_per_image: int, *, free_bytes: int | None = None) -> int:
    """Images a worker on ``device`` puts through its model at once (the rule in the module's docstring).

    Args:
        job: ``"denoise"`` or ``"apply"``.
        bytes_per_image: estimated peak device memory of one image in a pass.
        free_bytes: free device memory; ``None`` asks the device (``torch.cuda.mem_get_info``).
    """
    if device.type != "cuda":
        return CPU_DEFAULT[job]
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    fit = math.floor(MEMORY_SHARE * free_bytes / max(1, bytes_per_image))
    return max(1, min(GPU_CAP[job], fit))


def stage1_bytes_per_image(*, views: int, grid: tuple[int, int], channels: int, feature_bytes: int = 4,
                           batch_tokens: int = 0) -> int:
    """Peak memory of one image in a stage-1 fit: its view features (``views + 1`` views, the full one
    included) kept for the whole fit, and the losses' working copies of the tokens used per step (all of them
    when ``batch_tokens`` is 0)."""
    tokens = (views + 1) * grid[0] * grid[1]
    per_step = tokens if batch_tokens == 0 else min(tokens, batch_tokens)
    return tokens * channels * feature_bytes + per_step * channels * 4 * _FIT_COPIES


def forward_bytes_per_image(*, grid: tuple[int, int], channels: int, prefix_tokens: int = 1) -> int:
    """Peak activation memory of one image in an inference pass of a ViT (and a denoiser block)."""
    return (grid[0] * grid[1] + prefix_tokens) * channels * 4 * _FORWARD_COPIES
