"""What both Ray Train jobs (stage 2 training, stage 3 distillation) share: the settings every run has, the
run folder (its record of settings, the refusal to resume a run made for something else), checkpoint I/O, worker
resources, the trainer itself, and the pieces of the method: the loss, the schedule, the learning-rate rule, the
held-out rule, the plateau rule and a small all-reduce.

A run folder ``<output>`` holds a JSON record of the run's settings and Ray Train's checkpoints under
``<output>/run/``; each checkpoint is one folder with one ``state.pt`` (:data:`STATE_FILE`). The name is stable,
so a worker failure (``FailureConfig``) or a re-run of the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F

from . import fault_injection
from .failures import JobFailedError, one_line
from .head_watch import gcs_accepts
from ..io.storage import filesystem, is_local, local_path

__all__ = ["RunConfig", "fixed_workers", "RUN_NAME", "STATE_FILE", "denoising_loss", "lr_lambda", "scaled_lr", "per_worker_batch",
           "Plateau", "uri_fraction", "ray_storage", "read_threads",
           "steady_wait_fraction", "all_reduce", "previous_record", "refuse_changes", "write_record",
           "trainer_resources", "fit", "read_state", "restored_state", "report", "start_worker"]

_log = logging.getLogger(__name__)

#: Ray Train's run name under the output folder: stable, so a re-run resumes.
RUN_NAME = "run"
#: The one file of a checkpoint folder: everything a worker needs to go on.
STATE_FILE = "state.pt"


@dataclass(kw_only=True)
class RunConfig:
    """Settings every Ray Train run of this package has; the jobs' configs add their own (and their defaults).

    Attributes:
        batch_size: samples per optimiser step over all workers (each takes ``batch_size / workers``).
        lr: peak learning rate; ``None`` means ``base_lr * sqrt(batch_size / 256)`` (:func:`scaled_lr`), so the
            same run on more or fewer workers takes the same steps at the same rate.
        base_lr, weight_decay, warmup_fraction: AdamW and schedule (linear warm-up, cosine decay to 0).
        workers: training workers (DDP ranks).
        use_gpu: one GPU per worker; ``None`` means yes when the cluster has GPUs.
        cpus_per_worker: CPUs per worker; ``None`` means 1 with a GPU, else a share that leaves room to read.
        read_threads: reads at a time in each worker (:mod:`.train_stream`); ``None`` means 2 per torch thread of
            the worker, at least 4 and at most 16.
        max_failures: worker failures Ray Train recovers from (from the latest checkpoint).
        overwrite: delete ``output`` first instead of resuming from it.
        seed: initialisation and data-order seed.
        dashboard: start Ray's dashboard when this run starts a local Ray.
    """

    batch_size: int = 16
    lr: float | None = None
    base_lr: float = 1.2e-2
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.05
    workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: float | None = None
    read_threads: int | None = None
    max_failures: int = 3
    overwrite: bool = False
    seed: int = 0
    dashboard: bool = False

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else scaled_lr(self.base_lr, self.batch_size)

    def warmup_steps(self, total_steps: int) -> int:
        return max(1, round(self.warmup_fraction * total_steps))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def fixed_workers(workers: int | tuple[int, int]) -> int:
    """The number of training workers; a ``MIN-MAX`` range is refused in one line.

    Ray 2.60 has elastic training (``ScalingConfig(num_workers=(min, max))``), but these loops fix each worker's
    share of the global batch and of each step's rows when they start, and the step budget counts global batches:
    a worker group that resized would change the run. A range is therefore not accepted here (yet).
    """
    from .checks import JobConfigError

    if isinstance(workers, tuple):
        low, high = workers
        raise JobConfigError(f"--workers {low}-{high}: training takes a fixed number of workers (each takes its share "
                             f"of the global batch); pass one number, e.g. --workers {high}. Ranges are for dvt "
                             f"denoise and dvt apply")
    return workers


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``MSE + (1 - cos)`` over ``(..., C)`` features; cosine per token, both averaged."""
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    return mse + (1 - cos), {"mse": mse.detach(), "cos": cos.detach()}


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak rate: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """``base_lr * sqrt(global batch / 256)``: the square-root rule of the reference scripts, on the global batch
    only, so the same run on more or fewer workers takes the same steps at the same rate."""
    return base_lr * math.sqrt(global_batch / 256)


