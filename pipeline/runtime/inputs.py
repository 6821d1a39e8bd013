"""What a job's ``--images`` names: loose image files (a list of URIs) or shards (an index of their members).

:func:`list_inputs` is where an image job chooses: shards (:mod:`pipeline.io.shards`) come back as
:class:`ShardInputs`, everything else as the URIs :func:`pipeline.io.listing.list_uris` gives. A store made from
shards keeps each image's place in its shard in its listing, so a re-run indexes only shards the store has not
seen (a corpus that grows by new shards costs the new shards, not the whole corpus again).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..io.listing import list_uris
from ..io.shards import INDEX_COLUMNS, ShardOptions, index_shards, is_shard_source, shard_urls
from .checks import JobConfigError

__all__ = ["ShardInputs", "list_inputs", "parse_keep_columns"]

_log = logging.getLogger(__name__)

#: Above this many shards to index, the index is built by Ray tasks across the cluster (Ray is started for it).
RAY_INDEX_SHARDS = 32


@dataclass
class ShardInputs:
    """The images of a shard source: one row per image with :data:`pipeline.io.shards.INDEX_COLUMNS` and the kept
    columns, in listing order."""

    index: pa.Table
    options: ShardOptions

    def __len__(self) -> int:
        return self.index.num_rows

    @property
    def uris(self) -> pa.Array:
        return self.index["uri"].combine_chunks()

    def shards(self) -> list[str]:
        """The shard files, in listing order (each once)."""
        return pc.unique(self.index["shard"].combine_chunks()).to_pylist()

    def listing_rows(self) -> pa.Table:
        """What the store's listing keeps per image: the URI, where it lies in its shard, the kept columns."""
        return self.index.select([*INDEX_COLUMNS, *(c for c in self.options.keep_columns if c not in INDEX_COLUMNS)])


def parse_keep_columns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"key,url,caption"`` (the flag) or a sequence -> a tuple of names."""
    if not value:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))


def _known_rows(output: str, urls: Sequence[str]) -> pa.Table | None:
    """The listing rows of the store at ``output`` for shards among ``urls``, if it was made from shards."""
    from ..store import FeatureStore

    try:
        listing = FeatureStore.open(output, "r").listing()
    except Exception:  # noqa: BLE001 - no store yet (or not readable): every shard is indexed
        return None
    if "shard" not in listing.column_names:
        return None
    return listing.filter(pc.is_in(listing["shard"], pa.array(list(urls), pa.string())))


def list_inputs(config) -> list[str] | ShardInputs:
    """The images ``config`` (an image job's config) covers: URIs, or a shard index (module docstring)."""
    options = ShardOptions(image_column=config.image_column, keep_columns=parse_keep_columns(config.keep_columns))
    if not is_shard_source(config.images, options.image_column):
        if options.keep_columns:
            raise JobConfigError(f"--keep-columns applies to shard inputs (.tar or .parquet with image bytes); "
                                 f"{config.images} lists image files")
        return list_uris(config.images, config.limit)
    urls = shard_urls(config.images)
    known = None if config.overwrite else _known_rows(config.output, urls)
    seen = set(known["shard"].to_pylist()) if known is not None else set()
    fresh = [u for u in urls if u not in seen]
    tables = []
    if known is not None and known.num_rows:
        missing = [c for c in options.keep_columns if c not in known.column_names]
        if missing:
            _log.warning("the store's listing has no column %s for the shards it has seen; their rows keep it empty",
                         ", ".join(missing))
        tables.append(known.drop_columns(["image_id"]))
        _log.info("%d of %d shards already indexed in %s", len(seen & set(urls)), len(urls), config.output)
    if fresh:
        if config.limit is None and len(fresh) > RAY_INDEX_SHARDS:
            from .ray_session import init_ray

            init_ray(config.dashboard)
        tables.append(index_shards(fresh, options, limit=config.limit))
    index = pa.concat_tables(tables, promote_options="default")
    order = {u: i for i, u in enumerate(urls)}  # listing order: the source's shard order
    if len(tables) > 1:
        rank = pa.array([order[s] for s in index["shard"].to_pylist()], pa.int64())
        index = index.append_column("_rank", rank).sort_by([("_rank", "ascending")]).drop_columns(["_rank"])
    if config.limit is not None:
        index = index.slice(0, config.limit)
    if index.num_rows == 0:
        raise JobConfigError(f"{config.images} holds no images")
    return ShardInputs(index, options)
