"""Stage-2 training data: every pass of a run over the training pairs in one Ray Data stream.

Iterating a Ray Dataset once per epoch starts its execution again every epoch: tasks are scheduled, stores are
opened and the first batch waits for all of it (3-10 s per epoch on a small CPU machine, most of an epoch of a
few hundred images). Here the driver lays out all the passes a run needs at once, each pass a fresh permutation
of every training image of every store, and the trainers iterate that one stream until their step budget is
spent: the pipeline starts once per run (and once more after a worker failure, when the restarted workers take
fresh passes from the start of the stream).

Rows are ``(store index, image id)`` lists; Ray tasks read their arrays from the stores a block at a time
(:func:`pipeline.store.feature_store.read_pairs`), so only ids travel through the driver.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..store.feature_store import read_pairs, task_options

if TYPE_CHECKING:
    import ray.data

__all__ = ["passes_needed", "pair_stream"]

#: Blocks of the stream at most: bounds the objects the driver puts in Ray's store for very long runs.
MAX_BLOCKS = 4096


def passes_needed(num_train: int, total_steps: int, global_batch: int) -> int:
    """Passes over ``num_train`` images that cover ``total_steps`` batches of ``global_batch``, plus one spare
    (each worker drops its last incomplete batch, and a restarted worker starts the stream again)."""
    return math.ceil(total_steps * global_batch / max(1, num_train)) + 1


def pair_stream(sources: Sequence[tuple[str, np.ndarray]], *, passes: int, seed: int, rows_per_block: int,
                read_options: Mapping[str, Any] | None = None) -> ray.data.Dataset:
    """A Ray Dataset of ``passes`` shuffled passes over the ``(store URL, training ids)`` in ``sources``.

    Columns: ``raw`` and ``clean`` ``(gh, gw, C)`` as stored (float16 or float32). Pass ``p`` is the permutation
    drawn from ``(seed, p)``, so a run's data order depends on its seed only. ``read_options``: ``map_batches``
    options of the read step (:func:`pipeline.runtime.ray_train.read_step_options`; default: 0.25 CPU per task).
    """
    import ray.data

    store_index = np.concatenate([np.full(len(ids), i, dtype=np.int32) for i, (_, ids) in enumerate(sources)])
    image_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in sources])
    n = len(image_ids)
    if n == 0:
        raise ValueError("no training images: every image of the stores is held out or failed")
    order = np.concatenate([np.random.default_rng([seed, p]).permutation(n) for p in range(passes)])
    table = pa.table({"store": pa.array(store_index[order]), "image_id": pa.array(image_ids[order])})
    step = max(rows_per_block, math.ceil(table.num_rows / MAX_BLOCKS))
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    urls = tuple(url for url, _ in sources)
    return ray.data.from_arrow(blocks).map_batches(
        read_pairs, batch_size=rows_per_block, batch_format="numpy",
        fn_kwargs={"urls": urls, "options": task_options(urls)}, **dict(read_options or {"num_cpus": 0.25}))
