"""Stage 3 on Ray Train: distil a stage-2 denoiser into the ViT itself, so no extra block is needed at inference.

::

    image listing --(driver: hold out images, write the run config)--> TorchTrainer: N workers (DDP, gloo on
        CPU), each fetching, decoding and resizing its slice of every step to (3, S, S) uint8 in a thread pool
        (:mod:`pipeline.runtime.train_stream`), random horizontal flips,
        teacher = frozen backbone + denoiser, student = trainable copy of the backbone,
        loss MSE + (1 - cos) on patch tokens, AdamW with warm-up + cosine decay, optional bf16 autocast
        and activation checkpointing on GPU --> checkpoints under <output>/run/ (local path or s3://)
        --> <output>/student.safetensors (a timm checkpoint) + student.json / student.md notes

Held-out images and undecodable ones: see :mod:`pipeline.stage3.pixels`. The held-out distance to the teacher
is measured before the first step (the original backbone), at every checkpoint and at the end.

Resume: ``RunConfig(name="run", storage_path=<output>)`` is stable, so a worker failure (``FailureConfig``) or a
re-run of the same command continues from the latest checkpoint: weights, optimiser, schedule, step counter
and history. The run's data order depends on its seed only (pass ``p`` is the permutation drawn from ``(seed,
p)``), and restarted workers read it from the checkpoint's step on, so a resumed run trains on the batches an
uninterrupted one would have (the flips are seeded by step and rank). A re-run with more ``epochs`` continues the
same run with a longer schedule.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from ..io.decode import DecodeConfig
from .pixels import PixelRows, flip_batch, held_out_pixels, pixel_batches, rows_of_rank, split_listing
from .student import (build_student_and_teacher, distance_from_sums, distance_sums, export_student,
                            select_trainable)
from ..io.listing import list_uris
from ..io.shards import ShardOptions, shard_index
from ..runtime.ray_session import init_ray
from ..runtime.reachability import check_reachable, image_job_inputs
from ..runtime.ray_train import (RUN_NAME, STATE_FILE, RunConfig, all_reduce, denoising_loss, fit, lr_lambda,
                                 per_worker_batch, previous_record, read_state, read_threads, refuse_changes, report,
                                 restored_state, start_worker, steady_wait_fraction, trainer_resources, write_record)
from ..runtime.train_stream import RankBatches

__all__ = ["DistillConfig", "DistillSummary", "train_loop_per_worker", "run_distillation", "STUDENT_FILE", "STATE_FILE"]

_log = logging.getLogger(__name__)

STUDENT_FILE = "student.safetensors"
CONFIG_FILE = "distill_config.json"
#: Run settings that must not change when a run folder is resumed.
_FIXED = ("denoiser", "weights", "input_size", "train_blocks")


@dataclass(kw_only=True)
class DistillConfig(RunConfig):
    """A distillation run; ``dvt distill`` flags map one to one onto these fields (with those of
    :class:`pipeline.runtime.ray_train.RunConfig`, the settings every training run has).

    Attributes:
        images: folder, glob, ``s3://`` prefix or .txt/.csv/.parquet list of image URIs, or shards
            (:mod:`pipeline.io.shards`).
        image_column: Parquet shards' column of encoded images.
        denoiser: stage-2 denoiser file (``dvt train`` output); it names the backbone, block and stride.
        output: run folder (local path or ``s3://``): checkpoints under ``run/``, the student on top.
        weights: the backbone weights the denoiser was trained on (teacher backbone and the student's start):
            ``"hub"``, ``"none"`` or a local file.
        input_size: square training size; ``None`` means the size the denoiser was trained at.
        epochs: passes over the training images.
        max_steps: stop (and end the schedule) after this many steps instead.
        batch_size: images per optimiser step over all workers, each taking ``batch_size / workers`` (the
            paper: 512); with ``lr`` unset the rate follows it alone, so ``workers`` does not change the run.
        base_lr: with ``lr`` unset the peak rate is ``base_lr * sqrt(global batch / 256)`` (2.8e-4 at 512, the
            paper).
        flip: random horizontal flips (the same flip for teacher and student).
        train_blocks: ``all`` (default: every block up to the distilled one, embeddings and final norm),
            ``last:N`` or ``i,j,k`` (those blocks and the final norm).
        bf16: bfloat16 autocast on GPU (ignored on CPU).
        grad_checkpointing: activation checkpointing of the student's blocks (timm's ``set_grad_checkpointing``).
        val_fraction, max_val_images: the held-out rule (module docstring).
        checkpoint_every: steps between checkpoints (and held-out measurements); ``None``: once per epoch, and
            at least every 1000 steps.
        limit: only the first ``limit`` images of the listing.
        decode: limits on accepted images.
    """

    images: str
    denoiser: str
    output: str
    image_column: str = "jpg"
    weights: str = "hub"
    input_size: int | None = None
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    base_lr: float = 2e-4
    warmup_fraction: float = 0.15
    flip: bool = True
    train_blocks: str = "all"
    bf16: bool = False
    grad_checkpointing: bool = False
    val_fraction: float = 0.05
    max_val_images: int = 256
    checkpoint_every: int | None = None
    limit: int | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class DistillSummary:
    """What a distillation run produced.

    Attributes:
        student: the exported student file; checkpoint: the latest Ray Train checkpoint folder.
        steps, epochs: optimiser steps taken in all (over every resume), and passes over the training images.
        skipped_images: undecodable training rows met (every pass counts them again).
        before, after: held-out distance to the teacher (``mse``, ``cos``, ``distance``, ``images``) of the
            original backbone and of the student.
        history: the metrics of every checkpoint; resumed_from: the steps this run was resumed at.
    """

    output: str
    student: str
    checkpoint: str
    steps: int
    epochs: float
    num_train: int
    num_val: int
    skipped_images: int
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]]
    resumed_from: list[int]
    seconds: float

    def format(self) -> str:
        b, a = self.before.get("distance", float("nan")), self.after.get("distance", float("nan"))
        return (f"distill finished: {self.steps} steps ({self.epochs:.2f} epochs) on {self.num_train} images "
                f"({self.skipped_images} undecodable skips) in {self.seconds:.1f} s; held-out distance to the teacher "
                f"{b:.4g} -> {a:.4g} on {self.after.get('images', 0)} images; student {self.student}")


# ------------------------------------------------------------------------------------------------ worker

def _loss(pred: torch.Tensor, target: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``MSE + (1 - cos)`` over the decodable images (``ok``: a CPU mask, so no device sync); if none is, a
    zero that still reaches every parameter, so DDP ranks stay in step."""
    pred, target = pred.float(), target.float()
    if bool(ok.all()):
        return denoising_loss(pred, target)[0]
    if bool(ok.any()):
        keep = ok.to(pred.device)
        return denoising_loss(pred[keep], target[keep])[0]
    return pred.sum() * 0.0


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (one per rank)."""
    import ray.train
    import ray.train.torch

    config: DistillConfig = loop_config["config"]
    spe, total, size = int(loop_config["steps_per_epoch"]), int(loop_config["total_steps"]), int(loop_config["size"])
    per_worker = int(loop_config["batch"])
    every = int(loop_config["checkpoint_every"])
    rank, world, device = start_worker(loop_config, config.seed)  # the same random weights when weights="none"
    student, teacher, _ = build_student_and_teacher(config.denoiser, config.weights, size, device)
    trainable = select_trainable(student, config.train_blocks)
    if config.grad_checkpointing and not student.custom:
        student.model.set_grad_checkpointing(True)
    autocast = config.bf16 and device.type == "cuda"
    state = restored_state()
    if state is not None:
        if json.loads(state["trainable"]) != trainable:
            raise ValueError("the checkpoint trained other parameters than --train-blocks selects now")
        student.model.load_state_dict(state["model"])
    ddp = ray.train.torch.prepare_model(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.peak_lr(),
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, config.warmup_steps(total)))
    held_out = held_out_pixels(rows_of_rank(loop_config["val_uris"], rank, world), size, config.decode,
                               config.image_column)

    def measure() -> dict[str, float]:
        return distance_from_sums(all_reduce(distance_sums(
            student, teacher, pixel_batches(held_out, per_worker, device), autocast)))

    if state is None:
        step, history, resumed, skipped = 0, [], [], 0
        before = measure()
        _log.info("rank %d: held-out distance before distillation %s", rank, json.dumps(before))
    else:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, skipped = int(state["step"]), int(state["skipped"])
        history, before = json.loads(state["history"]), json.loads(state["before"])
        resumed = [*json.loads(state["resumed_from"]), step]
        _log.info("rank %d resumes at step %d of %d", rank, step, total)
    images = PixelRows(ray.get(loop_config["images"]), loop_config["train_ids"], size, config.decode, seed=config.seed,
                       image_column=config.image_column, shards=bool(loop_config["shards"]))
    # The run's one data order, from this step on: a resumed rank trains on what an uninterrupted one would have.
    batches = RankBatches(images.order, len(images), images.read, batch=per_worker, rank=rank, world=world,
                          start_step=step, threads=int(loop_config["read_threads"]))
    loss_sum, wait, seen, bad, first_wait = torch.zeros((), device=device), 0.0, 0, 0, None
    began = time.perf_counter()
    while step < total:
        t = time.perf_counter()
        batch = next(batches)
        pixels = torch.from_numpy(batch["pixels"]).to(device, non_blocking=True).float().div_(255)
        ok = torch.from_numpy(batch["ok"])
        wait += time.perf_counter() - t
        if first_wait is None:
            first_wait = wait  # the first reads: once per run (and after a restart)
        if config.flip:
            pixels = flip_batch(pixels, config.seed * 1_000_003 + step * 1_009 + rank)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            target = teacher.features(pixels)
            loss = _loss(ddp(pixels), target, ok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        n_ok = int(ok.sum())
        loss_sum, seen, bad = loss_sum + loss.detach() * n_ok, seen + n_ok, bad + len(ok) - n_ok
        if step % every and step < total:
            continue
        interval_loss = loss_sum.item()  # waits for the device, so the time below is true
        elapsed = time.perf_counter() - began
        g = all_reduce({"loss": interval_loss, "seen": seen, "bad": bad, "wait": wait, "elapsed": elapsed,
                        "first_wait": first_wait or 0.0})
        slowest = all_reduce([elapsed], op="max")[0]
        skipped += int(g["bad"])
        images_per_s = (g["seen"] + g["bad"]) / max(slowest, 1e-9)
        metrics = {"step": step, "epoch": step / spe, "train_loss": g["loss"] / max(1.0, g["seen"]),
                   "lr": sched.get_last_lr()[0], "images_per_s": images_per_s,
                   "images_per_s_per_worker": images_per_s / world,
                   "data_wait_fraction": g["wait"] / max(g["elapsed"], 1e-9), "data_wait_s": g["wait"] / world,
                   "steady_wait_fraction": steady_wait_fraction(g["wait"], g["first_wait"], g["elapsed"]),
                   "first_batch_s": g["first_wait"] / world, "skipped_images": skipped}
        metrics.update({f"val_{k}": v for k, v in measure().items()})
        history.append(metrics)
        _log.info("rank %d step %d/%d: %s", rank, step, total, json.dumps(metrics))
        report(metrics, lambda: {
            "model": student.model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, "skipped": skipped, "history": json.dumps(history), "before": json.dumps(before),
            "resumed_from": json.dumps(resumed), "trainable": json.dumps(trainable)},
            rank=rank, faults=loop_config.get("faults"))
        loss_sum, wait, seen, bad, first_wait = torch.zeros((), device=device), 0.0, 0, 0, 0.0
        began = time.perf_counter()
    batches.close()


# ------------------------------------------------------------------------------------------------ driver

def _check_previous(config: DistillConfig) -> None:
    """Refuse to resume a run folder made with another teacher, backbone weights, size or trained blocks."""
    before = previous_record(config.output, CONFIG_FILE, config.overwrite)
    if before is not None:
        refuse_changes(config.output, "a distillation run", before["config"], config.to_json(), _FIXED)


def run_distillation(config: DistillConfig) -> DistillSummary:
    """Distil ``config.denoiser`` into its backbone on ``config.images`` with Ray Train; export the student."""
    from ..vit.backbone import create_backbone
    from ..stage2.denoiser import read_spec

    import ray

    began = time.monotonic()
    init_ray(config.dashboard)
    spec = read_spec(config.denoiser)
    size = int(config.input_size or spec.input_size[0])
    index = shard_index(config.images, ShardOptions(image_column=config.image_column), config.limit)
    uris = list_uris(config.images, config.limit) if index is None else index["uri"].to_pylist()
    train_ids, val_ids = split_listing(uris, config.val_fraction, config.max_val_images)
    batch = per_worker_batch(config.batch_size, config.workers)
    spe = (len(train_ids) // config.workers) // batch
    if spe < 1:
        raise ValueError(f"{len(train_ids)} training images cannot fill one global batch of {config.batch_size}: "
                         f"lower --batch-size or add images")
    total = config.max_steps or config.epochs * spe
    every = min(config.checkpoint_every or min(spe, 1000), total)
    _check_previous(config)
    check_reachable(outputs=[("--output", config.output)], inputs=image_job_inputs(config, uris))
    write_record(config.output, CONFIG_FILE, {"config": config.to_json(), "teacher": spec.to_dict(), "size": size})
    gpu, cpus, threads = trainer_resources(config)
    _log.info("distill: %d training images (%d held out), %d worker(s) (%s, %.2g CPU each), %d steps/epoch, %d steps, "
              "peak lr %.3g, size %d, output %s", len(train_ids), len(val_ids), config.workers, "GPU" if gpu else "CPU",
              cpus, spe, total, config.peak_lr(), size, config.output)
    images = index if index is not None else pa.table({"uri": pa.array(uris, pa.string())})
    val = [uris[i] for i in val_ids] if index is None else index.take(pa.array(val_ids, pa.int64()))
    result = fit(train_loop_per_worker,
                 {"config": config, "steps_per_epoch": spe, "total_steps": total, "size": size, "batch": batch,
                  "checkpoint_every": every, "threads": threads, "val_uris": val, "images": ray.put(images),
                  "train_ids": train_ids, "shards": index is not None, "read_threads": read_threads(config, threads)},
                 config, config.output, gpu, cpus, "distillation")
    checkpoint = f"{config.output.rstrip('/')}/{RUN_NAME}/{result.checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}"
    state = read_state(result.checkpoint)
    student = create_backbone(spec.backbone_config("none", size))
    student.model.load_state_dict(state["model"])
    history, before = json.loads(state["history"]), json.loads(state["before"])
    after = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    step = int(state["step"])
    note = {"teacher": config.denoiser, "images": config.images, "num_train": len(train_ids),
            "num_held_out": len(val_ids), "steps": step, "epochs": step / spe,
            "batch_size": config.batch_size, "workers": config.workers, "lr": config.peak_lr(),
            "train_blocks": config.train_blocks, "flip": config.flip, "skipped_images": int(state["skipped"]),
            "before": before, "after": after,
            "held_out_rule": f"the {config.max_val_images} smallest sha1(file name) below {config.val_fraction}"}
    path = f"{config.output.rstrip('/')}/{STUDENT_FILE}"
    export_student(student, path, note, original_weights=config.weights)
    summary = DistillSummary(output=config.output, student=path, checkpoint=checkpoint, steps=step, epochs=step / spe,
                             num_train=len(train_ids), num_val=len(val_ids), skipped_images=int(state["skipped"]),
                             before=before, after=after, history=history,
                             resumed_from=json.loads(state["resumed_from"]), seconds=time.monotonic() - began)
    _log.info("%s", summary.format())
    return summary
