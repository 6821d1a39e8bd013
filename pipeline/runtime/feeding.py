"""How the CPU side of an image job is sized to its model workers: where images are decoded, and with how much CPU.

The decode step (:func:`pipeline.io.decode.decode_batch`: bytes -> uint8 pixels at the model's input size) runs
either as Ray Data tasks beside the model workers or inside each worker, in a small thread pool:

* GPU workers (1 CPU each by default) beside at least :data:`MIN_FREE_FOR_TASKS` free CPUs: decode tasks, one CPU
  each, as many as free CPUs (15 beside one GPU worker on a 16-core node; a 512 px JPEG decodes and resizes in
  ~6 ms on one core, so that is thousands of images/s against a GPU's hundreds). Decoding and resizing then
  spread over the node's cores instead of queueing in the process that drives the GPU.
* Fewer free CPUs than that (CPU workers, which hold ~90% of the CPUs, or a GPU on a small node): each worker
  fetches and decodes its own units in threads (PIL and torch release the GIL while they work), one per CPU it
  holds. A decode task there would only compete with the model for the same cores, and every image would pay
  for a task of its own stage: on 2 cores a decode task cost ~22 ms of CPU per image against ~6 ms of decoding
  (the pixels' conversion to Arrow and their trip through the object store, Ray Data's per-task bookkeeping,
  worker processes started and stopped), and the fetch tasks more on top (``docs/feed.md``).

``--decode-threads`` (decode in the workers) or ``--decode-tasks`` and ``--decode-cpus`` (decode in tasks)
override the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..io.decode import DecodeConfig
from .checks import JobConfigError

__all__ = ["FETCH_CPUS", "MIN_FREE_FOR_TASKS", "FeedPlan", "check_feed_flags", "plan_feed"]

#: CPUs one fetch task holds (it waits on storage, it does not compute).
FETCH_CPUS = 0.1
#: Free CPUs (beside the workers) from which decoding runs in tasks of its own rather than in the workers.
MIN_FREE_FOR_TASKS = 2.0


@dataclass(frozen=True)
class FeedPlan:
    """The decode step of a job.

    Attributes:
        input_size: square size images are resized to (the model's input).
        decode_tasks: decode tasks running at once, over the whole job (0 when the workers decode).
        decode_cpus: CPUs each decode task holds (0 when the workers decode).
        threads: decode threads in each worker, which then fetches and decodes its units itself; 0: the job
            fetches and decodes in tasks of their own and hands the workers pixels.
        decode: limits on accepted images.
        draft: decode large JPEGs at a reduced scale (:func:`pipeline.io.decode.decode_image`'s ``draft``).
    """

    input_size: int
    decode_tasks: int
    decode_cpus: float
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    draft: bool = False
    threads: int = 0

    @property
    def in_workers(self) -> bool:
        """Do the workers fetch and decode their units themselves?"""
        return self.threads > 0


def check_feed_flags(decode_tasks: int | None, decode_cpus: float | None, decode_threads: int | None = None) -> None:
    """Refuse out-of-range or contradictory decode settings, naming the flag."""
    if decode_tasks is not None and decode_tasks < 1:
        raise JobConfigError(f"--decode-tasks must be at least 1, got {decode_tasks} (leave it out to use the free CPUs)")
    if decode_cpus is not None and not (0 < decode_cpus <= 64):
        raise JobConfigError(f"--decode-cpus must be above 0 and at most 64, got {decode_cpus}")
    if decode_threads is not None and not (1 <= decode_threads <= 64):
        raise JobConfigError(f"--decode-threads must be between 1 and 64, got {decode_threads}")
    if decode_threads is not None and (decode_tasks is not None or decode_cpus is not None):
        raise JobConfigError("--decode-threads (decode in the workers) cannot go with --decode-tasks or --decode-cpus "
                             "(decode in tasks of its own): give one or the other")


def plan_feed(*, input_size: int, cluster_cpus: float, workers: int, gpus: float, cpus: float,
              decode_tasks: int | None = None, decode_cpus: float | None = None, decode_threads: int | None = None,
              decode: DecodeConfig = DecodeConfig(), draft: bool = False) -> FeedPlan:
    """The decode step for ``workers`` model workers holding ``gpus`` and ``cpus`` each on ``cluster_cpus`` CPUs."""
    check_feed_flags(decode_tasks, decode_cpus, decode_threads)
    free = max(0.0, cluster_cpus - workers * cpus - FETCH_CPUS)
    tasks_asked = decode_tasks is not None or decode_cpus is not None
    if decode_threads is None and not tasks_asked and free < MIN_FREE_FOR_TASKS:
        decode_threads = max(1, math.ceil(cpus - 1e-9))
    if decode_threads is not None:
        return FeedPlan(input_size=int(input_size), decode_tasks=0, decode_cpus=0.0, decode=decode, draft=draft,
                        threads=int(decode_threads))
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
