"""Imports run one way: ground (langcell.core) <- stages, left to right <- top (CLI, demo, API).

Static: every import statement of every module (inside functions too) is read with `ast`, so a
lazy import that would only run in one handler is checked as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "build_sclibrary", "pretrain", "eval")
TOP = {"langcell", "langcell.cli", "langcell.demo", "langcell.demo_cli"}


def _modules() -> dict[str, Path]:
    """Import name -> file of every module the distribution installs."""
    found = {}
    for root, prefix in [("langcell", "langcell"), *[(s, f"langcell.{s}") for s in STAGES]]:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO / root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((prefix, *parts))] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from langcell import api` imports the module langcell.api, not just the package
            out += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
                    for a in node.names]
    return [(line, target) for line, target in out if target.split(".")[0] == "langcell"]


def _layer(name: str) -> tuple[str, int]:
    """(kind, rank): a module may import modules of its own kind at equal or lower rank."""
    if name == "langcell.core" or name.startswith("langcell.core."):
        return "ground", 0
    for i, stage in enumerate(STAGES, start=1):
        if name == f"langcell.{stage}" or name.startswith(f"langcell.{stage}."):
            return "stage", i
    assert name in TOP, f"{name}: not in any layer; add it to the ground, a stage or TOP"
    return "top", len(STAGES) + 1


MODULES = _modules()


def violations() -> list[str]:
    bad = []
    for name, path in sorted(MODULES.items()):
        kind, rank = _layer(name)
        for line, target in _imports(name, path):
            target_kind, target_rank = _layer(target)
            if target_rank > rank or (kind == "ground" and target_kind != "ground"):
                bad.append(f"{name}:{line} ({kind}) imports {target} ({target_kind})")
    return bad


def test_every_module_imports_only_its_own_layer_and_below():
    assert violations() == []


def test_the_check_catches_a_stage_importing_the_top_and_the_ground_importing_a_stage():
    assert _layer("langcell.core.files") == ("ground", 0)
    assert _layer("langcell.ingest.census") == ("stage", 1)
    assert _layer("langcell.eval.annotate") == ("stage", 4)
    assert _layer("langcell.cli")[0] == "top"
    ranks = {name: _layer(name)[1] for name in ("langcell.cli", "langcell.pretrain.model", "langcell.core.errors")}
    assert ranks["langcell.cli"] > ranks["langcell.pretrain.model"] > ranks["langcell.core.errors"]


def test_relative_and_package_imports_resolve_to_modules(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..demo import run_demo\nfrom langcell import cli\nfrom . import census\n"
                     "def f():\n    import langcell.eval.data\n")
    found = [t for _, t in _imports("langcell.ingest.probe", probe)]
    assert found == ["langcell.demo", "langcell.cli", "langcell.ingest.census", "langcell.eval.data"]
    monkeypatch.setitem(MODULES, "langcell.ingest.probe", probe)
    assert len([v for v in violations() if "probe" in v]) == 3


def test_the_ground_may_not_import_a_stage(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text("from langcell.core.errors import LangCellError\nfrom langcell.ingest import census\n")
    monkeypatch.setitem(MODULES, "langcell.core.probe", probe)
    assert [v for v in violations() if "probe" in v] == [
        "langcell.core.probe:2 (ground) imports langcell.ingest.census (stage)"]
