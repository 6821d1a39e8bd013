"""Denoise job throughput: the Ray Data pipeline with 1 and 2 workers against the stage-1 kernel alone.

All three run in one process on the same images with the same settings, one CPU thread per worker:

* kernel: decode is done up front; only ``fit_images`` is timed, batch by batch, in this process;
* job, 1 worker / 2 workers: ``run_denoise`` end to end (listing, store, fetch, decode, fit, write).

Reported: images/s, pipeline overhead = 1 - kernel time / job time for the same images (with and without
the fixed start-up: Ray and actor start, backbone load), scaling efficiency of 2 workers, and peak RSS of
the driver and the worker processes (VmHWM from /proc).

    python benchmarks/denoise_job.py --images 12 --input-size 224
"""

from __future__ import annotations

import argparse
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


def kernel_seconds(config: DenoiseConfig, paths: list[Path]) -> float:
    """Seconds ``fit_images`` alone takes for ``paths`` in batches, on one thread, like one worker."""
    torch.set_num_threads(1)
    backbone = create_backbone(config.backbone_config())
    stage1 = config.stage1_config()
    pixels = [resize_to_tensor(decode_image(p.read_bytes()).pixels, config.input_size) for p in paths]
    total = 0.0
    for start in range(0, len(pixels), config.images_per_batch):
        batch = torch.stack(pixels[start:start + config.images_per_batch])
        ids = list(range(start, start + len(batch)))
        t0 = time.perf_counter()
        fit_images(backbone, batch, stage1, image_ids=ids, seed=config.seed)
        total += time.perf_counter() - t0
    return total


def job_run(config: DenoiseConfig) -> tuple[float, float, int]:
    """(seconds end to end, seconds after the first unit, peak worker RSS) of one ``run_denoise``."""
    import ray

    with WorkerMemory() as memory:
        t0 = time.perf_counter()
        summary = run_denoise(config)
        seconds = time.perf_counter() - t0
    assert summary.failed == 0 and summary.ok == summary.todo, summary
    ray.shutdown()
    return seconds, summary.seconds, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--images-per-batch", type=int, default=2)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--views", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    work = Path(tempfile.mkdtemp(prefix="dvt-bench-"))
    paths = make_corpus(work / "images", args.images)
    base = DenoiseConfig(images=str(work / "images"), output="", model=args.model, weights="none",
                         input_size=args.input_size, preset=args.preset, views=args.views, steps=args.steps,
                         images_per_batch=args.images_per_batch, cpus_per_worker=0.9, progress_every_s=1e9)
    # 0.9 CPU per actor: two actors must leave room for the fetch tasks on a 2-CPU machine (one torch thread each).
    kernel = kernel_seconds(base, paths)
    rows = [("stage-1 kernel alone (1 thread)", kernel, kernel, 0)]
    for workers in (1, 2):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        config = DenoiseConfig(**{**base.__dict__, "output": str(work / f"store-{workers}.zarr"), "workers": workers})
        total, _, peak = job_run(config)
        rows.append((f"denoise job, {workers} worker(s) x 1 CPU", total, total, peak))

    n = len(paths)
    print(f"\n{n} images, {args.model} (random weights) at {args.input_size}, preset {args.preset}, "
          f"{args.images_per_batch} images per batch, {os.cpu_count()} CPU cores\n")
    print("| run | seconds | images/s | overhead vs kernel | worker peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds, _, peak in rows:
        per_worker = 1 if "kernel" in name else int(name.split(",")[1].split()[0])
        overhead = 1 - kernel / (seconds * per_worker)
        print(f"| {name} | {seconds:.1f} | {n / seconds:.3f} | {overhead:+.1%} | "
              f"{peak / 2**20:.0f} MiB |" if peak else f"| {name} | {seconds:.1f} | {n / seconds:.3f} | - | - |")
    one, two = rows[1][1], rows[2][1]
    print(f"\n2-worker scaling efficiency: {one / (2 * two):.1%} (throughput ratio {one / two:.2f}x)")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
