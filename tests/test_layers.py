"""Arrows point down (DESIGN.md, "Layers"): the import graph of ``src/attrlab``,
read with ``ast`` (every import, also the ones inside functions), obeys the
layering — the wrapper knows no method, views compute nothing, units know no
estimator, and nothing above the wrapper reaches into ``model/adapters/``.

The oracle is the source text itself, not the import machinery, so a lazy
import inside a function counts as much as a module-level one.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Module:
    name: str  # dotted, e.g. "attrlab.units.tokens"
    path: Path
    imports: set[str] = field(default_factory=set)  # every dotted name it imports
    #: ``line N: .adapter`` / ``.norm_kind``: per-family knowledge read outside the wrapper
    adapter_uses: list[str] = field(default_factory=list)


def _parse(path: Path, root: Path) -> Module:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    pkg = parts if is_pkg else parts[:-1]
    mod = Module(".".join(parts), path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mod.imports.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = pkg[: len(pkg) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            mod.imports.add(base)
            # ``from .. import units`` imports the module attrlab.units
            mod.imports.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Attribute) and node.attr in ("adapter", "norm_kind"):
            mod.adapter_uses.append(f"line {node.lineno}: .{node.attr}")
    mod.imports = {i for i in mod.imports if i == "attrlab" or i.startswith("attrlab.")}
    return mod


def modules(root: Path = SRC) -> dict[str, Module]:
    """Every module under ``root/attrlab``, by dotted name."""
    paths = sorted((root / "attrlab").rglob("*.py"))
    return {m.name: m for m in (_parse(p, root) for p in paths)}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(
    src: str, forbidden: tuple[str, ...], mods: dict[str, Module] | None = None
) -> list[str]:
    """``module -> import`` for every module under ``src`` that imports anything
    under one of ``forbidden`` (``"attrlab"`` alone: the whole package)."""
    out = []
    for m in (mods or modules()).values():
        if not _under(m.name, src):
            continue
        for imp in sorted(m.imports):
            for f in forbidden:
                hit = imp == "attrlab" if f == "attrlab" else _under(imp, f)
                if hit and not _under(imp, src):
                    out.append(f"{m.name} -> {imp}")
    return sorted(set(out))


ABOVE_MODEL = tuple(
    f"attrlab.{p}"
    for p in (
        "units",
        "methods",
        "evaluate",
        "viz",
        "data",
        "app",
        "report",
        "cli",
        "attribute",
        "question",
        "zoo",
        "dictionaries",
    )
) + ("attrlab",)
COMPUTATIONS = tuple(
    f"attrlab.{p}"
    for p in (
        "methods",
        "evaluate",
        "units",
        "data",
        "model",
        "app",
        "attribute",
        "question",
        "zoo",
    )
) + ("attrlab",)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy relative import inside a function is an arrow."""
    pkg = tmp_path / "attrlab" / "model"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "from ..errors import InputError\n"
        "def f(lm):\n    from ..units.tokens import EmbedForward\n    return lm.adapter\n"
    )
    mods = modules(tmp_path)
    m = mods["attrlab.model.x"]
    assert "attrlab.units.tokens.EmbedForward" in m.imports and m.adapter_uses == [
        "line 4: .adapter"
    ]
    assert violations("attrlab.model", ABOVE_MODEL, mods) == [
        "attrlab.model.x -> attrlab.units.tokens",
        "attrlab.model.x -> attrlab.units.tokens.EmbedForward",
    ]


def test_model_knows_no_unit_method_evaluation_view_or_data_attribution() -> None:
    v = violations("attrlab.model", ABOVE_MODEL)
    assert v == [], "\n".join(v)


def test_views_compute_nothing() -> None:
    """viz/ renders results it is given: it imports no method, evaluation, unit
    kind, model or application (the demo lives in attrlab.app)."""
    v = violations("attrlab.viz", COMPUTATIONS)
    assert v == [], "\n".join(v)


def test_units_know_no_estimator() -> None:
    forbidden = ("attrlab.methods", "attrlab.evaluate", "attrlab.viz", "attrlab.app")
    v = violations("attrlab.units", forbidden)
    assert v == [], "\n".join(v)


def _adapter_reaches() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in modules().values():
        if _under(m.name, "attrlab.model"):
            continue
        bad = [i for i in sorted(m.imports) if _under(i, "attrlab.model.adapters")]
        bad += m.adapter_uses
        if bad:
            out[m.name] = bad
    return out


def test_nothing_above_the_wrapper_reaches_into_adapters() -> None:
    """Methods, units, evaluations, data attribution, views and applications use
    the wrapper (``lm.W_O``, ``lm.frozen_norm``, ``lm.embed_ids`` …), never an
    adapter, ``lm.adapter`` or the norm kind (a norm formula of their own):
    per-family knowledge lives in one place."""
    reaches = _adapter_reaches()
    assert reaches == {}, "\n".join(f"{k}: {v}" for k, v in reaches.items())


def test_results_import_no_view() -> None:
    assert violations("attrlab.result", ("attrlab.viz", "attrlab.report")) == []


def test_circuit_evaluation_and_extraction_do_not_import_each_other() -> None:
    assert violations("attrlab.evaluate.circuits", ("attrlab.methods.circuits",)) == []
    assert violations("attrlab.methods.circuits", ("attrlab.evaluate.circuits",)) == []
