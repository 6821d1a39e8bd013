"""Before any work: can every node that may run the job's workers see the job's storage?

On one machine every path is everyone's. On a cluster, a path on the driver's disk is a different folder (or none)
on each worker node: a store written there is scattered over the nodes' disks and no reader can assemble it, and
inputs there are missing on the workers. A filesystem every node mounts (NFS, EFS, Lustre) and object storage are
fine. Each can look the same from the driver, so the job asks the nodes:

* outputs (a store, a run folder, Ray Train's storage path): the driver writes a token with a fresh random content
  into the output (or, for a local path not created yet, its nearest existing folder); a small task pinned to each
  node (``NodeAffinitySchedulingStrategy``, no CPU asked, so it runs beside busy workers) reads it back. Only the
  same storage holds the same token: a node's own ``/tmp`` has no such file.
* inputs (image files, stores, a denoiser file): the task checks that each sampled file exists with the size the
  driver sees (nothing is written next to a data set).

The URLs are checked exactly as the workers will get them, so a relative path is resolved in each node's working
directory, as the workers would resolve it. A cluster with one node that runs work and holds the driver (a laptop's
local Ray) is not asked: there is nothing to tell apart. Nodes that join later are not checked; use storage that
every node of the cluster's node types mounts.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..io.storage import filesystem, is_local, local_path
from .checks import JobConfigError

__all__ = ["Location", "probe_node", "work_nodes", "check_reachable", "outputs_and_inputs", "image_job_inputs"]

_log = logging.getLogger(__name__)

#: File name prefix of the tokens (removed again after the check).
TOKEN_PREFIX = ".dvt-reachability-"
#: Input files sampled per flag (the first, the middle and the last of a listing).
SAMPLES_PER_INPUT = 3
#: Seconds to wait for every node's answer (a node must start one Python worker for it).
ANSWER_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Location:
    """One thing a job's workers will read or write: ``flag`` names it in messages, ``url`` as the workers get it.

    For an output, ``token`` is the file the driver wrote and ``content`` what it holds; for an input, ``size`` is
    the file's size as the driver sees it.
    """

    flag: str
    url: str
    output: bool = False
    token: str | None = None
    content: str | None = None
    size: int | None = None


def probe_node(locations: Sequence[Location]) -> list[str]:
    """On a node: what it cannot see, one reason per location (empty: it sees everything)."""
    problems = []
    for loc in locations:
        try:
            fs, _ = filesystem(loc.url)
            if loc.output:
                path = filesystem(loc.token)[1]
                fs.invalidate_cache()
                if not fs.exists(path):
                    problems.append(f"{loc.flag} {loc.url}: this node does not see the file the driver wrote there")
                elif fs.cat_file(path).decode(errors="replace") != loc.content:
                    problems.append(f"{loc.flag} {loc.url}: this node sees another file at the driver's path")
            else:
                path = filesystem(loc.url)[1]
                if not fs.exists(path):
                    problems.append(f"{loc.flag} {loc.url}: missing on this node")
                elif loc.size is not None and fs.size(path) != loc.size:
                    problems.append(f"{loc.flag} {loc.url}: this node sees another file ({fs.size(path)} bytes, "
                                    f"the driver {loc.size})")
        except Exception as e:  # noqa: BLE001 - any failure to see it is the answer
            problems.append(f"{loc.flag} {loc.url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return problems


def work_nodes() -> list[dict[str, Any]]:
    """Alive nodes that can run workers (any CPU or GPU); a head with 0 CPUs runs none."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0
                                                          or n["Resources"].get("GPU", 0) > 0)]


def _needs_check(nodes: list[dict[str, Any]]) -> bool:
    import ray

    here = ray.get_runtime_context().get_node_id()
    return not (len(nodes) == 1 and nodes[0]["NodeID"] == here) and bool(nodes)


