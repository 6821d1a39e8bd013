"""What every image-to-store job (``dvt denoise``, ``dvt apply``) checks before it starts anything, and the store
session it runs in.

A job checks all it can on the driver before Ray starts or anything is written (:func:`check_job_flags` and
each job's own checks: backbone, geometry, weights, the output location and the store's settings), so a wrong
flag costs a second and one line, not a Ray start, a store and a failed row per image.

:func:`store_session` holds the store's lease while the job runs and, when the job fails, releases it and
removes a store this run created but never committed a unit to.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..io.storage import filesystem, is_unavailable
from ..store import StoreLease, remove_store
from ..store.manifest import PARTS_DIR
from .job_errors import JobConfigError

__all__ = ["JobConfigError", "Workers", "parse_workers", "pool_bounds", "check_job_flags", "nothing_to_do",
           "store_session"]

_log = logging.getLogger(__name__)


#: ``--workers``: a fixed number of actors, or ``(min, max)`` for an autoscaling pool.
Workers = int | tuple[int, int]


def parse_workers(text: str) -> Workers:
    """``"4"`` -> 4, ``"2-16"`` -> ``(2, 16)`` (argparse ``type=``: a bad value is an argparse error naming the flag)."""
    import argparse

    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of workers nor a range MIN-MAX such as 2-16")
    low, high = match.groups()
    return int(low) if high is None else (int(low), int(high))


def pool_bounds(workers: Workers) -> tuple[int, int]:
    """``(min, max)`` actors for ``workers``; a plain number is a fixed pool."""
    return (workers, workers) if isinstance(workers, int) else (int(workers[0]), int(workers[1]))


def check_job_flags(*, workers: Workers, images_per_batch: int | None, limit: int | None, progress_every_s: float,
                    gpus_per_worker: float | None = None, cpus_per_worker: float | None = None) -> None:
    """Refuse out-of-range resource and selection flags, naming each one."""
    problems = []
    low, high = pool_bounds(workers)
    if low < 1:
        problems.append(f"--workers must be at least 1, got {workers if isinstance(workers, int) else f'{low}-{high}'}")
    elif high < low:
        problems.append(f"--workers {low}-{high}: the range's maximum must be at least its minimum")
    if images_per_batch is not None and images_per_batch < 1:
        problems.append(f"--images-per-batch must be at least 1, got {images_per_batch} (leave it out to choose per device)")
    if limit is not None and limit < 0:
        problems.append(f"--limit must be 0 or more, got {limit}")
    if not progress_every_s > 0:
        problems.append(f"--progress-every must be a positive number of seconds, got {progress_every_s}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        problems.append(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}")
    if cpus_per_worker is not None and not cpus_per_worker > 0:
        problems.append(f"--cpus-per-worker must be positive, got {cpus_per_worker}")
    if problems:
        raise JobConfigError("; ".join(problems))


def nothing_to_do(limit: int | None) -> bool:
    """``--limit 0``: say so and let the job return without starting Ray or creating a store."""
    if limit == 0:
        _log.info("--limit 0 selects no images: nothing to do")
        return True
    return False


def _committed(url: str) -> bool:
    fs, root = filesystem(url)
    path = f"{root.rstrip('/')}/{PARTS_DIR}"
    fs.invalidate_cache(path)
    try:
        return bool(fs.find(path))
    except FileNotFoundError:
        return False


@contextmanager
def store_session(url: str, job: str, *, existed: bool, ttl_s: float | None = None) -> Iterator[StoreLease]:
    """Hold the lease of the store at ``url`` for ``job``; on failure remove the store if this run created it
    (``existed`` False) and no unit was committed, so a failed first run leaves no empty store behind.

    When storage itself stopped answering, nothing more is sent to it: the lease goes stale by itself.
    """
    kwargs: dict[str, Any] = {} if ttl_s is None else {"ttl_s": ttl_s}
    lease = StoreLease(url, job, **kwargs).acquire()
    try:
        yield lease
    except BaseException as e:
        if is_unavailable(e):
            lease.abandon()
        elif not existed:
            try:
                if not _committed(url):
                    lease.abandon()
                    remove_store(url)
                    _log.info("removed %s: this run created it and finished no image", url)
            except Exception as cleanup:  # noqa: BLE001 - the job's own error is the one to report
                _log.warning("could not remove the empty store %s (%s)", url, cleanup)
        lease.release()
        raise
    lease.release()
