"""Stage-1 benchmark: recovery error versus wall-clock time and views, ``paper`` against ``default``, batching.

Everything runs side by side in one process on whatever device ``--device`` names, so the timings compare.
Prints Markdown tables and writes a PNG of raw / clean / G / |h| for one image to ``--out``.

* Synthetic backbone (known answer): recovery error (mean-removed relative error of the clean map) and
  seconds per image for ``paper`` and ``default``. The full run fits the ``paper`` preset at its full 20k
  steps (about 37 minutes per image on 2 CPU cores), plus a 2k-step schedule for the error-versus-time curve; ``--quick``
  runs a 200-step ``paper`` schedule and extrapolates its time to 20k steps (the table says which).
* ``default`` with 8..48 views (error versus views) and images/second for batches of 1, 2, 4, 8.
* A real timm ViT (random weights, sample photographs): no ground truth, so it reports the share of the
  raw feature energy assigned to ``G`` and ``h``, the time, and the ViT's seconds per view; with
  ``--vit-paper-steps`` also how close the default's clean map is to the paper preset's on one image.

    python benchmarks/stage1.py --quick          # ~2-4 min on 2 CPU cores
    python benchmarks/stage1.py                  # ~45 min on 2 CPU cores: the paper preset at its full 20k steps
    python benchmarks/stage1.py --only-vit --vit-paper-steps 2000   # default vs paper on a real ViT image
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stage1 import Stage1Config, fit_images  # noqa: E402
from pipeline.synthetic import SyntheticBackbone, recovery_error, smooth_images  # noqa: E402
from pipeline.view_features import extract_view_features  # noqa: E402
from pipeline.views import ViewConfig  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "samples"
_log = logging.getLogger("benchmarks.stage1")


class Clock:
    """Wall and process-CPU seconds of a block; CPU time stays comparable when other jobs share the machine."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window, so each row reports its own peak rather than the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        except OSError:
            pass


def peak_mem(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB alloc"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB RSS"
    except OSError:
        pass
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process)"


def _progress(tag: str):
    t0 = time.perf_counter()

    def report(step: int, steps: int, losses: dict[str, float]) -> None:
        _log.info("%s: step %d/%d, %.0f s, mse %.4f cos %.4f", tag, step + 1, steps, time.perf_counter() - t0,
                  losses["mse"], losses["cos"])
    return report


