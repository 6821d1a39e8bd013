"""Stage 1 benchmark: the synthetic families (known answer) for raw, ``paper`` at its full schedule and
``default``; and a real timm ViT (no answer: energies, time, and closeness to the paper preset).

Each family of :data:`pipeline.testing.synthetic.FAMILIES` is a problem with a known clean map (in stage 1's gauge:
the artifact has zero mean over the view grid). Every fit is scored the way users use a clean map, with the
mean kept: uncentred error, mean token cosine to the truth, the ratio of mean-vector norms, and the centred
error next to them (:func:`pipeline.testing.synthetic.clean_scores`).

The ``paper`` preset at its full 20k steps costs ~15-30 CPU-minutes per image, so its fits can be run once
(here or on a GPU) and saved with ``--save-reference``; later runs load them with ``--reference`` and time the
paper preset on a short schedule, extrapolated (the table says which). Everything else runs side by side.

    python benchmarks/stage1.py --paper-steps 20000 --save-reference outputs/benchmarks/paper_ref.pt
    python benchmarks/stage1.py --reference outputs/benchmarks/paper_ref.pt --paper-time-steps 500  # default vs it
    python benchmarks/stage1.py --reference REF --candidate views=48 --candidate full_view_weight=20  # a sweep
    python benchmarks/stage1.py --reference REF --preset quality  # another preset beside the default
    python benchmarks/stage1.py --families none --vit vit_small_patch14_dinov2 --vit-paper-steps 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stage1.field import FieldConfig  # noqa: E402
from pipeline.stage1.fit import Stage1Config, fit_images, fit_views  # noqa: E402
from pipeline.testing.synthetic import FAMILIES, clean_scores, make_problem  # noqa: E402
from pipeline.stage1.view_features import ViewBatch, extract_batch  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "samples"
_log = logging.getLogger("benchmarks.stage1")
KEYS = ("uncentred", "cosine", "mean_norm_ratio", "centred")


def peak_memory(device: torch.device) -> float:
    """Peak memory in MiB since the last reset: GPU allocations, or the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def parse_overrides(text: str) -> dict:
    """``views=48,steps=600,grid_factor=3,lr=1e-3`` -> ``Stage1Config.replace`` keyword arguments."""
    out: dict = {}
    base = Stage1Config.preset("default")
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if key == "views":
            out["views"] = replace(out.get("views", base.views), num_views=int(value))
        elif key in ("scale_min", "scale_max"):
            v = out.get("views", base.views)
            lo, hi = v.scale
            out["views"] = replace(v, scale=(float(value), hi) if key == "scale_min" else (lo, float(value)))
        elif key == "near_full_share":
            out["views"] = replace(out.get("views", base.views), near_full_share=float(value))
        elif key == "grid_factor":
            out["field"] = FieldConfig(kind="grid", grid_factor=int(value))
        else:
            current = getattr(base, key)
            out[key] = type(current)(float(value)) if not isinstance(current, bool) else value == "1"
    return out


def picked(args) -> list[int]:
    """Indices of the seed's ``--images`` images this run fits (``--pick``; all by default). They keep their index as
    image id, so a picked image gets the same views as in a run over all of them."""
    return args.pick or list(range(args.images))


def problem(family: str, args) -> tuple:
    bb, images = make_problem(family, args.images, args.size, embed_dim=args.dim, seed=args.seed)
    return bb.to(args.device), images[picked(args)].to(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: Stage1Config, family: str, args, ids: list[int] | None = None) -> dict:
    """Fit ``config`` to a family's images, ``--batch`` at a time: scores, s/image (views + fit), peak memory."""
    device = torch.device(args.device)
    bb, images = problem(family, args)
    ids = ids or picked(args)
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    res = []
    for start in range(0, len(ids), args.batch):
        res += fit_images(bb, images[start:start + args.batch], config, image_ids=ids[start:start + args.batch],
                          seed=args.seed)
    sync(device)
    seconds = (time.perf_counter() - t) / len(ids)
    clean = torch.stack([r.clean for r in res])
    return dict(scores=clean_scores(clean, bb.clean_map(images).cpu()), seconds=seconds,
                view_seconds=sum(r.view_seconds for r in res) / len(res), peak_mib=peak_memory(device), clean=clean)


