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
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..io.decode import DecodeConfig, ImageDecodeError, decode_image, resize_pixels
from ..io.listing import fetch_bytes
from ..io.shard_reads import read_blocks, read_shard_members
from ..runtime.ray_train import uri_fraction

__all__ = ["split_listing", "decode_batch", "flip_batch", "held_out_pixels", "pixel_batches", "rows_of_rank",
           "PixelRows"]

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
        pixels[i] = resize_pixels(image.pixels, size)
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



class PixelRows:
    """The training images ``ids`` of a listing as rows for :class:`pipeline.runtime.train_stream.RankBatches`: a pass's
    order of their listing positions, and ``{"pixels": (N, 3, size, size) uint8, "ok": (N,) bool}`` of a few of them.

    ``images``: a table with a ``uri`` column aligned with the listing, or a shard index
    (:func:`pipeline.io.shards.shard_index`). With shards, a pass takes runs of one shard's members (the runs in random
    order, each run's images shuffled), so a read of consecutive rows stays within one shard: one ranged read.
    """

    def __init__(self, images: pa.Table, ids: np.ndarray, size: int, decode: DecodeConfig = DecodeConfig(), *,
                 seed: int = 0, image_column: str = "jpg", shards: bool = False):
        self.images, self.ids = images, np.sort(np.asarray(ids, np.int64))
        self.size, self.decode, self.seed, self.image_column, self.shards = size, decode, seed, image_column, shards

    def __len__(self) -> int:
        return len(self.ids)

    def order(self, p: int) -> np.ndarray:
        """The listing positions of pass ``p``, drawn from ``(seed, p)``."""
        rng = np.random.default_rng([self.seed, p])
        if not self.shards:
            return self.ids[rng.permutation(len(self.ids))]
        rows = self.images.take(pa.array(self.ids, pa.int64())).append_column("image_id", pa.array(self.ids, pa.int64()))
        blocks = read_blocks(rows)
        return np.concatenate([blocks[b]["image_id"].to_numpy()[rng.permutation(blocks[b].num_rows)]
                               for b in rng.permutation(len(blocks))])

    def read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Fetch and decode the images at ``positions`` (undecodable ones: zero rows with ``ok`` False)."""
        rows = self.images.take(pa.array(positions, pa.int64()))
        if self.shards:
            rows = rows.append_column("image_id", pa.array(positions, pa.int64()))
            batch = {c: rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names}
            fetched = read_shard_members(batch, self.image_column)
        else:
            fetched = fetch_bytes({"uri": rows["uri"].to_numpy(zero_copy_only=False)})
        return decode_batch(fetched, self.size, self.decode)
