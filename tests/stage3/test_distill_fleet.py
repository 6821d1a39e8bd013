"""``dvt distill`` on a multi-node cluster (``fleet``): a training worker's node lost mid-run and a new node joining.

The run must end with status 0, resumed from the last checkpoint Ray Train registered (at most one checkpoint
interval redone), and end within 1% of the same run (same seed) left alone: the workers read the run's seeded data
order from the checkpoint's step on, so the resumed run trains on the same batches. Images live on S3 (moto on 127.0.0.1); the model is timm's
6-block test ViT with random weights at 64 px.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from pipeline.io.storage import filesystem
from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser

from ..conftest import ROOT
from ..node_loss import latest_state, run_through_node_loss
from .test_distill import _png

pytestmark = pytest.mark.slow

STEPS, EVERY = 72, 12


def test_distill_resumes_from_the_last_registered_checkpoint_after_a_node_loss(fleet, s3_bucket, tmp_path):
    torch.manual_seed(0)
    config = DenoiserConfig(channels=64, pos_grid=(4, 4))
    spec = DenoiserSpec(denoiser=config, backbone="test_vit", block=5, input_size=(64, 64), patch_size=16, stride=16)
    denoiser = save_denoiser(str(tmp_path / "denoiser.safetensors"), Denoiser(config), spec)  # every node sees it
    fs, root = filesystem(s3_bucket)
    for i in range(20):
        fs.pipe_file(f"{root}/images/{i:02d}.png", _png(i, (40 + i, 48)))
    fleet.add_node(cpus=1), fleet.add_node(cpus=1)  # one training worker of 0.75 CPU on each
    distill = [sys.executable, "-m", "jobs.distill", "--images", f"{s3_bucket}/images/", "--denoiser", denoiser,
               "--weights", "none", "--workers", "2", "--cpu", "--cpus-per-worker", "0.75", "--batch-size", "4",
               "--lr", "3e-3", "--train-blocks", "last:1", "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY),
               "--val-fraction", "0.2", "--max-val-images", "4", "--max-failures", "3", "--seed", "3"]
    try:
        began = time.monotonic()
        base = subprocess.run([*distill, "--output", f"{s3_bucket}/base"], cwd=ROOT, env=fleet.driver_env(),
                              capture_output=True, text=True, timeout=900)
        base_s = time.monotonic() - began
        assert base.returncode == 0, base.stderr[-4000:]

        out = f"{s3_bucket}/lost"
        run = run_through_node_loss(fleet, [*distill, "--output", out], out, cpus=1)
        assert run.status == 0, run.log[-5000:]
        assert "distill finished" in run.log
    finally:
        for node in list(fleet.nodes):
            fleet.remove_node(node)

    state, kept = latest_state(out), latest_state(f"{s3_bucket}/base")
    resumed = json.loads(state["resumed_from"])
    assert int(state["step"]) == STEPS and json.loads(kept["resumed_from"]) == []
    # The restarted group began at the newest checkpoint registered when the node went; the group had not registered
    # the next one, so it had taken fewer than EVERY steps past it: at most one interval is redone.
    assert resumed[:1] == [run.registered_at_loss] and run.registered_at_loss % EVERY == 0, (resumed, run)
    history = json.loads(state["history"])
    assert [h["step"] for h in history] == list(range(EVERY, STEPS + 1, EVERY))

    final_lost, final_kept = history[-1]["val_distance"], json.loads(kept["history"])[-1]["val_distance"]
    before = json.loads(state["before"])["distance"]
    assert final_lost < before and final_kept < before, (before, final_kept, final_lost)  # both learned
    gap = abs(final_lost - final_kept) / final_kept
    assert gap <= 0.01, f"held-out distance {final_lost:.5f} after the node loss vs {final_kept:.5f} uninterrupted"
    waits = [round(h["steady_wait_fraction"], 3) for h in history]
    print(f"\nfleet distill: node lost at {run.lost_at:.0f} s with step {run.registered_at_loss} registered; resumed "
          f"at {resumed}; at most {EVERY} steps redone; exit 0 in {run.wall:.0f} s (uninterrupted {base_s:.0f} s); "
          f"held-out distance {final_lost:.5f} vs {final_kept:.5f} ({100 * gap:.2f}%); data wait after the first "
          f"batch per interval {waits}")
