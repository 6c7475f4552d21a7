"""The demo's per-step peak memory: each step's own high-water mark, not the process's so far."""

import numpy as np

from langcell.demo import _StepMemory


def test_each_step_reports_its_own_peak_not_an_earlier_steps(tmp_path):
    memory = _StepMemory()
    memory.start("big")
    block = np.ones(400 * 2**20 // 8)  # 400 MiB resident
    del block
    memory.start("small")
    small = np.ones(20 * 2**20 // 8)
    del small
    memory.finish()
    memory.record("pre-training stage 1", 1.5)  # a child process's own logged peak
    assert memory.peaks["big"] - memory.peaks["small"] > 0.3
    peaks = memory.save(tmp_path)
    # A resumed invocation keeps what earlier ones measured and adds its own.
    again = _StepMemory()
    again.record("eval suite", 0.8)
    assert again.save(tmp_path) == {**peaks, "eval suite": 0.8}