def per_worker_batch(global_batch: int, workers: int, flag: str = "--batch-size") -> int:
    """The batch each of ``workers`` ranks takes for a ``global_batch``; it must divide evenly."""
    if workers < 1 or global_batch < workers or global_batch % workers:
        raise ValueError(f"{flag} {global_batch} is the global batch: it must be a multiple of --workers ({workers}); "
                         f"pass e.g. {flag} {max(1, global_batch // max(1, workers)) * max(1, workers)}")
    return global_batch // workers


@dataclass
class Plateau:
    """Early stopping on a held-out loss: stop after ``patience`` evaluations in a row that did not beat the best
    by more than ``min_delta`` (relative). ``patience = 0`` never stops. Plain fields, so it rides in checkpoints.
    """

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = -1
    bad: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Record the loss at ``step``; returns whether it is the new best (the weights worth keeping)."""
        if not math.isfinite(loss):
            self.bad += 1
            return False
        improved = loss < self.best * (1 - self.min_delta) if math.isfinite(self.best) else True
        if loss < self.best:
            self.best, self.best_step = loss, step
        self.bad = 0 if improved else self.bad + 1
        return self.best_step == step

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uri_fraction(uri: str) -> float:
    """An image's fixed position in [0, 1): held-out sets are the images below a fraction.

    Only the file name is hashed, so an image keeps its side of the split wherever the dataset lives: copied from
    a disk to a bucket, listed from another working directory, or read back from a store's manifest. Images
    that share a file name in different folders fall on the same side.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2 ** 64


def ray_storage(output: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train: local paths as they are, else our fsspec filesystem
    (with its retry and endpoint settings) wrapped for pyarrow, and the path without its scheme."""
    if is_local(output):
        return local_path(output), None
    import pyarrow.fs as pafs

    fs, path = filesystem(output)
    return path.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def steady_wait_fraction(wait: float, first_wait: float, elapsed: float) -> float:
    """The share of step time spent waiting for data after the first batch: the first batch of a run (and of a
    restarted worker group) waits for the data pipeline to start (seconds of process starts), once, which says
    nothing about whether reading keeps up with training."""
    return max(0.0, wait - first_wait) / max(elapsed - first_wait, 1e-9)


@overload
def all_reduce(values: Mapping[str, float], op: str = "sum") -> dict[str, float]: ...
@overload
def all_reduce(values: list[float], op: str = "sum") -> list[float]: ...


def all_reduce(values, op="sum"):
    """Sum (or ``op="max"``) numbers over the ranks; a mapping comes back with its names, a list in its order."""
    import torch.distributed as dist

    names = list(values) if isinstance(values, Mapping) else None
    t = torch.tensor([values[k] for k in names] if names is not None else list(values), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist())) if names is not None else t.tolist()


# ------------------------------------------------------------------------------------------------ run folder

def previous_record(output: str, record_file: str, overwrite: bool) -> dict[str, Any] | None:
    """The settings record a previous run left in ``output`` (``None``: a new run). With ``overwrite`` the previous
    run is deleted first, so there is none."""
    fs, root = filesystem(output)
    if overwrite:
        if fs.exists(root):
            _log.warning("deleting the previous run at %s (--overwrite)", output)
            fs.rm(root, recursive=True)
        return None
    path = f"{root.rstrip('/')}/{record_file}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def refuse_changes(output: str, what: str, old: Mapping[str, Any], new: Mapping[str, Any], keys: tuple[str, ...],
                   error: type[Exception] = ValueError) -> None:
    """Raise ``error`` when a run folder's settings ``old`` differ from this run's ``new`` in any of ``keys``."""
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise error(f"{output} holds {what} with other settings ("
                    + "; ".join(f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
                    + "): pass --overwrite to start again there, or use another --output")
    _log.info("resuming %s in %s from its latest checkpoint", what, output)


def write_record(output: str, record_file: str, record: Mapping[str, Any]) -> None:
    """Create the run folder and write the run's settings record into it."""
    fs, root = filesystem(output)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root.rstrip('/')}/{record_file}", json.dumps(record, indent=2, sort_keys=True).encode())


