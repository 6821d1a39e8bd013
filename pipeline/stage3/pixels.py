"""Stage 3 data: which images are held out, and images as ``(3, S, S)`` uint8 rows for the trainers.

Held-out images: among the images whose ``sha1(file name)`` falls below ``val_fraction`` (the rule stage 2 uses, so
with the same fraction the denoiser never trained on them either), the ``max_val_images`` with the smallest
hash are held out and measured; every other image is trained on. The split depends on the file names only, never on
where the images live, worker count or listing order.

Undecodable images stay in the training stream as all-zero rows flagged ``ok = False``, so every epoch has the
same number of steps (the schedule is exact and DDP ranks stay in step); the decoding task logs each with its
reason, and the trainers give them no weight and count them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..io.decode import DecodeConfig, ImageDecodeError, decode_image, resize_to_tensor
from ..io.listing import fetch_bytes
from ..io.shard_reads import read_blocks, read_shard_members
from ..runtime.ray_train import uri_fraction

__all__ = ["split_listing", "decode_batch", "flip_batch", "held_out_pixels", "pixel_batches", "rows_of_rank",
           "training_dataset"]

_log = logging.getLogger(__name__)


def split_listing(uris: list[str], val_fraction: float, max_val_images: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, held_out_ids)``: listing positions; held out = the ``max_val_images`` smallest ``sha1(file name)``
    below ``val_fraction`` (at least one when ``val_fraction > 0`` and there are two images or more)."""
    h = np.array([uri_fraction(u) for u in uris])
    order = np.argsort(h, kind="stable")
    n = int((h < val_fraction).sum()) if val_fraction > 0 else 0
    if val_fraction > 0 and n == 0 and len(uris) >= 2:
        n = 1
    held = np.sort(order[:min(n, max_val_images)])
    train = np.setdiff1d(np.arange(len(uris)), held)
    return train, held


def decode_batch(batch: dict[str, np.ndarray], size: int,
                 decode: DecodeConfig = DecodeConfig()) -> dict[str, np.ndarray]:
    """Ray Data step after :func:`pipeline.io.listing.fetch_bytes`: ``{"pixels": (N, 3, S, S) uint8, "ok": (N,) bool}``.

    Unreadable or undecodable images become all-zero rows with ``ok`` False (and a warning naming the reason).
    """
    n = len(batch["uri"])
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    for i, (uri, data, error) in enumerate(zip(batch["uri"], batch["bytes"], batch["error"])):
        try:
            if error:
                raise ImageDecodeError(str(error))
            image = decode_image(bytes(data), decode)
        except ImageDecodeError as e:
            _log.warning("skipping %s: %s", uri, e)
            continue
        pixels[i] = (resize_to_tensor(image.pixels, size) * 255).round_().to(torch.uint8).numpy()
        ok[i] = True
    return {"pixels": pixels, "ok": ok}


def flip_batch(pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2, drawn from ``seed`` (reproducible after a resume)."""
    g = torch.Generator().manual_seed(seed)
    flip = (torch.rand(len(pixels), generator=g) < 0.5).to(pixels.device)
    return torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)


def rows_of_rank(uris: Sequence[str] | pa.Table, rank: int, world: int) -> Sequence[str] | pa.Table:
    """Every ``world``-th held-out image from ``rank``: URIs, or shard index rows."""
    if isinstance(uris, pa.Table):
        return uris.take(pa.array(range(rank, uris.num_rows, world), pa.int64()))
    return uris[rank::world]


def held_out_pixels(uris: Sequence[str] | pa.Table, size: int, decode: DecodeConfig,
                    image_column: str = "jpg") -> torch.Tensor:
    """This worker's held-out images as one uint8 tensor (undecodable ones left out); ``uris`` may be shard index
    rows (:mod:`pipeline.io.shards`), read from their shards."""
    if not len(uris):
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    if isinstance(uris, pa.Table):
        rows = uris.append_column("image_id", pa.array(np.arange(uris.num_rows), pa.int64()))
        batch = {c: rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names}
        fetched = read_shard_members(batch, image_column)
    else:
        fetched = fetch_bytes({"uri": np.array(uris, dtype=object)})
    out = decode_batch(fetched, size, decode)
    return torch.from_numpy(out["pixels"][out["ok"]])


def pixel_batches(pixels: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for i in range(0, len(pixels), batch_size):
        yield pixels[i:i + batch_size].to(device).float().div_(255)



def _shard_pass_blocks(index: pa.Table, ids: np.ndarray, rng: np.random.Generator) -> list[pa.Table]:
    """One pass over shard inputs: the read blocks of ``ids`` (runs of one shard's members) in random order, each
    block's rows shuffled (a shuffle buffer of a block: reads stay sequential within a shard)."""
    rows = index.take(pa.array(np.sort(ids), pa.int64())).append_column("image_id", pa.array(np.sort(ids), pa.int64()))
    blocks = read_blocks(rows)
    return [blocks[b].take(pa.array(rng.permutation(blocks[b].num_rows), pa.int64()))
            for b in rng.permutation(len(blocks))]


def training_dataset(uris: Sequence[str], ids: np.ndarray, size: int, batch_size: int,
                     read_options: Mapping[str, Any] | None = None, decode: DecodeConfig = DecodeConfig(), *,
                     passes: int = 1, seed: int = 0, index: pa.Table | None = None, image_column: str = "jpg"):
    """The Ray Dataset of training images ``uris[ids]``: ``{"pixels", "ok"}`` rows, ``passes`` passes in one stream,
    each a fresh permutation drawn from ``(seed, pass)`` (so the trainers start the pipeline once per run).

    Bytes are fetched and decoded by tasks run with ``read_options`` (``map_batches`` options,
    :func:`pipeline.runtime.ray_train.read_step_options`; default: 0.1 CPU to fetch, 0.25 to decode); only
    ``(3, size, size)`` uint8 pixels
    travel to the trainers (a quarter of float32), in blocks of a few training batches. With a shard ``index``
    (:func:`pipeline.io.shards.shard_index`, rows aligned with ``uris``) each read task takes a run of one shard's
    members, the runs in random order and the images within a run shuffled (:func:`_shard_pass_blocks`).
    """
    import ray

    ids = np.asarray(ids, dtype=np.int64)
    batch = max(1, min(16, batch_size))
    fetch = dict(read_options or {"num_cpus": 0.1})
    read = dict(read_options or {"num_cpus": 0.25})
    if index is not None:
        blocks = [b for p in range(passes) for b in _shard_pass_blocks(index, ids, np.random.default_rng([seed, p]))]
        return (ray.data.from_arrow(blocks)
                .map_batches(read_shard_members, batch_size=None, fn_kwargs={"image_column": image_column}, **fetch)
                .map_batches(decode_batch, fn_kwargs={"size": size, "decode": decode}, batch_size=batch, **read))
    order = np.concatenate([ids[np.random.default_rng([seed, p]).permutation(len(ids))] for p in range(passes)])
    table = pa.table({"image_id": pa.array(order, pa.int64()), "uri": pa.array([uris[i] for i in order], pa.string())})
    per_block = max(16, 4 * batch_size, -(-table.num_rows // 4096))
    ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, table.num_rows, per_block)])
    return (ds.map_batches(fetch_bytes, batch_size=batch, **fetch)
            .map_batches(decode_batch, fn_kwargs={"size": size, "decode": decode}, batch_size=batch, **read))
