"""What ``dvt store info`` shows: :class:`StoreInfo`, built from a store, and its text formatting."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from .manifest import PARTS_DIR, ROW_FAILED, ROW_OK, STATUS_FAILED, status_per_row
from ..io.storage import storage_errors
from .handle import StoreHandle
from .layout import describe_weights
from .lease import lease_holder

__all__ = ["StoreInfo", "store_info"]


@dataclass
class StoreInfo:
    """Summary of a store for ``dvt store info``."""

    url: str
    attrs: dict[str, Any]
    arrays: dict[str, dict[str, Any]]
    listed: int
    ok: int
    failed: int
    pending: int
    failures: list[tuple[str, int]]
    manifest_parts: int
    size_bytes: int | None = None
    objects: int | None = None
    lease: str | None = None

    def format(self) -> str:
        a = self.attrs
        lines = [
            f"DVT feature store {self.url} (format {a.get('format_version')}, written by dvt {a.get('package_version')})",
            f"  images:   {self.listed} listed, {self.ok} ok, {self.failed} failed, {self.pending} pending",
            f"  features: {a.get('backbone')} block {a.get('block')}, input {shape_text(a.get('input_size'))}, "
            f"patch {a.get('patch_size')} stride {a.get('stride')}, grid {shape_text(a.get('grid'))} x "
            f"{a.get('channels')} channels, {a.get('dtype')}",
        ]
        if a.get("compact"):
            lines.append(f"  compact:  {json.dumps(a['compact'], sort_keys=True)} (reads decode it; docs/store.md)")
        for name, arr in self.arrays.items():
            lines.append(f"  array {name:9s} shape {tuple(arr['shape'])} {arr['dtype']} chunks {tuple(arr['chunks'])}"
                         f" compressor {arr['compressor']}")
        size = "size not measured" if self.size_bytes is None else \
            f"{human_bytes(self.size_bytes)} in {self.objects} objects"
        lines.append(f"  storage:  {size}, {self.manifest_parts} manifest parts")
        if self.failures:
            lines.append("  failures:")
            lines += [f"    {n:6d} x {reason}" for reason, n in self.failures]
        lines.append(f"  weights:  {describe_weights(a.get('weights'))}")
        record = a.get("method") or {}
        if "method" in record or record.get("stage") == 2:  # a method other than stage 1 (pipeline.denoise.methods)
            lines.append(f"  method:   {record.get('method', 'denoiser')}, seed {a.get('seed', 'not recorded')}, "
                         f"{json.dumps(record, sort_keys=True)}")
        else:
            lines.append(f"  stage 1:  version {a.get('stage1_version', 1)}, seed {a.get('seed', 'not recorded')}")
            lines += [f"    {line}" for line in stage1_lines(record)]
        if self.lease:
            lines.append(f"  in use:   by {self.lease}")
        return "\n".join(lines)


def store_info(store: StoreHandle, size: bool = True) -> StoreInfo:
    """:meth:`FeatureStore.info`: counts, failure reasons, attributes, arrays and (``size``) bytes on storage."""
    m = store.refresh().manifest(columns=("image_id", "status", "error"))  # not the listing, not the other columns
    status = status_per_row(m, store.num_rows)
    ok, failed = int((status == ROW_OK).sum()), int((status == ROW_FAILED).sum())
    failed_rows = m.filter(pc.equal(m["status"], STATUS_FAILED))["error"].to_pylist()
    errors = [e.splitlines()[0][:120] if e else "unknown" for e in failed_rows]
    with storage_errors(store.url):
        store.fs.invalidate_cache(store.root)
        parts = len(store.fs.find(f"{store.root}/{PARTS_DIR}"))
        objects = store.fs.find(store.root, detail=True) if size else None
    holder = lease_holder(store.url, store.storage_options)
    arrays = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                  "compressor": store.layout.compressor or "none"} for n, a in store.zarr_arrays.items()}
    return StoreInfo(
        url=store.url, attrs=store.attrs, arrays=arrays, listed=store.num_rows, ok=ok, failed=failed,
        pending=store.num_rows - ok - failed, failures=Counter(errors).most_common(10), manifest_parts=parts,
        size_bytes=None if objects is None else int(sum(o.get("size") or 0 for o in objects.values())),
        objects=None if objects is None else len(objects),
        lease=None if holder is None else holder.describe() + (" (stale)" if holder.stale() else ""))


def stage1_lines(record: dict[str, Any]) -> list[str]:
    """A store's stage-1 record as the settings that run actually used, one readable line each (a closed-form
    fit has no optimiser and a grid ``F`` no hash encoding, so neither is shown for it)."""
    if not record:
        return ["settings not recorded"]
    views, fld = record.get("views") or {}, record.get("field") or {}
    lo, hi = views.get("scale", (0.1, 0.5))
    full = " + the full view" if views.get("include_full", True) else ""
    count = views.get("num_views", "?")
    near = round((views.get("near_full_share") or 0) * count) if isinstance(count, int) else 0
    if near:
        nlo, nhi = views.get("near_full_scale", (0.9, 1.0))
        crops = (f"{count - near} random crops of {_num(100 * lo)}-{_num(100 * hi)}% of the area and {near} of "
                 f"{_num(100 * nlo)}-{_num(100 * nhi)}%")
    else:
        crops = f"{count} random crops of {_num(100 * lo)}-{_num(100 * hi)}% of the area"
    lines = [f"views:  {crops}{full}, flipped with p={_num(views.get('flip_prob', 0.5))}"]
    if not fld:
        lines.append("F:      not recorded")
    elif fld.get("kind") == "grid":
        lines.append(f"F:      dense bilinear grid, {fld.get('grid_factor', 1)} node(s) per patch spacing")
    else:
        h = fld.get("hash") or {}
        lines.append(f"F:      hash grid ({h.get('levels')} levels x {h.get('features_per_level')} features, table "
                     f"2^{h.get('log2_table_size')}, resolution {h.get('base_resolution')}-{h.get('max_resolution')}) "
                     f"+ MLP")
    solve = record.get("linear_solve_iters") or 0
    if solve:
        rule = record.get("full_view_rule") or 0
        weight = (f"per image (rule k={_num(rule)}, from a first solve at {_num(record.get('full_view_weight', 1))})"
                  if rule else _num(record.get("full_view_weight", 1)))
        near_weight = record.get("near_full_weight", 1)
        if near and near_weight != 1:
            weight += f", near-full views {_num(near_weight)}"
        if near and record.get("near_full_rule"):
            weight += (f", both scaled per image by the zoomed-in crops' disagreement (rule k="
                       f"{_num(record['near_full_rule'])}, from a first solve at 1)")
        lines.append(f"solve:  closed form, {solve} alternating F/G least-squares solves; full view weight "
                     f"{weight}, high-norm tokens above "
                     f"{_num(record.get('high_norm', 0))}x the median left to the residual, smoothing "
                     f"{_num(record.get('field_smooth', 0))}")
    steps = record.get("steps") or 0
    if steps:
        tokens = record.get("batch_tokens") or "all"
        residual = "on" if record.get("residual", True) else "off"
        lines.append(f"Adam:   {steps} steps of {tokens} tokens, lr {_num(record.get('lr'))} -> "
                     f"{_num(record.get('min_lr'))}, G frozen after {_num(100 * record.get('freeze_artifact_at', 0.5))}%, "
                     f"residual h {residual}")
    elif not solve:
        lines.append("fit:    none (steps 0, no closed-form solve)")
    if record.get("amp_dtype"):
        lines.append(f"amp:    {record['amp_dtype']}")
    if (record.get("clean_upsample") or 1) > 1:
        lines.append(f"upsample: F also on a {record['clean_upsample']}x finer grid")
    return lines


def _num(v: Any) -> str:
    """A recorded number compactly (``0.03``, ``1e-05``), anything else as it is."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def shape_text(v: Any) -> str:
    """A size or grid as ``HxW``."""
    return "x".join(str(i) for i in v) if isinstance(v, (list, tuple)) else str(v)


def human_bytes(n: float) -> str:
    """A byte count in binary units (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
