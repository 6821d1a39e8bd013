"""The parts of ``benchmarks/device_check.py`` that run jobs: the stage-1 kernel in plain processes, and
``dvt denoise`` / ``dvt apply`` / ``dvt train`` as child processes on one shared local Ray (each with a timeout and
its log in ``OUT/logs``), measured from their stores' manifests, with GPU use sampled."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import torch
from device_support import STATE, GpuSampler, corpus_image, ensure_corpus, run_job, shared_ray

from pipeline.vit.backbone import create_backbone
from pipeline.runtime.batching import images_per_pass, stage1_bytes_per_image, unit_size
from pipeline.io.decode import decode_image, resize_to_tensor
from pipeline.stage1.fit import Stage1Config, fit_images


def manifest_stats(url: str) -> dict[str, Any]:
    """From a store's manifest: images done, and the steady rate: each worker's images of units 2..k over the time
    between its first and last commit, summed over workers; also the share of that time spent in the model."""
    from pipeline.store import FeatureStore

    store = FeatureStore.open(url)
    rows = store.manifest().to_pylist()
    units: dict[str, dict[str, list]] = {}
    for r in rows:
        units.setdefault(r["worker"], {}).setdefault(r["unit"], []).append(
            (r["written_at"].timestamp(), r.get("seconds") or 0.0))
    rate = busy = span = 0.0
    first, last, short = math.inf, -math.inf, 0
    every = []  # (commit time, images) of every unit
    started = -math.inf  # when the last worker to start committed its first unit
    for worker_units in units.values():
        commits = sorted((max(t for t, _ in u), len(u), sum(s for _, s in u)) for u in worker_units.values())
        every += [(t, n) for t, n, _ in commits]
        first, last, started = min(first, commits[0][0]), max(last, commits[-1][0]), max(started, commits[0][0])
        if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
            short += 1
            continue
        rate += sum(n for _, n, _ in commits[1:]) / (commits[-1][0] - commits[0][0])
        busy += sum(s for _, _, s in commits[1:])
        span += commits[-1][0] - commits[0][0]
    if short:  # a worker with one unit has no rate of its own: all workers' units after every one had started
        after = sum(n for t, n in every if t > started)
        rate = after / (last - started) if last > started and after else 0.0
        if not rate:  # the last worker to start committed last: the window after the job's first unit
            after = sum(n for t, n in every if t > first)
            rate = after / (last - first) if last > first and after else 0.0
    last_run = store.attrs.get("last_run") or {}
    return {"ok": sum(r["status"] == "ok" for r in rows), "failed": sum(r["status"] != "ok" for r in rows),
            "workers": len(units), "workers_with_one_unit": short,
            "steady_images_per_s": round(rate, 4) if rate else None,
            "steady_method": "window after every worker's first unit" if short else "per worker, units 2..k",
            "in_model_share": round(busy / span, 3) if span else None,
            "job_images_per_s": _round(last_run.get("images_per_second")),
            "job_seconds": _round(last_run.get("seconds")),
            "window": (first, last)}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _fit_settings(model: str, size: int, preset: str, steps: int | None, amp: str | None = None) -> dict[str, Any]:
    return {"model": model, "size": size, "preset": preset, "steps": steps, "amp": amp}


def _stage1_config(s: dict[str, Any]) -> Stage1Config:
    config = Stage1Config.preset(s["preset"], amp_dtype=s["amp"])
    return config.replace(steps=s["steps"]) if s["steps"] is not None else config


def kernel_units(paths: list[Path], s: dict[str, Any], unit: int, device: torch.device, *,
                 passes: int | None = None, deadline: float = math.inf) -> list[float]:
    """Seconds of the stage-1 kernel for each unit of ``unit`` images of ``paths``, as a worker does it: decoded
    and resized up front, fitted in passes of ``passes`` images, the host waiting for the device per unit."""
    backbone = create_backbone(s["model"], weights="none", img_size=s["size"]).to(device)
    config = _stage1_config(s)
    pixels = [resize_to_tensor(decode_image(p.read_bytes()).pixels, s["size"]) for p in paths]
    times = []
    for start in range(0, len(pixels), unit):
        if time.monotonic() > deadline and len(times) >= 2:
            break
        batch = torch.stack(pixels[start:start + unit]).to(device)
        step = passes or len(batch)
        t0 = time.perf_counter()
        for p in range(0, len(batch), step):
            part = batch[p:p + step]
            fit_images(backbone, part, config, image_ids=list(range(start + p, start + p + len(part))))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def release(device: torch.device) -> None:
    """Give this process's cached GPU memory back, so a job started next finds it free."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _order(workers: tuple[int, ...]) -> list[int]:
    """The smallest and largest worker counts first (the efficiency that matters), then the others."""
    return sorted(workers, key=lambda n: (n != min(workers), n != max(workers), n))


