"""The stage-2 Ray Train worker: steps over the run's data order, held-out evaluations, checkpoints, early stopping.

Each rank reads its slice of every global batch of the run's one data order (:mod:`pipeline.runtime.train_stream`,
:mod:`pipeline.stage2.pairs`) from the step it starts at, so a resumed run trains on the batches an uninterrupted
one would have. Every ``eval_every`` steps (and at the
last step) the ranks add up their training loss, data wait (``data_wait_fraction`` of the step time, and
``steady_wait_fraction`` without the first batch of a (re)started worker) and held-out sums, every rank applies the same
:class:`pipeline.runtime.ray_train.Plateau` to the same held-out loss, and rank 0 reports a checkpoint holding the
weights, optimiser, schedule, step, history, the plateau state and the best weights so far. A run stops at its
step budget or when the held-out loss has stopped improving, whichever comes first; what the export holds is the
best weights on the held-out images (the last ones when nothing is held out).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .denoiser import Denoiser, DenoiserMismatchError, DenoiserSpec
from .pairs import PairRows
from ..store import FeatureStore
from ..runtime.ray_train import (Plateau, all_reduce, denoising_loss, lr_lambda, report, restored_state, start_worker,
                                 steady_wait_fraction)
from ..runtime.train_stream import RankBatches, permutation_order

__all__ = ["train_loop_per_worker", "HeldOut"]

_log = logging.getLogger(__name__)

#: A rank keeps its held-out pairs in memory below this many bytes (else it reads them at every evaluation).
HELD_OUT_CACHE_BYTES = 256 * 2 ** 20


class HeldOut:
    """One rank's held-out pairs: read from the stores once and kept when small, else read at each evaluation."""

    def __init__(self, sources: Sequence[tuple[str, Sequence[int]]], batch_size: int):
        self.sources = [(url, list(ids)) for url, ids in sources if len(ids)]
        self.batch_size = batch_size
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._too_big = False

    def batches(self):
        if self._cache is not None:
            yield from self._cache
            return
        kept, size = [], 0
        for url, ids in self.sources:
            for raw, clean in FeatureStore.open(url).iter_pairs(self.batch_size, ids=ids, as_torch=True):
                if not self._too_big:
                    size += raw.nbytes + clean.nbytes
                    self._too_big = size > HELD_OUT_CACHE_BYTES
                    kept.append((raw, clean))
                yield raw, clean
        if not self._too_big:
            self._cache = kept

    @torch.no_grad()
    def sums(self, model: torch.nn.Module, device: torch.device) -> list[float]:
        """``[mse_sum, cos_sum, images]`` of ``model`` on these pairs (per image: mean MSE, mean token cosine)."""
        sums = [0.0, 0.0, 0.0]
        was_training = model.training
        model.eval()
        for raw, clean in self.batches():
            pred = model(raw.to(device, torch.float32))
            clean = clean.to(device, torch.float32)
            sums[0] += F.mse_loss(pred, clean, reduction="none").flatten(1).mean(1).sum().item()
            sums[1] += F.cosine_similarity(pred, clean, dim=-1).flatten(1).mean(1).sum().item()
            sums[2] += len(pred)
        model.train(was_training)
        return sums


