"""The whole chain on a ViT that really has artifacts: ``dvt denoise`` -> ``dvt train`` -> ``dvt apply`` on
held-out images -> ``dvt distill`` -> the student's features, measured at every stage (:mod:`pipeline.analysis.chain`).

The backbone is the test ViT of :mod:`pipeline.testing.artifact_vit` (timm's ViT-Ti/16, random weights, a grid-like
positional artifact; its artifact-free twin is the reference). Training crops come from three bundled photos,
held-out crops from the other two. Every job runs with its defaults except what the flags below set. Prints the
measures per stage, the targets, and each job's time; ``--json`` keeps everything.

    python benchmarks/chain.py --distill '{"batch_size": 8, "lr": 1e-3, "max_steps": 150, "checkpoint_every": 30}'

(15 minutes on a busy 2-core machine, 10 of them distilling; see docs/chain.md.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.chain import ChainConfig, run_chain  # noqa: E402
from pipeline.stage2.train import TrainConfig  # noqa: E402

COLUMNS = ("positional_energy", "grid_energy", "cross_view_consistency", "cos_to_raw", "cos_to_reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="images, stores and runs (default: a temporary folder)")
    parser.add_argument("--model", default=ChainConfig.model)
    parser.add_argument("--reference", default=ChainConfig.reference)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train-crops", type=int, default=48)
    parser.add_argument("--held-out-crops", type=int, default=12)
    parser.add_argument("--preset", default="default", help="stage-1 preset")
    parser.add_argument("--train", default="{}", help="JSON overrides of dvt train's config, e.g. '{\"max_steps\": 300}'")
    parser.add_argument("--distill", default="{}", help="JSON overrides of dvt distill's config")
    parser.add_argument("--consistency-images", type=int, default=4, help="images per stage for the cross-view measure")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the full result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    import ray

    work = args.workdir or tempfile.mkdtemp(prefix="dvt-chain-")
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = ChainConfig(workdir=work, model=args.model, reference=args.reference or None, input_size=args.size,
                         train_crops=args.train_crops, held_out_crops=args.held_out_crops, preset=args.preset,
                         train=json.loads(args.train), distill=json.loads(args.distill), workers=args.workers,
                         consistency_images=args.consistency_images)
    result = run_chain(config)
    ray.shutdown()
    t, d = result.summaries["train"], result.summaries["distill"]
    print(f"\nChain on {args.model} at {args.size} px: {args.train_crops} training crops "
          f"({', '.join(config.train_photos)}), {args.held_out_crops} held-out crops "
          f"({', '.join(config.held_out_photos)}), {os.cpu_count()} CPUs\n")
    print("| features | images | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, row in result.rows.items():
        images = "held out" if "held out" in name or name in ("stage-2", "student") else "training"
        cells = [f"{row[c]:.3f}" if c in row else "-" for c in COLUMNS]
        print(f"| {name.split(' (')[0]} | {images} | " + " | ".join(cells) + " |")
    print("\n| target | value | bound | met |\n|---|---|---|---|")
    for name, tgt in result.targets.items():
        print(f"| {name} | {tgt['value']:.3f} | {tgt['target']} | {'yes' if tgt['met'] else 'NO'} |")
    stop = t.get("stopping", {})
    print(f"\nstage 2: {t['steps']} steps ({t['epochs']:.1f} epochs) of global batch "
          f"{config.train.get('batch_size', TrainConfig.batch_size)}, stopped by {stop.get('reason')} (budget {stop.get('budget_steps')}, best "
          f"step {stop.get('best_step')}); stage 3: {d['steps']} steps, held-out distance to the teacher "
          f"{d['before'].get('distance', float('nan')):.4f} -> {d['after'].get('distance', float('nan')):.4f}")
    print("\n| job | seconds |\n|---|---|")
    for name, s in result.seconds.items():
        print(f"| {name} | {s:.0f} |")
    print(f"| total | {sum(result.seconds.values()):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config.__dict__, "rows": result.rows, "targets": result.targets,
                                               "seconds": result.seconds, "summaries": result.summaries},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
