"""Errors of the feature store: each message says what is wrong and what to do."""

from __future__ import annotations

__all__ = ["StoreError", "StoreNotFoundError", "StoreMismatchError"]


class StoreError(Exception):
    """A feature store cannot be used as asked; the message says why and what to do."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The URL holds no feature store (or an unfinished one)."""


class StoreMismatchError(StoreError, ValueError):
    """The store was written with another configuration than the one in use."""
