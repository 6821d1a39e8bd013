"""Print package versions, the compute devices found and the storage endpoint in use."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.runtime.environment import environment_info, format_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    info = environment_info()
    sys.stdout.write((json.dumps(info, indent=2) if args.json else format_info(info)) + "\n")
    return 0


if __name__ == "__main__":
    from jobs.cli import job_main

    sys.exit(job_main(__name__))
