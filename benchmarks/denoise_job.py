"""Denoise job throughput: the Ray Data pipeline with 1 and 2 workers against the stage-1 kernel alone.

All three run in one process on the same images with the same settings, one CPU thread per worker:

* kernel: decode is done up front; only ``fit_images`` is timed, batch by batch, in this process;
* job, 1 worker / 2 workers: ``run_denoise`` end to end (listing, store, fetch, decode, fit, write).

Two views of the same runs:

* end to end: wall seconds of ``run_denoise`` including its fixed start (Ray Data planning, actor start,
  backbone load, store creation), which a large corpus amortises;
* steady state: from the manifest's commit times, each worker's rate between its first and its last unit
  (images of units 2..k over the time between commits 1 and k), summed over workers. This is the rate a long
  job runs at; its overhead is ``1 - job rate / (workers x kernel rate)``, i.e. the share of worker time not
  spent in stage 1 (fetch, decode, resize, store writes, Ray scheduling, contention with the driver).

Also: 2-worker scaling efficiency (both views), and peak RSS of the driver and the worker processes (VmHWM).

    python benchmarks/denoise_job.py --images 24 --input-size 224
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.backbone import create_backbone  # noqa: E402
from pipeline.decode import decode_image, resize_to_tensor  # noqa: E402
from pipeline.denoise import DenoiseConfig, run_denoise  # noqa: E402
from pipeline.stage1 import fit_images  # noqa: E402

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
    parser.add_argument("--kernel-rate", type=float, nargs=2, metavar=("END_TO_END", "STEADY"),
                        help="reuse the kernel's images/s from an earlier run on this machine instead of measuring")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    work = Path(tempfile.mkdtemp(prefix="dvt-bench-"))
    paths = make_corpus(work / "images", args.images)
    base = DenoiseConfig(images=str(work / "images"), output="", model=args.model, weights="none",
                         input_size=args.input_size, preset=args.preset, views=args.views, steps=args.steps,
                         images_per_batch=args.images_per_batch, cpus_per_worker=0.9, progress_every_s=1e9)
    # 0.9 CPU per actor: two actors must leave room for the fetch tasks on a 2-CPU machine (one torch thread each).
    if args.kernel_rate:
        kernel_rate, steady_kernel = args.kernel_rate
        kernel, tag = len(paths) / kernel_rate, "stage-1 kernel alone (1 thread; earlier run)"
    else:
        batches = kernel_seconds(base, paths)
        kernel, tag = sum(batches), "stage-1 kernel alone (1 thread)"
        kernel_rate = len(paths) / kernel
        steady_kernel = (len(paths) - base.images_per_batch) / sum(batches[1:])  # without the first call's warm-up
    rows = [(tag, 1, kernel, kernel_rate, steady_kernel, 0)]
    for workers in args.workers:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        config = DenoiseConfig(**{**base.__dict__, "output": str(work / f"store-{workers}.zarr"), "workers": workers})
        total, rate, peak = job_run(config)
        rows.append((f"denoise job, {workers} worker(s) x 0.9 CPU", workers, total, len(paths) / total, rate, peak))

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
        print(f"| {name} | {seconds:.1f} | {rate:.4f} | {1 - rate / (workers * kernel_rate):.1%} | {steady:.4f} | "
              f"{1 - steady / (workers * steady_kernel):.1%} | {peak / 2**20:.0f} MiB |")
    for _, workers, _, rate, steady, _ in rows[1:]:
        print(f"\n{workers}-worker efficiency against {workers} x the kernel: end to end "
              f"{rate / (workers * kernel_rate):.1%}, steady state {steady / (workers * steady_kernel):.1%}")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
