"""Flag groups shared by the jobs, so that the same option is spelt, defaulted and explained the same everywhere."""

from __future__ import annotations

import argparse

__all__ = ["add_dashboard_argument"]


def add_dashboard_argument(group: argparse._ArgumentGroup) -> None:
    """The ``--dashboard`` flag of the jobs that start Ray."""
    group.add_argument("--dashboard", action="store_true",
                       help="start Ray's dashboard with a local Ray (a cluster has its own; off by default to "
                            "leave the CPUs to the workers)")