def _stats(url: str) -> dict[str, Any]:
    """:func:`manifest_stats`, also of a job that was stopped (its committed units still count)."""
    try:
        return manifest_stats(url)
    except Exception as e:  # noqa: BLE001 - no store or no manifest yet
        return {"stats_error": f"{type(e).__name__}: {e}"}


def _steady(times: list[float], unit: int) -> float | None:
    """Images/s of units 2..k (the first pays for warm-up); ``None`` with fewer than two units."""
    return unit * (len(times) - 1) / sum(times[1:]) if len(times) >= 2 else None


# ------------------------------------------------------------------------------------------------ part 4

def _kernel_process(s: dict[str, Any], paths: list[Path], rank: int, results) -> None:
    try:
        torch.set_num_threads(1)
        results.put((rank, kernel_units(paths, s, 1, torch.device("cpu")), None))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, [], f"{type(e).__name__}: {e}"))


def part_scaling_processes(run) -> None:
    cfg = run.config
    run.part()["note"] = ("stage-1 kernel alone in N spawned processes side by side (OMP_NUM_THREADS=1, GPU hidden), "
                          f"{cfg.scaling_model} at {cfg.scaling_size} px, preset {cfg.scaling_preset}, 1 image per "
                          "fit; rate = sum over processes of images 2..k over their fit time")
    s = _fit_settings(cfg.scaling_model, cfg.scaling_size, cfg.scaling_preset, cfg.steps)
    per = cfg.scaling_images_per_worker
    folder = ensure_corpus(max(cfg.scaling_workers) * per)
    paths = sorted(folder.glob("*.jpg"))
    base = None
    ctx = multiprocessing.get_context("spawn")
    order = _order(cfg.scaling_workers)
    for k, n in enumerate(order):
        if run.left() < 5:
            run.part()["cut"] = f"workers {order[k:]} left out: part deadline"
            break
        saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MKL_NUM_THREADS")}
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        results = ctx.Queue()
        procs = [ctx.Process(target=_kernel_process, args=(s, paths[r * per:(r + 1) * per], r, results))
                 for r in range(n)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for v, old in saved.items():
            os.environ.pop(v) if old is None else os.environ.__setitem__(v, old)
        got, errors = [], []
        try:
            for _ in procs:
                rank, times, error = results.get(timeout=max(1.0, run.left()))
                (errors.append(error) if error else got.append(times))
        except Exception:  # noqa: BLE001 - queue.Empty: out of time
            errors.append("part deadline reached before every process finished")
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        rates = [_steady(t, 1) for t in got]
        total = sum(r for r in rates if r) if rates and all(rates) and len(rates) == n else None
        if n == 1 and total:
            base = total
        run.row(workers=n, images_per_s=total and round(total, 4),
                efficiency=round(total / (n * base), 3) if total and base else None,
                s_per_image_one_process=round(1 / rates[0], 3) if rates and rates[0] else None,
                wall_s=round(time.monotonic() - t0, 1), error="; ".join(errors) or None)


# ------------------------------------------------------------------------------------------------ parts 5-8

def _job_common(model: str, size: int, preset: str, steps: int | None) -> list[str]:
    return ["--model", model, "--weights", "none", "--input-size", str(size), "--preset", preset,
            "--progress-every", "10", "--overwrite", *(["--steps", str(steps)] if steps is not None else [])]


def _sampled_job(run, name: str, module: str, args: list[str], store: str) -> tuple[dict, dict, Any, Any]:
    """Run one job on the device (its workers get a GPU there, else the configured CPU share) while sampling the
    GPU: ``(job timings, store statistics, sampler, the stores' busy window)``."""
    cfg = run.config
    args = [*args, *(["--gpus-per-worker", "1"] if run.device.type == "cuda"
                     else ["--cpus-per-worker", str(cfg.scaling_cpus_per_worker)])]
    sampler = GpuSampler(run.device)
    try:
        job = run_job(name, module, args, timeout=run.left() - 3)
    finally:
        sampler.stop()
    stats = _stats(str(STATE["work"] / store))
    return job, stats, sampler, stats.pop("window", None)


def part_denoise_job(run) -> None:
    cfg, device = run.config, run.device
    s = _fit_settings(cfg.job_model, cfg.input_size, cfg.preset, cfg.steps)
    shared_ray()
    cuda = device.type == "cuda"
    unit = cfg.job_unit or unit_size("denoise", cuda)
    backbone = create_backbone(cfg.job_model, weights="none", img_size=cfg.input_size)
    config = _stage1_config(s)
    passes = unit if cfg.job_unit else images_per_pass("denoise", device, stage1_bytes_per_image(
        views=config.views.num_views, grid=backbone.grid(cfg.input_size), channels=backbone.embed_dim,
        batch_tokens=config.batch_tokens))
    lo, hi = cfg.job_images
    folder = ensure_corpus(max(lo, 4 * unit))
    paths = sorted(folder.glob("*.jpg"))
    # The kernel alone first (it also sizes the corpus to the time left): up to 3 units, the first a warm-up.
    kernel_deadline = time.monotonic() + 0.25 * run.left()
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # as the job's CPU worker
    try:
        times = kernel_units(paths[:max(2, min(3, lo // unit)) * unit], s, unit, device, passes=passes,
                             deadline=kernel_deadline)
    finally:
        torch.set_num_threads(threads)
    kernel = _steady(times, unit)
    per_image = 1 / kernel if kernel else sum(times) / (unit * len(times))
    startup = 40.0 if cuda else 30.0
    fit = int((run.left() - startup) / (1.15 * per_image)) // unit * unit
    n = max(lo, min(hi, fit))
    folder = ensure_corpus(n)
    release(device)
    args = ["--images", str(folder), "--limit", str(n), "--output", str(STATE["work"] / "denoise.zarr"),
            *_job_common(cfg.job_model, cfg.input_size, cfg.preset, cfg.steps), "--workers", "1"]
    if cfg.job_unit:
        args += ["--images-per-batch", str(cfg.job_unit)]
    job, stats, sampler, window = _sampled_job(run, "denoise_job", "jobs.denoise", args, "denoise.zarr")
    steady = stats.get("steady_images_per_s")
    run.part()["summary"] = {
        "model": cfg.job_model, "input_size": cfg.input_size, "preset": cfg.preset, "images": n,
        "images_per_unit": unit, "images_per_pass": passes, "kernel_units": len(times),
        "kernel_steady_images_per_s": kernel and round(kernel, 4), **job, **stats,
        "end_to_end_images_per_s": round(stats.get("ok", 0) / job["wall_s"], 4) if stats else None,
        "overhead_steady": round(1 - steady / kernel, 4) if steady and kernel else None,
        "gpu": sampler.summary(window), "gpu_whole_job": sampler.summary()}
    run.save()


def part_apply_job(run) -> None:
    from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser

    cfg, device = run.config, run.device
    cuda = device.type == "cuda"
    shared_ray()
    backbone = create_backbone(cfg.job_model, weights="none", img_size=cfg.input_size).to(device)
    grid = backbone.grid(cfg.input_size)
    spec = DenoiserSpec(denoiser=DenoiserConfig(channels=backbone.embed_dim, pos_grid=grid), backbone=cfg.job_model,
                        block=backbone.block, input_size=(cfg.input_size, cfg.input_size),
                        patch_size=backbone.patch_size, stride=backbone.stride)
    path = str(STATE["work"] / "denoiser.safetensors")
    save_denoiser(path, Denoiser(spec.denoiser), spec)
    # The plain backbone forward, fp32 as the job runs, at the job's pass size.
    unit = cfg.job_unit or unit_size("apply", cuda)
    x = torch.stack([corpus_image(i, cfg.input_size) for i in range(min(unit, 64))]).to(device)
    with torch.inference_mode():
        for _ in range(2):
            backbone.model.forward_features(backbone.normalize(x))
        if cuda:
            torch.cuda.synchronize(device)
        t0, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - t0 < 2:
            backbone.model.forward_features(backbone.normalize(x))
            calls += 1
        if cuda:
            torch.cuda.synchronize(device)
    forward = len(x) * calls / (time.perf_counter() - t0)
    del backbone, x
    release(device)
    lo, hi = cfg.apply_images
    guess = min(forward, 150.0)  # decoding on one CPU bounds the job well below a GPU's forward
    n = max(lo, min(hi, int(0.5 * (run.left() - 40) * guess) // unit * unit))
    folder = ensure_corpus(n)
    args = ["--denoiser", path, "--images", str(folder), "--limit", str(n), "--output",
            str(STATE["work"] / "apply.zarr"), "--weights", "none", "--progress-every", "10", "--overwrite",
            "--workers", "1"]
    if cfg.job_unit:
        args += ["--images-per-batch", str(cfg.job_unit)]
    job, stats, sampler, window = _sampled_job(run, "apply_job", "jobs.apply_denoiser", args, "apply.zarr")
    steady = stats.get("steady_images_per_s")
    run.part()["summary"] = {
        "model": cfg.job_model, "input_size": cfg.input_size, "images": n, "images_per_unit": unit,
        "backbone_forward_images_per_s": round(forward, 2), **job, **stats,
        "ratio_steady": round(steady / forward, 4) if steady else None,
        "gpu": sampler.summary(window)}
    run.save()


def part_feed_job(run) -> None:
    """``dvt denoise --method average --copies 1`` with a backbone that costs nothing but has ViT-B/14's shapes
    (:mod:`pipeline.testing.zero_vit`), one GPU worker: the images/s the machinery around the model (fetch, decode
    and resize tasks, upload, float16, chunk writes, ledger) feeds one GPU, with the node's CPUs sized by default."""
    cfg = run.config
    shared_ray()
    n = cfg.feed_images
    folder = ensure_corpus(n)
    args = ["--method", "average", "--copies", "1", "--model", "pipeline.testing.zero_vit:create", "--weights", "none",
            "--input-size", str(cfg.feed_size), "--images", str(folder), "--limit", str(n), "--output",
            str(STATE["work"] / "feed.zarr"), "--overwrite", "--progress-every", "10", "--workers", "1"]
    if cfg.job_unit:
        args += ["--images-per-batch", str(cfg.job_unit)]
    job, stats, sampler, window = _sampled_job(run, "feed_job", "jobs.denoise", args, "feed.zarr")
    run.part()["summary"] = {"model": "pipeline.testing.zero_vit:create", "input_size": cfg.feed_size, "images": n,
                             "cpus": os.cpu_count(), **job, **stats, "gpu": sampler.summary(window)}
    run.save()


def part_scaling_ray(run) -> None:
    cfg = run.config
    per, base = cfg.scaling_images_per_worker, None
    shared_ray()
    run.part()["note"] = (f"dvt denoise, N workers x {cfg.scaling_cpus_per_worker} CPU and 0 GPU (1 torch thread), "
                          f"{cfg.scaling_model} at {cfg.scaling_size} px, preset {cfg.scaling_preset}, 1 image per "
                          f"unit, {per} units per worker; rate = steady state from the manifest")
    folder = ensure_corpus(max(cfg.scaling_workers) * per)
    order = _order(cfg.scaling_workers)
    for k, n in enumerate(order):
        if run.left() < 15:
            run.part()["cut"] = f"workers {order[k:]} left out: part deadline"
            break
        url = str(STATE["work"] / f"scaling-{n}.zarr")
        args = ["--images", str(folder), "--limit", str(n * per), "--output", url,
                *_job_common(cfg.scaling_model, cfg.scaling_size, cfg.scaling_preset, cfg.steps), "--workers", str(n),
                "--cpus-per-worker", str(cfg.scaling_cpus_per_worker), "--gpus-per-worker", "0",
                "--images-per-batch", "1"]
        share = run.left() / (len(order) - k)
        job = run_job(f"scaling_ray_{n}", "jobs.denoise", args, timeout=max(share, min(run.left(), 60)) - 2)
        stats = _stats(url)
        stats.pop("window", None)
        steady = stats.get("steady_images_per_s")
        if n == 1 and steady:
            base = steady
        run.row(workers=n, images_per_s=steady, efficiency=round(steady / (n * base), 3) if steady and base else None,
                job_images_per_s=stats.get("job_images_per_s"), in_model_share=stats.get("in_model_share"),
                ok=stats.get("ok"), wall_s=job["wall_s"], error=job.get("error"))


def part_train(run) -> None:
    from pipeline.stage2.denoiser import read_spec
    from pipeline.testing.synthetic_pairs import write_synthetic_store

    cfg, device = run.config, run.device
    shared_ray()
    url = str(STATE["work"] / "pairs.zarr")
    t0 = time.monotonic()
    write_synthetic_store(url, cfg.train_images, grid=(cfg.train_grid, cfg.train_grid), channels=cfg.train_channels,
                          unit=16)
    written = time.monotonic() - t0
    out = str(STATE["work"] / "train")
    steps_per_pass = max(1, cfg.train_images // cfg.train_batch)
    args = ["--stores", url, "--output", out, "--epochs", str(cfg.train_epochs), "--batch-size", str(cfg.train_batch),
            "--eval-every", str(steps_per_pass), "--patience", "0", "--workers", "1", "--val-fraction", "0",
            "--overwrite", "--gpu" if device.type == "cuda" else "--cpu"]
    release(device)
    sampler = GpuSampler(device)
    try:
        job = run_job("train", "jobs.train_denoiser", args, timeout=run.left() - 3)
    finally:
        sampler.stop()
    summary: dict[str, Any] = {"images": cfg.train_images, "grid": cfg.train_grid, "channels": cfg.train_channels,
                               "batch": cfg.train_batch, "epochs": cfg.train_epochs, "store_write_s": round(written, 1),
                               **job, "gpu": sampler.summary()}
    if job["rc"] == 0:
        # One history entry per held-out check (here: per pass); the first interval pays for the workers' start.
        history = read_spec(f"{out}/denoiser.safetensors").training.get("history", [])
        for h in history:
            run.row(step=h["step"], epoch=round(h["epoch"], 2), samples_per_s=round(h["samples_per_s"], 2),
                    data_wait=round(h["data_wait_fraction"], 4), first_batch_s=round(h["first_batch_s"], 3))
        if history:
            later = history[1:] or history
            seconds = sum(h["seconds"] for h in history)
            summary.update(
                samples_per_s_after_first_check=round(
                    sum(h["samples_per_s"] * h["seconds"] for h in later) / max(sum(h["seconds"] for h in later), 1e-9), 2),
                data_wait_run=round(sum(h["data_wait_s"] for h in history) / max(seconds, 1e-9), 4),
                data_wait_after_first_batch=round((sum(h["data_wait_s"] for h in history) - history[0]["first_batch_s"])
                                                  / max(seconds - history[0]["first_batch_s"], 1e-9), 4))
    run.part()["summary"] = summary
    run.save()
