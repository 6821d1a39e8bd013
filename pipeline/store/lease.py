"""One writing job per store: a lease object, ``<store>/lease.json``, taken before a job writes and renewed while
it runs.

A second job on the same store is refused with a message naming the first (job, host, pid, start, last
heartbeat). The lease names its holder and carries a heartbeat the holder renews every ``ttl_s / 4`` seconds;
a lease whose heartbeat is older than ``ttl_s``, or whose holder ran on this host and is no longer running,
is stale and the next job takes it over.

Taking and renewing are conditional writes, so two jobs can never both believe they hold it: on S3 a create
is ``PutObject`` with ``If-None-Match: *`` and a renewal or takeover ``If-Match: <etag>`` of the lease that
was read; on a local disk a create is an exclusive hard link of a complete file. Other filesystems
(``memory://``) check and then write, which is enough for one process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ..io.storage import filesystem, storage_errors
from .errors import StoreError

__all__ = ["LEASE_FILE", "LeaseHolder", "StoreBusyError", "LeaseLostError", "StoreLease", "lease_holder"]

_log = logging.getLogger(__package__)

LEASE_FILE = "lease.json"

#: Seconds without a heartbeat after which a lease is stale (renewed every quarter of it).
DEFAULT_TTL_S = 120.0

#: Seconds one lease operation may take when the job is ending (a release must not hang a finished job).
_RELEASE_TIMEOUT_S = 10.0


class StoreBusyError(StoreError):
    """Another job holds the store's lease."""


