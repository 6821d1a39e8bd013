"""Where shards are: a brace pattern, a glob, a folder or prefix of ``.tar`` / ``.parquet`` files, or one shard,
expanded to shard URLs in a stable order (see :mod:`.shards` for the index built from them).
"""

from __future__ import annotations

import logging
import posixpath
import re

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import filesystem, with_protocol

__all__ = ["SHARD_EXTENSIONS", "ShardError", "split_uri", "shard_kind", "expand_braces", "is_shard_source", "shard_urls"]

_log = logging.getLogger(__name__)

SHARD_EXTENSIONS = (".tar", ".parquet")
_BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


class ShardError(ValueError):
    """Shards cannot be listed or indexed as asked; the message says what to pass instead."""


def split_uri(uri: str) -> tuple[str, str]:
    """``shard#key`` -> ``(shard, key)``."""
    shard, _, key = str(uri).rpartition("#")
    return shard, key


def shard_kind(url: str) -> str:
    """``"tar"`` or ``"parquet"`` from the shard's extension."""
    lowered = url.lower()
    if lowered.endswith(".tar"):
        return "tar"
    if lowered.endswith(".parquet"):
        return "parquet"
    raise ShardError(f"{url} is not a shard: shards end in .tar (WebDataset) or .parquet")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00099}`` (zero padding kept) and ``{a,b}`` left to right, as a shell does."""
    found = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())
    head, tail = pattern[:match.start()], pattern[match.end():]
    if match.re is _BRACE_LIST:
        return [u for part in match.group(1).split(",") for u in expand_braces(f"{head}{part}{tail}")]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.lstrip("-").startswith("0") and len(lo) > 1 else 0
    step = 1 if int(hi) >= int(lo) else -1
    return [u for i in range(int(lo), int(hi) + step, step) for u in expand_braces(f"{head}{i:0{width}d}{tail}")]


def _has_braces(source: str) -> bool:
    return bool(_BRACE_RANGE.search(source) or _BRACE_LIST.search(source))


def _is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_EXTENSIONS)


def _parquet_has_images(source: str, image_column: str) -> bool:
    fs, path = filesystem(source)
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    if image_column not in schema.names:
        return False
    return pa.types.is_binary(schema.field(image_column).type) or pa.types.is_large_binary(
        schema.field(image_column).type)


def is_shard_source(source: str, image_column: str = "jpg") -> bool:
    """Whether ``--images`` names shards rather than image files or a list of URIs.

    Brace patterns, globs matching ``.tar``/``.parquet``, a ``.tar`` file and a folder whose files are shards
    (and no images) are shards; a ``.parquet`` file is a shard when it has a binary ``image_column`` (else it is a
    list of URIs, as before).
    """
    source = str(source)
    if _has_braces(source):
        return True
    if any(ch in source for ch in "*?["):
        return _is_shard(source)
    if source.lower().endswith(".tar"):
        return True
    fs, path = filesystem(source)
    if source.lower().endswith(".parquet"):
        return fs.exists(path) and not fs.isdir(path) and _parquet_has_images(source, image_column)
    if not fs.exists(path) or not fs.isdir(path):
        return False
    from .listing import IMAGE_EXTENSIONS

    found = fs.find(path)
    if any(posixpath.splitext(p.lower())[1] in IMAGE_EXTENSIONS for p in found):
        return False
    return any(_is_shard(p) for p in found)


def shard_urls(source: str) -> list[str]:
    """The shard URLs ``source`` names (module docstring), checked to exist, in listing order."""
    source = str(source)
    if _has_braces(source):
        fs, _ = filesystem(source)
        urls = [with_protocol(fs, filesystem(u)[1]) for u in expand_braces(source)]  # as a prefix would list them
        missing = [u for u in urls[:1] + urls[-1:] if not fs.exists(filesystem(u)[1])]
        if missing:
            raise ShardError(f"shard {missing[0]} of {source} does not exist: check the pattern's range")
        return urls
    fs, path = filesystem(source)
    if any(ch in source for ch in "*?["):
        found = sorted(p for p in fs.glob(path) if _is_shard(p))
        if not found:
            raise ShardError(f"No .tar or .parquet shards match {source}.")
        return [with_protocol(fs, p) for p in found]
    if not fs.exists(path):
        raise ShardError(f"Shard source {source} does not exist: pass a shard, a folder or prefix of shards, a glob "
                         "or a brace pattern such as s3://bucket/shards/{00000..00099}.tar")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if _is_shard(p))
        if not found:
            raise ShardError(f"{source} holds no .tar or .parquet shards")
        return [with_protocol(fs, p) for p in found]
    shard_kind(source)
    return [with_protocol(fs, path)]
