import dataclasses
import json
import multiprocessing
import subprocess
import sys

import pytest

from langcell.core.config import from_dict, load_config
from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, atomic_write_json, display_path, output_lock, read_json, sha256_file


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = b"x" * 3_000_000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text("{oops")
    with pytest.raises(LangCellError, match="manifest.json: manifest is not valid JSON"):
        read_json(bad, "manifest")
    with pytest.raises(LangCellError, match="not found"):
        read_json(tmp_path / "missing.json")


def _hold_lock(folder, ready, release):
    with output_lock(folder):
        ready.set()
        release.wait(10)


def test_display_path_is_relative_to_where_the_command_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert display_path(tmp_path / "run" / "export") == "run/export"
    assert display_path("../elsewhere/x.yaml") == "../elsewhere/x.yaml"
    assert display_path("/somewhere/else.yaml") == "/somewhere/else.yaml"


def test_output_lock_excludes_a_second_run(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    assert ready.wait(10)
    with pytest.raises(LangCellError, match=f"locked by pid {proc.pid}"):
        with output_lock(tmp_path):
            pass
    release.set()
    proc.join()
    with output_lock(tmp_path):  # released once the holder is gone
        pass


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-4


@dataclasses.dataclass
class _Outer:
    name: str = "x"
    optim: _Inner = dataclasses.field(default_factory=_Inner)


def test_config_rejects_unknown_keys_with_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: y\noptim:\n  lr: 0.5\n")
    loaded = load_config(_Outer, cfg)
    assert loaded.name == "y" and loaded.optim.lr == 0.5
    cfg.write_text("optim:\n  lrr: 0.5\n")
    with pytest.raises(LangCellError, match=r"c.yaml: unknown key 'optim.lrr'; valid keys here are lr"):
        load_config(_Outer, cfg)
    with pytest.raises(LangCellError, match="unknown key 'nam'"):
        from_dict(_Outer, {"nam": 1}, "src")


def test_cli_help_is_fast_and_lists_no_heavy_imports():
    code = ("import sys; from langcell.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'deepspeed', 'tiledbsoma', 'transformers', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
