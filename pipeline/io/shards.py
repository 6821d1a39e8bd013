"""Shard inputs: WebDataset tar shards and Parquet files whose rows hold image bytes (img2dataset's formats).

A corpus of 10^7 images ships as ~10^4 shards, so nothing here lists or fetches objects per image:

* **Expansion** (:func:`shard_urls`): a brace pattern (``s3://b/shards/{00000..09999}.tar``, ``{a,b}``), a glob,
  a folder or prefix of ``.tar`` / ``.parquet`` files, or one shard, in sorted (brace: numeric) order.
* **Index** (:func:`index_shard`, :func:`index_shards`): one columnar row per image, ``(shard, key)`` plus where
  its bytes lie. A tar shard is walked header by header (payloads are seeked over, so on object storage the shard
  is read in a few large sequential range reads); a Parquet shard is read for its footer and its ``key`` column
  only. Many shards are indexed by parallel Ray tasks, a few shards each, returning Arrow tables.
* **Bytes** (:func:`read_shard_members`): a Ray Data step that opens each shard of its batch once and emits the
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
import re
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import filesystem, with_protocol

__all__ = ["ShardOptions", "ShardError", "INDEX_COLUMNS", "is_shard_source", "expand_braces", "shard_urls",
           "shard_kind", "index_shard", "index_shards", "shard_index", "read_blocks", "read_shard_members", "split_uri"]

_log = logging.getLogger(__name__)

SHARD_EXTENSIONS = (".tar", ".parquet")
#: Member extensions that hold an image (WebDataset convention: ``KEY.EXT``).
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
#: Columns of an index row besides the kept ones: the image's URI, its shard, where its bytes lie (tar: byte
#: offset and size; Parquet: row within its row group, the group's mean bytes per row, the row group) and why it
#: cannot be used, if so.
INDEX_COLUMNS = ("uri", "shard", "shard_offset", "shard_size", "shard_group", "shard_error")
_INDEX_SCHEMA = pa.schema([("uri", pa.string()), ("shard", pa.string()), ("shard_offset", pa.int64()),
                           ("shard_size", pa.int64()), ("shard_group", pa.int32()), ("shard_error", pa.string())])
#: Read-ahead for walking tar headers and reading members: large sequential range reads on object storage.
_BLOCK = 16 * 2**20
#: Members closer than this are read together (one range read); further apart, with separate range reads.
_GAP = 2**20
#: Most rows one read task takes from a tar shard (one ranged read); a Parquet row group's rows stay together.
SHARD_READ_ROWS = 256
_BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


class ShardError(ValueError):
    """Shards cannot be listed or indexed as asked; the message says what to pass instead."""


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


# ---------------------------------------------------------------------------------------------- expansion

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
    with fs.open(path, "rb", block_size=_BLOCK) as f:
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


# ---------------------------------------------------------------------------------------------- bytes

def read_blocks(rows: pa.Table, max_rows: int = SHARD_READ_ROWS) -> list[pa.Table]:
    """``rows`` (with :data:`INDEX_COLUMNS`, in shard order) cut where the shard or Parquet row group changes and
    every ``max_rows`` rows of a tar, so no read task spans two shards and each opens its shard once; a Parquet row
    group's rows stay in one task (its image column is read whole)."""
    shards = rows["shard"].to_pylist()
    groups = rows["shard_group"].to_pylist()
    blocks, start = [], 0
    for i in range(1, len(shards) + 1):
        end = i == len(shards) or shards[i] != shards[start] or groups[i] != groups[start]
        if end or (groups[start] in (-1, None) and i - start >= max_rows):
            blocks.append(rows.slice(start, i - start))
            start = i
    return blocks


def read_shard_members(batch: dict[str, np.ndarray], image_column: str = "jpg") -> dict[str, np.ndarray]:
    """Ray Data step: the bytes of a batch of indexed rows (``image_id``, ``uri`` and :data:`INDEX_COLUMNS`).

    Each shard of the batch is opened once: tar members are read with one ranged read from the first member to
    the last, Parquet rows with one read of the image column per row group. Returns the columns
    :func:`pipeline.io.listing.fetch_bytes` does (``image_id``, ``uri``, ``bytes``, ``error``); an unusable member
    or an unreadable shard gives its rows an ``error``, never an exception.
    """
    n = len(batch["image_id"])
    data: list[bytes] = [b""] * n
    errors: list[str] = [str(e) if e else "" for e in batch["shard_error"]]
    shards: dict[str, list[int]] = {}
    loose = []  # rows of a store that also lists loose files: fetched by URI
    for i, shard in enumerate(batch["shard"]):
        if shard is None or shard != shard or shard == "":
            loose.append(i)
        elif not errors[i]:
            shards.setdefault(str(shard), []).append(i)
    if loose:
        from .listing import fetch_bytes

        fetched = fetch_bytes({"uri": np.asarray([batch["uri"][i] for i in loose], dtype=object)})
        for j, i in enumerate(loose):
            data[i], errors[i] = fetched["bytes"][j], str(fetched["error"][j])
    for shard, rows in shards.items():
        try:
            if shard_kind(shard) == "tar":
                _read_tar_rows(shard, rows, batch, data, errors)
            else:
                _read_parquet_rows(shard, rows, batch, data, errors, image_column)
        except Exception as e:  # noqa: BLE001 - an unreadable shard fails its rows, not the job
            for i in rows:
                if not errors[i]:
                    errors[i] = f"cannot read shard {shard}: {type(e).__name__}: {e}"
    for i in range(n):
        if not errors[i] and not data[i]:
            errors[i] = "empty image bytes"
    return {"image_id": np.asarray(batch["image_id"], dtype=np.int64), "uri": np.asarray(batch["uri"], dtype=object),
            "bytes": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}


def _read_tar_rows(shard: str, rows: list[int], batch: dict[str, np.ndarray], data: list[bytes],
                   errors: list[str]) -> None:
    """The members of ``rows`` with one ranged read per run of members less than :data:`_GAP` apart (a block of
    consecutive members is one read; members left between finished ones are read over, not fetched apart)."""
    members = sorted((int(batch["shard_offset"][i]), int(batch["shard_size"][i]), i) for i in rows)
    fs, path = filesystem(shard)
    run: list[tuple[int, int, int]] = []

    def read(run: list[tuple[int, int, int]]) -> None:
        start, end = run[0][0], max(o + s for o, s, _ in run)
        span = fs.cat_file(path, start=start, end=end)
        for offset, size, i in run:
            piece = span[offset - start:offset - start + size]
            if len(piece) < size:
                errors[i] = f"member cut off: {len(piece)} of {size} bytes readable"
            else:
                data[i] = piece

    for member in members:
        if run and member[0] - max(o + s for o, s, _ in run) > _GAP:
            read(run)
            run = []
        run.append(member)
    if run:
        read(run)


def _read_parquet_rows(shard: str, rows: list[int], batch: dict[str, np.ndarray], data: list[bytes],
                       errors: list[str], image_column: str) -> None:
    fs, path = filesystem(shard)
    by_group: dict[int, list[int]] = {}
    for i in rows:
        by_group.setdefault(int(batch["shard_group"][i]), []).append(i)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for group, members in by_group.items():
            column = pf.read_row_group(group, columns=[image_column])[image_column]
            taken = pc.take(column, pa.array([int(batch["shard_offset"][i]) for i in members], pa.int64()))
            for i, value in zip(members, taken.to_pylist()):
                if value is None:
                    errors[i] = f"row has no image ({image_column} is null)"
                else:
                    data[i] = value
