"""The main job end to end at a reduced setting: `langcell demo --config ci`."""

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "langcell.cli", "demo", "--out", str(out), "--config", "ci"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_a_report_whose_numbers_come_from_the_metrics(demo):
    out, stdout = demo
    assert f"[demo] report: {out / 'report.md'}" in stdout
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    summary = json.loads((out / "demo_summary.json").read_text())
    accuracy = metrics["zero-shot"]["accuracy"]
    assert f"| LangCell (this demo model) | {accuracy:.3f} |" in report
    assert summary["chance"] == pytest.approx(0.1)  # the 10 PBMC types
    assert f"| chance (uniform over 10 types) | 0.100 |" in report
    for task in ("zero-shot", "few-shot", "finetune", "retrieval", "integration"):
        assert task in metrics
    assert (out / "eval" / "zero_shot_confusion.png").stat().st_size > 1000
    # Every real cell is accounted for in the split table.
    rows = dict(re.findall(r"\| (scanpy-pbmc68k-reduced|celltypist-sample-cell-by-gene) \| real \| (\d+ \| \d+ \| \d+) \|", report))
    assert sum(map(int, rows["scanpy-pbmc68k-reduced"].split(" | "))) == 700
    assert sum(map(int, rows["celltypist-sample-cell-by-gene"].split(" | "))) == 559
    synthetic = re.findall(r"\| (\S+) \| synthetic \| (\d+) \| (\d+) \| (\d+) \|", report)
    assert sum(int(n) for row in synthetic for n in row[1:]) == 200
    # Every step's peak memory, pre-training's from its own process.
    peaks = {row["step"]: row["gb"] for row in summary["peak_memory_gb"]}
    assert {"pre-training stage 1", "pre-training stage 2", "eval suite", "export (published LangCell layout)"} <= set(peaks)
    assert all(0.05 < gb < 16 for gb in peaks.values())
    assert f"| eval suite | {peaks['eval suite']:.2f} |" in report


def test_demo_evaluates_only_real_pbmcs_that_pretraining_never_saw(demo):
    from datasets import load_from_disk

    out, _ = demo
    held_out = load_from_disk(str(out / "eval_data" / "pbmc_test"))
    train = load_from_disk(str(out / "sclibrary" / "hf" / "train"))
    assert set(held_out["dataset_id"]) == {"scanpy-pbmc68k-reduced"}
    assert len(set(held_out["cell_type"])) == 10
    train_pbmc = train.filter(lambda row: row["dataset_id"] == "scanpy-pbmc68k-reduced")
    assert len(train_pbmc) > 0 and not set(held_out["soma_joinid"]) & set(train_pbmc["soma_joinid"])
    # Synthetic cells took part in pre-training and are labelled as such in the report.
    assert len(train) > len(train_pbmc) + 335
    # A third of the real PBMCs are held out (stratified: within rounding per type).
    assert 0.30 < len(held_out) / 700 < 0.36


def test_demo_rerun_reuses_every_finished_step(demo):
    out, _ = demo
    before = (out / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "langcell.cli", "demo", "--out", str(out), "--config", "ci"],
                          capture_output=True, text=True, check=True)
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[demo]") and "report:" not in line]
    assert steps and all(line.endswith("done earlier, reused") for line in steps), steps
    after = (out / "report.md").read_text()
    # Only the line with this invocation's duration may differ.
    assert [l for l in before.splitlines() if "took" not in l] == [l for l in after.splitlines() if "took" not in l]
