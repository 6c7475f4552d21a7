"""Pre-training on CPU builds no DeepSpeed C++ op: a machine without a compiler runs it, and
one with a compiler does not spend minutes of its cores on one."""

from __future__ import annotations

import subprocess
import sys

from tests.pretrain_helpers import REPO, env, read_metrics, write_setup

# Every name torch's extension builder, distutils and DeepSpeed's op probes call a compiler by.
COMPILERS = ("c++", "g++", "gcc", "cc", "clang", "clang++", "x86_64-linux-gnu-g++", "x86_64-linux-gnu-gcc", "ninja")


def test_stage1_on_cpu_calls_no_compiler(tmp_path):
    shims, calls = tmp_path / "bin", tmp_path / "compiler_calls"
    shims.mkdir()
    for name in COMPILERS:
        shim = shims / name
        shim.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nexit 1\n")
        shim.chmod(0o755)
    lib, cfg = write_setup(tmp_path, steps1=2)
    e = env()
    # An empty extension cache, so an op built earlier on this machine cannot be reused silently.
    e.update(PATH=f"{shims}:{e['PATH']}", TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
             CC=str(shims / "cc"), CXX=str(shims / "c++"))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "langcell.cli", "pretrain", "--config", str(cfg), "--data", str(lib),
                           "--out", str(run), "--stage", "1"], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "torch_extensions").exists()
    assert read_metrics(run / "stage1" / "metrics.jsonl")[-1]["step"] == 2
