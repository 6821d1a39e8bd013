"""Stage 2 training on Ray Train: (raw, clean) pairs from feature stores in, a denoiser file out.

::

    feature stores --(driver: check geometry, split ids)--> TorchTrainer: N workers, each reading its slice of
        every step of the run's seeded data order from the stores (:mod:`pipeline.runtime.train_stream`,
        :mod:`pipeline.stage2.pairs`), DDP (gloo on CPU), AdamW + warm-up/cosine, loss MSE + (1 - cos)
        --> a held-out evaluation and a checkpoint every ``eval_every`` steps under <output>/run/
            (Ray Train storage: local path or s3://), early stop when the held-out loss stops improving
        --> <output>/denoiser.safetensors (best held-out weights + spec, loadable without Ray)

How much training (measured in ``benchmarks/learning_curves.py``, see its table in the README): ``batch_size`` is
the **global** batch and the learning rate follows it alone (:func:`pipeline.runtime.ray_train.scaled_lr`), so
``--workers`` changes the speed, not the run. The step budget grows with the training set
(:func:`step_budget`) and a run ends early when ``patience`` evaluations in a row did not improve the held-out
loss by ``min_delta``; the export's spec records the rule, the budget, where it stopped and why.

Split: an image is in the validation set when a hash of its file name falls below ``val_fraction``, so the split
is the same on every run, for every store holding that image and wherever the images were read from, and never
depends on worker count or order.

Resume: ``RunConfig(name="run", storage_path=<output>)`` is stable, so a worker failure (``FailureConfig``)
or a re-run of the same command restarts from the latest checkpoint: weights, optimiser, schedule, step, the
plateau state, the best weights and the metrics history all live in it. A re-run with a larger budget goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .denoiser import Denoiser, DenoiserConfig, DenoiserMismatchError, DenoiserSpec, save_denoiser
from ..runtime.ray_session import init_ray
from ..runtime.reachability import check_reachable
from ..store import FeatureStore, StoreError, StoreLayout
from ..store.feature_store import task_options
from .train_worker import train_loop_per_worker
from ..runtime.ray_train import (RUN_NAME, RunConfig, denoising_loss, fit, lr_lambda, per_worker_batch, previous_record,
                                 read_state, read_threads, refuse_changes, trainer_resources, uri_fraction,
                                 write_record)

__all__ = ["TrainConfig", "TrainSummary", "denoising_loss", "lr_lambda", "step_budget", "split_ids", "open_stores",
           "train_loop_per_worker", "run_training", "export_checkpoint", "DENOISER_FILE", "RUN_NAME"]

_log = logging.getLogger(__name__)

DENOISER_FILE = "denoiser.safetensors"
CONFIG_FILE = "train_config.json"

#: The step-budget rule (:func:`step_budget`), from the learning curves of ``benchmarks/learning_curves.py``: at a
#: global batch of 16 the held-out loss was within 1% of its best by 420-600 steps on 39 chain images and by
#: 210-390 steps on 53 and 412 synthetic pairs, and a 1500-step budget did not beat a 600-step one on either.
MIN_STEPS = 600
PASSES = 20
MAX_STEPS = 50_000


def step_budget(num_train: int, global_batch: int) -> int:
    """Default optimiser steps for ``num_train`` training images: ``PASSES`` passes over them, at least
    ``MIN_STEPS`` (where the learning curves of small sets reached their plateau) and at most ``MAX_STEPS`` (the
    reference's 50k iterations)."""
    return int(min(MAX_STEPS, max(MIN_STEPS, round(PASSES * num_train / global_batch))))


def default_eval_every(total_steps: int) -> int:
    """About 25 held-out evaluations per run, between every 10 and every 1000 steps."""
    return int(min(1000, max(10, round(total_steps / 25)), total_steps))


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """A denoiser training run; ``dvt train`` flags map one to one onto these fields (with those of
    :class:`pipeline.runtime.ray_train.RunConfig`, the settings every training run has).

    Attributes:
        stores: feature store URLs made by ``dvt denoise`` (all with the same backbone settings).
        output: run folder (local path or ``s3://``): checkpoints under ``run/``, the denoiser file on top.
        batch_size: feature maps per optimiser step over all workers (each takes ``batch_size / workers``).
        base_lr: with ``lr`` unset the peak rate is ``base_lr * sqrt(batch_size / 256)``: 3e-3 at the default batch
            of 16 and 4.2e-3 at 32, the rates that gave the lowest held-out loss in the learning curves (1e-2 at 16
            did as well, 1e-3 and 3e-4 ended 20% and 65% higher). The schedule ends at the step budget.
        max_steps: the step budget; ``None`` means ``epochs`` passes if given, else :func:`step_budget`.
        epochs: the step budget in passes over the training images (when ``max_steps`` is not given).
        eval_every: steps between held-out evaluations and checkpoints; ``None``: :func:`default_eval_every`.
        patience, min_delta: stop after ``patience`` evaluations in a row that did not lower the held-out loss
            by more than ``min_delta`` (relative); 0 trains to the budget.
        val_fraction: share of images (by a hash of the file name) held out for validation.
        num_blocks: Transformer blocks of the denoiser.
        pos_grid: grid of the positional embedding; ``None`` means the stores' grid.
        expect_backbone: refuse stores made with another backbone (``None``: whatever they hold).
    """

    stores: Sequence[str]
    output: str
    max_steps: int | None = None
    epochs: float | None = None
    eval_every: int | None = None
    patience: int = 5
    min_delta: float = 0.01
    val_fraction: float = 0.05
    num_blocks: int = 1
    pos_grid: tuple[int, int] | None = None
    expect_backbone: str | None = None

    def total_steps(self, num_train: int) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        if self.epochs is not None:
            return max(1, round(self.epochs * num_train / self.batch_size))
        return step_budget(num_train, self.batch_size)


@dataclass
class TrainSummary:
    """What a training run produced.

    Attributes:
        steps: optimiser steps taken (over every resume); epochs: the same in passes over the training images.
        stopping: the stopping rule and outcome recorded in the denoiser file (budget, best step, reason).
        history: one entry per evaluation; resumed_from: the steps this run was resumed at.
    """

    output: str
    denoiser: str
    steps: int
    epochs: float
    num_train: int
    num_val: int
    history: list[dict[str, float]]
    resumed_from: list[int]
    seconds: float
    stopping: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    def format(self) -> str:
        s = self.stopping
        return (f"train finished: {self.steps} steps ({self.epochs:.1f} epochs) on {self.num_train} images "
                f"({self.num_val} held out) in {self.seconds:.1f} s, stopped by {s.get('reason', '?')}; exported the "
                f"weights of step {s.get('exported_step', '?')}: val mse {s.get('val_mse', float('nan')):.4g}, val cos "
                f"{s.get('val_cos', float('nan')):.4f}; denoiser {self.denoiser}")


# ------------------------------------------------------------------------------------------------ pieces

def split_ids(store: FeatureStore, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, val_ids)`` of the store's ok images; validation = file-name hash below ``val_fraction``.

    With ``val_fraction > 0`` and at least two images, at least one image is held out.
    """
    m = store.manifest(columns=("image_id", "status", "uri"))
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
    before = previous_record(config.output, CONFIG_FILE, config.overwrite)
    if before is not None:
        refuse_changes(config.output, "a training run", before.get("spec", {}), spec.to_dict(),
                       ("backbone", "block", "channels", "patch_size", "stride", "denoiser"), DenoiserMismatchError)


# ------------------------------------------------------------------------------------------------ driver

def _stopping(state: dict[str, Any], rule: dict[str, Any]) -> dict[str, Any]:
    """What the export records about when and why the run ended, and which weights it holds."""
    history, plateau = json.loads(state["history"]), json.loads(state["plateau"])
    step, total = int(state["step"]), int(state["total_steps"])
    best = "best_model" in state
    exported = plateau["best_step"] if best else step
    at = next((h for h in history if h.get("step") == exported), history[-1] if history else {})
    stopped_early = step < total
    return {**rule, "budget_steps": total, "steps": step, "stopped_early": stopped_early,
            "reason": "plateau" if stopped_early else "budget", "best_step": plateau["best_step"],
            "best_val_loss": plateau["best"] if math.isfinite(plateau["best"]) else None,
            "exported": "best held-out weights" if best else "last weights (nothing held out)",
            "exported_step": exported, **{k: at[k] for k in ("val_mse", "val_cos", "val_loss") if k in at}}


def export_checkpoint(checkpoint_dir: str, path: str, training: dict[str, Any] | None = None) -> DenoiserSpec:
    """Write the denoiser of a training checkpoint folder to a denoiser file (its best held-out weights when it has
    them); returns its spec, whose ``training`` holds the history and the ``stopping`` record."""
    state = read_state(checkpoint_dir)
    spec = DenoiserSpec.from_dict(json.loads(state["spec"]))
    training = dict(training or {})
    rule = training.pop("stopping_rule", {})
    spec.training.update(training, history=json.loads(state["history"]), steps=int(state["step"]),
                         stopping=_stopping(state, rule))
    model = Denoiser(spec.denoiser)
    model.load_state_dict(state.get("best_model") or state["model"])
    save_denoiser(path, model, spec)
    return spec


def run_training(config: TrainConfig) -> TrainSummary:
    """Train a denoiser on ``config.stores`` with Ray Train and export it to ``<output>/denoiser.safetensors``."""
    import ray

    began = time.monotonic()
    layout, stores = open_stores(config)
    splits = [split_ids(s, config.val_fraction) for s in stores]
    num_train, num_val = sum(len(t) for t, _ in splits), sum(len(v) for _, v in splits)
    if num_train < config.batch_size:
        smaller = num_train // config.workers * config.workers
        if smaller < 1:
            raise ValueError(f"{num_train} training images cannot give each of {config.workers} workers one: lower "
                             f"--workers or add images")
        _log.warning("%d training images cannot fill a global batch of %d: using batches of %d", num_train,
                     config.batch_size, smaller)
        config = dataclasses.replace(config, batch_size=smaller)
    batch = per_worker_batch(config.batch_size, config.workers)
    total = config.total_steps(num_train)
    every = config.eval_every or default_eval_every(total)
    steps_per_epoch = num_train / config.batch_size
    dcfg = DenoiserConfig(channels=layout.channels, num_blocks=config.num_blocks,
                          pos_grid=tuple(config.pos_grid or layout.grid))
    rule = {"rule": "step budget, or earlier when the held-out loss stops improving",
            "budget_rule": ("max_steps" if config.max_steps is not None else "epochs" if config.epochs is not None
                            else f"clip({PASSES} x images / batch, {MIN_STEPS}, {MAX_STEPS})"),
            "eval_every": every, "patience": config.patience, "min_delta": config.min_delta}
    training = {"stores": [s.url for s in stores], "num_train": num_train, "num_val": num_val,
                "val_fraction": config.val_fraction, "split": "sha1(file name) < val_fraction",
                "batch_size": config.batch_size, "workers": config.workers, "lr": config.peak_lr(),
                "lr_rule": "lr" if config.lr is not None else f"{config.base_lr:g} x sqrt(batch / 256)",
                "weight_decay": config.weight_decay, "warmup_fraction": config.warmup_fraction,
                "stopping_rule": rule}
    spec = DenoiserSpec.from_layout(layout, dcfg, **{k: v for k, v in training.items() if k != "stopping_rule"})
    _check_previous(config, spec)
    init_ray(config.dashboard)
    check_reachable(outputs=[("--output", config.output)],
                    inputs=[("--stores", [f"{s.url.rstrip('/')}/zarr.json" for s in stores])])
    write_record(config.output, CONFIG_FILE, {"config": config.to_json(), "spec": spec.to_dict()})
    train = [(s.url, tr) for s, (tr, _) in zip(stores, splits) if len(tr)]
    val = [(s.url, v.tolist()) for s, (_, v) in zip(stores, splits) if len(v)]
    gpu, cpus, threads = trainer_resources(config)
    _log.info("train: %d images (%d held out) from %d store(s), global batch %d on %d worker(s) (%s, %.2g CPU each), "
              "budget %d steps (%.1f epochs), held-out check every %d steps, peak lr %.3g, output %s", num_train, num_val,
              len(stores), config.batch_size, config.workers, "GPU" if gpu else "CPU", cpus, total,
              total / steps_per_epoch, every, config.peak_lr(), config.output)
    result = fit(train_loop_per_worker,
                 {"config": config, "spec": spec.to_dict(), "total_steps": total, "eval_every": every, "batch": batch,
                  "steps_per_epoch": steps_per_epoch, "threads": threads, "val": val, "train": ray.put(train),
                  "storage_options": task_options([u for u, _ in train]), "read_threads": read_threads(config, threads)},
                 config, config.output, gpu, cpus, "training")
    path = f"{config.output.rstrip('/')}/{DENOISER_FILE}"
    with result.checkpoint.as_directory() as d:
        spec = export_checkpoint(d, path, training)
        state = read_state(d)
    step = int(state["step"])
    summary = TrainSummary(output=config.output, denoiser=path, steps=step, epochs=step / steps_per_epoch,
                           num_train=num_train, num_val=num_val, history=spec.training["history"],
                           resumed_from=json.loads(state["resumed_from"]), seconds=time.monotonic() - began,
                           stopping=spec.training["stopping"])
    _log.info("%s", summary.format())
    return summary
