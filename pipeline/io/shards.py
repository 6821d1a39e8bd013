"""Shard inputs: WebDataset tar shards and Parquet files whose rows hold image bytes (img2dataset's formats).

A corpus of 10^7 images ships as ~10^4 shards, so nothing here lists or fetches objects per image:

* **Expansion** (:func:`shard_urls`): a brace pattern (``s3://b/shards/{00000..09999}.tar``, ``{a,b}``), a glob,
  a folder or prefix of ``.tar`` / ``.parquet`` files, or one shard, in sorted (brace: numeric) order.
* **Index** (:func:`index_shard`, :func:`index_shards`): one columnar row per image, ``(shard, key)`` plus where
  its bytes lie. A tar shard is walked header by header (payloads are seeked over, so on object storage the shard
  is read in a few large sequential range reads); a Parquet shard is read for its footer and its ``key`` column
  only. Many shards are indexed by parallel Ray tasks, a few shards each, returning Arrow tables.
* **Bytes** (:func:`pipeline.io.shard_reads.read_shard_members`): a Ray Data step that opens each shard of its batch once and emits the
  columns :func:`pipeline.io.listing.fetch_bytes` emits (``image_id``, ``uri``, ``bytes``, ``error``); a tar
  batch is one ranged read of consecutive members, a Parquet batch one read of the image column of the row
  groups it touches.

An image's URI is ``shard#key``: stable across re-runs and across a listing that grows by new shards, so every
image keeps its row. A member that cannot be used (a member without an image, one cut off by a truncated tar,
empty or null bytes) gets an ``error`` and becomes a failed row; it never stops the job. Ray Data's own readers
(``read_webdataset``, ``read_parquet``) are not used for the bytes: they stream every row of a shard (a resume
would re-read finished shards), carry no row ids, and a truncated tar fails their read task, and with it the job.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import filesystem
from .shard_sources import ShardError, expand_braces, is_shard_source, shard_kind, shard_urls, split_uri

__all__ = ["ShardOptions", "ShardError", "INDEX_COLUMNS", "is_shard_source", "expand_braces", "shard_urls",
           "shard_kind", "index_shard", "index_shards", "shard_index", "split_uri"]

_log = logging.getLogger(__name__)

#: Member extensions that hold an image (WebDataset convention: ``KEY.EXT``).
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
#: Columns of an index row besides the kept ones: the image's URI, its shard, where its bytes lie (tar: byte
#: offset and size; Parquet: row within its row group, the group's mean bytes per row, the row group) and why it
#: cannot be used, if so.
INDEX_COLUMNS = ("uri", "shard", "shard_offset", "shard_size", "shard_group", "shard_error")
_INDEX_SCHEMA = pa.schema([("uri", pa.string()), ("shard", pa.string()), ("shard_offset", pa.int64()),
                           ("shard_size", pa.int64()), ("shard_group", pa.int32()), ("shard_error", pa.string())])
#: Read-ahead for walking tar headers and reading members: large sequential range reads on object storage.
READ_AHEAD_BYTES = 16 * 2**20
#: Members closer than this are read together (one range read); further apart, with separate range reads.
MEMBER_GAP_BYTES = 2**20
#: Most rows one read task takes from a tar shard (one ranged read); a Parquet row group's rows stay together.
SHARD_READ_ROWS = 256


@dataclass(frozen=True)
class ShardOptions:
    """How to read shards.

    Attributes:
        image_column: Parquet column holding each row's encoded image (``jpg``, as img2dataset writes); for tar
            shards, the member extension preferred when a key has several images.
        keep_columns: other fields carried into the store's listing: Parquet columns, or for tar shards the
            member ``KEY.<name>`` (text) or else field ``<name>`` of ``KEY.json``; ``key`` is the member key.
    """

    image_column: str = "jpg"
    keep_columns: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        reserved = {"image_id", *INDEX_COLUMNS}
        clash = sorted(set(self.keep_columns) & reserved)
        if clash:
            raise ShardError(f"--keep-columns cannot name {', '.join(clash)}: the listing already has such a column")
        if not self.image_column:
            raise ShardError("--image-column must name the column (or tar member extension) holding the images")


# ---------------------------------------------------------------------------------------------- index

def _member_key(name: str) -> tuple[str, str]:
    """WebDataset split: ``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``): the key ends at the basename's first dot."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def _pick_image(exts: dict[str, tuple[int, int]], image_column: str) -> str | None:
    if image_column in exts:
        return image_column
    for ext in exts:
        if ext.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS:
            return ext
    return None


