"""``dvt apply`` with a denoiser that costs (almost) nothing, to measure the machinery around the model.

On a CPU the real denoiser (one transformer block over 37x37 tokens of 768 channels) takes about half a
second per image, so ``dvt apply``'s rate there says nothing about fetching, decoding, uploading, converting
and writing. :class:`ZeroBlockApplyWorker` is :class:`pipeline.stage2.apply.ApplyWorker` with one change: after
the real set-up (the denoiser file read and checked, its backbone built), the denoiser's transformer blocks are
replaced by the identity. What stays real: the backbone (``pipeline.testing.zero_vit`` in the benchmarks), the
denoiser's positional embedding added to the raw features, the reshapes, two arrays (``raw`` and ``clean``,
which differ by the embedding) converted and written per image, and everything of the job around them.
:func:`zero_block_plan` is :func:`pipeline.stage2.apply.plan_apply` with this worker (``benchmarks/feed.py``).
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from pipeline.runtime.plan import ImageJobPlan
from pipeline.stage2.apply import ApplyConfig, ApplyWorker, plan_apply

__all__ = ["ZeroBlockApplyWorker", "zero_block_plan"]

_log = logging.getLogger(__name__)


class ZeroBlockApplyWorker(ApplyWorker):
    """``dvt apply``'s worker with the denoiser's blocks replaced by the identity after the real set-up."""

    def setup(self) -> None:
        super().setup()
        blocks = self.model.denoiser.blocks
        self.model.denoiser.blocks = nn.Identity()
        _log.info("zero-cost denoiser: %d transformer block(s) replaced by the identity", len(blocks))


def zero_block_plan(config: ApplyConfig) -> ImageJobPlan:
    """``dvt apply``'s checked plan, run by :class:`ZeroBlockApplyWorker` (nothing else changes)."""
    plan = plan_apply(config)
    return dataclasses.replace(plan, worker=ZeroBlockApplyWorker) if plan.has_work else plan
