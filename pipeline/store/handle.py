"""The store as its helper modules see it.

:class:`FeatureStore` (``feature_store.py``) imports the modules that implement its parts (``create``,
``info``, ``writer``, ``compact``). Those modules name the store through the protocols below instead of the
class, so nothing imports ``feature_store`` back, not even for type hints. ``FeatureStore`` is the one
implementation; ``tests/test_store.py`` checks that it satisfies :class:`StoreHandle` and that no module of the
package imports it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import pyarrow as pa

from .manifest import ImageRecord
from .layout import StoreLayout

__all__ = ["StoreHandle", "StoreClass"]


@runtime_checkable
class StoreHandle(Protocol):
    """An open store: where it is, what it holds, and the calls its helper modules make."""

    url: str
    mode: str
    storage_options: dict[str, Any]
    fs: Any
    root: str
    attrs: dict[str, Any]
    layout: StoreLayout
    num_rows: int
    zarr_arrays: dict[str, Any]

    def listing(self) -> pa.Table: ...

    def refresh(self) -> Any: ...

    def manifest(self, refresh: bool = False, columns: Sequence[str] | None = None) -> pa.Table: ...

    def row_status(self) -> np.ndarray: ...

    def unit(self) -> AbstractContextManager[Any]: ...

    def write_unit(self, records: Sequence[ImageRecord | Mapping[str, Any]],
                   arrays: Mapping[str, Any] | None = None) -> str: ...

    def write_rows(self, ids: np.ndarray, data: Mapping[str, np.ndarray]) -> None: ...


S = TypeVar("S", bound=StoreHandle, covariant=True)


class StoreClass(Protocol[S]):
    """The store class itself, as ``create`` uses it: built from an open Zarr group, or opened by URL."""

    def __call__(self, url: str, group: Any, mode: str, storage_options: Mapping[str, Any] | None = None) -> S: ...

    def open(self, url: str, mode: str = "r", *, storage_options: Mapping[str, Any] | None = None) -> S: ...
