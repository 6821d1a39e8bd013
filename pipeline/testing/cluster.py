"""A real multi-node Ray cluster on one machine, for tests and measurements of what a fleet does.

A head node with no CPUs (work never lands beside the GCS and the driver, as ``ray_cluster.yaml`` keeps it) and
worker nodes added and removed while a job runs, every node on 127.0.0.1 (keep
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment so Ray stays on loopback). Jobs reach it as a cluster
user's jobs do: ``RAY_ADDRESS=<address>`` in a separate driver process. The only storage the nodes share by
design is an S3 server (:mod:`.object_store`); the machine's disk is visible to every node, as a shared mount
(NFS/EFS) would be, unless a node is started with ``private_dirs``: that node's processes run in their own mount
namespace with an empty tmpfs over each of those folders, so it sees its own, empty disk there, as a separate
machine would (needs CAP_SYS_ADMIN: root in a container).

Removing a node kills its raylet and every process it started, without a graceful shutdown: what a spot
preemption or the OOM killer does to a machine.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .object_store import free_port

__all__ = ["ClusterNode", "LocalCluster", "private_dirs_supported"]

_log = logging.getLogger(__name__)


#: How the GCS notices a dead node: a health check every second, dead after 3 missed (Ray's defaults, 3 s x 5,
#: take up to ~30 s). A real cluster keeps Ray's defaults; here they only make tests wait less.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@dataclass
class ClusterNode:
    """One worker node of a :class:`LocalCluster`: its name (a custom resource ``node:<name>`` of 1 that tasks can
    ask for, to be steered there), its resources, and the processes behind it."""

    name: str
    cpus: int
    resources: dict[str, float]
    private_dirs: tuple[str, ...] = ()
    _process: subprocess.Popen | None = None  # the process holding the node (its process group is the node)

    @property
    def resource(self) -> str:
        """The custom resource only this node has."""
        return f"node:{self.name}"


def private_dirs_supported() -> bool:
    """Whether this machine lets us give a node a private view of a folder (a mount namespace with a tmpfs)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@contextmanager
