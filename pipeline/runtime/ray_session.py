"""Which Ray a job runs on: the cluster in use, else a local instance started in this process.

``ray job submit`` (and ``RAY_ADDRESS``) point a job at a running cluster, whose services are the cluster's
business. A job started on its own (``dvt denoise`` on a laptop) starts a local Ray, and there Ray's own processes
share the machine with the workers: on 2 cores with workers that sleep, the driver and Ray's services keep 0.20-0.22
cores busy with the dashboard and 0.17-0.19 without it (``benchmarks/denoise_job.py --idle-seconds 25``). So a
local instance starts without the dashboard unless asked for (``--dashboard``); the progress lines report what
it would show.

A local instance is the job's own: :func:`shutdown_ray` stops it when the job ends, however it ends. If the driver
is killed outright (SIGKILL), Ray's agents notice their raylet is gone but then wait for the GCS to come back
before exiting: 64 s with Ray's default ``RAY_gcs_rpc_server_reconnect_timeout_s`` (60), 3 s with the 5 s
this module sets when no ``RAY_ADDRESS`` names a cluster and the variable is not set already (a cluster's own
processes keep their setting).

While the job runs, :class:`~pipeline.runtime.head_watch.HeadWatch` watches the GCS, so a lost head node ends the
job in one line with status 4 instead of Ray's silent exit a minute later.

Ray's core worker logs one error-level line on every run that needs no action (Ray Data passes its actors'
arguments through the object store, ray-project/ray#57733); :func:`init_ray` drops that line from the console.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

from .head_watch import HeadWatch, exit_lost, exit_now, gcs_accepts

__all__ = ["init_ray", "shutdown_ray", "end_process", "filter_stderr", "restore_stderr", "EXPECTED_RAY_LINES", "LOCAL_GCS_RECONNECT_S"]

_log = logging.getLogger(__name__)

#: How long the processes of a local Ray wait for a lost GCS before exiting (the driver owns it: it is not coming
#: back). Set only when no ``RAY_ADDRESS`` names a cluster.
LOCAL_GCS_RECONNECT_S = 5

#: Console lines Ray prints on every run that are expected and need no action.
EXPECTED_RAY_LINES = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
               rb"and max_restarts > 0"),
)

_started = False
_watch: HeadWatch | None = None


def init_ray(dashboard: bool = False) -> Any:
    """Connect to the Ray cluster in use, or start a local one (with the dashboard only if ``dashboard``).

    Returns ``ray.init``'s context, or ``None`` when Ray was already initialised (tests, notebooks, a caller that
    set Ray up itself), which is then left as it is.
    """
    import ray

    global _started, _watch
    if ray.is_initialized():
        return None
    from .failures import raise_terminated, terminate_on_sigterm

    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is \
        raise_terminated
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(LOCAL_GCS_RECONNECT_S))
    # ``include_dashboard`` only applies to a Ray this call starts; connecting to a cluster ignores it.
    context = ray.init(log_to_driver=True, include_dashboard=dashboard)
    _started = True
    if ours:
        terminate_on_sigterm()  # ray.init replaced it
    filter_stderr(EXPECTED_RAY_LINES)
    _watch = HeadWatch(ray.get_runtime_context().gcs_address,
                       on_lost=lambda message: exit_lost(message, drain=restore_stderr)).start()
    if dashboard and context.dashboard_url:
        _log.info("Ray dashboard at http://%s", context.dashboard_url)
    return context


def shutdown_ray() -> bool:
    """Shut down the Ray :func:`init_ray` started or joined (nothing otherwise), now rather than at interpreter
    exit, where Ray's threads may still run and the process can end in an abort.

    Returns whether the cluster's head was found gone: then nothing is shut down (Ray would wait on the lost GCS)
    and the caller should end the process with :func:`end_process`, since a normal exit would wait in Ray's
    teardown until Ray's own timeout ends it with status 1."""
    global _started, _watch
    if not _started:
        return False
    _started = False
    import ray

    if _watch is not None:
        _watch.stop()
        gone = not gcs_accepts(_watch.address, timeout=1.0)
        _watch = None
        if gone:
            return True
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the job is already ending; nothing left to clean up
        pass
    return False


def end_process(status: int) -> None:
    """End this process with ``status`` now, its logs and console output handed on (after :func:`shutdown_ray`
    found the cluster gone)."""
    exit_now(status, drain=restore_stderr)


def filter_stderr(patterns: tuple[re.Pattern[bytes], ...]) -> None:
    """Route this process's file descriptor 2 through a thread that drops whole lines matching ``patterns``.

    Lines written from C++ (Ray's core worker) reach fd 2 directly, so they cannot be filtered by ``logging``.
    Text without a newline yet is held only while it could still become a filtered line (Ray's C++ lines start
    with ``[``), so progress bars redrawn with ``\\r`` pass at once.
    """
    if getattr(filter_stderr, "installed", False):
        return
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        original = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:  # no usable fd 2 (closed, or a platform without pipes): leave the console as it is
        return
    filter_stderr.installed = True

    def pump() -> None:
        held = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, held = (held + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in patterns))
            if held and not held.startswith(b"["):
                out, held = out + held, b""
            if out:
                os.write(original, out)
        if held:
            os.write(original, held)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="dvt-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)  # closes the pipe's last write end here: the thread drains what is left and ends
        thread.join(timeout=2)

    filter_stderr.restore = restore
    atexit.register(restore)


def restore_stderr() -> None:
    """Hand on what :func:`filter_stderr` still holds and write to the console directly again (before an
    ``os._exit``, which runs no ``atexit`` hook)."""
    restore = getattr(filter_stderr, "restore", None)
    if restore is not None:
        restore()
