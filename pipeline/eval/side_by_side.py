"""Write an evaluation report side by side: ``report.json``, ``report.md`` and one PNG bar chart per measure.

Each measure is a table with one row per metric and one column per source (``raw``, ``stage-1``,
``stage-2``, ``student``, ...), so what each stage bought reads across a row; seeded probes show
``mean ± std``. The JSON holds every number, including per-seed values, per-image MIC and timings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["format_markdown", "write_report", "headline"]

_log = logging.getLogger(__name__)


def headline(value: Any) -> tuple[float | None, float | None]:
    """``(value, spread)`` of a result entry: a plain number, or a seeded ``{"mean", "std"}`` summary."""
    if isinstance(value, Mapping) and "mean" in value:
        return float(value["mean"]), float(value.get("std", 0.0))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value), None
    return None, None


def _fmt(value: Any) -> str:
    v, spread = headline(value)
    if v is None:
        return "n/a"
    return f"{v:.3f} ± {spread:.3f}" if spread is not None else f"{v:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _protocol_line(protocol: Mapping[str, Any]) -> str:
    keep = {k: v for k, v in protocol.items() if not isinstance(v, Mapping)}
    sched = protocol.get("schedule")
    if isinstance(sched, Mapping):
        keep.update({f"{k}": sched[k] for k in ("iters", "lr", "weight_decay", "policy", "warmup_iters") if k in sched})
    return "; ".join(f"{k} {v}" for k, v in keep.items())


def format_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown rendering of a report dict (see :func:`pipeline.eval.harness.run_evaluation`)."""
    sources = list(report.get("sources", {}))
    lines = ["# DVT evaluation", "", "Sources:", ""]
    for name, desc in report.get("sources", {}).items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} `{v}`" for k, v in desc.items()))
    lines.append("")
    for key, entry in report.get("measures", {}).items():
        results = entry.get("results", {})
        cols = [s for s in sources if s in results]
        lines += [f"## {entry.get('title', key)}", ""]
        if entry.get("protocol"):
            lines += [f"Protocol: {_protocol_line(entry['protocol'])}.", ""]
        rows = [[metric, better, *(_fmt(results[s].get(metric)) for s in cols)]
                for metric, better in entry.get("better", {}).items()
                if any(headline(results[s].get(metric))[0] is not None for s in cols)]
        rows.append(["seconds", "", *(_fmt(results[s].get("seconds")) for s in cols)])
        lines += _table(["metric", "better", *cols], rows) + ["", f"![{key}]({key}.png)", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += [f"Written {report.get('written', '')} in {float(report.get('seconds') or 0):.1f} s.", ""]
    return "\n".join(lines)


def _chart(entry: Mapping[str, Any], sources: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    results = entry.get("results", {})
    cols = [s for s in sources if s in results]
    metrics = [m for m in entry.get("better", {}) if any(headline(results[s].get(m))[0] is not None for s in cols)]
    if not cols or not metrics:
        return False
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(metrics) * max(1, len(cols)) / 2, 3.2), dpi=110)
    width = 0.8 / len(cols)
    for j, src in enumerate(cols):
        vals = [headline(results[src].get(m)) for m in metrics]
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [v if v is not None else 0 for v, _ in vals], width, label=src,
               yerr=[s or 0 for _, s in vals] if any(s for _, s in vals) else None, capsize=3)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([f"{m} ({entry['better'][m]} better)" for m in metrics], fontsize=8)
    ax.set_title(entry.get("title", ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``<measure>.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(_clean(report), indent=2) + "\n")
    paths["markdown"].write_text(format_markdown(report))
    sources = list(report.get("sources", {}))
    for key, entry in report.get("measures", {}).items():
        if _chart(entry, sources, out / f"{key}.png"):
            paths[key] = out / f"{key}.png"
    return paths
