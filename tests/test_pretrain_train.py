"""Single-process DeepSpeed training: bad input, both stages + export, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from langcell.core.errors import LangCellError
from langcell.pretrain.engine import consolidated_state_dict, pretrain
from tests.pretrain_helpers import REPO, env, read_metrics, run_cli, write_setup


@pytest.fixture
def setup(tmp_path):
    lib, cfg = write_setup(tmp_path)
    return tmp_path, lib, cfg


def _edit(path, fn):
    data = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))


def test_unknown_config_key(setup):
    tmp, lib, cfg = setup
    _edit(cfg, lambda d: d.update(micro_batchsize=4))
    with pytest.raises(LangCellError, match="unknown key 'micro_batchsize'"):
        pretrain(cfg, lib, tmp / "run", 1)


def test_stage_datasets_are_checked_and_reach_the_stream(setup):
    tmp, lib, cfg = setup
    _edit(cfg, lambda d: d.setdefault("stage1", {}).update(datasets="d1"))
    with pytest.raises(LangCellError, match="stage1.datasets is 'd1'; give a list of dataset ids"):
        pretrain(cfg, lib, tmp / "run", 1)
    _edit(cfg, lambda d: d["stage1"].update(datasets=["d9"]))
    with pytest.raises(LangCellError, match=r"got no cells of datasets \['d9'\]"):
        pretrain(cfg, lib, tmp / "run", 1)
    assert not (tmp / "run" / "stage1" / "done.json").exists()


def test_vocab_size_mismatch(setup):
    tmp, lib, cfg = setup
    _edit(tmp / "model.yaml", lambda d: d["cell"].update(vocab_size=25427))
    with pytest.raises(LangCellError, match="600 tokens but the model's cell vocab_size is 25427"):
        pretrain(cfg, lib, tmp / "run", 1)


def test_missing_and_corrupt_shards(setup):
    tmp, lib, cfg = setup
    shard = lib / "shards" / "train" / "sclibrary-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LangCellError, match="sclibrary-000002.tar: checksum differs"):
        pretrain(cfg, lib, tmp / "run", 1)
    shard.unlink()
    with pytest.raises(LangCellError, match="sclibrary-000002.tar: shard listed in .* is missing"):
        pretrain(cfg, lib, tmp / "run", 1)
    assert not (tmp / "run" / "stage1").exists()


def test_text_model_missing_offline(setup):
    tmp, lib, cfg = setup
    _edit(tmp / "model.yaml", lambda d: d["text"].update(init_from=str(tmp / "no-such-bert")))
    with pytest.raises(LangCellError, match="no-such-bert': folder does not exist"):
        pretrain(cfg, lib, tmp / "run", 1)


def test_cell_checkpoint_checked_before_the_run_starts(setup):
    tmp, lib, cfg = setup
    _edit(tmp / "model.yaml", lambda d: d["cell"].update(init_from=str(tmp / "no-such-geneformer")))
    with pytest.raises(LangCellError, match="no-such-geneformer': folder does not exist"):
        pretrain(cfg, lib, tmp / "run", 1)
    assert not (tmp / "run" / "run.json").exists()


def test_fp16_on_cpu_refused(setup):
    tmp, lib, cfg = setup
    ds = tmp / "fp16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    with pytest.raises(LangCellError, match="fp16 is not supported on CPU"):
        pretrain(cfg, lib, tmp / "run", 1, deepspeed_config=str(ds))


def test_stage2_needs_stage1(setup):
    tmp, lib, cfg = setup
    with pytest.raises(LangCellError, match="stage 1 has not finished"):
        pretrain(cfg, lib, tmp / "run", 2)


@pytest.mark.slow
def test_two_stages_then_export_loads_the_trained_weights(setup):
    """ZeRO-0 here (weights in the model-states file); ZeRO-2/3 exports are in test_pretrain_distributed."""
    from langcell.pretrain.export import load_langcell
    tmp, lib, cfg = setup
    run = tmp / "run"
    for stage in ("1", "2"):
        r = run_cli(["pretrain", "--config", str(cfg), "--data", str(lib), "--out", str(run), "--stage", stage,
                     "--deepspeed-config", "zero0.json"])
        assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = read_metrics(run / "stage1" / "metrics.jsonl"), read_metrics(run / "stage2" / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2, 3, 4, 5, 6]
    assert set(m1[0]) >= {"mlm", "cell_cell", "loss", "cells_per_s", "tokens_per_s", "padding_share", "mfu",
                          "model_flops_per_s"}
    assert all(r["model_flops_per_s"] > 0 for r in m1 + m2)
    assert set(m2[0]) >= {"mlm", "cell_cell", "cell_text", "ctm", "temperature"}
    # Without ZeRO (stage 0 in fp32) DeepSpeed does not report the gradient norm.
    assert all(m["grad_norm"] is None for m in m1 + m2)
    # Peak resident size of the training process, never falling: above the model and torch, far below the machine.
    peaks = [m["peak_memory_gb"] for m in m1 + m2]
    assert all(0.2 < p < 16 for p in peaks) and peaks[:len(m1)] == sorted(peaks[:len(m1)])
    assert all(0.0 <= m["padding_share"] < 0.5 and m["cells_per_s"] > 0 for m in m1 + m2)
    assert (run / "stage1" / "tb").is_dir() and (run / "stage2" / "done.json").is_file()

    r = run_cli(["export", "--run", str(run), "--out", str(tmp / "export"), "--langcell-compatible"])
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_langcell(tmp / "export")
    state = consolidated_state_dict(run / "stage2" / "checkpoints")
    assert torch.equal(model.cell_bert.embeddings.word_embeddings.weight, state["cell_bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.ctm_head.weight, state["ctm_head.weight"])
    assert torch.equal(model.text_bert.encoder.layer[0].crossattention.self.key.weight,
                       state["text_bert.encoder.layer.0.crossattention.self.key.weight"])
    # Stage 2 started from stage 1's cell encoder, then moved on.
    s1 = torch.load(run / "stage1" / "final_model.pt")
    assert not torch.equal(s1["cell_proj.weight"], state["cell_proj.weight"])
    assert (s1["cell_proj.weight"] - state["cell_proj.weight"]).abs().max() < 0.1


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_same_losses(tmp_path):
    """With token-budget batches (a 2-rank run resumes with per-rank batches in test_pretrain_distributed)."""
    lib, cfg = write_setup(tmp_path, steps1=40, checkpoint_every=5,
                           data={"shuffle_buffer": 48, "bucket_batches": 2, "num_workers": 0, "max_length": 128,
                                 "tokens_per_batch": 384})
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_cli(["pretrain", "--config", str(cfg), "--data", str(lib), "--out", str(full), "--stage", "1"])
    assert r.returncode == 0, r.stderr[-3000:]

    # The killed run loads with 2 workers: positions come back through them, and the losses may not
    # depend on the worker count.
    workers = tmp_path / "workers.yaml"
    _edit(cfg, lambda d: d["data"].update(num_workers=2))
    cfg.rename(workers)
    cmd = [sys.executable, "-m", "langcell.cli", "pretrain", "--config", str(workers), "--data", str(lib),
           "--out", str(killed), "--stage", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = killed / "stage1" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers, as a job scheduler kills them
    proc.wait()
    assert not (killed / "stage1" / "done.json").exists(), "the run finished before it could be killed"
    resumed_from = int(latest.read_text().strip()[4:])
    assert resumed_from < 40
    # The checkpoint holds where the data stream stood: resuming does not replay it. A checkpoint
    # without it (written before positions were saved) replays the stream to the same place.
    position = latest.parent / latest.read_text().strip() / "stream_rank00000.json"
    assert position.is_file()
    shutil.copytree(killed, tmp_path / "old")
    (tmp_path / "old" / position.relative_to(killed)).unlink()
    for folder, replays in ((killed, False), (tmp_path / "old", True)):
        r = run_cli(["pretrain", "--config", str(workers), "--data", str(lib), "--out", str(folder), "--stage", "1"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("replaying the stream" in r.stdout + r.stderr) == replays

    a = read_metrics(full / "stage1" / "metrics.jsonl")
    for folder in (killed, tmp_path / "old"):
        b = read_metrics(folder / "stage1" / "metrics.jsonl")
        assert [m["step"] for m in b] == list(range(1, 41))
        for x, y in zip(a[resumed_from:], b[resumed_from:]):
            for key in ("loss", "mlm", "cell_cell", "lr", "padding_share"):
                assert abs(x[key] - y[key]) < 1e-6, (folder.name, x["step"], key, x[key], y[key])


def test_micro_step_seeds_fit_torch_and_never_collide():
    from langcell.pretrain.engine import _seed
    seeds = {_seed(s, stage, step, micro, rank) for s in (0, 1844, 2**63 - 1) for stage in (1, 2)
             for step in (0, 1, 10**6) for micro in range(12) for rank in (0, 83, 1009)}
    assert len(seeds) == 3 * 2 * 3 * 12 * 3  # an arithmetic mix made (step 0, micro 10) == (step 1, rank 83)
    for s in seeds:
        torch.manual_seed(s)
    assert _seed(1844, 1, 0, 0, 0) == _seed(1844, 1, 0, 0, 0)


def test_seed_out_of_range_refused(setup):
    tmp, lib, cfg = setup
    _edit(cfg, lambda d: d.update(seed=-1))
    with pytest.raises(LangCellError, match="seed -1 is out of range"):
        pretrain(cfg, lib, tmp / "run", 1)


def test_batching_has_one_source(setup):
    """Accumulation and clipping come from configs/pretrain; a DeepSpeed config cannot set them too."""
    from langcell.pretrain.config import load_pretrain_config
    tmp, lib, cfg = setup
    ds = tmp / "clip.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5,
                              "gradient_accumulation_steps": 4}))
    with pytest.raises(LangCellError, match="gradient_accumulation_steps, gradient_clipping are set by configs/pretrain"):
        pretrain(cfg, lib, tmp / "run", 1, deepspeed_config=str(ds))
    # bf16 is the DeepSpeed config's alone ("auto"); the pretrain key that said it is gone.
    _edit(cfg, lambda d: d.update(bf16_on_gpu=True))
    with pytest.raises(LangCellError, match="bf16_on_gpu"):
        load_pretrain_config(cfg)
    for name in ("base", "demo", "tiny"):
        load_pretrain_config(name)


def test_a_stage_killed_before_done_json_is_finished_by_resume(setup, one_thread):
    """Killed after the last checkpoint but before final_model.pt and done.json: stage 2 would
    refuse to start for ever; rerunning stage 1 finishes it without training."""
    tmp, lib, cfg = setup
    _edit(cfg, lambda d: d["stage1"].update(max_steps=2))
    run = tmp / "run"
    summary = pretrain(cfg, lib, run, 1)
    assert summary["step"] == 2
    final = torch.load(run / "stage1" / "final_model.pt")
    (run / "stage1" / "done.json").unlink()
    (run / "stage1" / "final_model.pt").unlink()
    metrics = (run / "stage1" / "metrics.jsonl").read_text()
    with pytest.raises(LangCellError, match="stage 1 has not finished"):
        pretrain(cfg, lib, run, 2)
    assert pretrain(cfg, lib, run, 1) == summary
    assert json.loads((run / "stage1" / "done.json").read_text()) == summary
    again = torch.load(run / "stage1" / "final_model.pt")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    assert (run / "stage1" / "metrics.jsonl").read_text() == metrics  # nothing trained again
