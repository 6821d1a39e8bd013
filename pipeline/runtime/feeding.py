"""How the CPU side of an image job is sized to its model workers: decode tasks and the CPUs each one holds.

The decode step (:func:`pipeline.io.decode.decode_batch`: bytes -> uint8 pixels at the model's input size) runs
as Ray Data tasks beside the model workers, so decoding and resizing spread over the node's cores instead of
queueing in the process that drives the GPU. By default the CPUs the model workers and the fetch step leave
free all go to decoding:

* GPU workers (1 CPU each by default): one CPU per decode task, as many tasks as free CPUs (15 beside one GPU
  worker on a 16-core node; a 512 px JPEG decodes and resizes in ~5 ms on one core, so that is thousands of
  images/s against a GPU's hundreds);
* CPU workers (which hold ~90% of the CPUs): two decode tasks per worker sharing what is left; the tasks then
  compete with the model for real cores, as any CPU work would.

``--decode-tasks`` and ``--decode-cpus`` override either choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..io.decode import DecodeConfig
from .checks import JobConfigError

__all__ = ["FETCH_CPUS", "FeedPlan", "check_feed_flags", "plan_feed"]

#: CPUs one fetch task holds (it waits on storage, it does not compute).
FETCH_CPUS = 0.1


@dataclass(frozen=True)
class FeedPlan:
    """The decode step of a job.

    Attributes:
        input_size: square size images are resized to (the model's input).
        decode_tasks: decode tasks running at once, over the whole job.
        decode_cpus: CPUs each decode task holds.
        decode: limits on accepted images.
        draft: decode large JPEGs at a reduced scale (:func:`pipeline.io.decode.decode_image`'s ``draft``).
    """

    input_size: int
    decode_tasks: int
    decode_cpus: float
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    draft: bool = False


def check_feed_flags(decode_tasks: int | None, decode_cpus: float | None) -> None:
    """Refuse out-of-range decode settings, naming the flag."""
    if decode_tasks is not None and decode_tasks < 1:
        raise JobConfigError(f"--decode-tasks must be at least 1, got {decode_tasks} (leave it out to use the free CPUs)")
    if decode_cpus is not None and not (0 < decode_cpus <= 64):
        raise JobConfigError(f"--decode-cpus must be above 0 and at most 64, got {decode_cpus}")


def plan_feed(*, input_size: int, cluster_cpus: float, workers: int, gpus: float, cpus: float,
              decode_tasks: int | None = None, decode_cpus: float | None = None,
              decode: DecodeConfig = DecodeConfig(), draft: bool = False) -> FeedPlan:
    """The decode step for ``workers`` model workers holding ``gpus`` and ``cpus`` each on ``cluster_cpus`` CPUs."""
    check_feed_flags(decode_tasks, decode_cpus)
    free = max(0.0, cluster_cpus - workers * cpus - FETCH_CPUS)
    if gpus > 0:
        if decode_cpus is None:
            decode_cpus = 1.0 if free >= 1 else max(0.05, free)
        if decode_tasks is None:
            decode_tasks = max(1, math.floor(free / decode_cpus + 1e-9))
    else:
        if decode_tasks is None:
            decode_tasks = 2 * workers
        if decode_cpus is None:
            decode_cpus = min(1.0, max(0.05, free / decode_tasks))
    return FeedPlan(input_size=int(input_size), decode_tasks=int(decode_tasks), decode_cpus=round(float(decode_cpus), 3),
                    decode=decode, draft=draft)
