"""One measurement run for a GPU machine and its CPU cores, in a fixed time budget, written as it goes.

On a machine with one GPU (made for: one H100/H200, 16 cores, Python 3.12, torch 2.11, no Ray or zarr, no
network), from the repository root, after ``bash infra/device_wheels.sh`` where the network is (the working tree
then carries the ignored folder ``.device``, 25 MB)::

    PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --out $OUT --budget 450

450 s of parts, plus at most 30 s past the budget before the run stops itself, fit an 8-minute limit.

The archive ``.device/site-cp312.tar.xz`` (Ray 2.60, zarr 3 and what they need) is unpacked into
``/tmp/dvt-site`` and put on the path when Ray or zarr are missing (``--site-archive`` names another one,
``none`` runs without). CI runs ``--smoke``: the same code on a CPU with tiny sizes (about two minutes on 2
cores, most of it starting Ray's workers).

Parts, in this order (each in its own slice of the budget; parts cut their sizes, never themselves):

1. ``backbone``: images/s of timm's ``forward_features`` for ViT-S/14 and ViT-B/14 DINOv2 (random weights) at
   518 px, batch 32 and 64, fp32 and bf16 autocast, with peak GPU memory: the physical anchor.
2. ``stage1``: seconds per image of ``fit_images`` (the ``default`` preset) for both models at 518 px, 1, 4
   and 16 images fitted together, fp32 and bf16, split into view extraction and fitting, peak memory against
   :mod:`pipeline.runtime.batching`'s estimate, bf16's deviation from fp32, and where the fit waits for the GPU.
3. ``apply_kernel``: backbone + denoiser (what ``dvt apply``'s worker runs) against the backbone alone.
4. ``scaling_processes``: the stage-1 kernel (ViT-S at 224, the ``ci`` preset to fit the time, one torch thread
   each) in 1, 2, 4, 8 processes side by side: the machine's own scaling, with no pipeline.
5. ``denoise_job``: ``dvt denoise`` with one GPU worker on >= 64 generated images against the kernel alone on
   the same images and settings (overhead), with GPU utilisation sampled by ``nvidia-smi``.
6. ``apply_job``: ``dvt apply`` with one GPU worker against the backbone's forward.
7. ``feed_job``: ``dvt denoise --method average --copies 1`` on a backbone that costs nothing but has ViT-B/14's
   shapes (``pipeline.testing.zero_vit``) at 518 px, one GPU worker, decode tasks on the other cores: how many
   images/s the machinery around the model feeds one GPU.
8. ``scaling_ray``: ``dvt denoise`` with 1, 2, 4, 8 CPU workers (as in 4), efficiency against 1 worker.
9. ``train``: ``dvt train`` with one GPU worker on a synthetic store: samples/s and the data-wait share.

Parts 5-9 need Ray and zarr and say ``skipped`` without them. ``OUT/device_check.json`` and
``OUT/device_check.md`` are rewritten after every measurement; the jobs' logs go to ``OUT/logs``. A part
that fails records its error and the next one runs; 30 s past the budget the run stops with what it has
(exit status 2). ``--parts`` reruns some parts only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import device_jobs as jobs  # noqa: E402  (benchmarks/, beside this file)
import device_support as support  # noqa: E402
import torch  # noqa: E402

from pipeline.vit.backbone import create_backbone  # noqa: E402
from pipeline.runtime.batching import images_per_pass, stage1_bytes_per_image  # noqa: E402
from pipeline.stage2.denoiser import DenoisedViT, Denoiser, DenoiserConfig  # noqa: E402
from pipeline.stage1.fit import Stage1Config, fit_images  # noqa: E402

_log = logging.getLogger("device_check")
GIB = 2 ** 30
SMALL, BASE = "vit_small_patch14_dinov2", "vit_base_patch14_dinov2"


@dataclass
class CheckConfig:
    """Sizes of every part: the defaults for a GPU machine, :meth:`smoke` for a CPU in a few minutes."""

    models: tuple[str, ...] = (SMALL, BASE)
    input_size: int = 518
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    backbone_batches: tuple[int, ...] = (32, 64)
    preset: str = "default"
    steps: int | None = None  # stage-1 steps everywhere; None: the preset's
    stage1_batches: tuple[int, ...] = (1, 4, 16)
    apply_batch: int = 64
    job_model: str = SMALL
    job_unit: int | None = None  # images per store unit; None: the jobs' own default for the device
    job_images: tuple[int, int] = (64, 256)  # least and most images of the denoise job
    apply_images: tuple[int, int] = (256, 768)
    feed_images: int = 2048
    feed_size: int = 518
    scaling_model: str = SMALL
    scaling_size: int = 224
    scaling_preset: str = "ci"  # 10 views, 100 steps: ~3-7 s per image on one core at 224 px (default: ~35 s)
    scaling_workers: tuple[int, ...] = (1, 2, 4, 8)
    scaling_images_per_worker: int = 3
    scaling_cpus_per_worker: float = 1.0
    train_images: int = 384
    train_grid: int = 37
    train_channels: int = 384
    train_batch: int = 32
    train_epochs: int = 2  # the first pays for starting the worker; the last is the one reported
    measure_s: float = 4.0  # seconds of timed calls per throughput figure
    budget_s: float = 450.0

    @classmethod
    def smoke(cls) -> CheckConfig:
        return cls(models=(SMALL,), input_size=56, backbone_batches=(2,), preset="ci", steps=20,
                   stage1_batches=(1, 2), apply_batch=2, job_unit=2, job_images=(4, 4), apply_images=(4, 4),
                   feed_images=4, feed_size=56,
                   scaling_size=56, scaling_preset="ci", scaling_workers=(1, 2), scaling_images_per_worker=2,
                   scaling_cpus_per_worker=0.5, train_images=16, train_grid=4, train_batch=4, train_epochs=2,
                   measure_s=0.5, budget_s=240.0)


# Parts in order, with their share of the budget (a part that cannot run gives its share to the others).
PART_WEIGHTS = {"backbone": 0.05, "stage1": 0.18, "apply_kernel": 0.04, "scaling_processes": 0.12,
                "denoise_job": 0.20, "apply_job": 0.08, "feed_job": 0.06, "scaling_ray": 0.17, "train": 0.10}
NEEDS_RAY = {"denoise_job", "apply_job", "feed_job", "scaling_ray", "train"}


class Run:
    """The report being built, the budget, and where both are written."""

    def __init__(self, out: Path, config: CheckConfig, device: torch.device, mode: str):
        self.out, self.config, self.device = out, config, device
        self.started = time.monotonic()
        self.deadline = self.started + config.budget_s
        self.part_deadline = self.deadline
        # Smoke sizes are tiny and fixed: a busy CI machine must not cut rows (the global watchdog still holds).
        self.may_cut = mode == "full"
        self.current: str | None = None
        self.part_started = self.started
        self.lock = threading.Lock()
        self.report: dict[str, Any] = {
            "script": "benchmarks/device_check.py", "mode": mode, "budget_s": config.budget_s,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(config), "environment": {}, "parts": {}, "goals": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        """Seconds left in the current part's slice."""
        return self.part_deadline - time.monotonic()

    def part(self) -> dict[str, Any]:
        return self.report["parts"][self.current]

    def row(self, **row: Any) -> None:
        """Add a measurement to the current part and write the report."""
        self.part().setdefault("rows", []).append(row)
        _log.info("%s: %s", self.current, json.dumps(row, default=str))
        self.save()

    def save(self) -> None:
        with self.lock:
            self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.report["goals"] = goals(self.report["parts"])
            tmp = self.out / "device_check.json.tmp"
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
            tmp.replace(self.out / "device_check.json")
            (self.out / "device_check.md").write_text(markdown(self.report))


