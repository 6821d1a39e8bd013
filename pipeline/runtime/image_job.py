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

import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.decode import DecodeConfig, decode_batch, pixels_to_float
from .feeding import check_feed_flags
from .failures import one_line
from .checks import Workers, check_job_flags
from ..io.listing import fetch_bytes, list_uris
from .inputs import list_inputs
from ..store import FeatureStore

__all__ = ["ImageJobConfig", "JobSummary", "ImageBatchWorker", "JobWorker", "fetch_bytes", "list_uris", "list_inputs"]

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
        decode_threads: each worker fetches and decodes its own units with this many threads, instead of tasks
            of their own (``None``: when the workers leave too few CPUs free for decode tasks, :mod:`.feeding`).
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
    decode_threads: int | None = None

    def check_flags(self) -> None:
        """Refuse out-of-range resource and selection settings, naming each flag."""
        check_job_flags(workers=self.workers, images_per_batch=self.images_per_batch, limit=self.limit,
                        progress_every_s=self.progress_every_s, gpus_per_worker=self.gpus_per_worker,
                        cpus_per_worker=self.cpus_per_worker)
        check_feed_flags(self.decode_tasks, self.decode_cpus, self.decode_threads)


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

    A batch arrives decoded (``pixels`` uint8 at the input size, from :func:`pipeline.io.decode.decode_batch`), as
    bytes, or as listing rows (``image_id, uri``); then it is fetched and decoded here, ``decode_threads`` images at
    once. Up to two batches run at once in an actor (:func:`run_image_job`): one on the
    model (a lock keeps the model to one batch) while the other's store unit is converted and written.

    Args:
        output: store URL, opened with ``mode="r+"`` and checked against ``layout``.
        layout: geometry the store must have.
        input_size: square size images are resized to.
        decode: limits on accepted images.
        cpus_per_worker: CPU threads for torch when running on the CPU.
        gpus_per_worker: GPUs Ray gave the actor; 0 keeps it on the CPU even where a GPU is visible (Ray 2.60
            leaves every GPU visible to actors that asked for none); ``None``: a GPU whenever one is visible.
        decode_threads: images fetched and decoded at once when a batch arrives undecoded.
        draft: decode large JPEGs at a reduced scale (:func:`pipeline.io.decode.decode_image`).
    """

    stage = "model"
    #: Which job's unit sizes apply (:func:`pipeline.runtime.batching.unit_size`); ``None``: the job's own.
    #: Forward-only workers take ``"apply"``'s, whatever job runs them.
    unit_job: str | None = None
    #: Images per model call; ``None`` is the whole batch. Subclasses set it in :meth:`setup` (see
    #: :mod:`pipeline.runtime.batching`) so a store unit larger than the device's memory allows is done in passes.
    images_per_pass: int | None = None

    def __init__(self, output: str, layout: dict[str, Any], *, input_size: int, decode: DecodeConfig = DecodeConfig(),
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None, decode_threads: int = 1,
                 draft: bool = False):
        self.input_size = input_size
        self.decode = decode
        self.decode_threads = max(1, decode_threads)
        self.draft = draft
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
        if "pixels" not in batch:  # listing rows or bytes (fetch_bytes' rows): fetch and decode here
            if "bytes" not in batch:
                batch = fetch_bytes(batch)
            batch = decode_batch(batch, size=self.input_size, config=self.decode, draft=self.draft,
                                 threads=self.decode_threads)
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
        if pixels and batch["pixels"].shape[1:] != (3, self.input_size, self.input_size):
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

    def to_store(self, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Results in the store's dtype on the host, for :meth:`process` to return: converted where they were
        computed (a GPU converts in microseconds, then half the bytes cross to the host), a tensor passed twice
        (``average`` with one copy: ``raw`` is ``clean``) converted once."""
        dtype = getattr(torch, self.store.layout.dtype)
        done: dict[int, torch.Tensor] = {}
        for a in arrays:
            if id(a) not in done:
                done[id(a)] = _host(a, dtype)
        return tuple(done[id(a)] for a in arrays)

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
        """Decoded uint8 images ``(3, S, S)`` -> ``(B, 3, S, S)`` float in ``[0, 1]`` on the worker's device. The
        uint8 pixels travel (a quarter of float32's bytes), to a GPU through pinned memory without blocking (the
        copy is queued on the stream that then computes on it), and become floats there."""
        if self.device.type != "cuda":
            return pixels_to_float(images)
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in images]
        staged = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.uint8, pin_memory=True)
        torch.stack(tensors, out=staged)
        return pixels_to_float(staged.to(self.device, non_blocking=True))


def _host(value: Any, dtype: torch.dtype) -> Any:
    """A result array in the store's dtype on the host: torch converts (several times faster than numpy's
    float32 -> float16, with the same round-to-nearest-even and overflow to inf, which the writer then refuses)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype).to("cpu")  # converted on its device: fewer bytes to copy
    return value


class JobWorker(ImageBatchWorker):
    """An :class:`ImageBatchWorker` built from its job's config (``config.input_size`` is the model's input) and
    what the job's plan built for it (``settings``: e.g. the backbone and stage-1 configs)."""

    def __init__(self, config: Any, layout: dict[str, Any], settings: Mapping[str, Any] | None = None):
        self.config = config
        self.settings: Mapping[str, Any] = settings or {}
        super().__init__(config.output, layout, input_size=config.input_size, decode=config.decode,
                         cpus_per_worker=config.cpus_per_worker, gpus_per_worker=config.gpus_per_worker,
                         decode_threads=config.decode_threads or 1, draft=config.fast_decode)