def _index_tar(url: str, options: ShardOptions) -> dict[str, list]:
    fs, path = filesystem(url)
    size = fs.size(path)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    texts: dict[str, dict[str, bytes]] = {}  # small members the kept columns come from, read during the walk
    current: dict[str, str] = {}  # a key met again with a member it already has is a new sample: KEY~2, KEY~3...
    repeats: dict[str, int] = {}
    wanted = {name for name in options.keep_columns if name != "key"}
    if wanted:
        wanted.add("json")
    broken = ""
    with fs.open(path, "rb", block_size=READ_AHEAD_BYTES) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                while True:
                    try:
                        info = tar.next()
                    except (tarfile.TarError, EOFError) as e:  # a damaged header: what came before stays usable
                        broken = f"shard damaged after its last readable member ({type(e).__name__}: {e})"
                        break
                    if info is None:
                        break
                    tar.members.clear()  # the walk keeps its own index; tarfile's would hold every TarInfo
                    if not info.isreg():
                        continue
                    base, ext = _member_key(info.name)
                    key = current.get(base, base)
                    if ext in members.get(key, {}):  # the key again, with a member it has: a new sample
                        repeats[base] = repeats.get(base, 1) + 1
                        key = current[base] = f"{base}~{repeats[base]}"
                    members.setdefault(key, {})[ext] = (info.offset_data, info.size)
                    if ext in wanted and info.offset_data + info.size <= size:
                        f.seek(info.offset_data)
                        texts.setdefault(key, {})[ext] = f.read(info.size)
        except tarfile.ReadError as e:
            if not members:
                broken = f"not a readable tar ({e})"
    others = [name for name in options.keep_columns if name != "key"]
    out: dict[str, list] = {c: [] for c in ("key", "offset", "size", "error", *others)}
    for key, exts in members.items():
        ext = _pick_image(exts, options.image_column)
        offset, length = exts[ext] if ext else (-1, -1)
        if ext is None:
            error = f"member {key} has no image (found {', '.join(sorted(exts)) or 'nothing'})"
        elif offset + length > size:
            error = f"member {key}.{ext} is cut off: the tar is truncated"
        else:
            error = ""
        out["key"].append(key)
        out["offset"].append(offset)
        out["size"].append(length)
        out["error"].append(error)
        kept = _kept_fields(texts.get(key, {}), others)
        for name in others:
            out[name].append(kept.get(name))
    if broken and not members:  # nothing readable: one failed row stands for the shard
        out = {"key": [""], "offset": [-1], "size": [-1], "error": [broken],
               **{name: [None] for name in others}}
    elif broken:
        _log.warning("%s: %s; the %d members before it are used", url, broken, len(members))
    return out


def _kept_fields(texts: dict[str, bytes], names: Sequence[str]) -> dict[str, str | None]:
    """Kept fields of one key: member ``KEY.<name>`` as text, else field ``<name>`` of ``KEY.json``."""
    doc: dict = {}
    if "json" in texts:
        try:
            parsed = json.loads(texts["json"])
            doc = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            doc = {}
    values: dict[str, str | None] = {}
    for name in names:
        if name in texts and name != "json":
            values[name] = texts[name].decode("utf-8", "replace")
        elif name == "json" and "json" in texts:
            values[name] = texts["json"].decode("utf-8", "replace")
        elif name in doc:
            value = doc[name]
            values[name] = None if value is None else (value if isinstance(value, str) else json.dumps(value))
    return values