def paper_reference(families: list[str], steps: int, args, budget: float = 0.0) -> dict:
    """The paper preset on every family's images fitted together as one batch (one schedule for all), so its
    full 20k steps are affordable; returns per family the clean maps and the batch's seconds per image.
    With ``budget`` (seconds), fewer steps are run if the full schedule would not fit (the rows say so)."""
    device = torch.device(args.device)
    paper = Stage1Config.preset("paper", steps=steps)
    batches, truths = [], {}
    for k, family in enumerate(families):
        bb, images = problem(family, args)
        truths[family] = bb.clean_map(images).cpu()
        batches.append(extract_batch(bb, images, paper.views, seed=args.seed, chunk=paper.view_chunk,
                                     image_ids=[1000 * k + i for i in picked(args)]))
    batch = ViewBatch.concat(batches)
    if budget:  # time a short schedule, then run as many steps as the budget allows (at most `steps`)
        t = time.perf_counter()
        fit_views(batch, paper.replace(steps=200), seed=args.seed)
        per_step = (time.perf_counter() - t) / 200
        steps = min(steps, max(1000, int(budget / per_step)))
        paper = paper.replace(steps=steps)
        _log.info("paper reference: %.1f ms/step for %d images; running %d steps", per_step * 1e3, len(batch.image_ids),
                  steps)
    reset_peak(device)
    t0 = time.perf_counter()

    def progress(step: int, total: int, losses: dict[str, float]) -> None:
        _log.info("paper reference: step %d/%d, %.0f s, mse %.4f", step + 1, total, time.perf_counter() - t0,
                  losses["mse"])

    res = fit_views(batch, paper, seed=args.seed, progress=progress)
    per_image = (batch.seconds + time.perf_counter() - t0) / len(res)
    out = {}
    for k, family in enumerate(families):
        n = len(picked(args))
        clean = torch.stack([r.clean for r in res[k * n:(k + 1) * n]])
        out[family] = dict(clean=clean, seconds=per_image, peak_mib=peak_memory(device), steps=steps,
                           device=args.device, batch=len(res), scores=clean_scores(clean, truths[family]))
    return out


def paper_time(family: str, steps: int, args) -> dict:
    """Seconds per image of the paper preset at its full schedule, one image alone (as the reference code runs),
    extrapolated from ``steps`` steps: views, plus the fit's time per step (the difference of a run of
    ``steps`` and one of ``steps / 5``, so fixed costs do not count per step) x 20k."""
    device = torch.device(args.device)
    paper = Stage1Config.preset("paper")
    bb, images = problem(family, args)
    short = max(1, steps // 5)
    fit_images(bb, images[:1], paper.replace(steps=short), image_ids=[0], seed=args.seed)  # warm-up
    reset_peak(device)
    first = fit_images(bb, images[:1], paper.replace(steps=short), image_ids=[0], seed=args.seed)[0]
    res = fit_images(bb, images[:1], paper.replace(steps=steps), image_ids=[0], seed=args.seed)[0]
    per_step = (res.fit_seconds - first.fit_seconds) / (steps - short)
    full = res.view_seconds + res.fit_seconds + per_step * (paper.steps - steps)
    return dict(scores={k: float("nan") for k in KEYS}, seconds=full, view_seconds=res.view_seconds,
                peak_mib=peak_memory(device))


def save_reference(path: Path, args, results: dict) -> None:
    meta = dict(images=args.images, size=args.size, dim=args.dim, seed=args.seed, pick=picked(args))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(meta=meta, families={f: {k: v for k, v in r.items() if k != "scores"}
                                         for f, r in results.items()}), path)


def load_reference(path: Path, args) -> dict:
    ref = torch.load(path, map_location="cpu", weights_only=False)
    meta = dict(images=args.images, size=args.size, dim=args.dim, seed=args.seed, pick=picked(args))
    saved = {"pick": list(range(ref["meta"]["images"])), **ref["meta"]}  # files from before --pick hold every image
    if saved != meta:
        raise SystemExit(f"--reference {path} was fitted on {ref['meta']}, this run uses {meta}: pass matching "
                         "--images/--size/--dim/--seed/--pick.")
    return ref["families"]