def synthetic_rows(args, device) -> tuple[list[str], dict]:
    bb = SyntheticBackbone(embed_dim=args.dim, patch_size=16, noise_std=0.1, outlier_prob=0.01, seed=0).to(device)
    images = smooth_images(args.images, args.size, seed=0).to(device)
    true = bb.clean_map(images).cpu()
    gh, gw = bb.grid(args.size)
    rows = [f"Synthetic backbone: {args.images} images {args.size}px ({gh}x{gw} patches, C={args.dim}), "
            f"noise 0.1, 1% outliers, device {device}.", "",
            "| preset | views | steps | wall s/image | CPU s/image | measured or extrapolated | recovery error | peak memory |",
            "|---|---|---|---|---|---|---|---|"]
    raw_err = recovery_error(bb.features(images).cpu(), true)
    rows.append(f"| raw features | - | - | - | - | - | {raw_err:.3f} | - |")
    ids = list(range(args.images))
    # paper: the reference schedule shortened to --paper-steps; time extrapolated to 20k steps.
    paper = Stage1Config.preset("paper")
    with Clock() as cv:
        for i in ids:
            extract_view_features(bb, images[i], paper.views, image_id=i, seed=0, chunk=paper.view_chunk)
    v_wall, v_cpu = cv.wall / len(ids), cv.cpu / len(ids)
    out = {}
    for steps in args.paper_steps:
        cfg = paper.replace(steps=steps)
        reset_peak(device)
        with Clock() as c:
            res = [fit_images(bb, images[i:i + 1], cfg, image_ids=[i], seed=0, progress=_progress(f"paper {steps}"))[0]
                   for i in ids]
        wall, cpu = c.wall / len(ids), c.cpu / len(ids)
        s_wall, s_cpu = max(wall - v_wall, 0.0) / steps, max(cpu - v_cpu, 0.0) / steps
        err = recovery_error(torch.stack([r.clean for r in res]), true)
        full_wall, full_cpu = v_wall + s_wall * paper.steps, v_cpu + s_cpu * paper.steps
        tag = "paper" if steps == paper.steps else f"paper ({steps} of {paper.steps} steps)"
        rows.append(f"| {tag} | 768 | {steps} | {wall:.1f} | {cpu:.1f} | measured | {err:.3f} | {peak_mem(device)} |")
        if steps == paper.steps:
            out["paper"] = (wall, cpu, err, res[0], "measured")
        elif steps == max(args.paper_steps):
            rows.append(f"| paper ({paper.steps} steps, time only) | 768 | {paper.steps} | {full_wall:.0f} | "
                        f"{full_cpu:.0f} | extrapolated: views measured ({v_cpu:.1f} CPU s) + {s_cpu * 1e3:.0f} CPU "
                        f"ms/step x {paper.steps} | (<= {err:.3f} if converged) | - |")
            out["paper"] = (full_wall, full_cpu, err, res[0], f"extrapolated from {steps} steps")
    for views in args.default_views:
        cfg = Stage1Config.preset("default", views=ViewConfig(num_views=views))
        reset_peak(device)
        with Clock() as c:
            res = fit_images(bb, images, cfg, image_ids=ids, seed=0)
        wall, cpu = c.wall / len(ids), c.cpu / len(ids)
        err = recovery_error(torch.stack([r.clean for r in res]), true)
        tag = "default" + ("" if views == Stage1Config.preset("default").views.num_views else f" ({views} views)")
        rows.append(f"| {tag} | {views} | {cfg.steps} | {wall:.2f} | {cpu:.2f} | measured | {err:.3f} | "
                    f"{peak_mem(device)} |")
        if tag == "default":
            out["default"] = (wall, cpu, err, res[0])
    if "paper" in out and "default" in out:
        (pw, pc, ep, _, how), (dw, dc, ed, _) = out["paper"], out["default"]
        rows += ["", f"default vs paper at 20k steps ({how}): {pw / dw:.0f}x less wall time, {pc / dc:.0f}x less "
                     f"CPU time per image; recovery error {ed:.3f} vs {ep:.3f} ({(ed / ep - 1) * 100:+.0f}%)."]
    # images/s vs batch size (default preset)
    rows += ["", "| batch | images/s wall (default) | images/CPU-s | wall s/batch | peak memory |", "|---|---|---|---|---|"]
    cfg = Stage1Config.preset("default")
    batch_images = smooth_images(max(args.batches), args.size, seed=1).to(device)
    for b in args.batches:
        reset_peak(device)
        with Clock() as c:
            fit_images(bb, batch_images[:b], cfg, image_ids=list(range(b)), seed=0)
        rows.append(f"| {b} | {b / c.wall:.2f} | {b / c.cpu:.2f} | {c.wall:.2f} | {peak_mem(device)} |")
    out["bb"] = bb
    return rows, out


def load_names(n: int) -> list[str]:
    return ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"][:n]


def load_samples(size: int, n: int) -> torch.Tensor:
    from PIL import Image

    ims = []
    for name in load_names(n):
        im = Image.open(SAMPLES / name).convert("RGB").resize((size, size), Image.BICUBIC)
        ims.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(ims).permute(0, 3, 1, 2).float() / 255


