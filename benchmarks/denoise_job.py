"""Denoise job throughput: the Ray Data pipeline with 1 and 2 workers against the stage-1 kernel alone.

All runs use the same images and settings, one CPU thread per worker:

* kernel, N processes: ``fit_images`` alone in N fresh processes run side by side (each with every N-th batch,
  decoded up front, ``OMP_NUM_THREADS=1`` as in a Ray worker), only the fits timed. With N=2 this is what
  the machine itself gives two workers: its own 2-process scaling, with no pipeline at all;
* job, N workers: ``run_denoise`` end to end (listing, store, fetch, decode, fit, write).

Two views of the same runs:

* end to end: wall seconds of ``run_denoise`` including its fixed start (Ray Data planning, actor start,
  backbone load, store creation), which a large corpus amortises; for the kernel, the slowest process's fits;
* steady state: from the manifest's commit times, each worker's rate between its first and its last unit
  (images of units 2..k over the time between commits 1 and k), summed over workers; for the kernel, batches
  2..k of each process. This is the rate a long job runs at.

Overhead of a job with N workers = ``1 - job rate / kernel rate with N processes``: the share of worker time
lost to the pipeline (fetch, decode, store writes, Ray's scheduling and its own processes on the same cores).
Scaling efficiency = ``rate with 2 / (2 x rate with 1)``, for the job and for the kernel (the machine's ceiling).
Also the peak RSS of the driver and of the worker processes (VmHWM).

    python benchmarks/denoise_job.py --images 16 --input-size 224
"""

from __future__ import annotations

import argparse
import collections
import logging
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.vit.backbone import create_backbone  # noqa: E402
from pipeline.io.decode import decode_image, resize_to_tensor  # noqa: E402
from pipeline.denoise.job import DenoiseConfig, prepare_store, run_denoise  # noqa: E402
from pipeline.runtime.image_job import ImageBatchWorker  # noqa: E402
from pipeline.runtime.job_runner import run_image_job  # noqa: E402
from pipeline.stage1.fit import fit_images  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "samples"


def _peak_rss(pid: str) -> int:
    """A process's peak resident set (VmHWM, Linux) in bytes, 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WorkerMemory:
    """Peak RSS of Ray's stage-1 actor processes (their VmHWM), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmd = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"Stage1Worker" in cmd:
                    self.peak = max(self.peak, _peak_rss(proc.name))
            time.sleep(0.2)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_corpus(folder: Path, n: int) -> list[Path]:
    samples = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = samples[i % len(samples)]
        dst = folder / f"{i:05d}{src.suffix}"
        shutil.copyfile(src, dst)
        paths.append(dst)
    return paths


def kernel_seconds(config: DenoiseConfig, paths: list[Path]) -> list[float]:
    """Seconds ``fit_images`` alone takes for each batch of ``paths``, on one thread, like one worker."""
    torch.set_num_threads(1)
    backbone = create_backbone(config.backbone_config())
    stage1 = config.stage1_config()
    pixels = [resize_to_tensor(decode_image(p.read_bytes()).pixels, config.input_size) for p in paths]
    times = []
    for start in range(0, len(pixels), config.images_per_batch):
        batch = torch.stack(pixels[start:start + config.images_per_batch])
        ids = list(range(start, start + len(batch)))
        t0 = time.perf_counter()
        fit_images(backbone, batch, stage1, image_ids=ids, seed=config.seed)
        times.append(time.perf_counter() - t0)
    return times


def _kernel_process(config: DenoiseConfig, paths: list[Path], results) -> None:
    results.put(kernel_seconds(config, paths))


def kernel_run(config: DenoiseConfig, paths: list[Path], processes: int) -> tuple[float, float]:
    """``(seconds, steady images/s)`` of the kernel in ``processes`` fresh processes side by side, each fitting
    every ``processes``-th batch; seconds are the slowest process's fits, steady rates exclude each first batch."""
    b = config.images_per_batch
    batches = [paths[i:i + b] for i in range(0, len(paths), b)]
    shares = [[p for batch in batches[k::processes] for p in batch] for k in range(processes)]
    os.environ["OMP_NUM_THREADS"] = "1"  # as Ray sets it in its workers; read when the child imports torch
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_kernel_process, args=(config, share, results)) for share in shares]
    for proc in procs:
        proc.start()
    times = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    if any(len(t) < 2 for t in times):
        raise SystemExit("Too few batches per kernel process for a steady-state rate: raise --images.")
    seconds = max(sum(t) for t in times)
    steady = sum((len(share) - b) / sum(t[1:]) for share, t in zip(shares, times))
    return seconds, steady