def fmt(row: dict) -> str:
    s = row["scores"]
    return " | ".join(f"{s[k]:.4f}" for k in KEYS)


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
    from pipeline.vit.backbone import create_backbone

    bb = create_backbone(args.vit, weights="none", img_size=args.vit_size).to(device)
    images = load_samples(args.vit_size, args.vit_images).to(device)
    t = time.perf_counter()
    with torch.no_grad():
        bb.features(images[:1].expand(8, -1, -1, -1).contiguous())
    per_view = (time.perf_counter() - t) / 8
    cfg = Stage1Config.preset("default")
    t = time.perf_counter()
    res = fit_images(bb, images, cfg, image_ids=list(range(len(images))), seed=0)
    per_image = (time.perf_counter() - t) / len(images)

    def energy(x: torch.Tensor) -> float:
        return float((x - x.mean((0, 1))).square().sum())

    share_g = sum(energy(r.artifact) for r in res) / sum(energy(r.raw) for r in res)
    share_clean = sum(energy(r.clean) for r in res) / sum(energy(r.raw) for r in res)
    gh, gw = bb.grid(args.vit_size)
    rows = [f"Real ViT {args.vit} (random weights), {len(images)} sample photos at {args.vit_size}px "
            f"({gh}x{gw} patches, C={bb.embed_dim}).", "",
            "| preset | views | s/image | ViT s/view | paper's 768 ViT passes (extrapolated) | G energy / raw | "
            "clean energy / raw | mean residual norm | final mse, cos |", "|---|---|---|---|---|---|---|---|---|",
            f"| default | {cfg.views.num_views} | {per_image:.2f} | {per_view:.3f} | {769 * per_view:.0f} s | "
            f"{share_g:.2f} | {share_clean:.2f} | {res[0].residual_norm_mean:.2f} | "
            f"{res[0].losses['mse']:.3g}, {res[0].losses['cos']:.3g} |"]
    if args.vit_paper_steps:
        # No ground truth on a real ViT: compare the default's clean map with the paper preset's on the first image.
        paper = Stage1Config.preset("paper", steps=args.vit_paper_steps)
        t = time.perf_counter()
        ref = fit_images(bb, images[:1], paper, image_ids=[0], seed=0)[0]
        paper_s = time.perf_counter() - t
        ours = res[0]
        centred = [(m - m.mean((0, 1))).reshape(-1, m.shape[-1]) for m in (ours.clean, ref.clean, ref.raw)]
        cos = torch.nn.functional.cosine_similarity(centred[0], centred[1], dim=-1).mean()
        rel = (centred[0] - centred[1]).norm() / centred[1].norm()
        raw_rel = (centred[2] - centred[1]).norm() / centred[1].norm()
        rows += ["", f"| image 0 | paper ({args.vit_paper_steps} steps) s | default s | default vs paper clean: "
                     "mean cosine | relative difference | raw vs paper clean: relative difference |",
                 "|---|---|---|---|---|---|",
                 f"| {load_names(1)[0]} | {paper_s:.0f} | {ours.seconds:.1f} | {cos:.3f} | {rel:.3f} | {raw_rel:.3f} |"]
    return rows, res[0]


