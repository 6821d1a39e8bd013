"""Notice that the Ray cluster's head is gone and end the job in one line, before Ray ends it without a word.

The head node holds the GCS, the job's driver (``ray job submit`` runs it there) and Ray Train's controller (an
actor pinned to the driver's node). When that node dies the cluster goes with it (Ray without GCS fault
tolerance): the driver and every worker wait ``RAY_gcs_rpc_server_reconnect_timeout_s`` (60 s by default) for
the GCS to come back, then exit with status 1 and no message of ours, the status of a refused command.

:class:`HeadWatch` probes the GCS's port from a daemon thread of the driver. When it has not accepted a
connection for a grace period shorter than Ray's own timeout (by default 80% of it), the job logs one line that
says what happened and what to do, and the process exits with status 4 (stopped by a fault: every committed unit
or registered checkpoint is kept, and the same command resumes). A GCS that comes back within the grace period
(GCS fault tolerance restarts it) is not reported. A TCP connect costs the GCS nothing it notices, so the probe
runs every ``interval_s`` for the whole job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["HeadWatch", "gcs_accepts", "default_grace_s", "lost_head_message", "exit_lost", "exit_now"]

_log = logging.getLogger("dvt")

#: Ray's default for ``RAY_gcs_rpc_server_reconnect_timeout_s``.
RAY_RECONNECT_DEFAULT_S = 60.0


def gcs_accepts(address: str, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def default_grace_s(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """80% of the time Ray itself waits for a lost GCS (``RAY_gcs_rpc_server_reconnect_timeout_s``), at least 1 s:
    long enough for a GCS that restarts, short enough to speak before Ray ends the process."""
    try:
        ray_timeout = float(environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", RAY_RECONNECT_DEFAULT_S))
    except ValueError:
        ray_timeout = RAY_RECONNECT_DEFAULT_S
    return max(1.0, 0.8 * ray_timeout)


def lost_head_message(address: str, silent_s: float) -> str:
    return (f"lost the Ray cluster's head node: its GCS at {address} has not answered for {silent_s:.0f} s, and the "
            "cluster's workers go with it (Ray without GCS fault tolerance). Committed work and registered "
            "checkpoints are kept in the output; submit the same command again once the cluster is up to resume")


class HeadWatch:
    """A daemon thread that calls ``on_lost(message)`` once the GCS at ``address`` has refused connections for
    ``grace_s`` seconds in a row (by default :func:`exit_lost`: log the message, exit with status 4).

    Use :meth:`start` and :meth:`stop` (or ``with``); :meth:`stop` returns at once and the thread ends within
    ``interval_s``.
    """

    def __init__(self, address: str, grace_s: float | None = None, interval_s: float = 2.0,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.grace_s = default_grace_s() if grace_s is None else float(grace_s)
        self.interval_s = float(interval_s)
        self.on_lost = on_lost or exit_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dvt-head-watch", daemon=True)
        self.fired = False

    def start(self) -> HeadWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> HeadWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        silent_since: float | None = None
        while not self._stop.wait(self.interval_s):
            if gcs_accepts(self.address, timeout=min(2.0, self.interval_s)):
                silent_since = None
                continue
            now = time.monotonic()
            silent_since = now if silent_since is None else silent_since
            if now - silent_since >= self.grace_s and not self._stop.is_set():
                self.fired = True
                self.on_lost(lost_head_message(self.address, now - silent_since))
                return


def exit_lost(message: str, drain: Callable[[], None] | None = None) -> None:
    """Log ``message`` as the job's one error line and end the process with status 4 (:func:`exit_now`)."""
    from .failures import EXIT_FAULT

    _log.error("%s", message)
    exit_now(EXIT_FAULT, drain)


def exit_now(status: int, drain: Callable[[], None] | None = None) -> None:
    """End the process with ``status`` at once, logs flushed; ``drain`` runs first (it hands on what a stderr filter
    still holds).

    For a driver whose cluster is gone: its main thread may be blocked in Ray calls that will not return, and a
    normal exit waits in Ray's teardown until Ray's own timeout ends the process with status 1. Nothing of ours is
    half-written (every store object and checkpoint is committed atomically), so nothing is lost by not waiting.
    """
    for handler in logging.getLogger().handlers + _log.handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    if drain is not None:
        drain()
    os._exit(status)
