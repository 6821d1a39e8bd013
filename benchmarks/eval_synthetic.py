"""``dvt eval`` end to end on generated data with a known answer, printing the side-by-side report.

Makes a VOC-layout dataset of coloured shapes (``tests/eval_data.py``: 24 train / 8 val images, one box
per image) and three stores of its images: ``raw`` = label-encoding features + a fixed positional pattern,
``stage-1`` = the label-encoding features, ``noise`` = features without information. Then runs every
measure that needs no depth data (MIC, extras, KNN, the segmentation probe in the ``--quick`` form over
three seeds, LOST) and prints ``report.md``; the expected order is stage-1 > raw > noise for the label
measures and raw >> stage-1 for the artifact measures.

    python benchmarks/eval_synthetic.py --out outputs/eval-synthetic
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cli import main as dvt  # noqa: E402
from pipeline.eval.datasets import read_label, voc_pairs  # noqa: E402
from tests.eval_data import label_features, make_voc, positional_artifact, write_store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/eval-synthetic")
    p.add_argument("--probe-iters", type=int, default=300)
    p.add_argument("--strength", type=float, default=1.0, help="size of the positional pattern in raw")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_voc(Path(tmp) / "voc")
        pairs = voc_pairs(str(root), "train") + voc_pairs(str(root), "val")
        uris = [p for p, _ in pairs]
        clean = label_features([read_label(lab) for _, lab in pairs])
        write_store(f"{tmp}/voc.zarr", uris, {"raw": clean + positional_artifact(strength=args.strength),
                                              "clean": clean})
        write_store(f"{tmp}/noise.zarr", uris, {"clean": torch.randn_like(clean)})
        t0 = time.perf_counter()
        code = dvt(["eval", "--store", f"{tmp}/voc.zarr", "--source", f"noise={tmp}/noise.zarr", "--voc", str(root),
                    "--num-classes", "4", "--lost-voc07", str(root), "--quick", "--probe-iters",
                    str(args.probe_iters), "--out", args.out])
        print(f"\ndvt eval exited {code} after {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