def steady_rate(config: DenoiseConfig) -> tuple[float, float]:
    """Images/s of the job between each worker's first and last committed unit, summed over workers, and the
    share of that worker time spent in stage 1 (the manifest's per-image ``seconds``, timed inside the worker)."""
    from pipeline.store import FeatureStore

    table = FeatureStore.open(config.output).manifest().to_pylist()
    units: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in table:
        units[row["worker"]][row["unit"]].append((row["written_at"].timestamp(), row["seconds"] or 0.0))
    rate, busy, span = 0.0, 0.0, 0.0
    for worker_units in units.values():
        commits = sorted((max(t for t, _ in rows), len(rows), sum(s for _, s in rows)) for rows in worker_units.values())
        if len(commits) < 2:
            raise SystemExit("Too few units per worker for a steady-state rate: raise --images.")
        rate += sum(n for _, n, _ in commits[1:]) / (commits[-1][0] - commits[0][0])
        busy += sum(s for _, _, s in commits[1:])
        span += commits[-1][0] - commits[0][0]
    return rate, busy / span


class IdleWorker(ImageBatchWorker):
    """A stage-1 worker that sleeps instead of fitting and stores zeros: with it, every CPU cycle the machine
    spends is the pipeline's own (driver, Ray's services, fetch, store writes)."""

    stage = "idle"

    def __init__(self, config: DenoiseConfig, layout: dict, seconds: float):
        self.seconds = seconds
        super().__init__(config.output, layout, input_size=config.input_size, cpus_per_worker=config.cpus_per_worker)

    def process(self, ids, images):
        time.sleep(self.seconds)
        zeros = np.zeros((*self.store.layout.grid, self.store.layout.channels), np.float32)
        return [({"seconds": self.seconds / len(ids)}, {name: zeros for name in self.arrays}) for _ in ids]


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat, Linux)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def idle_pipeline_cores(config: DenoiseConfig, seconds_per_batch: float, dashboard: bool) -> float:
    """Cores the machine keeps busy in steady state while ``config.workers`` idle workers hold the pipeline
    running (from the second batch to the last), with or without Ray's dashboard."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=dashboard, log_to_driver=False)
    store, covered, pending = prepare_store(config)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.monotonic(), _busy_cpu_seconds()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.monotonic()
    run_image_job(job="idle", store=store, covered=covered, pending=pending, worker=IdleWorker,
                  worker_kwargs={"config": config, "layout": store.layout.geometry(), "seconds": seconds_per_batch},
                  images_per_batch=config.images_per_batch, workers=config.workers, gpus=0, cpus=0.9,
                  progress_every_s=1e9)
    done.set()
    thread.join()
    ray.shutdown()
    # Steady state: after start-up (imports, actors: ~20 s) and the first batch, until the last one ends.
    window = [(t, c) for t, c in samples if t - started > 20 + seconds_per_batch]
    if len(window) < 5:
        raise SystemExit("Too short a run for a steady-state reading: raise --images or --idle-seconds.")
    (t0, c0), (t1, c1) = window[0], window[-1]
    return (c1 - c0) / (t1 - t0)


def job_run(config: DenoiseConfig) -> tuple[float, float, int]:
    """(seconds end to end, steady-state images/s, peak worker RSS) of one ``run_denoise``."""
    import ray

    with WorkerMemory() as memory:
        t0 = time.perf_counter()
        summary = run_denoise(config)
        seconds = time.perf_counter() - t0
    assert summary.failed == 0 and summary.ok == summary.todo, summary
    ray.shutdown()
    rate, in_stage1 = steady_rate(config)
    print(f"{config.workers} worker(s): steady-state share of worker time inside stage 1 (timed in the worker): "
          f"{in_stage1:.1%}", flush=True)
    return seconds, rate, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--images-per-batch", type=int, default=2)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--views", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="job runs to make")
    parser.add_argument("--kernel-rate", nargs=3, action="append", default=[], metavar=("N", "END_TO_END", "STEADY"),
                        help="reuse the kernel's images/s with N processes from an earlier run on this machine "
                             "instead of measuring (repeatable)")
    parser.add_argument("--idle-seconds", type=float, default=None, metavar="S",
                        help="instead: measure the pipeline's own CPU use with 2 workers that sleep S s per batch, "
                             "with and without Ray's dashboard")
    args = parser.parse_args()
    args.kernel_rate = {n: (float(e), float(st)) for n, e, st in args.kernel_rate}
    logging.basicConfig(level=logging.WARNING)

    import ray

    work = Path(tempfile.mkdtemp(prefix="dvt-bench-"))
    paths = make_corpus(work / "images", args.images)
    base = DenoiseConfig(images=str(work / "images"), output="", model=args.model, weights="none",
                         input_size=args.input_size, preset=args.preset, views=args.views, steps=args.steps,
                         images_per_batch=args.images_per_batch, cpus_per_worker=0.9, progress_every_s=1e9)
    if args.idle_seconds is not None:
        for dashboard in (True, False):
            config = DenoiseConfig(**{**base.__dict__, "output": str(work / f"idle-{dashboard}.zarr"), "workers": 2})
            cores = idle_pipeline_cores(config, args.idle_seconds, dashboard)
            print(f"idle pipeline, 2 workers, dashboard {'on' if dashboard else 'off'}: {cores:.3f} cores busy "
                  f"in steady state ({cores / os.cpu_count():.1%} of this machine)", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        return
    # 0.9 CPU per actor: two actors must leave room for the fetch tasks on a 2-CPU machine (one torch thread each).
    rows, kernel = [], {}
    for n in args.workers:
        if str(n) in args.kernel_rate:
            rate, steady = args.kernel_rate[str(n)]
            rows.append((f"stage-1 kernel, {n} process(es) side by side (earlier run)", n, len(paths) / rate, rate,
                         steady, 0))
        else:
            seconds, steady = kernel_run(base, paths, n)
            rows.append((f"stage-1 kernel, {n} process(es) side by side", n, seconds, len(paths) / seconds, steady, 0))
        kernel[n] = rows[-1][3:5]
        print(f"kernel, {n} process(es): {rows[-1][3]:.4f} images/s end to end, {steady:.4f} steady", flush=True)
    jobs = {}
    for workers in args.workers:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        config = DenoiseConfig(**{**base.__dict__, "output": str(work / f"store-{workers}.zarr"), "workers": workers})
        total, rate, peak = job_run(config)
        rows.append((f"denoise job, {workers} worker(s) x 0.9 CPU", workers, total, len(paths) / total, rate, peak))
        jobs[workers] = rows[-1][3:5]

    n = len(paths)
    print(f"\n{n} images, {args.model} (random weights) at {args.input_size}, preset {args.preset}, "
          f"{args.images_per_batch} images per batch, {os.cpu_count()} CPU cores\n")
    print("| run | wall s | images/s end to end | overhead end to end | images/s steady | overhead steady | "
          "worker peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, workers, seconds, rate, steady, peak in rows:
        if not peak:
            print(f"| {name} | {seconds:.1f} | {rate:.4f} | - | {steady:.4f} | - | - |")
            continue
        k_rate, k_steady = kernel[workers]
        print(f"| {name} | {seconds:.1f} | {rate:.4f} | {1 - rate / k_rate:.1%} | {steady:.4f} | "
              f"{1 - steady / k_steady:.1%} | {peak / 2**20:.0f} MiB |")
    if 1 in jobs and 2 in jobs:
        print()
        for name, (one, two) in (("job", (jobs[1], jobs[2])), ("kernel (the machine)", (kernel[1], kernel[2]))):
            print(f"2-worker scaling, {name}: end to end {two[0] / (2 * one[0]):.1%}, "
                  f"steady state {two[1] / (2 * one[1]):.1%}")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
