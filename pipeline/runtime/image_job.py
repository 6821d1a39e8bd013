"""What every image-to-store job shares (``dvt denoise``, ``dvt apply``): a Ray Data pipeline from an image
listing to a feature store, with per-image failures, progress, a summary and resume.

::

    listing (ids the store has not finished)  ->  fetch bytes (light CPU tasks, fsspec)
        ->  decode + resize to the model's input, uint8 (CPU tasks over the node's cores, :mod:`.feeding`)
        ->  ImageBatchWorker actors (upload uint8, model on the batch, write one store unit per batch; a
            batch's chunk writes overlap the next batch's compute)
        ->  status rows back to the driver (progress, summary)

A job's settings extend :class:`ImageJobConfig` (which images, how to store them, the workers' resources); its
worker subclasses :class:`JobWorker` with its model (:meth:`ImageBatchWorker.setup`) and what it computes for a
batch (:meth:`ImageBatchWorker.process`); :func:`run_store_job` runs it under the store's lease. Each batch of images is one
work unit of the store: array chunks first, manifest part last, so a killed worker leaves nothing a reader
trusts and Ray's actor restarts and task retries redo the unit (rewriting the same rows is harmless).
Per-image problems (unreadable, undecodable, a model error on that image, non-finite features) become
``failed`` manifest rows and the job goes on. A re-run skips images already committed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .batching import unit_size
from ..io.decode import DecodeConfig, decode_batch, pixels_to_float
from .feeding import FETCH_CPUS, FeedPlan, check_feed_flags, plan_feed
from .failures import JobFailedError, one_line, root_cause
from .checks import Workers, check_job_flags, pool_bounds, store_session
from ..io.listing import fetch_bytes, list_uris
from ..io.shards import read_blocks, read_shard_members
from .inputs import ShardInputs, list_inputs
from .progress import Progress
from .ray_session import init_ray
from .reachability import check_reachable, image_job_inputs
from ..io.storage import StorageUnavailableError
from ..store import FeatureStore, StoreError, StoreLayout
from ..store.ledger import LedgerFolder
from ..store.manifest import ROW_OK, ROW_PENDING, uri_text

__all__ = ["ImageJobConfig", "JobSummary", "ImageBatchWorker", "JobWorker", "fetch_bytes", "list_uris", "list_inputs",
           "open_job_store", "worker_resources", "job_feed", "run_image_job", "run_store_job"]

_log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ImageJobConfig:
    """Settings every image-to-store job has (``dvt denoise``, ``dvt apply``); each job's config adds its model.

    Attributes:
        images: folder, glob, object-store prefix, or .txt/.csv/.parquet list of image URIs; or shards: WebDataset
            ``.tar`` or Parquet files with image bytes, as one shard, a folder or prefix, a glob or a brace pattern
            (:mod:`pipeline.io.shards`).
        image_column: Parquet shards' column of encoded images (tar shards: the preferred member extension).
        keep_columns: shard fields carried into the store's listing (``"key,url,caption"``).
        output: feature store URL (local path, ``file://``, ``s3://``, ``memory://`` for one process).
        images_per_batch: images per store unit (and per model call); ``None`` chooses per device
            (:mod:`pipeline.runtime.batching`).
        amp: autocast dtype (``"bfloat16"``) for the model; ``None``: the job's default (fp32).
        workers: actors: a number, or ``(min, max)`` for Ray Data's autoscaling pool, which grows onto nodes that
            join while the job runs (``--workers 2-16``).
        gpus_per_worker: GPUs per actor; ``None`` means 1 when the cluster has GPUs, else 0.
        cpus_per_worker: CPUs per actor; ``None`` means 1 with a GPU, else an even share of the CPUs.
        limit: only the first ``limit`` images of the listing.
        overwrite: delete the store and start again; otherwise finished images are skipped.
        retry_failed: also redo images a previous run recorded as failed.
        allow_config_change: add to a store made with another configuration of the job's model.
        dtype: feature storage type, ``float16`` or ``float32``.
        progress_every_s: seconds between progress lines.
        dashboard: start Ray's dashboard when this run starts a local Ray (:func:`pipeline.runtime.ray_session.init_ray`).
        decode: limits on accepted images.
        decode_tasks: decode tasks running at once (``None``: as many as the free CPUs allow, :mod:`.feeding`).
        decode_cpus: CPUs each decode task holds (``None``: 1 beside GPU workers, a share of the rest on CPUs).
        fast_decode: decode JPEGs at least twice the input size at a reduced scale (PIL's draft mode): much faster
            on large photos, slightly different pixels than a full decode and resize (off by default).
    """

    images: str
    output: str
    image_column: str = "jpg"
    keep_columns: str | tuple[str, ...] = ()
    images_per_batch: int | None = None
    amp: str | None = None
    workers: Workers = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    limit: int | None = None
    overwrite: bool = False
    retry_failed: bool = True
    allow_config_change: bool = False
    dtype: str = "float16"
    progress_every_s: float = 30.0
    dashboard: bool = False
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    decode_tasks: int | None = None
    decode_cpus: float | None = None
    fast_decode: bool = False

    def check_flags(self) -> None:
        """Refuse out-of-range resource and selection settings, naming each flag."""
        check_job_flags(workers=self.workers, images_per_batch=self.images_per_batch, limit=self.limit,
                        progress_every_s=self.progress_every_s, gpus_per_worker=self.gpus_per_worker,
                        cpus_per_worker=self.cpus_per_worker)
        check_feed_flags(self.decode_tasks, self.decode_cpus)


@dataclass
class JobSummary:
    """What a run did (also written into the store's ``last_run`` attribute)."""

    store: str
    listed: int
    skipped: int
    todo: int
    ok: int
    failed: int
    seconds: float
    images_per_second: float
    store_ok: int
    store_failed: int
    failures: list[tuple[str, int]] = field(default_factory=list)
    job: str = "denoise"

    @classmethod
    def nothing(cls, store: str, job: str) -> JobSummary:
        """A run that had nothing to do and touched nothing."""
        return cls(store=store, listed=0, skipped=0, todo=0, ok=0, failed=0, seconds=0.0, images_per_second=0.0,
                   store_ok=0, store_failed=0, job=job)

    def format(self) -> str:
        lines = [f"{self.job} finished: {self.ok} ok, {self.failed} failed of {self.todo} to do "
                 f"({self.skipped} already done) in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s",
                 f"store {self.store}: {self.store_ok} ok, {self.store_failed} failed of {self.listed} listed"]
        lines += [f"  {count} x {reason}" for reason, count in self.failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pipeline steps

class ImageBatchWorker:
    """Base Ray Data actor: one model per process, one store unit per batch of images.

    Subclasses set :attr:`stage` (names the step in failure messages), build their model in :meth:`setup` and
    compute a batch in :meth:`process`.

    A batch arrives decoded (``pixels`` uint8 at the input size, from :func:`pipeline.io.decode.decode_batch`) or as
    bytes (then it is decoded here). Up to two batches run at once in an actor (:func:`run_image_job`): one on the
    model (a lock keeps the model to one batch) while the other's store unit is converted and written.

    Args:
        output: store URL, opened with ``mode="r+"`` and checked against ``layout``.
        layout: geometry the store must have.
        input_size: square size images are resized to.
        decode: limits on accepted images.
        cpus_per_worker: CPU threads for torch when running on the CPU.
        gpus_per_worker: GPUs Ray gave the actor; 0 keeps it on the CPU even where a GPU is visible (Ray 2.60
            leaves every GPU visible to actors that asked for none); ``None``: a GPU whenever one is visible.
    """

    stage = "model"
    #: Images per model call; ``None`` is the whole batch. Subclasses set it in :meth:`setup` (see
    #: :mod:`pipeline.runtime.batching`) so a store unit larger than the device's memory allows is done in passes.
    images_per_pass: int | None = None

    def __init__(self, output: str, layout: dict[str, Any], *, input_size: int, decode: DecodeConfig = DecodeConfig(),
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None):
        self.input_size = input_size
        self.decode = decode
        use_gpu = torch.cuda.is_available() and (gpus_per_worker is None or gpus_per_worker > 0)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if self.device.type == "cpu" and cpus_per_worker:
            torch.set_num_threads(max(1, round(cpus_per_worker)))
        self.worker = f"{os.uname().nodename}:{os.getpid()}"
        self._broken: str | None = None
        self._model_lock = threading.Lock()
        try:
            self.setup()
            self.store = FeatureStore.open(output, "r+", expect=layout)
            self.arrays = self.store.layout.arrays
        except Exception as e:  # noqa: BLE001 - every batch reports it, so the driver stops with this one line
            self._broken = f"{self.stage} worker could not start: {one_line(e)}\n\n{traceback.format_exc()}"
            return
        _log.info("%s worker %s ready on %s", self.stage, self.worker, self.device)

    def setup(self) -> None:
        """Build the model (called once per actor, before the store is opened)."""

    def process(self, ids: list[int], images: torch.Tensor) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """For a batch ``images`` ``(B, 3, S, S)`` in ``[0, 1]`` on :attr:`device`: one ``(record fields, arrays)``
        per image, in order; the arrays are ``(gh, gw, C)`` per store array."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Status rows for a batch; a problem that is not one image's (the store cannot be written, a bug) comes
        back as ``fatal`` rows, and the driver stops the job with their message instead of Ray's traceback."""
        error = self._broken
        if error is None:
            try:
                return self._process_batch(batch)
            except Exception as e:  # noqa: BLE001 - see above
                error = f"{self.stage} worker failed: {one_line(e)}\n\n{traceback.format_exc()}"
        n = len(batch["image_id"])
        return {"image_id": np.asarray(batch["image_id"], dtype=np.int64), "status": np.full(n, "fatal", dtype=object),
                "error": np.full(n, error, dtype=object), "seconds": np.zeros(n)}

    def _process_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        if "pixels" not in batch:  # bytes (fetch_bytes' rows): decode here
            batch = decode_batch(batch, size=self.input_size, config=self.decode)
        ids, uris = [int(i) for i in batch["image_id"]], [str(u) for u in batch["uri"]]
        rows: dict[int, dict[str, Any]] = {i: {"image_id": i, "uri": u} for i, u in zip(ids, uris)}
        errors: dict[int, str] = {}
        pixels: dict[int, np.ndarray] = {}
        for j, i in enumerate(ids):
            if batch["error"][j]:
                errors[i] = str(batch["error"][j])
                continue
            rows[i].update(width=int(batch["width"][j]), height=int(batch["height"][j]))
            pixels[i] = batch["pixels"][j]
        if pixels and batch["pixels"].shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"decoded pixels of shape {batch['pixels'].shape[1:]} reached a worker for "
                             f"{self.input_size} px input")
        with self._model_lock:  # the model takes one batch at a time; another batch's writes go on meanwhile
            results = self._run(pixels, errors)
        dtype = getattr(torch, self.store.layout.dtype)
        with self.store.unit() as unit:
            for i in ids:
                if i in errors:
                    unit.fail(rows[i], errors[i])
                    continue
                record, arrays = results[i]
                unit.add({**rows[i], **record}, **{k: _host(arrays[k], dtype) for k in self.arrays})
        elapsed = time.perf_counter() - started
        return {"image_id": np.array(ids, dtype=np.int64),
                "status": np.array(["failed" if i in errors else "ok" for i in ids], dtype=object),
                "error": np.array([errors.get(i, "") for i in ids], dtype=object),
                "seconds": np.full(len(ids), elapsed / max(1, len(ids)))}

    def _run(self, pixels: dict[int, np.ndarray], errors: dict[int, str]) -> dict[int, Any]:
        """Process the batch together; if that fails, one by one so one bad image fails alone."""
        if not pixels:
            return {}
        ids = list(pixels)
        try:
            return self._run_ids(ids, pixels)
        except Exception as e:  # noqa: BLE001
            if len(ids) == 1:
                errors[ids[0]] = f"{self.stage} failed: {type(e).__name__}: {e}"
                return {}
            _log.warning("%s failed on a batch (%s); processing its %d images one by one", self.stage, e, len(ids))
        results = {}
        for i in ids:
            try:
                results.update(self._run_ids([i], pixels))
            except Exception as e:  # noqa: BLE001
                errors[i] = f"{self.stage} failed: {type(e).__name__}: {e}"
        return results

    def _run_ids(self, ids: list[int], pixels: dict[int, np.ndarray]) -> dict[int, Any]:
        step = self.images_per_pass or len(ids)
        results: dict[int, Any] = {}
        for start in range(0, len(ids), step):
            part = ids[start:start + step]
            results.update(zip(part, self.process(part, self._to_device([pixels[i] for i in part]))))
        return results

    def _to_device(self, images: list[np.ndarray]) -> torch.Tensor:
        """Decoded uint8 images ``(S, S, 3)`` -> ``(B, 3, S, S)`` float in ``[0, 1]`` on the worker's device. The
        uint8 pixels travel (a quarter of float32's bytes), to a GPU through pinned memory without blocking (the
        copy is queued on the stream that then computes on it), and become floats there."""
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in images]
        if self.device.type != "cuda":
            return pixels_to_float(torch.stack(tensors))
        staged = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.uint8, pin_memory=True)
        torch.stack(tensors, out=staged)
        return pixels_to_float(staged.to(self.device, non_blocking=True))


def _host(value: Any, dtype: torch.dtype) -> Any:
    """A result array in the store's dtype on the host: torch converts (several times faster than numpy's
    float32 -> float16, with the same round-to-nearest-even and overflow to inf, which the writer then refuses)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=dtype)
    return value


class JobWorker(ImageBatchWorker):
    """An :class:`ImageBatchWorker` built from its job's config (``config.input_size`` is the model's input) and
    what the job's plan built for it (``settings``: e.g. the backbone and stage-1 configs)."""

    def __init__(self, config: Any, layout: dict[str, Any], settings: Mapping[str, Any] | None = None):
        self.config = config
        self.settings: Mapping[str, Any] = settings or {}
        super().__init__(config.output, layout, input_size=config.input_size, decode=config.decode,
                         cpus_per_worker=config.cpus_per_worker, gpus_per_worker=config.gpus_per_worker)


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
    do leaves the store untouched. ``feed``: decode in CPU tasks of their own (:mod:`.feeding`); ``None`` decodes
    in the workers.
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
            ds = ds.map_batches(fetch_bytes, batch_size=images_per_batch, num_cpus=FETCH_CPUS)
        if feed is not None:
            # Bytes in, uint8 pixels at the model's size out: the CPU work per image, off the model's process.
            ds = ds.map_batches(decode_batch, batch_size=images_per_batch, num_cpus=feed.decode_cpus,
                                fn_kwargs={"size": feed.input_size, "config": feed.decode, "draft": feed.draft},
                                compute=ray.data.TaskPoolStrategy(size=max(1, min(feed.decode_tasks,
                                                                                  todo // max(1, per_block) + 1))))
        ds = ds.map_batches(
            worker, fn_constructor_kwargs=worker_kwargs, batch_size=images_per_batch, num_gpus=gpus, num_cpus=cpus,
            # --workers N: a fixed pool of what the user asked for (an autoscaling pool shrinks to one actor on a
            # short queue, since one actor with two batches in flight looks busy enough); MIN-MAX: Ray Data's
            # autoscaling pool, which adds actors on nodes that join. Two batches in flight per actor, and both may
            # run: one on the model while the other's unit is written.
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=2,
                                               max_concurrent_calls_per_actor=2, enable_true_multi_threading=True))
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
        config = dataclasses.replace(config, gpus_per_worker=gpus, cpus_per_worker=cpus)
        feed = job_feed(config, gpus, cpus)
        return run_image_job(job=job, store=store, covered=covered, pending=pending, worker=worker,
                             worker_kwargs={"config": config, "layout": store.layout.geometry(),
                                            "settings": dict(settings or {})},
                             images_per_batch=config.images_per_batch or unit_size(job, gpus > 0),
                             workers=config.workers, gpus=gpus, cpus=cpus, progress_every_s=config.progress_every_s,
                             started=started, lease=lease, feed=feed, image_column=config.image_column)


def job_feed(config: ImageJobConfig, gpus: float, cpus: float) -> FeedPlan:
    """The decode step of a job with ``config.workers`` workers of ``gpus`` and ``cpus`` each on this cluster."""
    import ray

    plan = plan_feed(input_size=config.input_size, cluster_cpus=ray.cluster_resources().get("CPU", 1),
                     workers=pool_bounds(config.workers)[1], gpus=gpus, cpus=cpus, decode_tasks=config.decode_tasks,
                     decode_cpus=config.decode_cpus, decode=config.decode, draft=config.fast_decode)
    _log.info("decoding in up to %d task(s) of %.3g CPU each%s", plan.decode_tasks, plan.decode_cpus,
              " (JPEG draft mode)" if plan.draft else "")
    return plan
