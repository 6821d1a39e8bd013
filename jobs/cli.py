"""The ``dvt`` console script. Each subcommand is one module of ``jobs/``, so ``dvt NAME ...`` and
``python -m jobs.NAME ...`` (or ``ray job submit ... -- python -m jobs.NAME ...``) take the same flags.

A job module provides ``add_arguments(parser)``, ``run(args) -> int`` and a one-line docstring.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

__all__ = ["JOBS", "build_parser", "main", "job_main"]

#: Subcommand name -> module under ``jobs/``. Order is the order ``dvt --help`` lists them.
JOBS: dict[str, str] = {
    "denoise": "jobs.denoise",
    "artifact": "jobs.artifact",
    "train": "jobs.train_denoiser",
    "apply": "jobs.apply_denoiser",
    "distill": "jobs.distill",
    "eval": "jobs.eval",
    "info": "jobs.info",
    "show": "jobs.show",
    "store": "jobs.store",
}


def _configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose <= 0:  # the AWS and fsspec libraries narrate every session at INFO ("Found credentials ...")
        for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _describe(module) -> str:
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``dvt`` parser; with ``only``, just that command's flags, so ``dvt store info`` does not import every
    job's module (torch, timm) before it runs."""
    from pipeline import __version__

    parser = argparse.ArgumentParser(
        prog="dvt", description="Denoising Vision Transformers at dataset scale (stage 1, 2 and 3 on Ray).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in JOBS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        desc = _describe(module)
        p = sub.add_parser(name, help=desc, description=desc)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(command if command in JOBS and not {"-h", "--help"} & set(words[:words.index(command)])
                          else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose)
    return run_job(args._run, args)


def run_job(run, args: argparse.Namespace) -> int:
    """Run a job. Every expected way to fail ends in one logged line that says what to do (a traceback too with
    -v) and a documented exit status (:mod:`pipeline.runtime.failures`); only a bug shows a traceback."""
    from pipeline.runtime.failures import (EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, exit_status, one_line,
                                   terminate_on_sigterm)

    from pipeline.runtime.ray_session import end_process, shutdown_ray

    log = logging.getLogger("dvt")
    previous = terminate_on_sigterm()
    status: int | None = None
    try:
        status = int(run(args) or 0)
    except (KeyboardInterrupt, Terminated) as e:
        what = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        log.error("%s: finished work is kept in the output; re-run the same command to resume", what)
        status = EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_TERMINATED
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        log.error("%s", one_line(e, limit=2000), exc_info=args.verbose > 0)
    finally:
        lost = shutdown_ray()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lost and status is not None:  # the cluster is gone: a normal exit would hang in Ray's teardown
            end_process(status)
    return status


def job_main(module_name: str, argv: Sequence[str] | None = None) -> int:
    """Entry point behind ``python -m jobs.NAME``: same flags as ``dvt NAME``."""
    if module_name == "__main__":  # run as `python -m jobs.NAME`: name it as users typed it
        module_name = sys.modules["__main__"].__spec__.name
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=_describe(module))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    return run_job(module.run, args)


if __name__ == "__main__":
    sys.exit(main())
