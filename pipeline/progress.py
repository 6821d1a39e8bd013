"""A periodic progress line for long jobs: done, failed, rate and ETA, every few seconds."""

from __future__ import annotations

import logging
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
    """Counts finished items and logs a line at most every ``every_s`` seconds (and on :meth:`close`)."""

    total: int
    label: str = "progress"
    every_s: float = 30.0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("dvt"))
    ok: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = field(default=0.0, repr=False)
    _logged: int = field(default=-1, repr=False)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, ok: int = 0, failed: int = 0) -> None:
        self.ok += ok
        self.failed += failed
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._log()

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = format_duration(eta) if eta != float("inf") else "unknown"
        return (f"{self.label}: {self.done}/{self.total} images ({self.failed} failed), {rate:.3g} images/s, "
                f"elapsed {format_duration(self.elapsed)}, ETA {eta_text}")

    def close(self) -> None:
        if self._logged != self.done:
            self._log()

    def _log(self) -> None:
        self._logged = self.done
        self.logger.info("%s", self.line())