class LeaseLostError(StoreError):
    """This job's lease was taken over (its heartbeat went stale, for example while the driver was paused)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class LeaseHolder:
    """The contents of ``lease.json``."""

    owner: str
    job: str
    host: str
    pid: int
    started: str
    heartbeat: str
    ttl_s: float

    def age_s(self) -> float:
        """Seconds since the last heartbeat, by this machine's clock."""
        try:
            beat = datetime.fromisoformat(self.heartbeat)
        except ValueError:
            return float("inf")
        return max(0.0, (datetime.now(timezone.utc) - beat).total_seconds())

    def gone(self) -> bool:
        """Ran on this host and is no longer running."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def stale(self) -> bool:
        return self.age_s() > self.ttl_s or self.gone()

    def describe(self) -> str:
        return (f"a {self.job} job on host {self.host} (pid {self.pid}, lease {self.owner[:8]}), started "
                f"{self.started}, last heartbeat {self.age_s():.0f} s ago")

    @classmethod
    def parse(cls, data: bytes) -> LeaseHolder | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None


class StoreLease:
    """The lease of the store at ``url`` for one job. Use :meth:`acquire`, then :meth:`release` (or ``with``).

    While held, a thread renews the heartbeat; if the lease is found taken over, :attr:`lost` is set and
    :meth:`check` raises :class:`LeaseLostError`.
    """

    def __init__(self, url: str, job: str, *, ttl_s: float = DEFAULT_TTL_S,
                 storage_options: Mapping[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.job = job
        self.ttl_s = float(ttl_s)
        self.fs, root = filesystem(self.url, **dict(storage_options or {}))
        self.path = f"{root.rstrip('/')}/{LEASE_FILE}"
        self.local = bool({"file", "local"} & set(self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                                  else (self.fs.protocol,)))
        self.s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.holder = LeaseHolder(owner=uuid.uuid4().hex, job=job, host=socket.gethostname(), pid=os.getpid(),
                                  started=_now(), heartbeat=_now(), ttl_s=self.ttl_s)
        self.lost = threading.Event()
        self._etag: str | None = None
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ public
    def acquire(self) -> StoreLease:
        """Take the lease, or raise :class:`StoreBusyError` naming the job that holds it."""
        with storage_errors(self.url):
            if not self._create():
                current, etag = self._read()
                if current is None:  # vanished or unreadable between our create and read: try once more
                    if not self._create():
                        raise StoreBusyError(f"{self.url} is being taken by another job at this moment; "
                                             f"try again in a few seconds.")
                elif not current.stale():
                    raise StoreBusyError(
                        f"{self.url} is in use by {current.describe()}. One job writes a store at a time: wait "
                        f"for it to finish, or if it is no longer running, re-run after its lease expires "
                        f"({max(0.0, current.ttl_s - current.age_s()):.0f} s from now).")
                else:
                    _log.warning("%s: taking over the stale lease of %s", self.url, current.describe())
                    if not self._replace(etag, current):
                        raise StoreBusyError(f"{self.url} was just taken by another job; re-run to see which.")
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat, name="dvt-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another job has taken the lease over."""
        if self.lost.is_set():
            raise LeaseLostError(f"{self.url}: another job took over this job's lease (its heartbeat went stale); "
                                 f"stopping so two jobs never write the store at once.")

    def renew(self) -> None:
        """Refresh the heartbeat; sets :attr:`lost` if the lease is no longer ours."""
        current, etag = self._read()
        if current is None or current.owner != self.holder.owner:
            self.lost.set()
            return
        self.holder.heartbeat = _now()
        if not self._replace(etag, current):
            self.lost.set()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (best effort, bounded in time)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_RELEASE_TIMEOUT_S)
            self._thread = None
        if not self._held:
            return
        self._held = False
        try:
            current, _ = self._read(timeout=_RELEASE_TIMEOUT_S)
            if current is not None and current.owner == self.holder.owner:
                self.fs.rm_file(self.path, **self._timeout(_RELEASE_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001 - a lease left behind goes stale; the next job takes it over
            _log.warning("%s: could not release the lease (%s); the next job takes it over once it is stale "
                         "(%.0f s)", self.url, e, self.ttl_s)

    def abandon(self) -> None:
        """Stop renewing without another request (storage stopped answering, or the store is being removed)."""
        self._stop.set()
        self._held = False

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ storage
    def _timeout(self, seconds: float | None) -> dict[str, float]:
        return {"timeout": seconds} if seconds and hasattr(self.fs, "loop") else {}

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=1).encode()

    def _read(self, timeout: float | None = None) -> tuple[LeaseHolder | None, str | None]:
        try:
            if self.s3:
                etag = self.fs.info(self.path, refresh=True, **self._timeout(timeout)).get("ETag")
                return LeaseHolder.parse(self.fs.cat_file(self.path, **self._timeout(timeout))), etag
            with self.fs.open(self.path, "rb") as f:
                return LeaseHolder.parse(f.read()), None
        except FileNotFoundError:
            return None, None

    def _create(self) -> bool:
        """Write the lease if there is none; False if one exists."""
        data = self._payload()
        if self.local:
            tmp = f"{self.path}.{self.holder.owner[:8]}.tmp"
            self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lease exists
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            out = self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        self._etag = (out or {}).get("ETag") if isinstance(out, dict) else None
        return True

    def _replace(self, etag: str | None, expected: LeaseHolder) -> bool:
        """Overwrite the lease read as ``expected`` (``etag`` on S3); False if it changed meanwhile."""
        data = self._payload()
        if self.s3:
            try:
                out = self.fs.pipe_file(self.path, data, IfMatch=etag) if etag else \
                    self.fs.pipe_file(self.path, data, mode="create")
            except (FileExistsError, OSError) as e:
                if isinstance(e, FileExistsError) or "precondition" in str(e).lower() or getattr(e, "errno", 0) == 22:
                    return False
                raise
            self._etag = (out or {}).get("ETag") if isinstance(out, dict) else None
            return True
        current, _ = self._read()
        if current is not None and current != expected:
            return False
        if self.local:
            tmp = f"{self.path}.{self.holder.owner[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - storage trouble: the job itself will hit it and fail clearly
                if not self._stop.is_set():  # (once the job is ending, its own error is the one to read)
                    _log.warning("%s: could not renew the lease (%s)", self.url, e)
                continue
            if self.lost.is_set():
                _log.error("%s: another job took over this job's lease; stopping", self.url)
                return


def lease_holder(url: str, storage_options: Mapping[str, Any] | None = None) -> LeaseHolder | None:
    """Who holds the lease of the store at ``url`` (stale or not), or ``None``."""
    lease = StoreLease(url, "query", storage_options=storage_options)
    with storage_errors(lease.url):
        current, _ = lease._read()
    return current
