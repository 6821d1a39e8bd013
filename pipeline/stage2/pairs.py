"""Stage-2 training data: the training pairs of every store as rows ``0..n-1``, which each Ray Train worker reads
for its slice of each step (:class:`pipeline.runtime.train_stream.RankBatches`).

A row is ``(store, image id)``; :meth:`PairRows.read` gets ``raw`` and ``clean`` of a few rows from their stores
(:func:`pipeline.store.feature_store.read_pairs`, each store opened once per process), so only ids are laid out and
the arrays go from storage straight to the worker that trains on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..store.feature_store import read_pairs, task_options

__all__ = ["PairRows"]


class PairRows:
    """The ``(store URL, training ids)`` of ``sources`` as rows; ``options``: storage options for reopening the
    stores in another process (:func:`pipeline.store.feature_store.task_options`; default: this process's)."""

    def __init__(self, sources: Sequence[tuple[str, Sequence[int]]], options: str | None = None):
        self.urls = tuple(url for url, _ in sources)
        self.store = np.concatenate([np.full(len(ids), i, np.int32) for i, (_, ids) in enumerate(sources)] or
                                    [np.zeros(0, np.int32)])
        self.image_id = np.concatenate([np.asarray(ids, np.int64) for _, ids in sources] or [np.zeros(0, np.int64)])
        self.options = options if options is not None else task_options(self.urls)

    def __len__(self) -> int:
        return len(self.image_id)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``raw`` and ``clean`` ``(len(rows), gh, gw, C)`` of ``rows``, as stored (float16 or float32)."""
        return read_pairs({"store": self.store[rows], "image_id": self.image_id[rows]}, urls=self.urls,
                          options=self.options)
