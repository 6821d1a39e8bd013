"""A Ray Train job on the ``fleet`` cluster through a lost worker node: helpers shared by the training and
distillation node-loss tests.

The node is removed once Ray Train has *registered* a checkpoint (its controller wrote the checkpoint into
``<output>/run/checkpoint_manager_snapshot.json``), not merely once a checkpoint folder exists: a folder whose report
never completed is not one a restart resumes from.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

from pipeline.io.storage import filesystem

from .conftest import ROOT, StreamLines

#: Ray Train's record of the checkpoints it registered, in the run folder (``ray.train.v2`` writes it on each one).
SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_steps(output: str) -> list[int]:
    """The ``step`` metric of every checkpoint Ray Train has registered for the run in ``output`` (oldest first)."""
    fs, root = filesystem(output)
    fs.invalidate_cache()
    path = f"{root.rstrip('/')}/run/{SNAPSHOT}"
    try:
        snapshot = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return []
    return [int(c["metrics"]["step"]) for c in snapshot.get("checkpoint_results", [])]


@dataclass
class NodeLossRun:
    """What a job did through the loss of a node: its exit status and log, the newest registered step when the node
    went, and the times (seconds from the job's start)."""

    status: int
    log: str
    registered_at_loss: int
    lost_at: float
    wall: float


def run_through_node_loss(fleet, command: list[str], output: str, cpus: int, timeout: float = 900) -> NodeLossRun:
    """Start ``command`` (a job's driver) on ``fleet``; once a checkpoint of the run in ``output`` is registered, kill
    the newest worker node (its training worker with it) and add a node of ``cpus`` CPUs 5 s later."""
    began = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=fleet.driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log = StreamLines(proc.stderr)
        while not registered_steps(output):
            assert proc.poll() is None, f"the job ended before a checkpoint was registered: {log.text()[-4000:]}"
            assert time.monotonic() - began < timeout, f"no checkpoint registered in {timeout:.0f} s"
            time.sleep(0.2)
        fleet.remove_node(fleet.nodes[-1])
        lost_at = time.monotonic() - began
        registered = max(registered_steps(output))  # no report completes once a rank is gone
        time.sleep(5)
        fleet.add_node(cpus=cpus)
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - began)))
        return NodeLossRun(status=proc.returncode, log=log.text(), registered_at_loss=registered, lost_at=lost_at,
                           wall=time.monotonic() - began)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def latest_state(output: str) -> dict:
    """The state (``state.pt``) of the newest checkpoint Ray Train registered for the run in ``output``."""
    import io

    import torch

    fs, root = filesystem(output)
    fs.invalidate_cache()
    run = f"{root.rstrip('/')}/run"
    name = json.loads(fs.cat_file(f"{run}/{SNAPSHOT}"))["latest_checkpoint_result"]["checkpoint_dir_name"]
    return torch.load(io.BytesIO(fs.cat_file(f"{run}/{name}/state.pt")), map_location="cpu", weights_only=True)
