"""The driver side of an image job: open the store, size the actors, run the Ray Data pipeline under the store's
lease, fold the ledger, summarise.

::

    listing rows still to do  ->  bytes (fetched by light tasks, or read from shards)  ->  decode tasks (uint8 at
        the input size)  ->  worker actors (model, one store unit per batch)  ->  status rows to the driver

Where the workers leave too few CPUs free for tasks of their own (:mod:`.feeding`), the workers fetch and decode
their units themselves: listing rows (or shard members' bytes) go straight to the actors.

The settings and the workers are :mod:`.image_job`'s; :func:`pipeline.runtime.plan.run_plan` calls
:func:`run_store_job` with a checked plan.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batching import unit_size
from ..io.decode import decode_batch
from .feeding import FETCH_CPUS, FeedPlan, plan_feed
from .failures import JobFailedError, one_line, root_cause
from .checks import Workers, pool_bounds, store_session
from ..io.listing import fetch_bytes
from ..io.shard_reads import read_blocks, read_shard_members
from .inputs import ShardInputs
from .progress import Progress
from .ray_session import init_ray
from .reachability import check_reachable, image_job_inputs
from ..io.storage import StorageUnavailableError
from ..store import FeatureStore, StoreError, StoreLayout
from ..store.ledger import LedgerFolder
from ..store.listing_table import uri_text
from ..store.manifest import ROW_OK, ROW_PENDING

from .image_job import ImageJobConfig, JobSummary, JobWorker

__all__ = ["open_job_store", "worker_resources", "worker_env", "job_feed", "run_image_job", "run_store_job"]

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- driver

def open_job_store(output: str, layout: StoreLayout, uris: Sequence[str] | ShardInputs, *, overwrite: bool = False,
                   allow_config_change: bool = False, retry_failed: bool = True) -> tuple[FeatureStore, int, pa.Table]:
    """Create or reopen the store for a run over ``uris`` (URIs, or the shard index :func:`list_inputs` gives); fold
    a ledger an earlier run left unfolded.

    Returns the store, how many images this run covers, and the listing rows it still has to do (for shard inputs
    with where each image lies in its shard). Costs one pass over the listing and two columns of the (folded)
    ledger: no per-URI Python objects on a re-run.
    """
    if isinstance(uris, ShardInputs):
        listing_rows, wanted = uris.listing_rows(), uri_text(uris.uris)
    else:
        wanted = uri_text(uris)  # repeats kept: the listing drops them, and a list with repeats is no prefix of it
        listing_rows = wanted
    store = FeatureStore.create(output, layout, listing_rows, overwrite=overwrite,
                                allow_config_change=allow_config_change)
    store.compact()  # a crashed run's or another program's parts: one object again before anything reads them
    listing = store.listing()
    head = listing["uri"].slice(0, len(wanted))
    if len(wanted) <= listing.num_rows and head.equals(pa.chunked_array([wanted.cast(head.type)])):
        mine = listing.slice(0, len(wanted))  # the usual case: this run's URIs are the listing's first rows
    else:
        mine = listing.filter(pc.is_in(listing["uri"], wanted))
    status = store.row_status()[mine["image_id"].to_numpy()]
    pending = mine.filter(pa.array(status != ROW_OK if retry_failed else status == ROW_PENDING))
    return store, mine.num_rows, pending


def worker_resources(workers: Workers, gpus_per_worker: float | None, cpus_per_worker: float | None) -> tuple[float, float]:
    """``(gpus, cpus)`` per actor: 1 GPU when the cluster has GPUs; on CPUs an even share that leaves room to fetch."""
    import ray

    cluster = ray.cluster_resources()
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    cpus = cpus_per_worker
    if cpus is None:
        # Leave a little CPU for the fetch tasks, or an actor pool that takes every core starves them.
        cpus = 1.0 if gpus else max(0.25, min(4.0, 0.9 * cluster.get("CPU", 1) / max(1, pool_bounds(workers)[1])))
    return gpus, cpus


def run_image_job(*, job: str, store: FeatureStore, covered: int, pending: pa.Table, worker: type,
                  worker_kwargs: dict[str, Any], images_per_batch: int, workers: Workers, gpus: float, cpus: float,
                  progress_every_s: float = 30.0, started: float | None = None, lease: Any = None,
                  feed: FeedPlan | None = None, image_column: str = "jpg") -> JobSummary:
    """Run ``worker`` actors over the ``pending`` listing rows into ``store`` and summarise the run.

    ``worker`` is an :class:`ImageBatchWorker` subclass built with ``worker_kwargs``. A fault that is not one
    image's (a worker that cannot start or write, Ray losing its actors, ``lease`` taken over) raises
    :class:`JobFailedError` with one line; units committed before it stay in the store. A run with nothing to
    do leaves the store untouched. ``feed``: where to decode (:mod:`.feeding`); ``None``, or a plan that decodes
    in the workers: no fetch or decode tasks, each worker fetches and decodes its units (its ``decode_threads``).
    """
    started = time.monotonic() if started is None else started
    todo = pending.num_rows
    low, high = pool_bounds(workers)
    _log.info("%s: %d images into %s, %d to do; %s worker(s) with %.2g GPU and %.2g CPU each",
              job, covered, store.url, todo, low if low == high else f"{low}-{high}", gpus, cpus)
    progress = Progress(total=todo, label=job, every_s=progress_every_s)
    folder = LedgerFolder(store.fs, store.root)
    if todo:
        import ray

        folder.start()
        # One batch per block, so one actor task is one store unit: work spreads evenly over the actors (a
        # block of several batches is one task, which one actor takes whole) and a retry redoes one unit only.
        per_block = max(images_per_batch, 1)
        if _from_shards(pending):
            # Shards: one read task per run of a shard's rows (one ranged read of a tar's members, one read of a
            # Parquet row group's images), cut into units of images_per_batch without a shuffle.
            blocks = read_blocks(pending)
            ds = ray.data.from_arrow(blocks)
            ds = ds.map_batches(read_shard_members, batch_size=None, num_cpus=FETCH_CPUS,
                                fn_kwargs={"image_column": image_column})
            # Ray Data cuts a read task's output into blocks of this size, so a shard's images reach the actors
            # about a unit at a time (a repartition step would take a whole CPU, which the actors may hold).
            ds.context.target_max_block_size = unit_block_bytes(pending, per_block)
        else:
            blocks = [pending.slice(i, per_block) for i in range(0, todo, per_block)]
            ds = ray.data.from_arrow(blocks)
            if feed is not None and not feed.in_workers:
                ds = ds.map_batches(fetch_bytes, batch_size=images_per_batch, num_cpus=FETCH_CPUS)
        # Ray Data samples each task's memory in a thread of its own every second (psutil): CPU the images need.
        ds.context.memory_usage_poll_interval_s = None
        if feed is not None and not feed.in_workers:
            # Bytes in, uint8 pixels at the model's size out: the CPU work per image, off the model's process.
            ds = ds.map_batches(decode_batch, batch_size=images_per_batch, num_cpus=feed.decode_cpus,
                                fn_kwargs={"size": feed.input_size, "config": feed.decode, "draft": feed.draft},
                                compute=ray.data.TaskPoolStrategy(size=max(1, min(feed.decode_tasks,
                                                                                  todo // max(1, per_block) + 1))))
        ds = ds.map_batches(
            worker, fn_constructor_kwargs=worker_kwargs, batch_size=images_per_batch, num_gpus=gpus, num_cpus=cpus,
            runtime_env={"env_vars": worker_env()},
            # --workers N: a fixed pool of what the user asked for (an autoscaling pool shrinks to one actor on a
            # short queue, since one actor with two batches in flight looks busy enough); MIN-MAX: Ray Data's
            # autoscaling pool, which adds actors on nodes that join. Two batches in flight per actor, and both may
            # run: one on the model while the other's unit is written.
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=2,
                                               max_concurrent_calls_per_actor=2, enable_true_multi_threading=True))
        if high > low:
            # Ray Data adds an actor when its tasks in flight reach 1.75x its concurrency slots; with two calls
            # running per actor and two in flight that is never (1.0 at most), so a joining node would stay idle.
            # Full slots (1.0) are the busy signal here.
            ds.context.autoscaling_config = dataclasses.replace(ds.context.autoscaling_config,
                                                                actor_pool_util_upscaling_threshold=1.0)
        progress.start()
        # No prefetch: with it, Ray Data holds each result back until the next one arrives, so progress runs one
        # unit late and a worker's fault reaches the driver only after the next unit (a second timeout) too.
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
        finished = False
        try:
            for out in batches:
                _raise_fatal(job, out, progress)
                if lease is not None:
                    lease.check()
                folder.add(out["image_id"].tolist())  # its task is over: its part will not change again
                failed = int((out["status"] == "failed").sum())
                progress.update(ok=len(out["status"]) - failed, failed=failed)
            finished = True
        except (JobFailedError, StoreError):
            raise
        except Exception as e:  # Ray's own errors: actors or nodes lost for good
            raise JobFailedError(f"{job} stopped after {progress.done} of {todo} images: Ray lost its workers "
                                 f"({one_line(root_cause(e))}). Finished units are kept: re-run the same command "
                                 f"to resume.") from e
        finally:
            progress.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            _settle_ledger(folder, finished)
    seconds = time.monotonic() - started
    info = store.refresh().info(size=False)
    summary = JobSummary(
        store=store.url, listed=store.num_rows, skipped=covered - todo, todo=todo,
        ok=progress.ok, failed=progress.failed, seconds=seconds,
        images_per_second=progress.done / seconds if seconds > 0 else 0.0,
        store_ok=info.ok, store_failed=info.failed, failures=[(str(r), int(n)) for r, n in info.failures], job=job)
    if todo:
        store.update_attrs(last_run={**dataclasses.asdict(summary),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _log.info("%s", summary.format())
    return summary


#: Environment of the worker actors (:func:`worker_env`), each setting a default the caller's environment overrides.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "THP_MEM_ALLOC_ENABLE": "1",
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
}


def worker_env() -> dict[str, str]:
    """Environment of the worker actors (:data:`WORKER_ENV`), each setting kept when the caller's environment has
    its own:

    * ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep when they have no work. An actor's torch threads share
      its cores with its decode and chunk-write threads; left spinning between operations they took ~11 of ~27 ms
      of CPU per image on 2 cores (``docs/feed.md``). A ViT forward's large operations hardly notice the wake-ups.
    * ``THP_MEM_ALLOC_ENABLE=1``: torch's CPU allocator asks for transparent huge pages on allocations of 2 MiB
      and more, so a buffer that is new memory faults in 2 MiB pages rather than 4 KiB ones. Without THP in the
      kernel (``never``) it changes nothing.
    * ``MALLOC_ARENA_MAX=1``, ``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_=16 GiB``: glibc's allocator keeps
      freed memory for the next batch instead of giving it back. A batch's buffers (float pixels, normalised
      pixels, features, float16 results: 140-240 MB a batch of 16 at 518 px) are above glibc's largest mmap
      threshold (32 MB) and larger than a thread arena's heap (64 MB), so with the defaults every batch mapped
      them afresh and the kernel zeroed and faulted in ~9 MB per image: 11-14 ms of a worker's ~23 ms of CPU
      per image on 2 cores, and more on a virtual machine whose host reclaims freed memory (``docs/feed.md``).
      One arena (the main heap) serves Ray's call threads alike, so its free blocks are reused by whichever call
      runs next. The cost: a worker keeps its peak heap until it exits (1.7 GB for two calls in flight at 518 px,
      measured), as torch's GPU caching allocator keeps its blocks. Other C libraries ignore the variables.
    """
    return {name: os.environ.get(name, default) for name, default in WORKER_ENV.items()}


def _settle_ledger(folder: LedgerFolder, finished: bool) -> None:
    """Fold the ledger as the run ends: all of it after a finished run; after a stopped one only the parts of
    units known to be over (workers may still be writing others), and never hiding the error that stopped it."""
    if finished:
        folder.finish()
        return
    try:
        folder.fold_pending()
    except Exception as e:  # noqa: BLE001 - the next run folds what is left
        _log.warning("could not fold the ledger after the run stopped (%s); the next run folds it", one_line(e))


def unit_block_bytes(pending: pa.Table, per_block: int) -> int:
    """Bytes of about ``per_block`` images of ``pending`` (from the shard index's sizes; at least 64 KiB)."""
    sizes = pc.filter(pending["shard_size"], pc.greater(pending["shard_size"], 0))
    mean = pc.mean(sizes).as_py() if len(sizes) else None
    return max(64 * 2**10, int(per_block * (mean or 64 * 2**10)))


def _from_shards(pending: pa.Table) -> bool:
    return "shard" in pending.column_names and pending["shard"].null_count < pending.num_rows


def _raise_fatal(job: str, out: dict[str, np.ndarray], progress: Progress) -> None:
    """Stop the job with a worker's ``fatal`` rows' message (its traceback only at debug level)."""
    fatal = np.flatnonzero(out["status"] == "fatal")
    if not len(fatal):
        return
    line, _, detail = str(out["error"][fatal[0]]).partition("\n\n")
    _log.debug("%s", detail)
    advice = "" if "re-run" in line else " Finished units are kept: fix the cause and re-run the same command."
    error = JobFailedError(f"{job} stopped after {progress.done} of {progress.total} images: "
                           f"{line.rstrip('.')}.{advice}")
    error.storage_unavailable = StorageUnavailableError.__name__ in line
    raise error


def run_store_job(job: str, config: ImageJobConfig, layout: StoreLayout, uris: Sequence[str] | ShardInputs,
                  existed: bool, worker: type[JobWorker], started: float,
                  settings: Mapping[str, Any] | None = None) -> JobSummary:
    """Run a checked job: start (or join) Ray, hold the store's lease, create or reopen the store, size the actors
    and run ``worker`` over what is left to do (:func:`run_image_job`)."""
    with store_session(config.output, job, existed=existed and not config.overwrite) as lease:
        store, covered, pending = open_job_store(config.output, layout, uris, overwrite=config.overwrite,
                                                 allow_config_change=config.allow_config_change,
                                                 retry_failed=config.retry_failed)
        if not pending.num_rows:  # nothing to do: no Ray to start
            return run_image_job(job=job, store=store, covered=covered, pending=pending, worker=worker,
                                 worker_kwargs={}, images_per_batch=1, workers=config.workers, gpus=0.0, cpus=0.0,
                                 progress_every_s=config.progress_every_s, started=started, lease=lease)
        init_ray(config.dashboard)
        # every node that may run a worker must see the output and the inputs; refused here, before any image,
        # a store this run created is removed again by the session (nothing was committed to it)
        readable = uris.shards() if isinstance(uris, ShardInputs) else uris  # shard inputs: the shard files
        check_reachable(outputs=[("--output", config.output)], inputs=image_job_inputs(config, readable))
        gpus, cpus = worker_resources(config.workers, config.gpus_per_worker, config.cpus_per_worker)
        feed = job_feed(config, gpus, cpus)
        config = dataclasses.replace(config, gpus_per_worker=gpus, cpus_per_worker=cpus,
                                     decode_threads=feed.threads or None)
        return run_image_job(job=job, store=store, covered=covered, pending=pending, worker=worker,
                             worker_kwargs={"config": config, "layout": store.layout.geometry(),
                                            "settings": dict(settings or {})},
                             images_per_batch=config.images_per_batch or unit_size(worker.unit_job or job, gpus > 0),
                             workers=config.workers, gpus=gpus, cpus=cpus, progress_every_s=config.progress_every_s,
                             started=started, lease=lease, feed=feed, image_column=config.image_column)


def job_feed(config: ImageJobConfig, gpus: float, cpus: float) -> FeedPlan:
    """The decode step of a job with ``config.workers`` workers of ``gpus`` and ``cpus`` each on this cluster."""
    import ray

    plan = plan_feed(input_size=config.input_size, cluster_cpus=ray.cluster_resources().get("CPU", 1),
                     workers=pool_bounds(config.workers)[1], gpus=gpus, cpus=cpus, decode_tasks=config.decode_tasks,
                     decode_cpus=config.decode_cpus, decode_threads=config.decode_threads, decode=config.decode,
                     draft=config.fast_decode)
    draft = " (JPEG draft mode)" if plan.draft else ""
    if plan.in_workers:
        _log.info("each worker fetches and decodes its units with %d thread(s)%s", plan.threads, draft)
    else:
        _log.info("decoding in up to %d task(s) of %.3g CPU each%s", plan.decode_tasks, plan.decode_cpus, draft)
    return plan
