"""Dataset-scale stage 1 on Ray Data: an image corpus in, a feature store of clean and raw features out.

The pipeline, streamed with backpressure so memory stays bounded whatever the corpus size::

    listing (ids the store has not finished)  ->  fetch bytes (light CPU tasks, fsspec)
        ->  Stage1Worker actors (decode, resize, batched stage-1 fit, write one store unit per batch)
        ->  status rows back to the driver (progress, summary)

Each actor loads the backbone once. Each batch of images is one work unit of the store: its array chunks
are written first and its manifest part last, so a killed worker leaves nothing a reader trusts, and
Ray's actor restarts and task retries redo the unit elsewhere (rewriting the same rows is harmless).
Per-image problems (unreadable, undecodable, non-finite features) become ``failed`` manifest rows and the
job goes on. A re-run skips images already committed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .backbone import Backbone, BackboneConfig, create_backbone
from .decode import DecodeConfig, ImageDecodeError, decode_image, resize_to_tensor
from .listing import iter_uris
from .progress import Progress
from .stage1 import Stage1Config, fit_images
from .storage import filesystem
from .store import FeatureStore, StoreLayout

__all__ = ["DenoiseConfig", "DenoiseSummary", "Stage1Worker", "fetch_bytes", "prepare_store", "run_denoise"]

_log = logging.getLogger(__name__)

DEFAULT_MODEL = "vit_small_patch14_dinov2.lvd142m"


@dataclass
class DenoiseConfig:
    """Everything a denoise run needs; the CLI flags of ``dvt denoise`` map one to one onto these fields.

    Attributes:
        images: folder, glob, object-store prefix, or .txt/.csv/.parquet list of image URIs.
        output: feature store URL (local path, ``file://``, ``s3://``, ``memory://`` for one process).
        model, weights, block, stride: the backbone (see :class:`pipeline.backbone.BackboneConfig`).
        input_size: square size images are resized to before the ViT (518 for patch 14 in the paper).
        preset: stage-1 preset (``default``, ``paper``, ``ci``); ``views`` and ``steps`` override it.
        images_per_batch: images fitted together by one worker, and the size of one store unit.
        workers: maximum number of stage-1 actors.
        gpus_per_worker: GPUs per actor; ``None`` means 1 when the cluster has GPUs, else 0.
        cpus_per_worker: CPUs per actor; ``None`` means 1 with a GPU, else an even share of the CPUs.
        seed: fixes every image's views and random draws (with its image id).
        limit: only the first ``limit`` images of the listing.
        overwrite: delete the store and start again; otherwise finished images are skipped.
        retry_failed: also redo images a previous run recorded as failed.
        allow_config_change: add to a store made with another stage-1 configuration.
        dtype: feature storage type, ``float16`` or ``float32``.
        keep_artifact: also store ``G`` on the full-image grid (array ``artifact``).
        progress_every_s: seconds between progress lines.
    """

    images: str
    output: str
    model: str = DEFAULT_MODEL
    weights: str = "hub"
    block: int = -1
    stride: int | None = None
    input_size: int = 518
    preset: str = "default"
    views: int | None = None
    steps: int | None = None
    images_per_batch: int = 4
    workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    seed: int = 0
    limit: int | None = None
    overwrite: bool = False
    retry_failed: bool = True
    allow_config_change: bool = False
    dtype: str = "float16"
    keep_artifact: bool = True
    progress_every_s: float = 30.0
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(model=self.model, weights=self.weights, block=self.block, stride=self.stride,
                              img_size=self.input_size)

    def stage1_config(self) -> Stage1Config:
        config = Stage1Config.preset(self.preset)
        if self.views is not None:
            config = config.replace(views=dataclasses.replace(config.views, num_views=self.views))
        if self.steps is not None:
            config = config.replace(steps=self.steps)
        return config

    def arrays(self) -> tuple[str, ...]:
        return ("raw", "clean", "artifact") if self.keep_artifact else ("raw", "clean")


@dataclass
class DenoiseSummary:
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

    def format(self) -> str:
        lines = [f"denoise finished: {self.ok} ok, {self.failed} failed of {self.todo} to do "
                 f"({self.skipped} already done) in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s",
                 f"store {self.store}: {self.store_ok} ok, {self.store_failed} failed of {self.listed} listed"]
        lines += [f"  {count} x {reason}" for reason, count in self.failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pipeline steps

def fetch_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read each ``uri``'s bytes through fsspec; unreadable ones get an ``error`` instead of stopping the job."""
    data, errors = [], []
    for uri in batch["uri"]:
        try:
            fs, path = filesystem(str(uri))
            data.append(fs.cat_file(path))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - any read failure is this image's failure
            data.append(b"")
            errors.append(f"cannot read {uri}: {type(e).__name__}: {e}")
    return {**batch, "bytes": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}


class Stage1Worker:
    """A Ray Data actor: one backbone per process, one store unit per batch of images."""

    def __init__(self, config: DenoiseConfig, layout: dict[str, Any]):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and config.cpus_per_worker:
            torch.set_num_threads(max(1, round(config.cpus_per_worker)))
        self.backbone: Backbone = create_backbone(config.backbone_config()).to(self.device)
        self.stage1 = config.stage1_config()
        self.store = FeatureStore.open(config.output, "r+", expect=layout)
        self.worker = f"{os.uname().nodename}:{os.getpid()}"
        _log.info("stage-1 worker %s ready on %s", self.worker, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        ids, uris = [int(i) for i in batch["image_id"]], [str(u) for u in batch["uri"]]
        rows: dict[int, dict[str, Any]] = {i: {"image_id": i, "uri": u} for i, u in zip(ids, uris)}
        errors: dict[int, str] = {}
        pixels: dict[int, torch.Tensor] = {}
        for i, data, error in zip(ids, batch["bytes"], batch["error"]):
            if error:
                errors[i] = str(error)
                continue
            try:
                image = decode_image(bytes(data), self.config.decode)
            except ImageDecodeError as e:
                errors[i] = str(e)
                continue
            rows[i].update(width=image.width, height=image.height)
            pixels[i] = resize_to_tensor(image.pixels, self.config.input_size)
        results = self._fit(pixels, errors)
        with self.store.unit() as unit:
            for i in ids:
                if i in errors:
                    unit.fail(rows[i], errors[i])
                    continue
                r = results[i]
                record = {**rows[i], "seconds": r.seconds, "losses": r.losses,
                          "stats": {"residual_norm_mean": r.residual_norm_mean, "residual_norm_max": r.residual_norm_max}}
                arrays = {"raw": r.raw, "clean": r.clean, "artifact": r.artifact}
                unit.add(record, **{k: arrays[k] for k in self.config.arrays()})
        elapsed = time.perf_counter() - started
        return {"image_id": np.array(ids, dtype=np.int64),
                "status": np.array(["failed" if i in errors else "ok" for i in ids], dtype=object),
                "error": np.array([errors.get(i, "") for i in ids], dtype=object),
                "seconds": np.full(len(ids), elapsed / max(1, len(ids)))}

    def _fit(self, pixels: dict[int, torch.Tensor], errors: dict[int, str]) -> dict[int, Any]:
        """Fit the batch together; if that fails, fit one by one so one bad image fails alone."""
        if not pixels:
            return {}
        ids = list(pixels)
        try:
            return self._fit_ids(ids, pixels)
        except Exception as e:  # noqa: BLE001
            if len(ids) == 1:
                errors[ids[0]] = f"stage 1 failed: {type(e).__name__}: {e}"
                return {}
            _log.warning("batch fit failed (%s); fitting its %d images one by one", e, len(ids))
        results = {}
        for i in ids:
            try:
                results.update(self._fit_ids([i], pixels))
            except Exception as e:  # noqa: BLE001
                errors[i] = f"stage 1 failed: {type(e).__name__}: {e}"
        return results

    def _fit_ids(self, ids: list[int], pixels: dict[int, torch.Tensor]) -> dict[int, Any]:
        images = torch.stack([pixels[i] for i in ids]).to(self.device)
        results = fit_images(self.backbone, images, self.stage1, image_ids=ids, seed=self.config.seed)
        return dict(zip(ids, results))


# ---------------------------------------------------------------------------------------------- driver

def describe_backbone(config: DenoiseConfig) -> Backbone:
    """The backbone's metadata without its weights (built on the meta device: no memory, no download)."""
    meta = dataclasses.replace(config.backbone_config(), weights="none")
    try:
        with torch.device("meta"):
            return create_backbone(meta)
    except Exception:  # noqa: BLE001 - some custom factories cannot build on meta; fall back to CPU
        return create_backbone(meta)


def prepare_store(config: DenoiseConfig) -> tuple[FeatureStore, int, pa.Table]:
    """Create or reopen the store for this run.

    Returns the store, how many images this run covers, and the listing rows it still has to do.
    """
    backbone = describe_backbone(config)
    layout = StoreLayout.from_backbone(backbone, config.input_size, arrays=config.arrays(), dtype=config.dtype,
                                       stage1=dataclasses.asdict(config.stage1_config()))
    uris = []
    for uri in iter_uris(config.images):
        if config.limit is not None and len(uris) >= config.limit:
            break
        uris.append(uri)
    store = FeatureStore.create(config.output, layout, uris, overwrite=config.overwrite,
                                allow_config_change=config.allow_config_change)
    listing = store.listing()
    mine = listing.filter(pc.is_in(listing["uri"], pa.array(uris, pa.string())))
    todo = store.todo(retry_failed=config.retry_failed)
    pending = mine.filter(pc.is_in(mine["image_id"], pa.array(todo, pa.int64())))
    return store, mine.num_rows, pending


def _resources(config: DenoiseConfig) -> tuple[float, float]:
    import ray

    cluster = ray.cluster_resources()
    gpus = config.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    cpus = config.cpus_per_worker
    if cpus is None:
        # Leave a little CPU for the fetch tasks, or an actor pool that takes every core starves them.
        cpus = 1.0 if gpus else max(0.25, min(4.0, 0.9 * cluster.get("CPU", 1) / max(1, config.workers)))
    return gpus, cpus


def run_denoise(config: DenoiseConfig) -> DenoiseSummary:
    """Run stage 1 over ``config.images`` into ``config.output`` on the Ray cluster in use (or a local one)."""
    import ray

    started = time.monotonic()
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    store, covered, pending = prepare_store(config)
    todo = pending.num_rows
    gpus, cpus = _resources(config)
    config = dataclasses.replace(config, gpus_per_worker=gpus, cpus_per_worker=cpus)
    _log.info("denoise: %d images into %s, %d to do; %d worker(s) with %.2g GPU and %.2g CPU each",
              covered, config.output, todo, config.workers, gpus, cpus)
    progress = Progress(total=todo, label="denoise", every_s=config.progress_every_s)
    if todo:
        per_block = max(config.images_per_batch, 1) * 4
        blocks = [pending.slice(i, per_block) for i in range(0, todo, per_block)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(fetch_bytes, batch_size=config.images_per_batch, num_cpus=0.1)
        ds = ds.map_batches(
            Stage1Worker, fn_constructor_kwargs={"config": config, "layout": store.layout.geometry()},
            batch_size=config.images_per_batch, num_gpus=gpus, num_cpus=cpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.workers, max_tasks_in_flight_per_actor=1))
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            failed = int((out["status"] == "failed").sum())
            progress.update(ok=len(out["status"]) - failed, failed=failed)
    progress.close()
    return _finish(config, store, covered, todo, progress, time.monotonic() - started)


def _finish(config: DenoiseConfig, store: FeatureStore, covered: int, todo: int, progress: Progress,
            seconds: float) -> DenoiseSummary:
    info = store.refresh().info()
    summary = DenoiseSummary(
        store=config.output, listed=store.num_rows, skipped=covered - todo, todo=todo,
        ok=progress.ok, failed=progress.failed, seconds=seconds,
        images_per_second=progress.done / seconds if seconds > 0 else 0.0,
        store_ok=info.ok, store_failed=info.failed, failures=[(str(r), int(n)) for r, n in info.failures])
    store.update_attrs(last_run={**dataclasses.asdict(summary), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _log.info("%s", summary.format())
    return summary
