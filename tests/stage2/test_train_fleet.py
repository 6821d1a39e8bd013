"""``dvt train`` on a multi-node cluster (``fleet``): a training worker's node lost mid-run and a new node joining.

The run must end with status 0, resumed from the last checkpoint Ray Train registered (so at most one checkpoint
interval is redone), with a held-out loss within 1% of the same run (same seed) left alone. The pairs live in an S3
store (moto on 127.0.0.1), the storage every node shares; the pairs are synthetic, with a learnable artifact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.stage2.denoiser import read_spec
from pipeline.testing.synthetic_pairs import write_synthetic_store

from ..conftest import ROOT
from ..node_loss import latest_state, run_through_node_loss

pytestmark = pytest.mark.slow

STEPS, EVERY = 48, 8


def test_train_resumes_from_the_last_registered_checkpoint_after_a_node_loss(fleet, s3_bucket):
    store = f"{s3_bucket}/pairs.zarr"
    write_synthetic_store(store, 40, grid=(8, 8), channels=32)
    fleet.add_node(cpus=1), fleet.add_node(cpus=1)  # one training worker of 0.75 CPU on each
    train = [sys.executable, "-m", "jobs.train_denoiser", "--stores", store, "--workers", "2", "--cpu",
             "--cpus-per-worker", "0.75", "--batch-size", "4", "--max-steps", str(STEPS), "--eval-every", str(EVERY),
             "--patience", "0", "--val-fraction", "0.2", "--max-failures", "3", "--seed", "3"]
    try:
        began = time.monotonic()
        base = subprocess.run([*train, "--output", f"{s3_bucket}/base"], cwd=ROOT, env=fleet.driver_env(),
                              capture_output=True, text=True, timeout=900)
        base_s = time.monotonic() - began
        assert base.returncode == 0, base.stderr[-4000:]

        out = f"{s3_bucket}/lost"
        run = run_through_node_loss(fleet, [*train, "--output", out], out, cpus=1)
        assert run.status == 0, run.log[-5000:]
        assert "train finished" in run.log and "Traceback" not in run.log.split("train finished")[-1]
    finally:
        for node in list(fleet.nodes):
            fleet.remove_node(node)

    state = latest_state(out)
    resumed = json.loads(state["resumed_from"])
    assert int(state["step"]) == STEPS
    # The restarted group began at the newest checkpoint registered when the node went; the group had not registered
    # the next one, so it had taken fewer than EVERY steps past it: at most one interval is redone.
    assert resumed[:1] == [run.registered_at_loss] and run.registered_at_loss % EVERY == 0, (resumed, run)
    history = json.loads(state["history"])
    assert [h["step"] for h in history] == list(range(EVERY, STEPS + 1, EVERY))

    lost, kept = read_spec(f"{out}/denoiser.safetensors"), read_spec(f"{s3_bucket}/base/denoiser.safetensors")
    final_lost, final_kept = lost.training["history"][-1]["val_loss"], kept.training["history"][-1]["val_loss"]
    gap = abs(final_lost - final_kept) / final_kept
    assert gap <= 0.01, f"held-out loss {final_lost:.5f} after the node loss vs {final_kept:.5f} uninterrupted"
    waits = [round(h["steady_wait_fraction"], 3) for h in history]
    print(f"\nfleet train: node lost at {run.lost_at:.0f} s with step {run.registered_at_loss} registered; resumed at "
          f"{resumed}; at most {EVERY} steps redone; exit 0 in {run.wall:.0f} s (uninterrupted {base_s:.0f} s); "
          f"held-out loss {final_lost:.5f} vs {final_kept:.5f} ({100 * gap:.2f}%); data wait after the first batch "
          f"per interval {waits}")