def outputs_and_inputs(outputs: Sequence[tuple[str, str]] = (),
                       inputs: Sequence[tuple[str, Sequence[str]]] = ()) -> tuple[list[tuple[str, str]],
                                                                                  list[tuple[str, str]]]:
    """``(flag, url)`` pairs to check: every output, and up to :data:`SAMPLES_PER_INPUT` files of each input list
    (object-store URLs included: a node may lack the endpoint or credentials the driver has)."""
    checked_inputs = []
    for flag, urls in inputs:
        urls = list(urls)
        picks = sorted({0, len(urls) // 2, len(urls) - 1})[:SAMPLES_PER_INPUT] if urls else []
        checked_inputs += [(flag, urls[i]) for i in picks]
    return [(f, u) for f, u in outputs if not u.startswith("memory://")], \
        [(f, u) for f, u in checked_inputs if not u.startswith("memory://")]


def _write_token(flag: str, url: str) -> Location:
    """Write a fresh token into the output ``url`` (for a local path not created yet: its nearest existing
    folder)."""
    fs, root = filesystem(url)
    name = f"{TOKEN_PREFIX}{uuid.uuid4().hex}"
    if is_local(url):
        folder = local_path(url)
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        token = os.path.join(folder, name)
    else:
        token = f"{url.rstrip('/')}/{name}"
    content = uuid.uuid4().hex
    fs.pipe_file(filesystem(token)[1], content.encode())
    return Location(flag=flag, url=url, output=True, token=token, content=content)


def check_reachable(outputs: Sequence[tuple[str, str]] = (), inputs: Sequence[tuple[str, Sequence[str]]] = (),
                    timeout_s: float = ANSWER_TIMEOUT_S) -> int:
    """Refuse (:class:`JobConfigError`, one line) unless every node that may run workers sees every output and
    input as the driver does. Call it after Ray started (or was joined) and before anything is created.

    ``outputs``: ``(flag, url)``; ``inputs``: ``(flag, urls)``. Returns how many nodes were asked (0 when the
    driver's node is the only one that runs work).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = work_nodes()
    if not _needs_check(nodes):
        return 0
    outs, ins = outputs_and_inputs(outputs, inputs)
    if not outs and not ins:
        return 0
    locations = [_write_token(f, u) for f, u in outs]
    try:
        for flag, url in ins:
            fs, path = filesystem(url)
            locations.append(Location(flag=flag, url=url, size=fs.size(path)))
        probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
        pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(locations): n for n in nodes}
        ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        for ref in not_ready:
            ray.cancel(ref, force=True)
        problems = []
        for ref in ready:
            node = pending[ref]
            try:
                seen = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a node lost during the check: it runs no workers either
                _log.warning("node %s did not answer the storage check (%s)", _name(node), type(e).__name__)
                continue
            problems += [f"node {_name(node)}: {p}" for p in seen]
        if not_ready:
            problems += [f"node {_name(pending[r])}: no answer in {timeout_s:.0f} s" for r in not_ready]
    finally:
        for loc in locations:
            if loc.token:
                try:
                    fs, path = filesystem(loc.token)
                    fs.rm_file(path)
                except Exception as e:  # noqa: BLE001 - a leftover token is harmless
                    _log.debug("could not remove %s: %s", loc.token, e)
    if problems:
        raise JobConfigError(
            f"storage not shared by the nodes that run workers ({len(nodes)} nodes): {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + ". On a cluster, use storage every node reaches: s3:// (or another object store) or a filesystem every "
              "node mounts (NFS/EFS/Lustre) at the same absolute path")
    _log.info("storage check: %d node(s) see %s", len(nodes), ", ".join(sorted({loc.flag for loc in locations})))
    return len(nodes)


def _name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')}/{node['NodeID'][:8]}"


def image_job_inputs(config: Any, uris: Sequence[str]) -> list[tuple[str, Sequence[str]]]:
    """What a job's workers read besides their data: the images, the denoiser or artifact file its method loads,
    and a weights file (``hub`` and ``none`` are not files)."""
    inputs: list[tuple[str, Sequence[str]]] = [("--images", uris)] if uris else []
    for flag in ("denoiser", "artifact", "weights"):
        value = getattr(config, flag, None)
        if isinstance(value, str) and value and not (flag == "weights" and value in ("hub", "none")):
            inputs.append((f"--{flag}", [value]))
    return inputs