# ------------------------------------------------------------------------------------------------ helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def autocast(device: torch.device, dtype: str):
    amp = getattr(torch, dtype)
    return torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)


def rate(fn: Callable[[], Any], device: torch.device, images: int, *, seconds: float, warmup: int = 2,
         most: int = 20) -> tuple[float, int]:
    """``(images/s, timed calls)`` of ``fn`` processing ``images`` per call: ``warmup`` calls, then calls until
    ``seconds`` have passed (at least one, at most ``most``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0, calls = time.perf_counter(), 0
    while calls < most and (calls == 0 or time.perf_counter() - t0 < seconds):
        fn()
        calls += 1
    sync(device)
    return images * calls / (time.perf_counter() - t0), calls


def sample_pixels(size: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` distinct RGB images in [0, 1] of ``size`` px, from the bundled samples (crops, flips)."""
    return torch.stack([support.corpus_image(i, size) for i in range(n)]).to(device)


def timm_forward(backbone, x: torch.Tensor) -> torch.Tensor:
    """The backbone as a timm user runs it: ``forward_features`` on normalised pixels."""
    return backbone.model.forward_features(backbone.normalize(x))


def apply_forward(model: DenoisedViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``dvt apply``'s worker computes for a batch: raw and denoised features, both copied to the host."""
    raw, clean = model.features(x, return_raw=True)
    return raw.cpu(), clean.cpu()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------------ parts 1-4

def part_backbone(run: Run) -> None:
    cfg, device = run.config, run.device
    combos = [(m, d, b) for m in cfg.models for d in cfg.dtypes for b in cfg.backbone_batches]
    for k, (model, dtype, batch) in enumerate(combos):
        if run.may_cut and run.left() < 3:
            run.part()["cut"] = f"{len(combos) - k} combinations left out: part deadline"
            break
        backbone = _backbone(run, model, cfg.input_size)
        x = torch.rand(batch, 3, cfg.input_size, cfg.input_size, device=device)
        reset_peak(device)
        try:
            with torch.inference_mode(), autocast(device, dtype):
                ips, calls = rate(functools.partial(timm_forward, backbone, x), device, batch,
                                  seconds=min(cfg.measure_s, run.left() / (len(combos) - k) / 2))
            run.row(model=model, dtype=dtype, batch=batch, images_per_s=round(ips, 2), calls=calls,
                    peak_gib=peak_gib(device))
        except RuntimeError as e:
            if not is_oom(e):
                raise
            run.row(model=model, dtype=dtype, batch=batch, error="out of memory")
        del x
        _empty_cache(device)


_BACKBONES: dict[tuple[str, int], Any] = {}


def _backbone(run: Run, model: str, size: int):
    key = (model, size)
    if key not in _BACKBONES:
        _BACKBONES.clear()
        _empty_cache(run.device)
        _BACKBONES[key] = create_backbone(model, weights="none", img_size=size).to(run.device)
    return _BACKBONES[key]


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _loop_lines() -> tuple[str, int, int]:
    """File and line span of ``fit_images``'s optimisation loop (for placing host-device syncs)."""
    lines, first = inspect.getsourcelines(fit_images)
    start = next(i for i, line in enumerate(lines) if "for step in range(config.steps)" in line)
    end = next(i for i, line in enumerate(lines)  # the first statement after the loop, back at the body's indent
               if i > start and line.startswith("    ") and not line.startswith("     "))
    return inspect.getsourcefile(fit_images), first + start, first + end - 1


def _sync_points(backbone, images: torch.Tensor, config: Stage1Config) -> dict[str, Any]:
    """Where one fit makes the host wait for the GPU (``torch.cuda.set_sync_debug_mode``), by source line."""
    path, lo, hi = _loop_lines()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit_images(backbone, images, config, image_ids=[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places: dict[str, int] = {}
    in_loop = 0
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where = f"{Path(w.filename).name}:{w.lineno}"
        places[where] = places.get(where, 0) + 1
        in_loop += w.filename == path and lo <= w.lineno <= hi
    return {"by_line": places, "in_fitting_loop": in_loop, "loop_lines": f"{Path(path).name}:{lo}-{hi}"}


def part_stage1(run: Run) -> None:
    cfg, device = run.config, run.device
    images = sample_pixels(cfg.input_size, max(cfg.stage1_batches), device)
    combos = [(m, d) for m in reversed(cfg.models) for d in reversed(cfg.dtypes)]  # ViT-B and bf16 first
    clean: dict[tuple[str, str], torch.Tensor] = {}
    for k, (model, dtype) in enumerate(combos):
        if run.may_cut and run.left() < 5:
            run.part()["cut"] = f"{len(combos) - k} model/dtype combinations left out: part deadline"
            break
        backbone = _backbone(run, model, cfg.input_size)
        config = Stage1Config.preset(cfg.preset, amp_dtype=None if dtype == "float32" else dtype)
        config = config.replace(steps=cfg.steps) if cfg.steps is not None else config
        sync(device)
        t0 = time.perf_counter()
        fit_images(backbone, images[:1], config, image_ids=[10_000])  # warm-up: kernels, allocator
        sync(device)
        per_image = time.perf_counter() - t0  # an upper bound until measured
        estimate = stage1_bytes_per_image(views=config.views.num_views, grid=backbone.grid(cfg.input_size),
                                          channels=backbone.embed_dim, batch_tokens=config.batch_tokens)
        for b in cfg.stage1_batches:
            if run.may_cut and run.left() < 2 + b * per_image:  # a fit cannot be stopped: start only one that fits
                run.part()["cut"] = f"{model} {dtype}: {b} images per batch and more left out: part deadline"
                break
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            try:
                results = fit_images(backbone, images[:b], config, image_ids=list(range(b)))
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                run.row(model=model, dtype=dtype, images_per_batch=b, error="out of memory")
                _empty_cache(device)
                break
            sync(device)
            per_image = (time.perf_counter() - t0) / b
            views = results[0].view_seconds
            run.row(model=model, dtype=dtype, images_per_batch=b, s_per_image=round(per_image, 4),
                    views_s_per_image=round(views, 4), fit_s_per_image=round(per_image - views, 4),
                    peak_gib=peak_gib(device), estimated_gib=round(b * estimate / GIB, 3),
                    pass_size_by_rule=images_per_pass("denoise", device, estimate) if device.type == "cuda" else None)
            if b == 1:
                clean[(model, dtype)] = results[0].clean
        if ("float32" in cfg.dtypes and "bfloat16" in cfg.dtypes and (model, "float32") in clean
                and (model, "bfloat16") in clean):
            a, c = clean[(model, "float32")], clean[(model, "bfloat16")]
            run.part().setdefault("bf16_vs_fp32", []).append({
                "model": model, "relative_error": round(float((a - c).norm() / a.norm()), 5),
                "mean_cosine": round(float(torch.nn.functional.cosine_similarity(a, c, dim=-1).mean()), 5),
                "note": "random weights; one image; clean F"})
            run.save()
    if device.type == "cuda" and run.left() > 3:
        backbone = _backbone(run, cfg.models[0], cfg.input_size)
        run.part()["sync_points"] = _sync_points(backbone, images[:1], Stage1Config.preset(cfg.preset))
        run.save()


def part_apply_kernel(run: Run) -> None:
    cfg, device = run.config, run.device
    x = sample_pixels(cfg.input_size, cfg.apply_batch, device)
    combos = [(m, d) for m in cfg.models for d in cfg.dtypes]
    for k, (model, dtype) in enumerate(combos):
        if run.may_cut and run.left() < 3:
            run.part()["cut"] = f"{len(combos) - k} combinations left out: part deadline"
            break
        backbone = _backbone(run, model, cfg.input_size)
        grid = backbone.grid(cfg.input_size)
        denoiser = Denoiser(DenoiserConfig(channels=backbone.embed_dim, pos_grid=grid)).to(device).eval()
        full = DenoisedViT(backbone, denoiser)
        seconds = min(cfg.measure_s, run.left() / (len(combos) - k) / 4)
        with torch.inference_mode(), autocast(device, dtype):
            plain, _ = rate(functools.partial(timm_forward, backbone, x), device, len(x), seconds=seconds)
            ours, _ = rate(functools.partial(apply_forward, full, x), device, len(x), seconds=seconds)
        run.row(model=model, dtype=dtype, batch=len(x), backbone_images_per_s=round(plain, 2),
                apply_images_per_s=round(ours, 2), ratio=round(ours / plain, 3))


# ------------------------------------------------------------------------------------------------ report

def goals(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals against what was measured (``value`` and ``met`` None when not measured)."""
    def rows(name: str) -> list[dict[str, Any]]:
        return [r for r in parts.get(name, {}).get("rows", []) if "error" not in r]

    out = []
    s1 = [r for r in rows("stage1") if r["model"] == BASE]
    best = min(s1, key=lambda r: r["s_per_image"], default=None)
    out.append({"goal": "stage 1, ViT-B/14 at 518: <= 1 s/image (best batch and dtype)", "target": 1.0,
                "value": best and best["s_per_image"], "met": None if best is None else best["s_per_image"] <= 1.0,
                "at": best and f"{best['dtype']}, {best['images_per_batch']} per batch"})
    job = parts.get("denoise_job", {}).get("summary")
    out.append({"goal": "denoise job overhead vs the stage-1 kernel: < 5%", "target": 0.05,
                "value": job and job.get("overhead_steady"),
                "met": None if not job or job.get("overhead_steady") is None else job["overhead_steady"] < 0.05})
    app = parts.get("apply_job", {}).get("summary")
    out.append({"goal": "dvt apply vs the backbone's forward: >= 0.8x", "target": 0.8,
                "value": app and app.get("ratio_steady"),
                "met": None if not app or app.get("ratio_steady") is None else app["ratio_steady"] >= 0.8})
    feed = parts.get("feed_job", {}).get("summary")
    rate = feed and feed.get("steady_images_per_s")
    out.append({"goal": "feed_job (zero-cost ViT-B/14-shaped backbone): the machinery feeds one GPU >= 300 images/s",
                "target": 300, "value": rate, "met": None if not rate else rate >= 300})
    for name in ("scaling_ray", "scaling_processes"):
        r8 = [r for r in rows(name) if r.get("workers") == 8]
        out.append({"goal": f"{name}: efficiency at 8 workers >= 90%", "target": 0.9,
                    "value": r8[0]["efficiency"] if r8 else None,
                    "met": None if not r8 or r8[0]["efficiency"] is None else r8[0]["efficiency"] >= 0.9})
    return out


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (dict, list))]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# Device check ({report['mode']})", "",
             f"{env.get('device_name', '?')}; {env.get('cpus', '?')} CPUs; Python {env.get('python', '?')}, "
             f"torch {env.get('torch', '?')}, Ray {env.get('ray') or 'absent'}, zarr {env.get('zarr') or 'absent'}; "
             f"started {report['started']}, {report.get('elapsed_s', 0)} s of a {report['budget_s']} s budget.", "",
             "## Goals", ""]
    lines += _table([{k: v for k, v in g.items()} for g in report["goals"]])
    for name, part in report["parts"].items():
        lines += ["", f"## {name}: {part.get('status', 'running')} ({part.get('seconds', '?')} s)", ""]
        for key in ("note", "cut", "error", "skipped"):
            if part.get(key):
                lines += [f"{key}: {part[key]}", ""]
        if part.get("rows"):
            lines += _table(part["rows"])
        if part.get("summary"):
            lines += ["", "| summary | |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v} |"
                      for k, v in part["summary"].items()]
        for key in ("ray", "bf16_vs_fp32", "sync_points"):
            if part.get(key):
                lines += ["", f"{key}: `{json.dumps(part[key], default=str)}`"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ driver

def environment(device: torch.device) -> dict[str, Any]:
    import timm

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                           "cpus": os.cpu_count(), "device": str(device), "hostname": platform.node()}
    env["ray"], env["zarr"] = support.versions()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                   bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device_name"] = platform.processor() or "CPU"
    return env


def run_parts(run: Run, parts: list[str]) -> None:
    functions: dict[str, Callable[[Run], None]] = {
        "backbone": part_backbone, "stage1": part_stage1, "apply_kernel": part_apply_kernel,
        "scaling_processes": jobs.part_scaling_processes, "denoise_job": jobs.part_denoise_job,
        "apply_job": jobs.part_apply_job, "feed_job": jobs.part_feed_job,
        "scaling_ray": jobs.part_scaling_ray, "train": jobs.part_train}
    missing = support.ray_missing()
    todo = list(parts)
    for name in parts:
        run.report["parts"][name] = {"status": "pending"}
    for i, name in enumerate(parts):
        todo.remove(name)
        run.current = name
        part = run.part()
        if name in NEEDS_RAY and missing:
            part.update(status="skipped", skipped=missing)
            run.save()
            continue
        now = time.monotonic()
        weights = PART_WEIGHTS[name] + sum(PART_WEIGHTS[n] for n in todo if not (n in NEEDS_RAY and missing))
        run.part_deadline = now + (run.deadline - now) * PART_WEIGHTS[name] / weights
        part.update(status="running", slice_s=round(run.part_deadline - now, 1))
        _log.info("part %d/%d %s: %.0f s", i + 1, len(parts), name, run.part_deadline - now)
        run.save()
        t0 = run.part_started = time.monotonic()
        try:
            functions[name](run)
            part["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded; the next part runs
            part.update(status="error", error=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc(limit=8)[-3000:])
            _log.error("part %s failed: %s", name, e)
        finally:
            part["seconds"] = round(time.monotonic() - t0, 1)
            _BACKBONES.clear()
            _empty_cache(run.device)
            run.save()


def watchdog(run: Run, grace: float) -> None:
    """Past the budget and ``grace``: stop child jobs, write what was measured, exit (status 2)."""
    def fire() -> None:
        if run.current and run.report["parts"].get(run.current, {}).get("status") == "running":
            run.part().update(status="cut", seconds=round(time.monotonic() - run.part_started, 1),
                              error=f"global budget of {run.config.budget_s:.0f} s + {grace:.0f} s grace reached")
        support.stop_children()
        run.save()
        _log.error("time budget exhausted: results so far in %s", run.out)
        os._exit(2)

    timer = threading.Timer(max(1.0, run.deadline + grace - time.monotonic()), fire)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "device_check", help="output folder")
    parser.add_argument("--budget", type=float, default=None, help="seconds for every part together "
                        "(default 450, smoke 240); the run stops 30 s after it at the latest")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU: every part, in a few minutes")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--parts", nargs="+", choices=list(PART_WEIGHTS), default=list(PART_WEIGHTS))
    parser.add_argument("--site-archive", default="auto",
                        help="tar.xz of Ray/zarr to unpack and use when they are missing (default: "
                             ".device/site-cpXY.tar.xz if present; 'none': never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("timm", "pipeline", "ray", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    site = support.use_site_archive(args.site_archive, ROOT)
    config = CheckConfig.smoke() if args.smoke else CheckConfig()
    if args.budget is not None:
        config = dataclasses.replace(config, budget_s=args.budget)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    run = Run(args.out, config, device, "smoke" if args.smoke else "full")
    run.report["environment"] = {**environment(device), "site_archive": site}
    run.report["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    _log.info("device check (%s) on %s, budget %.0f s, out %s", run.report["mode"], device, config.budget_s, args.out)
    run.save()
    support.setup(run)
    watchdog(run, grace=30.0)
    try:
        run_parts(run, args.parts)
    finally:
        support.cleanup()
    run.save()
    statuses = {k: v["status"] for k, v in run.report["parts"].items()}
    _log.info("done in %.0f s: %s; %s", time.monotonic() - run.started, statuses, args.out / "device_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
