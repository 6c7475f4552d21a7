"""The distribution installs one import name, `langcell`, with the stages inside it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "build_sclibrary", "pretrain", "eval")


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_inside_langcell_and_every_folder_is_packaged():
    tool = _setuptools()
    packages, mapping = set(tool["packages"]), tool["package-dir"]
    assert {p.split(".")[0] for p in packages} == {"langcell"}
    assert mapping == {f"langcell.{s}": s for s in STAGES}
    # A sub-package missing from the explicit list would silently not be installed.
    on_disk = {"langcell"}
    for root in ("langcell", *STAGES):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            on_disk.add(".".join(("langcell",) * (root != "langcell") + (root,) + rel))
    assert on_disk <= packages
    # The rest are data folders (no code), each with its files named in package-data.
    for package in packages - on_disk:
        folder = REPO.joinpath(*package.split(".")[1:])
        assert folder.is_dir() and not list(folder.glob("*.py")), package
        assert package in tool["package-data"], package


def test_stages_import_from_outside_the_repo_under_langcell_only(tmp_path):
    code = ("import importlib.util, langcell.pretrain.model as m, langcell.eval.annotate, sys; "
            "print(m.__name__, m.__file__); "
            f"print([s for s in {STAGES!r} if importlib.util.find_spec(s) is not None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    name, path, top_level = out.stdout.split("\n")[0].split(" ") + [out.stdout.split("\n")[1]]
    assert name == "langcell.pretrain.model" and Path(path) == REPO / "pretrain" / "model.py"
    assert top_level == "[]"


def test_no_module_imports_a_stage_by_its_top_level_name():
    import ast

    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n and n.split(".")[0] in STAGES]
    assert offenders == []
