"""The library's layout holds: each wing imports only the wings its ``__init__`` docstring allows, no two library
modules share a name, and no module imports another's private name."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

#: What each wing may import (besides itself). The stages build on vit/runtime/store/io; nothing below imports up.
ALLOWED = {
    "io": set(),
    "vit": {"io"},
    "store": {"io"},
    "runtime": {"store", "io"},
    "stage1": {"vit", "io"},
    "stage2": {"vit", "runtime", "store", "io"},
    "stage3": {"stage2", "vit", "runtime", "store", "io"},
    "denoise": {"stage1", "stage2", "vit", "runtime", "store", "io"},
    "testing": {"vit", "stage1", "stage2", "store", "runtime", "io"},  # stage2: the zero-cost apply worker
    "analysis": {"stage1", "stage2", "stage3", "denoise", "vit", "runtime", "store", "io"},
    "eval": {"analysis", "stage1", "stage2", "stage3", "denoise", "vit", "runtime", "store", "io"},
}
#: Old import paths kept as thin re-exports for one release (the README showed them).
SHIMS = {"backbone", "denoiser", "distill_model"}


def _modules() -> list[Path]:
    return sorted(p for p in PIPELINE.rglob("*.py") if "samples" not in p.parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of every ``pipeline`` import in ``path``, lazy ones included."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "pipeline":
                out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "pipeline"]
    return out


def test_wings_import_only_the_wings_below_them():
    wings = {p.name for p in PIPELINE.iterdir() if (p / "__init__.py").exists()}
    assert wings == set(ALLOWED), f"a wing without import rules (or rules for a missing wing): {wings ^ set(ALLOWED)}"
    wrong = []
    for path in _modules():
        parts = path.relative_to(PIPELINE).parts
        if len(parts) == 1:
            continue  # pipeline/__init__.py and the shims
        wing = parts[0]
        for module, names in _imports(path):
            target = module.split(".")[1] if "." in module else None
            if target is None:  # `from pipeline import __version__`
                continue
            if target != wing and target not in ALLOWED[wing]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert wrong == []


def test_no_two_library_modules_share_a_name():
    names = Counter(p.stem for p in _modules() if p.stem != "__init__" and not (p.parent == PIPELINE and p.stem in SHIMS))
    assert [n for n, c in names.items() if c > 1] == []


def test_no_private_name_crosses_a_module():
    crossing = []
    for path in _modules():
        for module, names in _imports(path):
            crossing += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert crossing == []


def test_every_wing_says_what_it_holds_and_may_import():
    for wing in ALLOWED:
        doc = ast.get_docstring(ast.parse((PIPELINE / wing / "__init__.py").read_text()))
        assert doc and len(doc) > 40, f"pipeline/{wing}/__init__.py has no docstring saying what it holds"
