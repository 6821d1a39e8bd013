"""How a job ends when something goes wrong: one line that names the problem and what to do, and an exit status.

Exit statuses of every ``dvt`` job (also ``python -m jobs.NAME``; see ``docs/reliability.md``):

====  ==========================================================================================================
0     done: every image finished (or there was nothing to do)
1     refused before any work, nothing written: a wrong flag or value, weights that do not fit the model, a store
      made with other settings, a store in use by another job, a location holding other data. Fix the command.
2     command-line usage error (unknown flag, missing value)
3     finished, but some images failed; each is a ``failed`` row of the store's manifest, with its reason
4     stopped by a fault after it started: storage unreachable or stalled, workers lost, the cluster's head node
      lost (:mod:`pipeline.runtime.head_watch`). Finished units are kept; re-run the same command to resume.
130   interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM). Finished units are kept; re-run to resume.
====  ==========================================================================================================
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_SOME_FAILED", "EXIT_FAULT", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED", "JobFailedError", "Terminated", "root_cause", "one_line", "exit_status",
           "terminate_on_sigterm", "raise_terminated"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_FAULT = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class JobFailedError(RuntimeError):
    """A running job stopped because of a fault around it (storage, workers), not because of its input.

    ``storage_unavailable`` is true when the fault was storage that stopped answering (nothing more is sent to
    it while the job ends)."""

    storage_unavailable: bool = False


class Terminated(BaseException):
    """The process received SIGTERM (a BaseException, like KeyboardInterrupt, so no handler swallows it)."""


def root_cause(error: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers (``RayTaskError``, ``UserCodeException``) and chains."""
    seen: set[int] = set()
    current = error
    while id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):
            current = cause
            continue
        if type(current).__module__.startswith("ray.") and (current.__cause__ or current.__context__):
            current = current.__cause__ or current.__context__
            continue
        break
    return current


def one_line(error: BaseException, limit: int = 600) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def exit_status(error: BaseException) -> int | None:
    """The exit status for ``error``; ``None`` for an unexpected error (a bug: the caller shows the traceback)."""
    from ..io.storage import StorageUnavailableError
    from ..store import LeaseLostError, StoreError

    if isinstance(error, (JobFailedError, StorageUnavailableError, LeaseLostError)):
        return EXIT_FAULT
    if isinstance(error, (ValueError, StoreError, OSError, KeyError)):
        return EXIT_REFUSED
    return None


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def terminate_on_sigterm() -> Any:
    """Make SIGTERM unwind the main thread like Ctrl-C does (leases released, Ray shut down, one line printed).

    Returns the handler it replaced (``None`` off the main thread, where nothing changes). ``ray.init``
    installs its own SIGTERM handler (``sys.exit``, which ends a running job in an abort), so
    :func:`pipeline.runtime.ray_session.init_ray` calls this again after starting Ray.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_terminated)
