"""Does the machinery around the model keep up with a GPU? The per-image CPU cost of every step around the model,
and ``dvt denoise`` / ``dvt apply`` rates with a backbone that costs nothing but has ViT-B/14's shapes.

Corpus: ``--images`` JPEGs (quality 90, 512x512 crops of the bundled photographs and /work/shared/samples when
present, repeated). Parts:

* ``steps``: each step on one core (``torch.set_num_threads(1)``), ms per image over the corpus: read, decode,
  resize (to 518 px, as ``--input-size 518``), upload (stack + uint8 -> float on the worker's device), forward
  (:mod:`pipeline.testing.zero_vit` at 518 px, normalisation included), host copy + float16 + finiteness check,
  write (two 37x37x768 float16 arrays through zarr, and as direct chunk objects when the store allows it), ledger
  (one manifest part per unit of ``--unit`` images, per image), and stage 1's own work per step (``default``
  preset, zero-cost backbone): what stays on the host, and the device work (views, closed-form solve, read-out).
* ``denoise``: ``dvt denoise --method average --copies 1`` with the zero-cost backbone at 518 px, one worker.
* ``apply``: ``dvt apply`` with the zero-cost backbone and a zero-cost denoiser at 518 px: a real denoiser file
  (768 channels, positional embedding on 37x37, one transformer block with random weights), read and checked as
  ``dvt apply`` does, whose block the workers replace by the identity (:mod:`pipeline.testing.zero_denoiser`);
  the embedding is still added, so ``raw`` and ``clean`` differ and both are converted and written.
* ``apply-block``: the same with the real block (about 0.5 s per image on a CPU; its in-memory rate is reported).
* ``dvt``: ``dvt denoise`` with its default method (stage 1, ``default`` preset) and the zero-cost backbone,
  ``--dvt-images`` images (stage 1's solve takes seconds per image on a CPU).

Job parts also give CPU milliseconds per committed image in the steady part of the run (between the commits of
20% and 80% of the images), per kind of process (from /proc, sampled every 0.2 s), and the model worker's by
thread: its pools by name (``dvt-decode``, ``dvt-chunks``; Ray runs the actor's calls in ``Dummy-*`` threads),
named with ``py-spy dump`` where py-spy is installed, and its native threads (torch's intra-op pool). They also
give the share of the machine's CPU time its host took for other guests while the job ran (``steal_share``, from
/proc/stat): on a shared virtual machine the rates move with it, CPU per image far less.

Job rates are steady rates from the store's manifest (commit times after each worker's first unit, so the
start-up is left out), with the whole job's images/s beside them.

* ``draft``: what the opt-in JPEG draft decoding (``--fast-decode``) changes: pixels and the features of
  :mod:`pipeline.testing.artifact_vit` at 224 px on 512 px photos.

    python benchmarks/feed.py --parts steps,draft,denoise,apply --images 256
    python benchmarks/feed.py --parts apply --images 512
    python benchmarks/feed.py --parts dvt --dvt-images 16
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.argv[1:2] == ["apply-job"]:
    # The job's driver: benchmarks/ must not be on its path (benchmarks/requests.py would shadow the package, and
    # Ray hands the driver's path to its workers).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
    sys.path.insert(0, str(ROOT))
else:
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
    out["resize with PIL's Image.resize, uint8 (HWC)"] = _ms(
        lambda a: np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.Resampling.BICUBIC, reducing_gap=None)),
        images)
    out["resize_to_tensor: resize + float"] = _ms(lambda a: dec.resize_to_tensor(a, SIZE), images)
    new = hasattr(dec, "resize_pixels")
    if new:
        out["resize_pixels: resize to uint8 (the float conversion is the device's)"] = _ms(
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
    out.update(stage1_steps(images[:2]))
    return {k: round(v, 2) for k, v in out.items()}


def stage1_steps(images: list[np.ndarray]) -> dict[str, float]:
    """Stage 1's own work per image, ``default`` preset, zero-cost backbone at 518 px, one CPU core: the host work
    that stays on the CPU whatever the device (view boxes, the fit's random starts), then the device work (here
    the CPU): views rendered and through the backbone, the closed-form solve (per iteration and all of them),
    the read-out."""
    from pipeline.io.decode import resize_to_tensor
    from pipeline.stage1.fit import Stage1Config, _readout, fit_generator
    from pipeline.stage1.noise_model import NoiseModel
    from pipeline.stage1.view_features import extract_batch
    from pipeline.vit import views as V
    from pipeline.vit.backbone import create_backbone

    config = Stage1Config.preset("default")
    vc = config.views
    backbone = create_backbone(MODEL, weights="none", img_size=SIZE)
    x = torch.stack([resize_to_tensor(a, SIZE) for a in images])
    b = len(images)
    ids = list(range(b))
    out = {}

    def bookkeeping(i: int) -> None:
        boxes, flips = V.sample_boxes(vc.num_views, vc, V.view_generator(i, 0))
        V.patch_coords(boxes, flips, SIZE, 14)

    n_views = vc.num_views + 1
    out[f"stage 1 host: view boxes + patch coordinates ({vc.num_views} views)"] = _ms(bookkeeping, ids)
    batch = extract_batch(backbone, x, vc, image_ids=ids, seed=0, chunk=config.view_chunk)
    full = batch.full_coords

    def model() -> NoiseModel:  # as fit_views builds it
        closed = config.linear_solve_iters > 0 and config.steps == 0
        gens = [fit_generator(i, 0) for i in ids]
        return NoiseModel(config.field, 768, full, full, gens, g_init_std=0.0 if closed else config.g_init_std,
                          residual=config.residual and config.steps > 0)

    out["stage 1 host: fit set-up (generators, random starts; F's zero grid too, as the device is the CPU)"] = _ms(
        lambda _: model(), range(3)) / b
    out["stage 1 host: fit set-up as it was (G's and h's starts drawn, F's zero grid on the host)"] = _ms(
        lambda _: NoiseModel(config.field, 768, full, full, [fit_generator(i, 0) for i in ids],
                             g_init_std=config.g_init_std, residual=config.residual), range(3)) / b
    boxes, flips = V.sample_boxes(vc.num_views, vc, V.view_generator(0, 0))
    out[f"stage 1 device: render {n_views} views"] = _ms(lambda i: V.render_views(x[i], boxes, flips, SIZE), ids)
    rendered = V.render_views(x[0], boxes, flips, SIZE)
    with torch.inference_mode():
        out[f"stage 1 device: zero-cost backbone over {n_views} views"] = _ms(
            lambda _: backbone.features(rendered), range(2))
    out["stage 1 device: view features in all (render, backbone, checks, stacking)"] = _ms(
        lambda _: extract_batch(backbone, x, vc, image_ids=ids, seed=0, chunk=config.view_chunk), range(1)) / b
    solve = {}
    for iters in (1, 5):  # one iteration and five, twice each: the difference is 4 iterations
        solve[iters] = _ms(lambda _: model().solve_linear(
            batch.raw, batch.xy, batch.views, iters, full_weight=config.full_view_weight,
            high_norm=config.high_norm, smooth=config.field_smooth), range(2)) / b
    per_iter = (solve[5] - solve[1]) / 4
    out["stage 1 device: closed-form solve, one iteration"] = per_iter
    out["stage 1 device: closed-form solve, set-up (high-norm mask, interpolation operator)"] = solve[1] - per_iter
    out[f"stage 1 device: closed-form solve, all {config.linear_solve_iters} iterations + set-up"] = \
        solve[1] + (config.linear_solve_iters - 1) * per_iter
    fitted = model()
    fitted.solve_linear(batch.raw, batch.xy, batch.views, 1)
    out["stage 1 device: read-out (F on the full grid, losses and residual norms over every token)"] = _ms(
        lambda _: _readout(fitted, batch.raw, batch.xy, full, batch.views, config, ids, use_residual=False),
        range(1)) / b
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


def _stat(path: str) -> tuple[int, float] | None:
    """Parent pid and CPU seconds (user + system) from a /proc ``stat`` file (a process's or a thread's), or
    ``None`` when it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """Name (the start of its command line, Ray's process title for workers) and CPU seconds (user + system) of
    ``root`` and every process below it, from /proc."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(f"/proc/{entry}/stat")) is not None:
            stats[int(entry)] = stat
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    out = {}
    for pid in tree & set(stats):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            name = "?"
        out[pid] = (name, stats[pid][1])
    return out


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, from /proc."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    stats = {int(tid): _stat(f"/proc/{pid}/task/{tid}/stat") for tid in tids}
    return {tid: stat[1] for tid, stat in stats.items() if stat is not None}


_PY_SPY = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
_THREAD_LINE = re.compile(r'^Thread (\d+) \(\w+\): "(.*)"', re.M)


def _python_thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name of a running process (``py-spy dump``; empty without py-spy). Threads
    not in it are native: torch's intra-op pool, Ray's core-worker threads."""
    if _PY_SPY is None:
        return {}
    try:
        text = subprocess.run([_PY_SPY, "dump", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in _THREAD_LINE.findall(text)}


def _thread_group(name: str | None) -> str:
    """A thread pool's name without its index (``dvt-decode_3`` -> ``dvt-decode``)."""
    if name is None:
        return "native threads (torch intra-op, Ray core worker)"
    return re.sub(r"_\d+$", "", name)


def _process_kind(pid: int, name: str, root: int) -> str:
    """Which part of a job a process is, for the per-process CPU table."""
    if pid == root:
        return "driver"
    if name.startswith("ray::") and "Worker" in name:
        return "model worker"
    if name.startswith("ray::"):
        return "other Ray workers (fetch/decode tasks, stats and autoscaling actors, idle)"
    return "Ray's processes (raylet, GCS, dashboard agent, log monitor)"


def _cpu_ticks() -> tuple[int, int]:
    """(steal, all) ticks of the machine's CPUs since boot (/proc/stat): on a virtual machine, time its host gave
    to others, which slows every figure here by more than the load average shows."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[7] if len(values) > 7 else 0, sum(values[:8])


def run_job(name: str, args: list[str], work: Path, timeout: float) -> dict:
    """Run ``python args`` (its own local Ray); wall seconds and the CPU seconds of its whole process tree
    (the job, Ray's processes and workers, sampled every 0.2 s: a machine shared with other work changes this
    figure far less than wall time). The samples stay in ``_samples`` for :func:`steady_cpu`."""
    log = work / f"{name}.log"
    steal_before, ticks_before = _cpu_ticks()
    began = time.monotonic()
    cpu: dict[int, float] = {}
    samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
    threads: list[tuple[float, dict[int, dict[int, float]]]] = []  # model workers' threads, per sample
    names: dict[int, str] = {}
    next_names = began + 5.0
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.monotonic() - began > timeout:
                proc.kill()
                raise RuntimeError(f"{name} timed out after {timeout:.0f} s; see {log}")
            tree = _tree_cpu(proc.pid)
            now = time.time()
            samples.append((now, tree))
            workers = [pid for pid, (name, _) in tree.items() if _process_kind(pid, name, proc.pid) == "model worker"]
            threads.append((now, {pid: _thread_cpu(pid) for pid in workers}))
            if workers and time.monotonic() > next_names:  # pools start lazily: name the threads every 5 s
                for pid in workers:
                    names.update(_python_thread_names(pid))
                next_names = time.monotonic() + 5.0
            for pid, (_, seconds) in tree.items():
                cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            time.sleep(0.2)
    wall = time.monotonic() - began
    steal, ticks = (a - b for a, b in zip(_cpu_ticks(), (steal_before, ticks_before)))
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{name} exited {proc.returncode}; see {log}")
    return {"wall_s": round(wall, 1), "cpu_s_process_tree": round(sum(cpu.values()), 1),
            "steal_share": round(steal / max(ticks, 1), 3), "load_after": round(os.getloadavg()[0], 2),
            "_samples": samples, "_root": proc.pid, "_threads": threads, "_thread_names": names}


def steady_cpu(job: dict, url: str) -> dict[str, float]:
    """CPU milliseconds per committed image in the steady part of a run (between the commits of 20% and 80% of
    its images), per kind of process: what one image costs once the job runs, start-up and tail left out."""
    from pipeline.store import FeatureStore

    samples, root = job.pop("_samples"), job.pop("_root")
    threads, names = job.pop("_threads"), job.pop("_thread_names")
    rows = FeatureStore.open(url).manifest().to_pylist()
    times = sorted(r["written_at"].timestamp() for r in rows)
    lo, hi = times[int(0.2 * len(times))], times[int(0.8 * len(times)) - 1]
    images = sum(lo < t <= hi for t in times)
    if images == 0 or not samples:
        return {}

    def at(t: float) -> dict[int, tuple[str, float]]:
        return min(samples, key=lambda s: abs(s[0] - t))[1]

    before, after = at(lo), at(hi)
    out: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        kind = _process_kind(pid, name, root)
        out[kind] = out.get(kind, 0.0) + seconds - (before.get(pid, (name, 0.0))[1])
    out = {k: round(1e3 * v / images, 1) for k, v in sorted(out.items())}
    out["total"] = round(sum(out.values()), 1)
    # the model worker's CPU by thread (pool), so run-to-run differences show where they are
    t_before = min(threads, key=lambda s: abs(s[0] - lo))[1]
    t_after = min(threads, key=lambda s: abs(s[0] - hi))[1]
    by_thread: dict[str, float] = {}
    for pid, per_tid in t_after.items():
        for tid, seconds in per_tid.items():
            group = "MainThread" if tid == pid else _thread_group(names.get(tid))
            by_thread[group] = by_thread.get(group, 0.0) + seconds - t_before.get(pid, {}).get(tid, 0.0)
    if by_thread:
        out["model_worker_by_thread"] = {k: round(1e3 * v / images, 2)
                                         for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1])}
    out["window_images"] = images
    out["window_images_per_s"] = round(images / (hi - lo), 1)
    return out


def job_stats(url: str) -> dict:
    from device_jobs import manifest_stats

    stats = manifest_stats(url)
    stats.pop("window", None)
    return stats


def part_denoise(folder: Path, n: int, work: Path, extra: list[str]) -> dict:
    url = str(work / "denoise.zarr")
    job = run_job("denoise", ["-m", "jobs.denoise", "--method", "average", "--copies", "1", "--model", MODEL,
                              "--weights", "none", "--input-size", str(SIZE), "--images", str(folder), "--limit",
                              str(n), "--output", url, "--overwrite", "--progress-every", "600", *extra], work, 900)
    cpu = steady_cpu(job, url)
    return {**job, **job_stats(url), "steady_cpu_ms_per_image": cpu}


def part_dvt(folder: Path, n: int, work: Path, extra: list[str]) -> dict:
    """``dvt denoise`` with its default method (stage 1, ``default`` preset) and the zero-cost backbone: what
    stage 1's own work costs per image when the backbone costs nothing."""
    url = str(work / "dvt.zarr")
    job = run_job("dvt", ["-m", "jobs.denoise", "--model", MODEL, "--weights", "none", "--input-size", str(SIZE),
                          "--images", str(folder), "--limit", str(n), "--output", url, "--overwrite",
                          "--progress-every", "600", *extra], work, 1800)
    cpu = steady_cpu(job, url)
    return {**job, **job_stats(url), "steady_cpu_ms_per_image": cpu}


def _denoiser_file(work: Path) -> tuple[str, float]:
    """A denoiser file with the real shapes (768 channels, positional embedding on 37x37, one block; random
    weights) for the zero-cost backbone, and the block's in-memory rate (images/s, all threads)."""
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
        rate = 8 / (time.perf_counter() - began)
    return path, rate


def part_apply(folder: Path, n: int, work: Path, extra: list[str], *, real_block: bool = False) -> dict:
    """``dvt apply`` with the zero-cost backbone and a denoiser file of the real shapes. By default the
    denoiser's transformer block is replaced by the identity in the workers
    (:mod:`pipeline.testing.zero_denoiser`), so the run measures the machinery; ``real_block`` runs the block
    (about 0.5 s per image on a CPU)."""
    path, rate = _denoiser_file(work)
    url = str(work / "apply.zarr")
    flags = ["--denoiser", path, "--weights", "none", "--images", str(folder), "--limit", str(n), "--output", url,
             "--overwrite", "--progress-every", "600", *extra]
    entry = ["-m", "jobs.apply_denoiser"] if real_block else [str(Path(__file__).resolve()), "apply-job"]
    job = run_job("apply", entry + flags, work, 1800)
    cpu = steady_cpu(job, url)
    out = {**job, **job_stats(url), "steady_cpu_ms_per_image": cpu,
           "denoiser_block": "real (random weights)" if real_block else "identity (zero-cost)"}
    if real_block:
        out["denoiser_in_memory_images_per_s_all_threads"] = round(rate, 2)
    return out


def apply_job(argv: list[str]) -> int:
    """``dvt apply`` as the command line runs it (same flags, same checks, same job), with
    :class:`pipeline.testing.zero_denoiser.ZeroBlockApplyWorker` as the worker."""
    from jobs import apply_denoiser
    from jobs.cli import _configure_logging, run_job as cli_run_job
    from jobs.flags import image_job_config
    from pipeline.runtime.failures import EXIT_SOME_FAILED
    from pipeline.runtime.plan import run_plan
    from pipeline.stage2.apply import ApplyConfig
    from pipeline.testing.zero_denoiser import zero_block_plan

    parser = argparse.ArgumentParser(prog="feed.py apply-job", description=apply_job.__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    apply_denoiser.add_arguments(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)

    def run(args: argparse.Namespace) -> int:
        summary = run_plan(zero_block_plan(image_job_config(ApplyConfig, args)))
        return EXIT_SOME_FAILED if summary.failed else 0

    return cli_run_job(run, args)


def main() -> None:
    if sys.argv[1:2] == ["apply-job"]:
        sys.exit(apply_job(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="steps,denoise,apply")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--apply-images", type=int, default=None, help="default: --images")
    parser.add_argument("--dvt-images", type=int, default=48, help="images of the dvt part (stage 1 on a CPU is slow)")
    parser.add_argument("--unit", type=int, default=16, help="images per unit in the steps part")
    parser.add_argument("--workdir", default=None,
                        help="keep the corpus and stores here (default: a temporary folder, removed at the end: a "
                             "1024-image run writes 8 GB of stores)")
    parser.add_argument("--job-args", default="", help="extra flags for both jobs, e.g. '--cpus-per-worker 1'")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workdir:
        run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="dvt-bench-feed-") as work:
            run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    paths = photo_corpus(work / "images", args.images)
    results: dict = {"images": args.images, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
                     # the steps part runs in this process: with torch's huge-page allocations or without
                     "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
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
    if "apply-block" in parts:
        results["apply_block"] = part_apply(work / "images", args.apply_images or args.images, work, extra,
                                            real_block=True)
    if "dvt" in parts:
        results["dvt"] = part_dvt(work / "images", min(args.dvt_images, args.images), work, extra)
    results["load_after"] = os.getloadavg()[0]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
