"""Does the machinery around the model keep up with a GPU? The per-image CPU cost of every step around the model,
and ``dvt denoise`` / ``dvt apply`` rates with a backbone that costs nothing but has ViT-B/14's shapes.

Corpus: ``--images`` JPEGs (quality 90, 512x512 crops of the bundled photographs and /work/shared/samples when
present, repeated). Parts:

* ``steps``: each step on one core (``torch.set_num_threads(1)``), ms per image over the corpus: read, decode,
  resize (to 518 px, as ``--input-size 518``), upload (stack + uint8 -> float on the worker's device), forward
  (:mod:`pipeline.testing.zero_vit` at 518 px, normalisation included), host copy + float16 + finiteness check,
  write (two 37x37x768 float16 arrays through zarr, and as direct chunk objects when the store allows it), ledger
  (one manifest part per unit of ``--unit`` images, per image), and stage 1's own CPU work (view sampling and
  crop extraction of the ``default`` preset, on a zero-cost backbone).
* ``denoise``: ``dvt denoise --method average --copies 1`` with the zero-cost backbone at 518 px, one worker.
* ``apply``: ``dvt apply`` with the zero-cost backbone and a random 768-channel denoiser at 518 px (the
  denoiser block is real compute: its in-memory rate is reported beside the job's).

Job rates are steady rates from the store's manifest (commit times after each worker's first unit, so the
start-up is left out), with the whole job's images/s beside them.

* ``draft``: what the opt-in JPEG draft decoding (``--fast-decode``) changes: pixels and the features of
  :mod:`pipeline.testing.artifact_vit` at 224 px on 512 px photos.

    python benchmarks/feed.py --parts steps,draft,denoise,apply --images 256
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MODEL = "pipeline.testing.zero_vit:create"
SIZE = 518
_log = logging.getLogger("feed")


def photo_corpus(folder: Path, n: int, side: int = 512) -> list[Path]:
    """``n`` JPEGs of ``side`` x ``side``: centre crops of the bundled photographs, repeated (each copy flipped or
    shifted a little so no two files are the same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(glob.glob(str(ROOT / "pipeline/samples/*.png")) + glob.glob(str(ROOT / "pipeline/samples/*.jpg")))
    sources += sorted(p for p in glob.glob("/work/shared/samples/*.*") if p.endswith((".png", ".jpg")))
    photos = []
    for p in sources:
        with Image.open(p) as im:
            im = im.convert("RGB")
        scale = side / min(im.size)
        im = im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale))), Image.BICUBIC)
        x, y = (im.width - side) // 2, (im.height - side) // 2
        photos.append(im.crop((x, y, x + side, y + side)))
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            im = photos[i % len(photos)]
            if (i // len(photos)) % 2:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90 - (i // (2 * len(photos))) % 5)
            path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def _ms(fn, items) -> float:
    """CPU milliseconds of this process per item, its I/O threads included (CPU time, not wall time: other
    processes on a shared machine change it far less)."""
    items = list(items)
    fn(items[0])  # warm-up
    began = time.process_time()
    for x in items:
        fn(x)
    return 1e3 * (time.process_time() - began) / len(items)


def part_steps(paths: list[Path], work: Path, unit: int) -> dict[str, float]:
    """CPU ms per image of each step on one core (one torch thread)."""
    from pipeline.io import decode as dec
    from pipeline.store import FeatureStore, StoreLayout
    from pipeline.store.manifest import ImageRecord, write_part
    from pipeline.store.writer import _unit_arrays
    from pipeline.vit.backbone import create_backbone

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    out["read file"] = _ms(lambda p: p.read_bytes(), paths)
    data = [p.read_bytes() for p in paths]
    out["decode"] = _ms(lambda b: dec.decode_image(b), data)
    images = [dec.decode_image(b).pixels for b in data]
    out["resize_to_tensor: resize + float (before)"] = _ms(lambda a: dec.resize_to_tensor(a, SIZE), images)
    new = hasattr(dec, "resize_pixels")
    if new:
        out["resize to uint8 (after; the float conversion moves to the device)"] = _ms(
            lambda a: dec.resize_pixels(a, SIZE), images)
        out["decode + resize, JPEG draft (opt-in; no effect on 512 px sources)"] = _ms(
            lambda b: dec.resize_pixels(dec.decode_image(b, draft=SIZE).pixels, SIZE), data)
    backbone = create_backbone(MODEL, weights="none", img_size=SIZE)
    batches = range(8)
    floats = [dec.resize_to_tensor(a, SIZE) for a in images[:unit]]
    out["upload: stack float32 (before)"] = _ms(lambda _: torch.stack(floats), batches) / unit
    if new:
        u8 = [dec.resize_pixels(a, SIZE) for a in images[:unit]]
        out["upload: uint8 images -> float batch on the device (after, device = CPU here)"] = _ms(
            lambda _: dec.pixels_to_float(u8), batches) / unit
    x = torch.stack(floats)
    with torch.inference_mode():
        out["forward: zero-cost ViT-B/14 shapes, normalisation included"] = _ms(
            lambda _: backbone.features(x), batches) / unit
        feats = backbone.features(x).contiguous()
    url = str(work / "steps.zarr")
    layout = StoreLayout(backbone=MODEL, block=0, input_size=SIZE, patch_size=14, stride=14, grid=(37, 37),
                         channels=768, arrays=("raw", "clean"))
    FeatureStore.create(url, layout, [str(p) for p in paths], overwrite=True)
    store = FeatureStore.open(url, "r+")
    recs = [ImageRecord.coerce({"image_id": i, "uri": str(paths[i])}) for i in range(unit)]
    out["to float16 on the host, numpy (before; 2 arrays)"] = _ms(
        lambda _: [feats.numpy().astype(np.float16) for _ in range(2)], batches) / unit
    out["to float16, torch (after; 2 arrays)"] = _ms(lambda _: [feats.to(torch.float16) for _ in range(2)], batches) / unit
    half = {"raw": feats.to(torch.float16).numpy(), "clean": feats.to(torch.float16).numpy()}
    out["finiteness check (2 arrays)"] = _ms(lambda _: _unit_arrays(store, list(recs), half), batches) / unit
    ids = np.arange(unit)
    out["write 2 arrays through zarr (before)"] = _ms(lambda _: store.write_rows(ids, half), batches) / unit
    try:
        from pipeline.store.direct import DirectChunkWriter
    except ImportError:
        DirectChunkWriter = None
    if DirectChunkWriter is not None:
        direct = DirectChunkWriter.for_store(store, threads=1)
        out["write 2 arrays as chunk objects (after)"] = _ms(lambda _: direct.write(ids, half), batches) / unit
        direct.close()
    out["ledger: one manifest part per unit"] = _ms(lambda k: write_part(store.fs, store.root, recs, f"bench{k}"),
                                                    batches) / unit
    out.update(stage1_steps(images[:4]))
    return {k: round(v, 2) for k, v in out.items()}


def stage1_steps(images: list[np.ndarray]) -> dict[str, float]:
    """Stage 1's own CPU work per image, ``default`` preset, zero-cost backbone at 518 px: the bookkeeping that
    stays on the CPU whatever the device (view boxes, patch coordinates), then what runs on the device (here the
    CPU): rendering the views. (The fit itself is device work: at 518 px it takes CPU-minutes per image.)"""
    from pipeline.io.decode import resize_to_tensor
    from pipeline.stage1.fit import Stage1Config
    from pipeline.vit import views as V

    config = Stage1Config.preset("default")
    vc = config.views
    x = torch.stack([resize_to_tensor(a, SIZE) for a in images])
    out = {}
    ids = list(range(len(images)))

    def bookkeeping(i: int) -> None:
        boxes, flips = V.sample_boxes(vc.num_views, vc, V.view_generator(i, 0))
        V.patch_coords(boxes, flips, SIZE, 14)

    out[f"stage 1: view boxes + patch coordinates ({vc.num_views} views; CPU whatever the device)"] = _ms(bookkeeping, ids)
    boxes, flips = V.sample_boxes(vc.num_views, vc, V.view_generator(0, 0))
    out["stage 1: render the views (device work; CPU here)"] = _ms(lambda i: V.render_views(x[i], boxes, flips, SIZE),
                                                                   ids[:2])
    return out


def part_draft(paths: list[Path], size: int = 224, n: int = 16) -> dict[str, float]:
    """How much the opt-in JPEG draft decoding changes pixels and features: ``n`` photos (512 px, so at least twice
    ``size``) through :mod:`pipeline.testing.artifact_vit` (timm ViT-Ti/16, random weights) at ``size`` px."""
    import torch.nn.functional as F

    from pipeline.io.decode import decode_image, pixels_to_float, resize_pixels
    from pipeline.vit.backbone import create_backbone

    data = [p.read_bytes() for p in paths[:n]]
    full = np.stack([resize_pixels(decode_image(b).pixels, size) for b in data])
    fast = np.stack([resize_pixels(decode_image(b, draft=size).pixels, size) for b in data])
    backbone = create_backbone("pipeline.testing.artifact_vit:create", weights="none", img_size=size)
    with torch.inference_mode():
        a = backbone.features(pixels_to_float(torch.from_numpy(full)))
        b = backbone.features(pixels_to_float(torch.from_numpy(fast)))
    return {"pixels_mean_abs_diff_of_255": round(float(np.abs(full.astype(float) - fast).mean()), 3),
            "features_cosine_mean": round(float(F.cosine_similarity(a, b, dim=-1).mean()), 5),
            "features_cosine_min": round(float(F.cosine_similarity(a, b, dim=-1).min()), 5),
            "features_relative_l2": round(float((a - b).norm() / a.norm()), 5), "input_size": size, "images": n}


def _tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and every process below it, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def run_job(name: str, args: list[str], work: Path, timeout: float) -> dict:
    """Run ``python -m args`` (its own local Ray); wall seconds and the CPU seconds of its whole process tree
    (the job, Ray's processes and workers, sampled every 0.2 s: a machine shared with other work changes this
    figure far less than wall time). Two runs of different sizes give the CPU cost of one more image."""
    log = work / f"{name}.log"
    began = time.monotonic()
    cpu: dict[int, float] = {}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.monotonic() - began > timeout:
                proc.kill()
                raise RuntimeError(f"{name} timed out after {timeout:.0f} s; see {log}")
            for pid, seconds in _tree_cpu(proc.pid).items():
                cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            time.sleep(0.2)
    wall = time.monotonic() - began
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{name} exited {proc.returncode}; see {log}")
    return {"wall_s": round(wall, 1), "cpu_s_process_tree": round(sum(cpu.values()), 1)}


def job_stats(url: str) -> dict:
    from device_jobs import manifest_stats

    stats = manifest_stats(url)
    stats.pop("window", None)
    return stats


def part_denoise(folder: Path, n: int, work: Path, extra: list[str]) -> dict:
    url = str(work / "denoise.zarr")
    job = run_job("denoise", ["jobs.denoise", "--method", "average", "--copies", "1", "--model", MODEL, "--weights",
                              "none", "--input-size", str(SIZE), "--images", str(folder), "--limit", str(n),
                              "--output", url, "--overwrite", "--progress-every", "600", *extra], work, 900)
    return {**job, **job_stats(url)}


def part_apply(folder: Path, n: int, work: Path, extra: list[str]) -> dict:
    from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser

    path = str(work / "denoiser.safetensors")
    config = DenoiserConfig(channels=768, pos_grid=(37, 37))
    spec = DenoiserSpec(denoiser=config, backbone=MODEL, block=0, input_size=(SIZE, SIZE), patch_size=14, stride=14)
    torch.manual_seed(0)
    denoiser = Denoiser(config).eval()
    save_denoiser(path, denoiser, spec)
    with torch.inference_mode():
        feats = torch.randn(8, 37, 37, 768)
        denoiser(feats)
        began = time.perf_counter()
        denoiser(feats)
        denoiser_rate = 8 / (time.perf_counter() - began)
    url = str(work / "apply.zarr")
    job = run_job("apply", ["jobs.apply_denoiser", "--denoiser", path, "--weights", "none", "--images", str(folder),
                            "--limit", str(n), "--output", url, "--overwrite", "--progress-every", "600", *extra],
                  work, 1800)
    return {**job, **job_stats(url), "denoiser_in_memory_images_per_s_all_threads": round(denoiser_rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="steps,denoise,apply")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--apply-images", type=int, default=None, help="default: --images")
    parser.add_argument("--unit", type=int, default=16, help="images per unit in the steps part")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--job-args", default="", help="extra flags for both jobs, e.g. '--cpus-per-worker 1'")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dvt-bench-feed-"))
    paths = photo_corpus(work / "images", args.images)
    results: dict = {"images": args.images, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    parts = args.parts.split(",")
    extra = args.job_args.split()
    if "steps" in parts:
        results["steps_ms_per_image_one_core"] = part_steps(paths, work, args.unit)
    if "draft" in parts:
        results["draft_vs_full_decode"] = part_draft(paths)
    if "denoise" in parts:
        results["denoise"] = part_denoise(work / "images", args.images, work, extra)
    if "apply" in parts:
        results["apply"] = part_apply(work / "images", args.apply_images or args.images, work, extra)
    results["load_after"] = os.getloadavg()[0]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
