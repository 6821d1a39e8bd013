"""Training data as one deterministic sequence of global batches, which each Ray Train worker reads for itself.

Why not a Ray Data stream split across the trainers: Ray's streaming split hands each block to whichever trainer
asks first, so the images a rank sees at a step depend on timing (three uninterrupted distillation runs with one
seed ended 3% apart), and a worker group restarted after a node loss reads the stream from its start again, not
from where its checkpoint stopped.

Here a run's data order is a function of its seed: pass ``p`` over the ``n`` training rows is the permutation
drawn from ``(seed, p)`` (or the job's own order of a pass, :class:`RankBatches`'s ``order``), the passes follow
each other, step ``s`` takes the global rows ``[s * G, (s + 1) * G)`` and rank ``r`` the ``r``-th slice of ``G /
world`` of them. A worker restored at step ``s`` reads from step ``s`` on, so a resumed run trains on exactly the
batches the uninterrupted run would have. Each worker reads its slices in a small thread pool (storage I/O,
decompression and image decoding release the GIL), ``prefetch`` steps ahead of the one it trains on: no read
tasks to schedule, no pipeline to start again after a restart, and no CPU budget to share with the trainers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["permutation_order", "global_rows", "RankBatches"]

_log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

#: Tries of one read before its step fails (and Ray Train restarts the group from its checkpoint).
READ_ATTEMPTS = 3


def permutation_order(n: int, seed: int) -> Callable[[int], np.ndarray]:
    """Pass ``p`` of ``n`` rows: the permutation drawn from ``(seed, p)``."""
    return lambda p: np.random.default_rng([seed, p]).permutation(n)


def global_rows(order: Callable[[int], np.ndarray], n: int, start: int, stop: int,
                cache: dict[int, np.ndarray]) -> np.ndarray:
    """Rows ``[start, stop)`` of the endless sequence ``order(0), order(1), ...`` of passes of ``n`` rows each.

    ``cache`` keeps the two passes last used, so reading step after step draws each pass's order once.
    """
    if n < 1:
        raise ValueError("no training rows: every image is held out or failed")
    out, at = [], start
    while at < stop:
        p, i = divmod(at, n)
        if p not in cache:
            for old in [k for k in cache if k != p - 1]:
                del cache[old]
            cache[p] = np.asarray(order(p))
            if len(cache[p]) != n:
                raise ValueError(f"pass {p} has {len(cache[p])} rows, not {n}")
        take = min(stop - at, n - i)
        out.append(cache[p][i:i + take])
        at += take
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class RankBatches(Iterator[Batch]):
    """Rank ``rank`` of ``world``'s batches from step ``start_step`` on: ``read(rows)`` of its slice of each step.

    Args:
        order: pass ``p`` -> the positions of the ``n`` rows in that pass's order.
        read: row positions -> a batch (a dict of arrays, first axis the rows, in the order asked). It runs in the
            pool's threads, ``rows_per_read`` rows at a time (default: a step's slice in one read, so a store reads
            its chunks concurrently); the pieces of a step are put together in order.
        batch: rows per step for this rank (the global batch is ``batch * world``).
        threads: reads at a time. ``prefetch``: steps read ahead of the one trained on (default ``threads + 2``,
            so every thread has a step to read while the trainer takes one).
    """

    def __init__(self, order: Callable[[int], np.ndarray], n: int, read: Callable[[np.ndarray], Batch], *, batch: int,
                 rank: int, world: int, start_step: int = 0, threads: int = 4, prefetch: int | None = None,
                 rows_per_read: int | None = None):
        if batch < 1 or not 0 <= rank < world:
            raise ValueError(f"a rank's batch must be >= 1 and 0 <= rank < world (batch {batch}, rank {rank}/{world})")
        self.order, self.n, self.read, self.batch, self.rank, self.world = order, n, read, batch, rank, world
        self.step = start_step
        self.prefetch = max(1, prefetch if prefetch is not None else threads + 2)
        self.rows_per_read = max(1, rows_per_read or batch)
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"read-rank{rank}")
        self._cache: dict[int, np.ndarray] = {}
        self._pending: deque[list[Future[Batch]]] = deque()
        self._next_submit = start_step
        self._closed = False

    def rows(self, step: int) -> np.ndarray:
        """This rank's row positions at ``step``."""
        g = self.batch * self.world
        begin = step * g + self.rank * self.batch
        return global_rows(self.order, self.n, begin, begin + self.batch, self._cache)

    def _submit(self) -> None:
        while len(self._pending) < self.prefetch:
            rows = self.rows(self._next_submit)
            self._pending.append([self._pool.submit(self._read, rows[i:i + self.rows_per_read])
                                  for i in range(0, len(rows), self.rows_per_read)])
            self._next_submit += 1

    def _read(self, rows: np.ndarray) -> Batch:
        """``read(rows)``, tried again after a failure (a storage hiccup); the last failure is the step's error."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return self.read(rows)
            except Exception as e:  # noqa: BLE001 - re-raised after the last attempt
                if attempt == READ_ATTEMPTS - 1 or self._closed:
                    raise
                _log.warning("rank %d: reading %d training rows failed (%s: %s); trying again", self.rank, len(rows),
                             type(e).__name__, e)
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def __next__(self) -> Batch:
        self._submit()
        pieces = [f.result() for f in self._pending.popleft()]
        self.step += 1
        self._submit()
        if len(pieces) == 1:
            return pieces[0]
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def close(self) -> None:
        """Stop reading ahead (reads already running finish in the background)."""
        self._closed = True
        for futures in self._pending:
            for f in futures:
                f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RankBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