# ------------------------------------------------------------------------------------------------ checkpoints

def read_state(checkpoint: Any) -> dict[str, Any]:
    """The state of a checkpoint: a Ray Train ``Checkpoint`` or a local checkpoint folder."""
    if hasattr(checkpoint, "as_directory"):  # a Checkpoint is os.PathLike but refuses to be used as a path
        with checkpoint.as_directory() as d:
            return read_state(d)
    return torch.load(os.path.join(checkpoint, STATE_FILE), map_location="cpu", weights_only=True)


def restored_state() -> dict[str, Any] | None:
    """In a worker: the state of the checkpoint Ray Train restored this run from, ``None`` on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else read_state(checkpoint)


def start_worker(loop_config: Mapping[str, Any], seed: int) -> tuple[int, int, torch.device]:
    """In a worker: ``(rank, world size, device)``, with torch's threads set on a CPU and its seed set (the same
    initial weights on every rank)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(int(loop_config["threads"]))
    torch.manual_seed(seed)
    return ctx.get_world_rank(), ctx.get_world_size(), device


def report(metrics: dict[str, Any], state: Callable[[], dict[str, Any]], *, rank: int,
           faults: Mapping[str, Callable[..., None]] | None = None) -> None:
    """Report ``metrics`` from every rank, with a checkpoint holding ``state()`` from rank 0 (the ranks hold the
    same weights under DDP), then pass the ``after_checkpoint`` fault point."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save(state(), os.path.join(d, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
    fault_injection.reach("after_checkpoint", faults, step=int(metrics.get("step", -1)), rank=rank)


# ------------------------------------------------------------------------------------------------ driver

def trainer_resources(config: RunConfig) -> tuple[bool, float, int]:
    """``(use_gpu, cpus, torch threads)`` per training worker, from the config and the cluster."""
    import ray

    cluster = ray.cluster_resources()
    gpu = config.use_gpu if config.use_gpu is not None else cluster.get("GPU", 0) > 0
    cpus = config.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if gpu else max(0.25, min(8.0, 0.75 * cluster.get("CPU", 1) / max(1, config.workers)))
    return gpu, cpus, max(1, round(cpus))


def read_threads(config: RunConfig, torch_threads: int) -> int:
    """Reads at a time in each training worker: ``config.read_threads``, else 2 per torch thread in [4, 16]. Reads
    are mostly storage I/O (and image decoding, which releases the GIL), so more threads than cores pay."""
    if config.read_threads is not None:
        if config.read_threads < 1:
            raise ValueError(f"--read-threads must be >= 1 (got {config.read_threads})")
        return config.read_threads
    return max(4, min(16, 2 * torch_threads))


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], config: RunConfig, output: str,
        gpu: bool, cpus: float, what: str) -> Any:
    """Run ``loop`` on ``config.workers`` Ray Train workers with checkpoints under ``<output>/run/``; returns the
    result, whose checkpoint is the latest. The fault points planned in this process go to the workers. The
    workers read their own data (:mod:`.train_stream`): no dataset is handed to Ray Train."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = ray_storage(output)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "faults": fault_injection.planned()},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except ray.exceptions.RayActorError as e:  # the controller, an actor on the driver's node, is gone
        raise JobFailedError(controller_lost(what, output, e)) from e
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} in {output} ended without a checkpoint")
    return result


def controller_lost(what: str, output: str, error: BaseException) -> str:
    """One line for a run whose Ray Train controller died: with the head node (its GCS no longer answers), or alone."""
    import ray

    kept = f"checkpoints registered in {output}/{RUN_NAME}/ are kept; submit the same command again to resume"
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if address and not gcs_accepts(address):
        return (f"{what} stopped: lost the Ray cluster's head node (GCS at {address}), where Ray Train's controller "
                f"ran beside the driver; {kept} once the cluster is up")
    return f"{what} stopped: Ray Train's controller was lost ({one_line(error)}); {kept}"
