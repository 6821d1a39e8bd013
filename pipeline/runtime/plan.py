"""One frozen plan per image job, checked in full before Ray starts, then run.

``dvt denoise`` and ``dvt apply`` each turn their config into an :class:`ImageJobPlan` (``plan_denoise``,
``plan_apply``): every flag, the backbone, the weights, the listing and the output store are checked once, in one
order, on the driver, and nothing is written. :func:`run_plan` does the rest for both jobs (Ray, the store's lease,
the store, the actors), "nothing to do" included. Building is not running, as in Ray Data's logical plans.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pyarrow as pa

from ..store import FeatureStore, StoreLayout
from .image_job import ImageJobConfig, JobSummary, JobWorker
from .job_runner import open_job_store, run_store_job
from .inputs import ShardInputs

__all__ = ["ImageJobPlan", "run_plan", "open_plan_store"]


@dataclass(frozen=True)
class ImageJobPlan:
    """What an image job will do, decided and checked on the driver.

    Attributes:
        job: ``"denoise"`` or ``"apply"``: names the job in logs, the lease and the store's ``last_run``.
        config: the job's settings, defaults resolved (e.g. ``dvt apply``'s input size from the denoiser).
        layout: what the output store holds and what decides its features; ``None`` when there is nothing to do.
        uris: the listed images this run covers: URIs, or a shard index (:class:`pipeline.runtime.inputs.ShardInputs`).
        existed: whether a store was already at ``config.output`` (resume or append).
        worker: the Ray Data actor class; ``None`` when there is nothing to do.
        settings: what the plan built for the workers (backbone and stage-1 configs), so they build nothing twice.
        started: monotonic time the plan was started (the run's wall time counts from here).
    """

    job: str
    config: ImageJobConfig
    layout: StoreLayout | None
    uris: Sequence[str] | ShardInputs
    existed: bool
    worker: type[JobWorker] | None
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def nothing(cls, job: str, config: ImageJobConfig, started: float) -> ImageJobPlan:
        """A run that selects no images (``--limit 0``): it starts nothing and touches no store."""
        return cls(job=job, config=config, layout=None, uris=(), existed=False, worker=None, started=started)

    @property
    def has_work(self) -> bool:
        return self.worker is not None


def open_plan_store(plan: ImageJobPlan) -> tuple[FeatureStore, int, pa.Table]:
    """Create or reopen the plan's store without a lease or Ray, for callers that run one job at a time
    themselves (tests, benchmarks): the store, how many images the run covers, the listing rows still to do."""
    if not plan.has_work:
        raise ValueError(f"the {plan.job} plan selects no images: there is no store to open")
    config = plan.config
    return open_job_store(config.output, plan.layout, plan.uris, overwrite=config.overwrite,
                          allow_config_change=config.allow_config_change, retry_failed=config.retry_failed)


def run_plan(plan: ImageJobPlan) -> JobSummary:
    """Run a checked plan on the Ray cluster in use (or a local one) under the store's lease."""
    if not plan.has_work:
        return JobSummary.nothing(plan.config.output, plan.job)
    return run_store_job(plan.job, plan.config, plan.layout, plan.uris, plan.existed, plan.worker, plan.started,
                         settings=plan.settings)
