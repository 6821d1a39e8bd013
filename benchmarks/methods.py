"""Every ``dvt denoise --method`` on problems with an answer: error against seconds per image.

Problems:

* the synthetic families of :data:`pipeline.testing.synthetic.FAMILIES` (a known clean map): uncentred error and
  token cosine to the truth (:func:`pipeline.testing.synthetic.clean_scores`);
* the artifact ViT fixture (:mod:`pipeline.testing.artifact_vit`, ``create`` at 224 px): positional energy of the
  clean maps (:func:`pipeline.analysis.metrics.positional_energy`; the twin without the artifact scores ~0.02) and token
  cosine to that reference twin.

Methods, each on the same held-out test images: ``raw`` (the backbone), ``dvt`` (stage 1, ``default``
preset), ``average`` (copies, :mod:`pipeline.denoise.average`), ``bias`` (mean stage-1 ``G`` over the training
images, subtracted), ``denoiser`` (a stage-2 denoiser trained here on the training images' stage-1 pairs).
``s/image`` is the per-image cost on the test images; ``setup s`` what ``bias`` and ``denoiser`` first cost
once per dataset (stage 1 on the training images, plus training).

    python benchmarks/methods.py                       # everything: table + PNG under outputs/benchmarks/
    python benchmarks/methods.py --families smooth --no-vit --train 8 --test 2   # a quick look
    python benchmarks/methods.py --replot outputs/benchmarks/methods.json          # redraw a run's table and PNG
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.vit.backbone import create_backbone  # noqa: E402
from pipeline.stage2.denoiser import Denoiser, DenoiserConfig  # noqa: E402
from pipeline.denoise.average import AverageConfig, average_features  # noqa: E402
from pipeline.analysis.metrics import positional_energy  # noqa: E402
from pipeline.stage1.fit import Stage1Config, fit_images  # noqa: E402
from pipeline.testing.synthetic import FAMILIES, clean_scores, make_problem, photo_images  # noqa: E402
from pipeline.runtime.ray_train import denoising_loss, lr_lambda  # noqa: E402

_log = logging.getLogger("benchmarks.methods")
METHODS = ("raw", "dvt", "average", "bias", "denoiser")
VIT = "pipeline.testing.artifact_vit:create"


def timed(fn, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """``fn`` over ``images`` in batches: the stacked maps and seconds per image."""
    t = time.perf_counter()
    out = torch.cat([fn(images[s:s + batch], s) for s in range(0, len(images), batch)])
    return out, (time.perf_counter() - t) / len(images)


def stage1(backbone, images: torch.Tensor, start: int, config: Stage1Config, seed: int) -> list:
    return fit_images(backbone, images, config, image_ids=list(range(start, start + len(images))), seed=seed)


def train_denoiser(raw: torch.Tensor, clean: torch.Tensor, steps: int, batch: int, lr: float) -> Denoiser:
    """A stage-2 denoiser (one block, the product's architecture) on stage-1 pairs, AdamW, warm-up then cosine."""
    gh, gw, c = raw.shape[1:]
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(channels=c, pos_grid=(gh, gw)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 10)))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(raw), (batch,), generator=g)
        loss, _ = denoising_loss(model(raw[idx]), clean[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def run_methods(backbone, train: torch.Tensor, test: torch.Tensor, args) -> dict[str, dict]:
    """Clean maps of the test images by every method, seconds per image and one-off setup seconds."""
    config = Stage1Config.preset("default")
    feats = lambda x, s: backbone.features(x).float()  # noqa: E731
    rows: dict[str, dict] = {}
    with torch.no_grad():
        raw, sec = timed(feats, test, args.batch)
    rows["raw"] = dict(clean=raw, seconds=sec, setup=0.0)
    dvt, sec = timed(lambda x, s: torch.stack([r.clean for r in stage1(backbone, x, 10_000 + s, config, args.seed)]),
                     test, args.batch)
    rows["dvt"] = dict(clean=dvt, seconds=sec, setup=0.0)
    with torch.no_grad():
        avg, sec = timed(lambda x, s: average_features(backbone, x, AverageConfig(copies=args.copies))[1], test,
                         args.batch)
    rows["average"] = dict(clean=avg, seconds=sec, setup=0.0)
    t = time.perf_counter()
    fits = [r for s in range(0, len(train), args.batch)
            for r in stage1(backbone, train[s:s + args.batch], s, config, args.seed)]
    fit_s = time.perf_counter() - t
    bias_map = torch.stack([r.artifact for r in fits]).mean(0)
    with torch.no_grad():
        out, sec = timed(lambda x, s: backbone.features(x).float() - bias_map, test, args.batch)
    rows["bias"] = dict(clean=out, seconds=sec, setup=fit_s)
    t = time.perf_counter()
    model = train_denoiser(torch.stack([r.raw for r in fits]), torch.stack([r.clean for r in fits]), args.steps,
                           args.train_batch, args.lr)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        out, sec = timed(lambda x, s: model(backbone.features(x).float()), test, args.batch)
    rows["denoiser"] = dict(clean=out, seconds=sec, setup=fit_s + train_s)
    return rows


def synthetic_rows(family: str, args) -> dict[str, dict]:
    backbone, images = make_problem(family, args.train + args.test, args.size, embed_dim=args.dim, seed=args.seed)
    train, test = images[:args.train], images[args.train:]
    rows = run_methods(backbone, train, test, args)
    truth = backbone.clean_map(test)
    for row in rows.values():
        s = clean_scores(row.pop("clean"), truth)
        row.update(error=s["uncentred"], cosine=s["cosine"])
    return rows


def vit_rows(args) -> dict[str, dict]:
    backbone = create_backbone(VIT, weights="none")
    reference = create_backbone(VIT.replace(":create", ":create_reference"), weights="none")
    train = photo_images(args.train, 224, seed=args.seed + 1)
    test = photo_images(args.vit_test, 224, seed=args.seed + 2)
    rows = run_methods(backbone, train, test, args)
    with torch.no_grad():
        truth = reference.features(test)
    for row in rows.values():
        clean = row.pop("clean")
        row.update(error=positional_energy(clean), cosine=float(F.cosine_similarity(clean, truth, dim=-1).mean()))
    rows["reference twin"] = dict(error=positional_energy(truth), cosine=1.0, seconds=float("nan"), setup=0.0)
    return rows


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| problem | method | error | token cosine | s/image | setup s |", "| --- | --- | --- | --- | --- | --- |"]
    for problem, rows in results.items():
        what = "positional energy" if problem.startswith("artifact ViT") else "uncentred error"
        for method, r in rows.items():
            sec = "-" if r["seconds"] != r["seconds"] else f"{r['seconds']:.3f}"
            lines.append(f"| {problem} | {method} | {r['error']:.3f} ({what}) | {r['cosine']:.3f} | {sec} | "
                         f"{r['setup']:.1f} |")
    return "\n".join(lines)


def save_png(results: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(METHODS, ("tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, vit in zip(axes, (False, True)):
        problems = [p for p in results if p.startswith("artifact ViT") == vit]
        for problem in problems:
            for method in METHODS:
                r = results[problem][method]
                y = 1 - r["cosine"] if vit else r["error"]
                ax.scatter(max(r["seconds"], 1e-4), y, color=colours[method], s=36,
                           label=method if problem == problems[0] else None)
        if not problems:
            ax.set_axis_off()
            continue
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image (log)")
        ax.set_ylabel("1 - token cosine to the artifact-free twin" if vit else "uncentred error vs the true clean map")
        ax.set_title("artifact ViT fixture (224 px)" if vit else "synthetic families (one point per family)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated synthetic families ('none': skip)")
    p.add_argument("--no-vit", dest="vit", action="store_false", help="skip the artifact ViT fixture")
    p.add_argument("--train", type=int, default=16, help="training images for bias and denoiser")
    p.add_argument("--test", type=int, default=4, help="test images per synthetic family")
    p.add_argument("--vit-test", type=int, default=8, help="test images for the artifact ViT")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--copies", type=int, default=AverageConfig.copies, help="average: copies")
    p.add_argument("--steps", type=int, default=400, help="denoiser: training steps")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/methods"), help="writes .md, .png, .json")
    p.add_argument("--replot", type=Path, help="only redraw the table and PNG from this run's .json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.replot:
        results = json.loads(args.replot.read_text())["results"]
        args.out.with_suffix(".md").write_text(table(results) + "\n")
        save_png(results, args.out.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict]] = {}
    for family in [f for f in args.families.split(",") if f and f != "none"]:
        _log.info("family %s", family)
        results[family] = synthetic_rows(family, args)
    if args.vit:
        _log.info("artifact ViT")
        results["artifact ViT (224 px)"] = vit_rows(args)
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=1))
    save_png(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
