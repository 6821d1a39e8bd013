"""The probes' optimisation, as the reference's mmcv runner schedules it: AdamW stepped once per iteration,
a learning rate per iteration (linear warm-up, then poly or cosine decay), optional one-cycle momentum
(AdamW's ``beta1``) and gradient clipping; and the mean and spread over seeds.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Schedule", "train_head", "summarize_runs"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Iteration-based schedule (mmcv's ``LrUpdaterHook`` semantics).

    Attributes:
        iters: optimiser steps.
        lr, weight_decay, betas: AdamW.
        policy: ``"poly"`` (``lr (1 - i / iters) ** power``, floor ``min_lr``) or ``"cosine"`` (to
            ``lr * min_lr_ratio``).
        warmup_iters, warmup_ratio: linear warm-up from ``warmup_ratio * lr``.
        one_cycle_momentum: ``(low, high)``: ``beta1`` goes high -> low over the first ``pct_start`` of the
            iterations and back (cosine), as mmcv's ``OneCycleMomentumUpdaterHook``; ``None`` keeps ``betas``.
        grad_clip: max gradient L2 norm (``None``: no clipping).
    """

    iters: int
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    policy: str = "poly"
    power: float = 1.0
    min_lr: float = 0.0
    min_lr_ratio: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    one_cycle_momentum: tuple[float, float] | None = None
    pct_start: float = 0.3
    grad_clip: float | None = None

    def lr_at(self, i: int) -> float:
        if self.policy == "poly":
            lr = (self.lr - self.min_lr) * (1 - i / self.iters) ** self.power + self.min_lr
        elif self.policy == "cosine":
            end = self.lr * self.min_lr_ratio
            lr = end + 0.5 * (self.lr - end) * (math.cos(math.pi * i / self.iters) + 1)
        else:
            raise ValueError(f"unknown learning-rate policy {self.policy!r} (poly or cosine).")
        if i < self.warmup_iters:
            lr *= 1 - (1 - i / self.warmup_iters) * (1 - self.warmup_ratio)
        return lr

    def beta1_at(self, i: int) -> float:
        if self.one_cycle_momentum is None:
            return self.betas[0]
        low, high = self.one_cycle_momentum
        turn = max(1.0, self.pct_start * self.iters - 1)
        if i <= turn:
            start, end, pct = high, low, i / turn
        else:
            start, end, pct = low, high, (i - turn) / max(1.0, self.iters - 1 - turn)
        return end + (start - end) / 2 * (math.cos(math.pi * min(pct, 1.0)) + 1)


def train_head(head: nn.Module, batch_fn: Callable[[int], tuple], loss_fn: Callable[..., torch.Tensor],
               schedule: Schedule, *, log_every: int = 0) -> nn.Module:
    """Optimise ``head`` for ``schedule.iters`` steps: ``loss_fn(head, *batch_fn(i), i)`` at iteration ``i``."""
    opt = torch.optim.AdamW(head.parameters(), lr=schedule.lr, betas=schedule.betas,
                            weight_decay=schedule.weight_decay)
    head.train()
    loss = torch.zeros(())
    for i in range(schedule.iters):
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(i)
            group["betas"] = (schedule.beta1_at(i), schedule.betas[1])
        loss = loss_fn(head, *batch_fn(i), i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.grad_clip is not None:
            nn.utils.clip_grad_norm_(head.parameters(), schedule.grad_clip)
        opt.step()
        if log_every and (i + 1) % log_every == 0:
            _log.info("iteration %d/%d: loss %.4f, lr %.2e", i + 1, schedule.iters, float(loss.detach()),
                      schedule.lr_at(i))
    _log.debug("head trained: %d iterations, final loss %.4f", schedule.iters, float(loss.detach()))
    return head.eval()


def summarize_runs(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict:
    """Mean, sample standard deviation, min and max of ``keys`` over seeded runs (the spread of the probe)."""
    out: dict = {}
    for k in keys:
        values = [float(r[k]) for r in runs if r.get(k) is not None and not math.isnan(float(r[k]))]
        if values:
            out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "min": min(values), "max": max(values), "runs": values}
    return out