def _index_parquet(url: str, options: ShardOptions) -> dict[str, list]:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if options.image_column not in names:
            raise ShardError(f"{url} has no column {options.image_column!r} (columns: {', '.join(names)}): pass "
                             f"--image-column with the column that holds the image bytes")
        missing = [c for c in options.keep_columns if c not in names]
        if missing:
            raise ShardError(f"{url} has no column {', '.join(map(repr, missing))} for --keep-columns "
                             f"(columns: {', '.join(names)})")
        wanted = list(dict.fromkeys((["key"] if "key" in names else []) + list(options.keep_columns)))
        others = [name for name in options.keep_columns if name != "key"]
        out: dict[str, list] = {c: [] for c in ("key", "offset", "size", "group", "error", *others)}
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            table = pf.read_row_group(group, columns=wanted) if wanted else None
            keys = (table["key"].to_pylist() if "key" in wanted else
                    [str(r) for r in range(len(out["key"]), len(out["key"]) + n)])
            out["key"] += [None if k is None else str(k) for k in keys]
            out["offset"] += list(range(n))
            chunk = pf.metadata.row_group(group).column(names.index(options.image_column))
            out["size"] += [chunk.total_compressed_size // max(1, n)] * n  # a mean: for sizing read blocks only
            out["group"] += [group] * n
            out["error"] += [""] * n
            for name in others:
                values = table[name].to_pylist()
                out[name] += [None if v is None else str(v) for v in values]
    for i, key in enumerate(out["key"]):  # a row without a key is named by its position in the shard
        if key is None:
            out["key"][i] = f"row{i}"
    return out


def _unique_keys(keys: list[str], url: str) -> list[str]:
    """Repeated keys in one shard would share a URI (and a row): later repeats get ``~2``, ``~3``... appended."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        count = seen.get(key, 0) + 1
        seen[key] = count
        out.append(key if count == 1 else f"{key}~{count}")
    repeats = len(keys) - len(seen)
    if repeats:
        _log.warning("%s: %d repeated keys; their later rows are named KEY~N", url, repeats)
    return out


def index_shard(url: str, options: ShardOptions = ShardOptions()) -> pa.Table:
    """One shard's index: a row per image with :data:`INDEX_COLUMNS`, ``key`` and the kept columns."""
    kind = shard_kind(url)
    out = _index_tar(url, options) if kind == "tar" else _index_parquet(url, options)
    keys = _unique_keys(out["key"], url)
    n = len(keys)
    columns = {
        "uri": pa.array([f"{url}#{k}" for k in keys], pa.string()),
        "shard": pa.array([url] * n, pa.string()),
        "shard_offset": pa.array(out["offset"], pa.int64()),
        "shard_size": pa.array(out["size"], pa.int64()),
        "shard_group": pa.array(out.get("group", [-1] * n), pa.int32()),
        "shard_error": pa.array(out["error"], pa.string()),
    }
    for name in options.keep_columns:
        columns[name] = pa.array(keys if name == "key" else out[name], pa.string())
    return pa.table(columns)


def _index_many(urls: Sequence[str], options: ShardOptions) -> pa.Table:
    return pa.concat_tables([index_shard(u, options) for u in urls])


def index_shards(urls: Sequence[str], options: ShardOptions = ShardOptions(), *, limit: int | None = None,
                 use_ray: bool | None = None, shards_per_task: int = 8, threads: int = 8) -> pa.Table:
    """The index of ``urls`` in their order (concatenated :func:`index_shard` tables).

    With ``use_ray`` (default: when Ray is initialised and there are more shards than one task takes), Ray tasks
    index ``shards_per_task`` shards each, in parallel across the cluster, and return Arrow tables; else a few
    threads of this process do. With ``limit``, shards are indexed in order until ``limit`` rows are known.
    """
    urls = list(urls)
    if not urls:
        raise ShardError("no shards to index")
    if limit is not None:
        tables, rows = [], 0
        for url in urls:
            tables.append(index_shard(url, options))
            rows += tables[-1].num_rows
            if rows >= limit:
                break
        return pa.concat_tables(tables).slice(0, limit)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized() and len(urls) > shards_per_task
    chunks = [urls[i:i + shards_per_task] for i in range(0, len(urls), shards_per_task)]
    if use_ray:
        import ray

        task = ray.remote(num_cpus=0.25, max_retries=3)(_index_many)
        opts = ray.put(options)
        refs = [task.remote(chunk, opts) for chunk in chunks]
        results: dict = {}
        pending, logged = list(refs), 0.0
        while pending:
            ready, pending = ray.wait(pending, num_returns=min(len(pending), 16))
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the shard's own one-line error, not Ray's traceback
                    raise (e.cause if isinstance(e.cause, Exception) else e) from None
            if len(results) / len(refs) >= logged + 0.1:
                logged = len(results) / len(refs)
                _log.info("indexed %d of %d shards", min(len(urls), len(results) * shards_per_task), len(urls))
        tables = [results[ref] for ref in refs]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            tables = list(pool.map(lambda chunk: _index_many(chunk, options), chunks))
    table = pa.concat_tables(tables)
    _log.info("indexed %d shards: %d images", len(urls), table.num_rows)
    return table


def shard_index(source: str, options: ShardOptions = ShardOptions(), limit: int | None = None) -> pa.Table | None:
    """The index of the shards ``source`` names, or ``None`` when it names image files or a list of URIs."""
    if not is_shard_source(source, options.image_column):
        return None
    table = index_shards(shard_urls(source), options, limit=limit)
    if table.num_rows == 0:
        raise ShardError(f"{source} holds no images")
    return table
