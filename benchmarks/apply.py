"""``dvt apply`` against the backbone's own speed, in one run on one machine (target: the job end to end at >= 0.8x
the plain forward's images/s with one worker).

Three rows over the same ``--images`` PNG files (square crops of the bundled photos at ``--size``):

* plain forward: the backbone alone on decoded, batched pixels already in memory, as a timm user runs it
  (``torch.inference_mode``, ``--batch`` images per call), in a Ray task with the apply worker's CPUs and thread
  count (so that on a shared machine both are scheduled alike), before and after the job;
* backbone + denoiser: :class:`pipeline.stage2.denoiser.DenoisedViT` the same way;
* ``dvt apply``: :func:`pipeline.stage2.apply.run_apply` with one worker, from the listing to committed store units
  (fetch, decode, resize, forward, float16 store writes), end to end: its summary's images over the job's
  seconds, the actor's start-up included, so the ratio is a lower bound on the steady state's; and its steady
  rate, from the store's commit times after the worker's first unit (start-up left out).

The denoiser has random weights (its speed does not depend on them) unless ``--denoiser`` names a file.

    python benchmarks/apply.py --images 512
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# benchmarks/ last on the path (Python puts a script's folder first): benchmarks/requests.py must not hide the
# requests package, which Ray Data imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from pipeline.stage2.apply import ApplyConfig, run_apply  # noqa: E402
from pipeline.vit.backbone import create_backbone  # noqa: E402
from pipeline.analysis.chain import write_photo_crops  # noqa: E402
from pipeline.stage2.denoiser import DenoisedViT, Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser  # noqa: E402
from pipeline.analysis.feature_maps import load_image  # noqa: E402


def random_denoiser(model: str, size: int, path: str) -> str:
    backbone = create_backbone(model, weights="none", img_size=size)
    grid = backbone.grid(size)
    config = DenoiserConfig(channels=backbone.embed_dim, pos_grid=grid)
    spec = DenoiserSpec(denoiser=config, backbone=model, block=backbone.block, input_size=(size, size),
                        patch_size=backbone.patch_size, stride=backbone.stride)
    return save_denoiser(path, Denoiser(config), spec)


@torch.inference_mode()
def rate(fn, pixels: torch.Tensor, batch: int) -> float:
    fn(pixels[:batch])  # warm-up
    began = time.perf_counter()
    for i in range(0, len(pixels), batch):
        fn(pixels[i:i + batch])
    return len(pixels) / (time.perf_counter() - began)


def in_memory_rates(denoiser: str, uris: list[str], size: int, batch: int, threads: int) -> tuple[float, float]:
    """(plain forward, backbone + denoiser) images/s on decoded pixels; run as a Ray task with the apply worker's
    CPUs and threads, so both sides are scheduled alike on a shared machine."""
    torch.set_num_threads(threads)
    pixels = torch.stack([load_image(u, size) for u in uris])
    model = DenoisedViT.from_file(denoiser, weights="none")
    return rate(model.backbone.features, pixels, batch), rate(model.features, pixels, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pipeline.testing.artifact_vit:create")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (and per apply unit)")
    parser.add_argument("--denoiser", default=None, help="a trained denoiser file (default: random weights)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    import ray

    work = args.workdir or tempfile.mkdtemp(prefix="dvt-bench-apply-")
    folder = os.path.join(work, "images")
    uris = write_photo_crops(folder, ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg"),
                             args.images, args.size)
    denoiser = args.denoiser or random_denoiser(args.model, args.size, os.path.join(work, "denoiser.safetensors"))
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = 0.9 * ray.cluster_resources()["CPU"]  # what one apply worker gets by default
    threads = max(1, round(cpus))
    measure = ray.remote(num_cpus=cpus)(in_memory_rates)
    load = [os.getloadavg()[0]]
    # In-memory rates before and after the job, so that a change in the machine's load shows up
    before = ray.get(measure.remote(denoiser, uris, args.size, args.batch, threads))
    plain, both = [before[0]], [before[1]]
    url = os.path.join(work, "applied.zarr")
    summary = run_apply(ApplyConfig(images=folder, output=url, denoiser=denoiser, weights="none", workers=1,
                                    images_per_batch=args.batch, overwrite=True, progress_every_s=600))
    from device_jobs import manifest_stats  # noqa: E402  (benchmarks/, beside this file)

    steady = manifest_stats(url)["steady_images_per_s"] or 0.0
    after = ray.get(measure.remote(denoiser, uris, args.size, args.batch, threads))
    plain.append(after[0])
    both.append(after[1])
    load.append(os.getloadavg()[0])
    ray.shutdown()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    base = sum(plain) / len(plain)
    print(f"\nApply speed: {args.model} at {args.size} px, {args.images} images, batch {args.batch}, "
          f"{threads} torch threads ({os.cpu_count()} CPUs; 1-minute load average {load[0]:.1f} before, "
          f"{load[1]:.1f} after)\n")
    print("| what | images/s | x plain forward |\n|---|---|---|")
    for name, r in ((f"plain forward, in memory (before / after the job: {plain[0]:.2f} / {plain[1]:.2f})", base),
                    (f"backbone + denoiser, in memory ({both[0]:.2f} / {both[1]:.2f})", sum(both) / len(both)),
                    (f"dvt apply end to end ({summary.seconds:.1f} s, worker start included)",
                     summary.images_per_second),
                    ("dvt apply steady (commits after the worker's first unit, start-up left out)", steady)):
        print(f"| {name} | {r:.2f} | {r / base:.2f} |")


if __name__ == "__main__":
    main()
