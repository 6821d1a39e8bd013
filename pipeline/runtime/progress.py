"""A periodic progress line for long jobs: done, failed, rate and ETA, every few seconds, and a warning when
nothing finishes for much longer than usual.

The line comes from its own thread, so it keeps coming while the driver waits on Ray for the next result: a job
whose workers or storage stall says so instead of falling silent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Progress:
    """Counts finished items and logs a line at most every ``every_s`` seconds (and on :meth:`close`).

    After :meth:`start`, a thread logs the line every ``every_s`` seconds even when nothing finishes, and a
    warning when nothing has finished for longer than ``stall_s`` and four times the usual time between results
    (the usual time is the mean gap so far, so slow work that is steady never warns).
    """

    total: int
    label: str = "progress"
    every_s: float = 30.0
    stall_s: float | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("dvt"))
    ok: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = field(default=0.0, repr=False)
    _logged: int = field(default=-1, repr=False)
    _last_result: float | None = field(default=None, repr=False)
    _results: int = field(default=0, repr=False)
    _warned_at: float = field(default=0.0, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stall_s is None:
            self.stall_s = max(60.0, 10 * self.every_s)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def start(self) -> Progress:
        """Start the thread that keeps the line coming and watches for stalls."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=f"{self.label}-progress", daemon=True)
            self._thread.start()
        return self

    def update(self, ok: int = 0, failed: int = 0) -> None:
        now = time.monotonic()
        with self._lock:
            self.ok += ok
            self.failed += failed
            self._last_result = now
            self._results += 1
            if now - self._last >= self.every_s:
                self._last = now
                self._log()

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = format_duration(eta) if eta != float("inf") else "unknown"
        return (f"{self.label}: {self.done}/{self.total} images ({self.failed} failed), {rate:.3g} images/s, "
                f"elapsed {format_duration(self.elapsed)}, ETA {eta_text}")

    def quiet_for(self, now: float | None = None) -> float:
        """Seconds since the last result (since the start when there was none)."""
        now = time.monotonic() if now is None else now
        return now - (self._last_result if self._last_result is not None else self.started)

    def stalled(self, now: float | None = None) -> bool:
        """Has nothing finished for longer than ``stall_s`` and four times the usual gap?"""
        now = time.monotonic() if now is None else now
        usual = (self._last_result - self.started) / self._results if self._results else 0.0
        return self.quiet_for(now) > max(self.stall_s, 4 * usual)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._logged != self.done:
                self._log()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.every_s, 5.0)):
            now = time.monotonic()
            with self._lock:
                if self.stalled(now) and now - self._warned_at >= self.stall_s:
                    self._warned_at = now
                    what = "no image finished" if self._results else "no image has finished"
                    self.logger.warning(
                        "%s: %s for %s: the workers or the storage may be stalled (storage that stops answering "
                        "fails the job by itself; `ray status` shows the workers)", self.label, what,
                        format_duration(self.quiet_for(now)))
                if now - self._last >= self.every_s:
                    self._last = now
                    self._log()

    def _log(self) -> None:
        self._logged = self.done
        self.logger.info("%s", self.line())