def _no_address_file() -> Iterator[None]:
    """Ray writes a new head's address to /tmp/ray/ray_current_cluster, where every plain ``ray.init()`` on the
    machine then finds it and joins it. A test cluster must not capture other people's jobs: skip that write."""
    import ray._private.utils as ray_utils

    original = ray_utils.write_ray_address
    ray_utils.write_ray_address = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray_utils.write_ray_address = original


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` set in this process while a node starts (its processes inherit this process's environment)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class LocalCluster:
    """A head with 0 CPUs plus worker nodes on 127.0.0.1; :meth:`add_node`, :meth:`remove_node`, :meth:`shutdown`.

    Args:
        env: environment variables every node's processes get (on top of this process's environment), e.g. the
            S3 endpoint and ``PYTHONPATH``; a job's own ``runtime_env`` still adds its own.
        object_store_mb: object store per node.
    """

    env: Mapping[str, str] = field(default_factory=dict)
    object_store_mb: int = 150
    nodes: list[ClusterNode] = field(default_factory=list)
    temp_dir: str = field(default_factory=lambda: f"/tmp/dvt-fleet-{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        from ray.cluster_utils import Cluster

        # The GCS port is chosen here so every node's processes get RAY_ADDRESS: Ray's own helpers that call
        # ray.init() with no address (Ray Train's placement group cleaner) then join this cluster, not "whichever
        # Ray instance is found" (which fails when the machine runs another one).
        port = free_port()
        self.env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        with _no_address_file(), _environment(self.env):
            self._cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
                num_cpus=0, node_ip_address="127.0.0.1", temp_dir=self.temp_dir, include_dashboard=False,
                gcs_server_port=port,
                object_store_memory=self.object_store_mb * 2 ** 20, resources={"node:head": 1},
                _system_config=HEALTH_CHECKS))
        _log.info("cluster head at %s (temp dir %s)", self.address, self.temp_dir)

    @property
    def address(self) -> str:
        """What ``RAY_ADDRESS`` (or ``ray.init(address=...)``) takes to join the cluster."""
        return self._cluster.address

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment for a job's driver process on this cluster."""
        return {**os.environ, **self.env, "RAY_ADDRESS": self.address, **extra}

    def add_node(self, cpus: int = 1, resources: Mapping[str, float] | None = None, name: str | None = None,
                 private_dirs: Sequence[str | os.PathLike] = (), timeout: float = 120) -> ClusterNode:
        """Start a worker node (it joins a running job's cluster as an autoscaled node would) and wait until it is
        alive. ``private_dirs``: folders this node sees empty (its own disk; see the module's docstring)."""
        name = name or f"w{len(self.nodes)}-{uuid.uuid4().hex[:4]}"
        node = ClusterNode(name=name, cpus=cpus, resources={**(resources or {}), f"node:{name}": 1.0},
                           private_dirs=tuple(str(Path(d).resolve()) for d in private_dirs))
        # Each node is a process group of its own (killed whole by remove_node). Ray gives a starting node 30 s to
        # register (hard-coded); on a busy machine that can pass: kill what started and try again.
        for attempt in range(3):
            node._process = self._start_node(node)
            try:
                self.wait_alive(node, timeout)
                break
            except RuntimeError as e:
                _kill_group(node._process.pid)
                if attempt == 2:
                    raise
                _log.warning("node %s did not start (%s); starting it again", name, str(e)[-200:])
        self.nodes.append(node)
        self.wait_alive(node, timeout)
        _log.info("node %s joined (%d CPU, resources %s)", name, cpus, node.resources)
        return node

    def _start_node(self, node: ClusterNode) -> subprocess.Popen:
        """Start the node in a process of this module that builds it the way ``Cluster.add_node`` does and holds it
        (its process group is the node); with private folders, in its own mount namespace with a tmpfs over each."""
        spec = json.dumps({"gcs": self.address, "cpus": node.cpus, "resources": node.resources,
                           "temp_dir": self.temp_dir, "object_store": self.object_store_mb * 2 ** 20,
                           "log_monitor": not node.private_dirs})
        start = [sys.executable, "-m", "pipeline.testing.cluster", spec]
        if node.private_dirs:
            mounts = " && ".join(f"mkdir -p {shlex.quote(d)} && mount -t tmpfs tmpfs {shlex.quote(d)}"
                                 for d in node.private_dirs)
            start = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(start)}"]
        os.makedirs(self.temp_dir, exist_ok=True)
        log = open(os.path.join(self.temp_dir, f"node-{node.name}.log"), "wb")  # noqa: SIM115 - the child holds it
        return subprocess.Popen(start, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def alive(self) -> list[dict[str, Any]]:
        """The GCS's alive nodes (``NodeID``, ``Resources``, ...)."""
        return [n for n in self._cluster.global_state.node_table() if n.get("Alive")]

    def wait_alive(self, node: ClusterNode, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(node.resource in n.get("Resources", {}) for n in self.alive()):
                return
            if node._process is not None and node._process.poll() is not None:
                log = Path(self.temp_dir, f"node-{node.name}.log")
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"node {node.name} exited with status {node._process.returncode} before joining: "
                                   f"{tail}")
            time.sleep(0.2)
        raise TimeoutError(f"node {node.name} did not join the cluster in {timeout:.0f} s")

    def remove_node(self, node: ClusterNode, timeout: float = 60) -> None:
        """Kill the node's raylet and every process on it at once (SIGKILL, no graceful shutdown), as a preemption
        does, and wait until the GCS has marked it dead."""
        if node._process is not None:
            _kill_group(node._process.pid)
            node._process.wait(timeout=timeout)
        self.nodes.remove(node)
        if self._cluster.head_node is None:
            return  # no GCS left to ask
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(node.resource in n.get("Resources", {}) for n in self.alive()):
                _log.info("node %s removed", node.name)
                return
            time.sleep(0.2)
        raise TimeoutError(f"the GCS still lists node {node.name} as alive {timeout:.0f} s after it was killed")

    def remove_head(self) -> None:
        """Kill the head node's processes at once (GCS, raylet, the drivers' node): the whole cluster is lost, as
        when the head's machine dies. Worker nodes' processes exit by themselves once they give up on the GCS
        (``RAY_gcs_rpc_server_reconnect_timeout_s``, 60 s by default); :meth:`shutdown` stops what is left."""
        head = self._cluster.head_node
        if head is not None:
            head.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
            self._cluster.head_node = None

    def shutdown(self) -> None:
        """Stop every node (workers first, then the head) and remove the cluster's temp dir."""
        for node in list(self.nodes):
            try:
                self.remove_node(node, timeout=10)
            except Exception as e:  # noqa: BLE001 - keep stopping the rest
                _log.warning("could not remove node %s cleanly: %s", node.name, e)
        try:
            self._cluster.shutdown()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _kill_group(pgid: int, timeout: float = 30) -> None:
    """SIGKILL the process group ``pgid`` (one this module started) and wait until it is gone."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.1)
    except ProcessLookupError:
        return


def _hold_node(spec: dict[str, Any]) -> None:
    """Start one worker node in this process (as ``Cluster.add_node`` does) and keep it until killed."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=spec["gcs"], node_ip_address="127.0.0.1", num_cpus=spec["cpus"], num_gpus=0,
        resources=spec["resources"], temp_dir=spec["temp_dir"], object_store_memory=spec["object_store"],
        min_worker_port=0, max_worker_port=0, node_manager_port=0, include_log_monitor=spec.get("log_monitor", False),
        dashboard_agent_listen_port=None)
    ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _hold_node(json.loads(sys.argv[1]))
