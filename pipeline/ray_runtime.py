"""Which Ray a job runs on: the cluster in use, else a local instance started in this process.

``ray job submit`` (and ``RAY_ADDRESS``) point a job at a running cluster, whose services are the cluster's
business. A job started on its own (``dvt denoise`` on a laptop) starts a local Ray, and there Ray's own processes
share the machine with the workers: on 2 cores with workers that sleep, the driver and Ray's services keep 0.20-0.22
cores busy with the dashboard and 0.17-0.19 without it (``benchmarks/denoise_job.py --idle-seconds 25``). So a
local instance starts without the dashboard unless asked for (``--dashboard``); the progress lines report what
it would show.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["init_ray", "add_dashboard_argument"]

_log = logging.getLogger(__name__)


def init_ray(dashboard: bool = False) -> Any:
    """Connect to the Ray cluster in use, or start a local one (with the dashboard only if ``dashboard``).

    Returns ``ray.init``'s context, or ``None`` when Ray was already initialised (tests, notebooks, a caller that
    set Ray up itself), which is then left as it is.
    """
    import ray

    if ray.is_initialized():
        return None
    # ``include_dashboard`` only applies to a Ray this call starts; connecting to a cluster ignores it.
    context = ray.init(log_to_driver=True, include_dashboard=dashboard)
    if dashboard and context.dashboard_url:
        _log.info("Ray dashboard at http://%s", context.dashboard_url)
    return context


def add_dashboard_argument(group: argparse._ArgumentGroup) -> None:
    """The ``--dashboard`` flag of the jobs that start Ray."""
    group.add_argument("--dashboard", action="store_true",
                       help="start Ray's dashboard with a local Ray (a cluster has its own; off by default to "
                            "leave the CPUs to the workers)")