def real_vit_rows(args, device) -> tuple[list[str], object]:
    from pipeline.backbone import create_backbone

    bb = create_backbone(args.vit, weights="none", img_size=args.vit_size).to(device)
    images = load_samples(args.vit_size, args.vit_images).to(device)
    t = time.perf_counter()
    with torch.no_grad():
        bb.features(images[:1].expand(8, -1, -1, -1).contiguous())
    per_view = (time.perf_counter() - t) / 8
    cfg = Stage1Config.preset("default")
    with Clock() as c:
        res = fit_images(bb, images, cfg, image_ids=list(range(len(images))), seed=0)
    per_image = c.wall / len(images)

    def energy(x: torch.Tensor) -> float:
        return float((x - x.mean((0, 1))).square().sum())

    share_g = sum(energy(r.artifact) for r in res) / sum(energy(r.raw) for r in res)
    share_clean = sum(energy(r.clean) for r in res) / sum(energy(r.raw) for r in res)
    gh, gw = bb.grid(args.vit_size)
    rows = [f"Real ViT {args.vit} (random weights), {len(images)} sample photos at {args.vit_size}px "
            f"({gh}x{gw} patches, C={bb.embed_dim}).", "",
            "| preset | views | s/image | ViT s/view | paper's 768 ViT passes (extrapolated) | G energy / raw | "
            "clean energy / raw | mean |h| | final mse, cos |", "|---|---|---|---|---|---|---|---|---|",
            f"| default | {cfg.views.num_views} | {per_image:.2f} | {per_view:.3f} | {769 * per_view:.0f} s | "
            f"{share_g:.2f} | {share_clean:.2f} | {res[0].residual_norm_mean:.2f} | "
            f"{res[0].losses['mse']:.3g}, {res[0].losses['cos']:.3g} |"]
    if args.vit_paper_steps:
        # No ground truth on a real ViT: compare the default's clean map with the paper preset's on the first image.
        paper = Stage1Config.preset("paper", steps=args.vit_paper_steps)
        with Clock() as c:
            ref = fit_images(bb, images[:1], paper, image_ids=[0], seed=0, progress=_progress("vit paper"))[0]
        ours = res[0]
        centred = [(m - m.mean((0, 1))).reshape(-1, m.shape[-1]) for m in (ours.clean, ref.clean, ref.raw)]
        cos = torch.nn.functional.cosine_similarity(centred[0], centred[1], dim=-1).mean()
        rel = (centred[0] - centred[1]).norm() / centred[1].norm()
        raw_rel = (centred[2] - centred[1]).norm() / centred[1].norm()
        rows += ["", f"| image 0 | paper ({args.vit_paper_steps} steps) s | default s | default vs paper clean: "
                     "mean cosine | relative difference | raw vs paper clean: relative difference |",
                 "|---|---|---|---|---|---|",
                 f"| {load_names(1)[0]} | {c.wall:.0f} | {ours.seconds:.1f} | {cos:.3f} | {rel:.3f} | {raw_rel:.3f} |"]
    return rows, res[0]


def save_png(result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pca_rgb(maps):
        flat = torch.cat([m.reshape(-1, m.shape[-1]) for m in maps])
        mean = flat.mean(0)
        _, _, v = torch.pca_lowrank(flat - mean, q=3, center=False)
        out = []
        for m in maps:
            p = (m.reshape(-1, m.shape[-1]) - mean) @ v
            out.append(p)
        allp = torch.cat(out)
        lo, hi = allp.quantile(0.01, 0), allp.quantile(0.99, 0)
        return [((p - lo) / (hi - lo)).clamp(0, 1).reshape(*m.shape[:2], 3).numpy() for p, m in zip(out, maps)]

    raw, clean, art = pca_rgb([result.raw, result.clean, result.artifact])
    fig, ax = plt.subplots(1, 4, figsize=(13, 3.4))
    for a, img, name in zip(ax, [raw, clean, art, result.residual_norm.numpy()],
                            ["raw (PCA)", "clean F (PCA)", "artifact G (PCA)", "|h| residual norm"]):
        a.imshow(img, interpolation="nearest")
        a.set_title(name)
        a.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small problem and short paper run (~2-4 min on 2 cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    p.add_argument("--vit", default="vit_small_patch14_dinov2")
    p.add_argument("--no-vit", action="store_true")
    p.add_argument("--vit-paper-steps", type=int, default=0, help="also fit the paper preset (this many steps) on "
                   "the first real image and compare the clean maps (0: skip)")
    p.add_argument("--only-vit", action="store_true", help="skip the synthetic backbone")
    p.add_argument("--paper-steps", type=int, nargs="+", help="paper-preset schedules to run (default: 200 with "
                   "--quick, else 2000 and the full 20000)")
    args = p.parse_args(argv)
    q = args.quick
    args.size, args.dim, args.images = (160, 32, 1) if q else (224, 64, 1)
    args.paper_steps = args.paper_steps or ([200] if q else [2000, 20000])
    args.default_views = [24, 8] if q else [24, 8, 16, 48]
    args.batches = [1, 2, 4] if q else [1, 2, 4, 8]
    args.vit_size, args.vit_images = (126, 1) if q else (224, 3)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    _log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    rows, out = ([], {}) if args.only_vit else synthetic_rows(args, device)
    print("\n".join(rows) + "\n", flush=True)
    if "default" in out:
        save_png(out["default"][3], args.out / "stage1_synthetic.png", "stage 1 default preset, synthetic backbone")
    if not args.no_vit:
        vrows, vres = real_vit_rows(args, device)
        print("\n".join(vrows) + "\n", flush=True)
        save_png(vres, args.out / "stage1_vit.png", f"stage 1 default preset, {args.vit} (random weights)")
    print(f"total benchmark time {time.perf_counter() - t0:.0f}s; torch threads {torch.get_num_threads()}; "
          f"PNGs in {args.out}")


if __name__ == "__main__":
    main()