def _restore(spec: DenoiserSpec, model: Denoiser) -> dict[str, Any] | None:
    state = restored_state()
    if state is None:
        return None
    if json.loads(state["spec"])["denoiser"] != spec.to_dict()["denoiser"]:
        raise DenoiserMismatchError("the checkpoint holds another denoiser architecture than this run's")
    model.load_state_dict(state["model"])
    return state


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (one per rank)."""
    import ray.train
    import ray.train.torch

    config = loop_config["config"]
    spec = DenoiserSpec.from_dict(loop_config["spec"])
    total, every, batch = int(loop_config["total_steps"]), int(loop_config["eval_every"]), int(loop_config["batch"])
    steps_per_epoch = float(loop_config["steps_per_epoch"])
    rank, world, device = start_worker(loop_config, config.seed)
    model = Denoiser(spec.denoiser)
    state = _restore(spec, model)
    ddp = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=config.peak_lr(), weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, config.warmup_steps(total)))
    plateau = Plateau(config.patience, config.min_delta)
    step, history, resumed, best = 0, [], [], None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), json.loads(state["history"])
        resumed = [*json.loads(state["resumed_from"]), step]
        saved = json.loads(state["plateau"])
        plateau = Plateau(**{**saved, "patience": config.patience, "min_delta": config.min_delta})
        if int(state["total_steps"]) != total:
            plateau.bad = 0  # a new budget: the run was asked to go on
        best = state.get("best_model")
        _log.info("rank %d resumes at step %d of %d", rank, step, total)
    held_out = HeldOut([(url, ids[rank::world]) for url, ids in loop_config["val"]], batch)

    def save_and_report(metrics: dict[str, float]) -> None:
        report(metrics, lambda: {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, "total_steps": total, "history": json.dumps(history), "resumed_from": json.dumps(resumed),
            "plateau": json.dumps(plateau.to_dict()), "spec": json.dumps(spec.to_dict()),
            **({"best_model": best} if best else {})}, rank=rank, faults=loop_config.get("faults"))

    if step >= total or plateau.stop:  # a finished run re-run as it was: report its state again, nothing to train
        save_and_report(history[-1] if history else {"step": step})
        return
    pairs = PairRows(ray.get(loop_config["train"]), loop_config["storage_options"])
    batches = RankBatches(permutation_order(len(pairs), config.seed), len(pairs), pairs.read, batch=batch, rank=rank,
                          world=world, start_step=step, threads=int(loop_config["read_threads"]))
    loss_sum, samples, wait, first_wait = 0.0, 0, 0.0, None
    began = time.perf_counter()
    while step < total and not plateau.stop:
        t = time.perf_counter()
        data = next(batches)
        raw, clean = (torch.from_numpy(data[k]).to(device, torch.float32, non_blocking=True) for k in ("raw", "clean"))
        wait += time.perf_counter() - t
        if first_wait is None:
            first_wait = wait  # the first reads: once per run (and after a restart)
        loss, _ = denoising_loss(ddp(raw), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_sum, samples = loss_sum + loss.item() * len(raw), samples + len(raw)
        if step % every and step < total:
            continue
        elapsed = time.perf_counter() - began
        val = held_out.sums(ddp, device)
        g = all_reduce({"loss": loss_sum, "samples": samples, "wait": wait, "elapsed": elapsed,
                        "first_wait": first_wait or 0.0, "val_mse": val[0], "val_cos": val[1], "val_images": val[2]})
        slowest = all_reduce([elapsed], op="max")[0]
        metrics = {"step": step, "epoch": step / steps_per_epoch, "train_loss": g["loss"] / max(1.0, g["samples"]),
                   "lr": sched.get_last_lr()[0], "samples_per_s": g["samples"] / max(slowest, 1e-9),
                   "data_wait_fraction": g["wait"] / max(g["elapsed"], 1e-9), "data_wait_s": g["wait"] / world,
                   "steady_wait_fraction": steady_wait_fraction(g["wait"], g["first_wait"], g["elapsed"]),
                   "seconds": slowest, "first_batch_s": g["first_wait"] / world}
        if g["val_images"] > 0:
            mse, cos = g["val_mse"] / g["val_images"], g["val_cos"] / g["val_images"]
            metrics.update(val_mse=mse, val_cos=cos, val_loss=mse + 1 - cos)
            if plateau.update(metrics["val_loss"], step) and rank == 0:
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(metrics)
        _log.info("rank %d step %d/%d: %s", rank, step, total, json.dumps(metrics))
        save_and_report(metrics)
        loss_sum, samples, wait, first_wait = 0.0, 0, 0.0, 0.0
        began = time.perf_counter()
    if plateau.stop:
        _log.info("rank %d: held-out loss stopped improving (best %.4g at step %d); stopping at step %d of %d",
                  rank, plateau.best, plateau.best_step, step, total)
    batches.close()