def save_panel(image: torch.Tensor, truth: torch.Tensor, maps: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """One image's clean maps side by side, coloured by the truth's first three principal components, and under
    each the error of every token (relative to the truth's typical centred norm): where a method is wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = truth.reshape(-1, truth.shape[-1]).float()
    mean = flat.mean(0)
    _, _, v = torch.pca_lowrank(flat - mean, q=3, center=False)
    ref = (flat - mean) @ v
    lo, hi = ref.quantile(0.01, 0), ref.quantile(0.99, 0)
    scale = (flat - mean).norm(dim=-1).mean()
    columns = {"truth": truth, **maps}
    fig, ax = plt.subplots(2, len(columns) + 1, figsize=(3 * (len(columns) + 1), 6.4), squeeze=False)
    ax[0, 0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax[0, 0].set_title("image")
    for i, (name, m) in enumerate(columns.items(), start=1):
        m = m.float()
        rgb = (((m.reshape(-1, m.shape[-1]) - mean) @ v - lo) / (hi - lo)).clamp(0, 1)
        ax[0, i].imshow(rgb.reshape(*m.shape[:2], 3).numpy(), interpolation="nearest")
        ax[0, i].set_title(name.split(" (")[0], fontsize=10)
        ax[1, i].imshow(((m - truth).norm(dim=-1) / scale).numpy(), vmin=0, vmax=0.5, cmap="magma",
                        interpolation="nearest")
        error = float((m - truth).norm() / (truth - truth.mean((0, 1))).norm())
        ax[1, i].set_title(f"token error (uncentred {error:.3f})", fontsize=9)
    for a in ax.flat:
        a.axis("off")
    _finish(fig, path, title, dpi=80)


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
    _finish(fig, path, title, dpi=100)


def _finish(fig, path: Path, title: str, dpi: int) -> None:
    """Title, lay out and save a figure as a PNG, then free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names")
    p.add_argument("--images", type=int, default=2, help="images per family")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pick", type=lambda t: [int(i) for i in t.split(",")], default=None,
                   help="fit only these of the seed's --images images, e.g. 0,3 (they keep their views)")
    p.add_argument("--batch", type=int, default=2, help="images fitted together (default and candidates)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paper-steps", type=int, default=0, help="fit the paper preset for this many steps "
                   "(20000: its full schedule; 0: skip)")
    p.add_argument("--paper-budget", type=float, default=0.0, help="seconds the paper reference may take; fewer "
                   "steps are run when the full schedule would not fit (0: no limit)")
    p.add_argument("--paper-time-steps", type=int, default=0, help="also time the paper preset on one image for "
                   "this many steps, extrapolated to its full schedule")
    p.add_argument("--reference", type=Path, action="append", default=[], help="saved paper-preset fits to score "
                   "against (repeatable: files of different families)")
    p.add_argument("--save-reference", type=Path, help="save the paper-preset fits here")
    p.add_argument("--preset", action="append", default=[], help="also score this named preset (repeatable: "
                   "quality, ci)")
    p.add_argument("--candidate", action="append", default=[], help="default preset with overrides, e.g. "
                   "views=48,steps=600 (repeatable)")
    p.add_argument("--json", type=Path, help="write every row here")
    p.add_argument("--vit", default="", help="also run a real timm ViT (random weights) on the sample photos")
    p.add_argument("--vit-size", type=int, default=224)
    p.add_argument("--vit-images", type=int, default=3)
    p.add_argument("--vit-paper-steps", type=int, default=0, help="also fit the paper preset (this many steps) on "
                   "the first photo and compare the clean maps (0: skip)")
    p.add_argument("--png", type=Path, default=Path("outputs/benchmarks"), help="folder for the PNG panels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    families = [f for f in args.families.split(",") if f and f != "none"]
    configs = {name: Stage1Config.preset(name) for name in ["default", *args.preset]}
    configs.update({c: Stage1Config.preset("default", **parse_overrides(c)) for c in args.candidate})
    reference = {f: r for path in args.reference for f, r in load_reference(path, args).items()}
    if args.paper_steps:
        reference = paper_reference(families, args.paper_steps, args, args.paper_budget)
        if args.save_reference:
            save_reference(args.save_reference, args, reference)
    table: dict[str, dict] = {}
    for family in families:
        rows = table.setdefault(family, {})
        bb, images = problem(family, args)
        truth = bb.clean_map(images).cpu()
        raw = bb.features(images).cpu()
        rows["raw"] = dict(scores=clean_scores(raw, truth), seconds=0.0, peak_mib=0.0, clean=raw)
        if family in reference:
            ref = reference[family]
            how = f"{ref['steps']} steps, {ref['batch']} images fitted together on {ref['device']}"
            rows[f"paper ({how})"] = dict(scores=clean_scores(ref["clean"], truth), seconds=ref["seconds"], clean=ref["clean"],
                                          peak_mib=ref["peak_mib"])
        if args.paper_time_steps and family == families[0]:  # the time does not depend on the family
            rows[f"paper, 1 image (time from {args.paper_time_steps} steps)"] = \
                paper_time(family, args.paper_time_steps, args)
        for name, cfg in configs.items():
            rows[name] = run(cfg, family, args)
        for name, r in rows.items():
            _log.info("%s %s: %s | %.3f s/image", family, name, fmt(r), r["seconds"])
        save_panel(images[0].cpu(), truth[0], {n: r["clean"][0] for n, r in rows.items() if "clean" in r},
                   args.png / f"stage1_{family}_seed{args.seed}_image{picked(args)[0]}.png",
                   f"{family}, seed {args.seed}, image {picked(args)[0]}: clean maps (PCA of the truth) and each "
                   "token's error")
    lines = [f"{len(picked(args))} images per family (seed {args.seed}), {args.size} px, patch 16, C={args.dim}, "
             f"device {args.device}.", "",
             "| family | method | uncentred | cosine | mean-norm ratio | centred | s/image | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for family, rows in table.items():
        for name, r in rows.items():
            lines.append(f"| {family} | {name} | {fmt(r)} | {r['seconds']:.2f} | {r['peak_mib']:.0f} |")
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({f: {n: dict(scores=r["scores"], seconds=r["seconds"], peak_mib=r["peak_mib"])
                                             for n, r in rows.items()} for f, rows in table.items()}, indent=1))
    if args.vit:
        args.vit_paper_steps = args.vit_paper_steps
        vrows, vres = real_vit_rows(args, torch.device(args.device))
        print("\n".join(vrows), flush=True)
        save_png(vres, args.png / "stage1_vit.png", f"stage 1 default preset, {args.vit} (random weights)")


if __name__ == "__main__":
    main()
