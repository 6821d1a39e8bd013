"""The errors a job raises before it starts work, at the bottom of the runtime so every wing can raise them."""

from __future__ import annotations

__all__ = ["JobConfigError"]


class JobConfigError(ValueError):
    """A flag or setting of a job is out of range; the message names the flag."""
