"""Stage 2 training on Ray Train: (raw, clean) pairs from feature stores in, a denoiser file out.

::

    feature stores --(driver: check geometry, split ids)--> Ray Data streams (store reads as Ray tasks)
        --> TorchTrainer: N workers, DDP (gloo on CPU), AdamW + warm-up/cosine, loss MSE + (1 - cos)
        --> one checkpoint per epoch under <output>/run/ (Ray Train storage: local path or s3://)
        --> <output>/denoiser.safetensors (weights + spec, loadable without Ray)

Split: an image is in the validation set when a hash of its file name falls below ``val_fraction``, so the split
is the same on every run, for every store holding that image and wherever the images were read from, and never
depends on worker count or order.

Resume: ``RunConfig(name="run", storage_path=<output>)`` is stable, so a worker failure (``FailureConfig``)
or a re-run of the same command restarts from the latest checkpoint: weights, optimiser, schedule, epoch
and the metrics history all live in it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .denoiser import Denoiser, DenoiserConfig, DenoiserMismatchError, DenoiserSpec, save_denoiser
from .ray_runtime import init_ray
from .storage import filesystem
from .store import FeatureStore, StoreError, StoreLayout
from .train_utils import all_reduce, denoising_loss, lr_lambda, ray_storage, uri_fraction

__all__ = ["TrainConfig", "TrainSummary", "denoising_loss", "lr_lambda", "split_ids", "open_stores",
           "train_loop_per_worker", "run_training", "export_checkpoint", "DENOISER_FILE", "RUN_NAME"]

_log = logging.getLogger(__name__)

DENOISER_FILE = "denoiser.safetensors"
CONFIG_FILE = "train_config.json"
RUN_NAME = "run"
STATE_FILE = "state.pt"


@dataclass
class TrainConfig:
    """A denoiser training run; ``dvt train`` flags map one to one onto these fields.

    Attributes:
        stores: feature store URLs made by ``dvt denoise`` (all with the same backbone settings).
        output: run folder (local path or ``s3://``): checkpoints under ``run/``, the denoiser file on top.
        epochs: passes over the training images.
        batch_size: feature maps per worker and step.
        lr: peak learning rate; ``None`` means ``base_lr * sqrt(global batch / 256)`` as in the reference.
        base_lr, weight_decay, warmup_fraction: AdamW and schedule (linear warm-up, cosine decay to 0).
        val_fraction: share of images (by a hash of the file name) held out for validation.
        num_blocks: Transformer blocks of the denoiser.
        pos_grid: grid of the positional embedding; ``None`` means the stores' grid.
        workers: training workers (DDP ranks).
        use_gpu: one GPU per worker; ``None`` means yes when the cluster has GPUs.
        cpus_per_worker: CPUs per worker; ``None`` means 1 with a GPU, else a share that leaves room to read.
        read_cpus: CPUs per store-reading task.
        max_failures: worker failures Ray Train recovers from (from the latest checkpoint).
        expect_backbone: refuse stores made with another backbone (``None``: whatever they hold).
        overwrite: delete ``output`` first instead of resuming from it.
        seed: initialisation seed.
        dashboard: start Ray's dashboard when this run starts a local Ray.
        after_epoch: advanced, for tests: a picklable ``f(epoch=, rank=)`` each worker calls after an epoch's
            checkpoint is reported (used to inject a worker crash).
    """

    stores: Sequence[str]
    output: str
    epochs: int = 10
    batch_size: int = 8
    lr: float | None = None
    base_lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.15
    val_fraction: float = 0.05
    num_blocks: int = 1
    pos_grid: tuple[int, int] | None = None
    workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: float | None = None
    read_cpus: float = 0.25
    max_failures: int = 3
    expect_backbone: str | None = None
    overwrite: bool = False
    seed: int = 0
    dashboard: bool = False
    after_epoch: Callable[..., None] | None = field(default=None, compare=False, repr=False)

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * math.sqrt(self.batch_size * self.workers / 256)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "after_epoch"}
        return json.loads(json.dumps(d, default=list))


@dataclass
class TrainSummary:
    """What a training run produced."""

    output: str
    denoiser: str
    epochs: int
    num_train: int
    num_val: int
    history: list[dict[str, float]]
    resumed_from: list[int]
    seconds: float

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    def format(self) -> str:
        f = self.final
        return (f"train finished: {self.epochs} epochs on {self.num_train} images ({self.num_val} for validation) "
                f"in {self.seconds:.1f} s; val mse {f.get('val_mse', float('nan')):.4g}, val cos "
                f"{f.get('val_cos', float('nan')):.4f}; denoiser {self.denoiser}")


# ------------------------------------------------------------------------------------------------ pieces

def split_ids(store: FeatureStore, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, val_ids)`` of the store's ok images; validation = file-name hash below ``val_fraction``.

    With ``val_fraction > 0`` and at least two images, at least one image is held out.
    """
    m = store.manifest()
    ok = np.asarray(m["status"].to_numpy(zero_copy_only=False) == "ok")
    ids = m["image_id"].to_numpy()[ok]
    uris = np.asarray(m["uri"].to_pylist(), dtype=object)[ok]
    h = np.array([uri_fraction(str(u)) for u in uris])
    val = h < val_fraction
    if val_fraction > 0 and not val.any() and len(ids) >= 2:
        val[np.argmin(h)] = True
    return ids[~val], ids[val]


def open_stores(config: TrainConfig) -> tuple[StoreLayout, list[FeatureStore]]:
    """Open every store, check they hold the same features (and the expected backbone) and are not empty."""
    if not config.stores:
        raise ValueError("no feature store given: pass --stores URL [URL ...] made by `dvt denoise`")
    first = FeatureStore.open(config.stores[0])
    layout = first.layout
    if config.expect_backbone and layout.backbone != config.expect_backbone:
        raise StoreError(f"{first.url} holds features of backbone {layout.backbone!r}, not {config.expect_backbone!r}: "
                         f"train on stores made with {config.expect_backbone!r} or drop --model")
    stores = [first] + [FeatureStore.open(url, expect=layout.geometry()) for url in config.stores[1:]]
    for s in stores:
        if "raw" not in s.layout.arrays:
            raise StoreError(f"{s.url} holds no raw features (made with `dvt apply --no-raw`): train on stores "
                             f"from `dvt denoise`, which keep raw and clean")
        if not len(s.ids("ok")):
            raise StoreError(f"{s.url} has no finished images (0 ok of {s.num_rows} listed): run `dvt denoise` "
                             f"into it first, or leave it out")
    return layout, stores


def _check_previous(config: TrainConfig, spec: DenoiserSpec) -> None:
    """Refuse to resume a run folder made for other features or another architecture."""
    fs, root = filesystem(config.output)
    path = f"{root.rstrip('/')}/{CONFIG_FILE}"
    if config.overwrite:
        if fs.exists(root):
            _log.warning("deleting the previous run at %s (--overwrite)", config.output)
            fs.rm(root, recursive=True)
        return
    if not fs.exists(path):
        return
    before = json.loads(fs.cat_file(path))
    old, new = before.get("spec", {}), spec.to_dict()
    keys = ("backbone", "block", "channels", "patch_size", "stride", "denoiser")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise DenoiserMismatchError(
            f"{config.output} holds a training run for other settings ("
            + "; ".join(f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
            + "): pass --overwrite to start again there, or use another --output")
    _log.info("resuming the training run in %s from its latest checkpoint", config.output)


# ------------------------------------------------------------------------------------------------ worker

@torch.no_grad()
def _evaluate(model: torch.nn.Module, val: Sequence[tuple[str, Sequence[int]]], batch_size: int,
              device: torch.device) -> list[float]:
    """Sums over this worker's validation images, read straight from the stores: ``[mse_sum, cos_sum, n]``.

    Validation sets are small, so they skip Ray Data (whose per-epoch start-up would cost more than reading).
    """
    sums = [0.0, 0.0, 0.0]
    model.eval()
    for url, ids in val:
        if not len(ids):
            continue
        for raw, clean in FeatureStore.open(url).iter_pairs(batch_size, ids=ids, torch=True):
            pred = model(raw.to(device, torch.float32))
            clean = clean.to(device, torch.float32)
            sums[0] += F.mse_loss(pred, clean, reduction="none").flatten(1).mean(1).sum().item()
            sums[1] += F.cosine_similarity(pred, clean, dim=-1).flatten(1).mean(1).sum().item()
            sums[2] += len(pred)
    return sums


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function (one per rank)."""
    import ray.train
    import ray.train.torch

    config: TrainConfig = loop_config["config"]
    spec = DenoiserSpec.from_dict(loop_config["spec"])
    steps_per_epoch, threads = int(loop_config["steps_per_epoch"]), int(loop_config["threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = Denoiser(spec.denoiser)
    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        if json.loads(state["spec"])["denoiser"] != spec.to_dict()["denoiser"]:
            raise DenoiserMismatchError("the checkpoint holds another denoiser architecture than this run's")
        model.load_state_dict(state["model"])
    ddp = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=config.peak_lr(), weight_decay=config.weight_decay)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, round(config.warmup_fraction * total))))
    history: list[dict[str, float]] = []
    resumed: list[int] = []
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, resumed = json.loads(state["history"]), [*json.loads(state["resumed_from"]), int(state["epoch"])]
        start = int(state["epoch"]) + 1
        _log.info("rank %d resumes after epoch %d", rank, start - 1)
    train_shard = ray.train.get_dataset_shard("train")
    world = ctx.get_world_size()
    my_val = [(url, ids[rank::world]) for url, ids in loop_config["val"]]
    for epoch in range(start, config.epochs):
        ddp.train()
        wait = loss_sum = 0.0
        steps = samples = 0
        began = time.perf_counter()
        batches = iter(train_shard.iter_torch_batches(
            batch_size=config.batch_size, drop_last=True, dtypes=torch.float32, device=device, prefetch_batches=2,
            local_shuffle_buffer_size=4 * config.batch_size, local_shuffle_seed=config.seed + epoch))
        first_wait = None
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t
            if first_wait is None:
                first_wait = wait  # the epoch's pipeline start-up: a fixed cost per epoch, not a stall
            if batch is None:
                break
            loss, _ = denoising_loss(ddp(batch["raw"]), batch["clean"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(batch["raw"])
            steps, samples = steps + 1, samples + len(batch["raw"])
        elapsed = time.perf_counter() - began
        val = _evaluate(ddp, my_val, config.batch_size, device)
        g = all_reduce([loss_sum, samples, wait, elapsed, first_wait or 0.0, *val])
        slowest = all_reduce([elapsed], op="max")[0]
        metrics = {"epoch": epoch, "steps": steps, "train_loss": g[0] / max(1.0, g[1]), "lr": sched.get_last_lr()[0],
                   "samples_per_s": g[1] / max(slowest, 1e-9), "data_wait_fraction": g[2] / max(g[3], 1e-9),
                   "data_wait_fraction_after_first_batch": (g[2] - g[4]) / max(g[3] - g[4], 1e-9),
                   "first_batch_s": g[4] / ctx.get_world_size()}
        if g[7] > 0:
            mse, cos = g[5] / g[7], g[6] / g[7]
            metrics.update(val_mse=mse, val_cos=cos, val_loss=mse + 1 - cos)
        history.append(metrics)
        _log.info("rank %d epoch %d: %s", rank, epoch, json.dumps(metrics))
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch, "history": json.dumps(history), "resumed_from": json.dumps(resumed),
                            "spec": json.dumps(spec.to_dict())}, os.path.join(d, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if config.after_epoch is not None:
            config.after_epoch(epoch=epoch, rank=rank)
    return {"history": history, "resumed_from": resumed}


# ------------------------------------------------------------------------------------------------ driver

def _resources(config: TrainConfig) -> tuple[bool, float, int]:
    import ray

    cluster = ray.cluster_resources()
    gpu = config.use_gpu if config.use_gpu is not None else cluster.get("GPU", 0) > 0
    cpus = config.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if gpu else max(0.25, min(8.0, 0.75 * cluster.get("CPU", 1) / max(1, config.workers)))
    return gpu, cpus, max(1, round(cpus))


def export_checkpoint(checkpoint_dir: str, path: str, training: dict[str, Any] | None = None) -> DenoiserSpec:
    """Write the denoiser of a training checkpoint folder to a denoiser file; returns its spec."""
    state = torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=True)
    spec = DenoiserSpec.from_dict(json.loads(state["spec"]))
    spec.training.update(training or {}, history=json.loads(state["history"]), epoch=int(state["epoch"]))
    model = Denoiser(spec.denoiser)
    model.load_state_dict(state["model"])
    save_denoiser(path, model, spec)
    return spec


def run_training(config: TrainConfig) -> TrainSummary:
    """Train a denoiser on ``config.stores`` with Ray Train and export it to ``<output>/denoiser.safetensors``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    began = time.monotonic()
    layout, stores = open_stores(config)
    splits = [split_ids(s, config.val_fraction) for s in stores]
    num_train, num_val = sum(len(t) for t, _ in splits), sum(len(v) for _, v in splits)
    per_worker = num_train // config.workers
    steps_per_epoch = per_worker // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{num_train} training images cannot fill one batch of {config.batch_size} on each of "
                         f"{config.workers} workers: lower --batch-size or --workers, or add images")
    dcfg = DenoiserConfig(channels=layout.channels, num_blocks=config.num_blocks,
                          pos_grid=tuple(config.pos_grid or layout.grid))
    training = {"stores": [s.url for s in stores], "num_train": num_train, "num_val": num_val,
                "val_fraction": config.val_fraction, "split": "sha1(file name) < val_fraction",
                "epochs": config.epochs, "batch_size": config.batch_size * config.workers, "lr": config.peak_lr()}
    spec = DenoiserSpec.from_layout(layout, dcfg, **training)
    _check_previous(config, spec)
    init_ray(config.dashboard)
    fs, root = filesystem(config.output)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root.rstrip('/')}/{CONFIG_FILE}",
                 json.dumps({"config": config.to_json(), "spec": spec.to_dict()}, indent=2, sort_keys=True).encode())

    def dataset(store: FeatureStore, ids: np.ndarray):
        return store.to_ray_dataset(("raw", "clean"), ids=ids, batch_size=config.batch_size, num_cpus=config.read_cpus)

    train = None
    for store, (tr, _) in zip(stores, splits):
        if len(tr):
            ds = dataset(store, tr)
            train = ds if train is None else train.union(ds)
    val = [(s.url, v.tolist()) for s, (_, v) in zip(stores, splits) if len(v)]
    gpu, cpus, threads = _resources(config)
    storage_path, storage_fs = ray_storage(config.output)
    _log.info("train: %d images (%d validation) from %d store(s), %d worker(s) (%s, %.2g CPU each), "
              "%d steps/epoch, peak lr %.3g, output %s", num_train, num_val, len(stores), config.workers,
              "GPU" if gpu else "CPU", cpus, steps_per_epoch, config.peak_lr(), config.output)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "spec": spec.to_dict(), "steps_per_epoch": steps_per_epoch,
                           "threads": threads, "val": val},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": train.randomize_block_order()},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training in {config.output} ended without a checkpoint")
    path = f"{config.output.rstrip('/')}/{DENOISER_FILE}"
    with result.checkpoint.as_directory() as d:
        spec = export_checkpoint(d, path, training)
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    summary = TrainSummary(output=config.output, denoiser=path, epochs=int(state["epoch"]) + 1, num_train=num_train,
                           num_val=num_val, history=spec.training["history"],
                           resumed_from=json.loads(state["resumed_from"]), seconds=time.monotonic() - began)
    _log.info("%s", summary.format())
    return summary
