"""Stage-2 learning curves: held-out loss against optimiser steps, through ``dvt train``'s own Ray Train loop.

Each curve is one :func:`pipeline.stage2.train.run_training` run with early stopping off, a held-out check every
``--eval-every`` steps and a fixed budget; the table gives, per curve, the best held-out loss, the first step
whose loss is within 5% and within 1% of that best (where the plateau starts), and where the default early-stopping
rule (``TrainConfig.patience`` checks without a ``min_delta`` improvement) would have ended it. Stores:

* ``chain``: stage-1 features of the test ViT with a real positional artifact (:mod:`pipeline.testing.artifact_vit`)
  on crops of the bundled photos, as ``benchmarks/chain.py`` makes them (pass ``--chain-store`` to reuse one);
* ``synthetic-N``: ``N`` synthetic (raw, clean) pairs with a known additive artifact
  (:mod:`pipeline.testing.synthetic_pairs`) on the same grid and channels.

Runs go as ``store:global batch:lr`` (lr ``auto`` = the default rule); the curves are drawn in ``--png``::

    python benchmarks/learning_curves.py --runs chain:16:3e-4 chain:16:1e-3 chain:16:3e-3 synthetic-256:16:auto
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.testing.synthetic_pairs import write_synthetic_store  # noqa: E402
from pipeline.stage2.train import TrainConfig, run_training  # noqa: E402
from pipeline.runtime.ray_train import Plateau  # noqa: E402


def chain_store(url: str, images: int, size: int) -> str:
    from pipeline.analysis.chain import ChainConfig, write_photo_crops
    from pipeline.denoise.job import DenoiseConfig, run_denoise

    c = ChainConfig(workdir=os.path.dirname(url))
    folder = os.path.join(c.workdir, "images", "train")
    write_photo_crops(folder, c.train_photos, images, size, seed=0)
    run_denoise(DenoiseConfig(images=folder, output=url, model=c.model, weights="none", input_size=size,
                              overwrite=True, progress_every_s=60))
    return url


def plateau_steps(history: list[dict], tolerance: float) -> int | None:
    best = min(h["val_loss"] for h in history)
    return next((h["step"] for h in history if h["val_loss"] <= best * (1 + tolerance)), None)


def early_stop(history: list[dict], patience: int, min_delta: float) -> tuple[int, float]:
    """Where :class:`pipeline.runtime.ray_train.Plateau` would have stopped this curve, and the best loss up to there."""
    p = Plateau(patience, min_delta)
    for h in history:
        p.update(h["val_loss"], h["step"])
        if p.stop:
            return h["step"], p.best
    return history[-1]["step"], p.best


def draw(curves: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    stores = sorted({name.split(":")[0] for name in curves})
    fig, axes = plt.subplots(1, len(stores), figsize=(5.5 * len(stores), 4.2), squeeze=False)
    for ax, store in zip(axes[0], stores):
        for name, history in curves.items():
            if name.split(":")[0] == store:
                _, batch, lr, *budget = name.split(":")
                ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], marker=".",
                        label=f"batch {batch}, lr {lr}" + (f", {budget[0]}-step budget" if budget else ""))
        ax.set_yscale("log")
        ax.set_xlabel("optimiser steps")
        ax.set_ylabel("held-out loss (MSE + 1 - cos)")
        ax.set_title(store)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=[], help="store:batch:lr[:steps], e.g. chain:16:1e-3")
    parser.add_argument("--redraw", nargs="*", default=[], help="draw these saved --json files (one panel each)")
    parser.add_argument("--steps", type=int, default=600, help="step budget of every run")
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--chain-store", default=None, help="reuse a chain stage-1 store (default: make one)")
    parser.add_argument("--chain-images", type=int, default=48)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=14, help="synthetic stores' grid side")
    parser.add_argument("--channels", type=int, default=192, help="synthetic stores' channels")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--png", default="learning_curves.png")
    parser.add_argument("--json", default=None, help="also write every history here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    import ray

    if args.redraw:  # saved histories only: no training
        curves = {k: v for f in args.redraw for k, v in json.loads(Path(f).read_text()).items()}
        draw(curves, args.png)
        print(f"curves: {args.png}")
        return
    work = args.workdir or tempfile.mkdtemp(prefix="dvt-curves-")
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stores: dict[str, str] = {}
    curves: dict[str, list[dict]] = {}
    rows = []
    for run in args.runs:
        store, batch, lr, *budget = run.split(":")
        if store not in stores:
            if store == "chain":
                stores[store] = args.chain_store or chain_store(os.path.join(work, "chain", "stage1.zarr"),
                                                                args.chain_images, args.size)
            else:
                n = int(store.split("-")[1])
                stores[store] = write_synthetic_store(os.path.join(work, f"{store}.zarr"), n, grid=(args.grid, args.grid),
                                                      channels=args.channels, unit=16).url
        config = TrainConfig(stores=[stores[store]], output=os.path.join(work, "runs", run.replace(":", "_")),
                             batch_size=int(batch), lr=None if lr == "auto" else float(lr),
                             max_steps=int(budget[0]) if budget else args.steps,
                             eval_every=args.eval_every, patience=0, val_fraction=args.val_fraction, overwrite=True)
        began = time.perf_counter()
        s = run_training(config)
        curves[run] = s.history
        best = min(h["val_loss"] for h in s.history)
        rows.append((run, s.num_train, s.num_val, config.peak_lr(), s.history[0]["val_loss"], best,
                     plateau_steps(s.history, 0.05), plateau_steps(s.history, 0.01),
                     early_stop(s.history, TrainConfig.patience, TrainConfig.min_delta), s.history[-1]["val_cos"],
                     sum(h["data_wait_s"] for h in s.history) / sum(h["seconds"] for h in s.history),
                     time.perf_counter() - began))
        print(f"{run}: best held-out loss {best:.4g}", flush=True)
    print(f"\nStage-2 learning curves, {args.steps} steps, held-out check every {args.eval_every} steps, "
          f"{os.cpu_count()} CPUs\n")
    print("| run (store:batch:lr) | train images | held out | peak lr | held-out loss at first check | best | "
          "step within 5% of best | within 1% | default early stop: step (best so far) | final held-out cos | "
          "data wait | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3g} | {r[4]:.4g} | {r[5]:.4g} | {r[6]} | {r[7]} | "
              f"{r[8][0]} ({r[8][1]:.4g}) | {r[9]:.4f} | {100 * r[10]:.1f}% | {r[11]:.0f} |")
    draw(curves, args.png)
    print(f"\ncurves: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
