"""Two-process torchrun (gloo, DS_ACCELERATOR=cpu): gathered losses, ZeRO-2 and ZeRO-3 training (ZeRO-3
really partitioned), export against the trained weights, stage-2 kill-and-resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from langcell.pretrain.config import DEEPSPEED_CONFIG_DIR
from langcell.pretrain.engine import consolidated_state_dict
from langcell.pretrain.losses import cell_cell_contrastive, cell_text_contrastive
from tests.pretrain_helpers import REPO, _port, env, read_metrics, run_cli, write_setup

GATHER_SCRIPT = r'''
import sys, torch, torch.distributed as dist
import langcell.pretrain.losses as losses
from langcell.pretrain.losses import cell_cell_contrastive, cell_text_contrastive, gather_with_grad
if sys.argv[2] == "fallback":  # what a torch without a differentiable functional all-gather runs
    losses._functional_gather_has_autograd = lambda: False
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
cells, texts, views = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(3))
codes, aspects, has_text = (torch.load(sys.argv[1] + "/relation.pt")[k] for k in ("codes", "aspects", "has_text"))
part = slice(rank * 4, rank * 4 + 4)
c, t, v = (x[part].clone().requires_grad_() for x in (cells, texts, views))
loss = (cell_text_contrastive(c, t, codes[part], aspects[part], has_text[part], torch.tensor(14.0))
        + cell_cell_contrastive(c, v, 0.05))
loss.backward()
probe = gather_with_grad(c)
path = type(probe.grad_fn).__name__
torch.save({"loss": loss.detach(), "c": c.grad, "t": t.grad, "v": v.grad, "path": path, "probe": probe.detach()},
           sys.argv[1] + f"/rank{rank}.pt")
# Neither rank may tear the group down while the other still waits on a collective, nor while
# tensors of a finished functional collective still hold its work: gloo then aborts the process
# ("terminate called without an active exception", seen once in about 20 runs).
del loss, probe, c, t, v
import gc
gc.collect()
dist.barrier()
dist.destroy_process_group()
'''


def _relation():
    """8 cells over two ranks: true descriptions straddle the ranks' halves, one cell has no text."""
    # (cell type, tissue) codes; the text of cell i mentions cell type only, or both.
    codes = torch.zeros(8, 7, dtype=torch.long)
    codes[:, 0] = torch.tensor([5, 5, 1, 2, 3, 3, 3, 4])
    codes[:, 1] = torch.tensor([7, 8, 7, 7, 8, 8, 7, 7])
    aspects = torch.zeros(8, 7, dtype=torch.bool)
    aspects[:, 0] = True
    aspects[[1, 4, 6], 1] = True
    has_text = torch.ones(8, dtype=torch.bool)
    has_text[3] = False
    codes[3] = 0
    aspects[3] = False
    return {"codes": codes, "aspects": aspects, "has_text": has_text}


@pytest.mark.slow
@pytest.mark.parametrize("gather,grad_fn", [("functional", "wait_tensor"),
                                            ("fallback", "_AllGatherBackward")])
def test_gathered_contrastive_equals_single_process_on_the_whole_batch(tmp_path, gather, grad_fn):
    torch.save(_relation(), tmp_path / "relation.pt")
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_port()), str(script), str(tmp_path), gather], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    cells, texts, views = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
                           for _ in range(3))
    rel = _relation()
    loss = (cell_text_contrastive(cells, texts, rel["codes"], rel["aspects"], rel["has_text"], torch.tensor(14.0))
            + cell_cell_contrastive(cells, views, 0.05))
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert all(grad_fn in r["path"] for r in ranks), [r["path"] for r in ranks]
    # Each rank's loss is its rows' share of the global mean, so the mean over ranks is the global mean ...
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 - loss.item()) < 1e-5
    # ... and each rank's gradient is world_size x the global gradient (DeepSpeed divides by it).
    for name, full in (("c", cells.grad), ("t", texts.grad), ("v", views.grad)):
        got = torch.cat([ranks[0][name], ranks[1][name]]) / 2
        assert torch.allclose(got, full, atol=1e-5), name
    assert cells.grad.abs().sum() > 0


def _falls(metrics, key="loss"):
    first = sum(m[key] for m in metrics[:3]) / 3
    last = sum(m[key] for m in metrics[-3:]) / 3
    return first, last


def _deepspeed_config(tmp_path, name):
    """The shipped config; for ZeRO-3 with every tensor partitioned (the tiny model's tensors are
    all below the shipped persistence threshold, which would leave them whole on every rank)."""
    cfg = json.loads((DEEPSPEED_CONFIG_DIR / name).read_text())
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def _kill_after_first_checkpoint(args, stage_dir):
    """Start a 2-rank run and SIGKILL every process of it once it has written a checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_port()), "-m", "langcell.cli", *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = stage_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage_dir / "done.json").exists(), "the run finished before it could be killed"
    return int(latest.read_text().strip()[len("step"):])


@pytest.mark.slow
@pytest.mark.parametrize("zero,micro,accum,budget", [("zero2.json", 8, 1, None), ("zero3.json", 4, 2, 384)])
def test_two_process_training_losses_fall_resume_and_export(tmp_path, zero, micro, accum, budget):
    """Half the cells have no identity text, so some micro-batches of a rank have none at all:
    ZeRO must still see every rank step through the same parameters. With a token budget
    (ZeRO-3) the ranks' batches hold 3 or 6 cells, alike at every step, or the gathers fail."""
    from langcell.pretrain.export import load_langcell
    lib, cfg = write_setup(tmp_path, steps1=14, steps2=10, deepspeed=str(_deepspeed_config(tmp_path, zero)),
                           micro_batch_size=micro, grad_accum_steps=accum, unlabelled_every=2, checkpoint_every=3,
                           data={"shuffle_buffer": 48 if budget else 32, "bucket_batches": 2, "num_workers": 0,
                                 "max_length": 128, "tokens_per_batch": budget})
    run = tmp_path / "run"
    for stage in ("1", "2"):
        r = run_cli(["pretrain", "--config", str(cfg), "--data", str(lib), "--out", str(run), "--stage", stage],
                    nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        if zero == "zero3.json":  # every tensor is split: each rank keeps about half of the elements
            kept = re.findall(r"rank (\d): ZeRO-3 partitions (\d+) of (\d+) parameter tensors over 2 ranks; "
                              r"this rank keeps (\d+) of (\d+) elements", r.stdout)
            assert sorted(k[0] for k in kept) == ["0", "1"], r.stdout[-2000:]
            for _, split, tensors, mine, total in kept:
                assert split == tensors and int(tensors) > 20
                assert int(mine) <= 0.51 * int(total)
    m1, m2 = read_metrics(run / "stage1" / "metrics.jsonl"), read_metrics(run / "stage2" / "metrics.jsonl")
    assert len(m1) == 14 and len(m2) == 10
    # ZeRO reports the global gradient norm (before clipping) of every logged step.
    assert all(m["grad_norm"] > 0 for m in m1 + m2)
    first, last = _falls(m1)
    assert last < first - 0.3, (first, last)
    first, last = _falls(m2)
    assert last < first - 0.05, (first, last)
    # ZeRO partitions optimizer state (and for ZeRO-3 the weights) per rank.
    ckpt = run / "stage2" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert len(list((ckpt / tag).glob("*zero_pp_rank_*optim_states.pt"))) == 2

    r = run_cli(["export", "--run", str(run), "--out", str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_langcell(tmp_path / "export")
    exported = {f"{part}.{k}": v for part in ("cell_bert", "cell_proj", "text_proj", "ctm_head")
                for k, v in getattr(model, part).state_dict().items()}
    exported.update({f"text_bert.{k}": v for k, v in model.text_bert.state_dict().items() if ".encoder." in f".{k}"})
    if zero == "zero2.json":
        # The module's own state dict, as rank 0 saved it (ZeRO-2 keeps whole weights on every rank),
        # not the consolidation of the optimizer's partitions that the export reads.
        own = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        own = consolidated_state_dict(ckpt)
    trained = {k for k in own if not k.endswith("position_ids")}
    assert {k for k in exported if not k.endswith("position_ids")} <= trained
    assert len(exported) > 40
    for k, v in exported.items():
        if not k.endswith("position_ids"):
            assert torch.equal(v, own[k].float()), k

    if zero == "zero2.json":
        # Stage 2 killed on both ranks after a checkpoint, then resumed: the same losses as the run above.
        killed = tmp_path / "killed"
        shutil.copytree(run, killed, ignore=shutil.ignore_patterns("stage2"))
        args = ["pretrain", "--config", str(cfg), "--data", str(lib), "--out", str(killed), "--stage", "2"]
        resumed_from = _kill_after_first_checkpoint(args, killed / "stage2")
        assert resumed_from < 10
        r = run_cli(args, nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "replaying" not in r.stdout + r.stderr
        again = read_metrics(killed / "stage2" / "metrics.jsonl")
        assert [m["step"] for m in again] == list(range(1, 11))
        for x, y in zip(m2[resumed_from:], again[resumed_from:]):
            for key in ("loss", "mlm", "cell_cell", "cell_text", "ctm", "lr", "temperature", "grad_norm"):
                assert abs(x[key] - y[key]) < 1e-5, (x["step"], key, x[key], y[key])


@pytest.mark.slow
def test_two_ranks_of_b_follow_one_process_of_2b(tmp_path):
    """The global-batch objective (cell-cell contrast, gathered over ranks) gives 2 ranks x B the
    loss trajectory of 1 process x 2B. Arranged so both see the same cells each step: one shard
    (2 ranks then take alternate cells of one stream, one process takes them all), no shuffle
    buffer or length windows, no masking or dropout (their draws are per rank). MLM (a mean per
    rank over its masked tokens) and CTM (hard negatives from the local batch) are per-rank by
    design and left out."""
    import yaml

    from tests.pretrain_helpers import MODEL
    runs = {}
    for nproc, micro in ((1, 16), (2, 8)):
        folder = tmp_path / f"n{nproc}"
        lib, cfg = write_setup(folder, n_cells=96, n_shards=1, steps1=6, micro_batch_size=micro, mask_prob=0.0,
                               data={"shuffle_buffer": 1, "bucket_batches": 1, "open_shards": 1, "num_workers": 0,
                                     "max_length": 128})
        model = {**MODEL, "cell": {**MODEL["cell"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
        (folder / "model.yaml").write_text(yaml.safe_dump(model))
        data = yaml.safe_load(cfg.read_text())
        data["stage1"]["losses"] = {"mlm": 0.0, "cell_cell": 1.0, "cell_text": 0.0, "ctm": 0.0}
        cfg.write_text(yaml.safe_dump(data))
        r = run_cli(["pretrain", "--config", str(cfg), "--data", str(lib), "--out", str(folder / "run"), "--stage", "1"],
                    nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[nproc] = read_metrics(folder / "run" / "stage1" / "metrics.jsonl")
    one, two = ([m["cell_cell"] for m in runs[n]] for n in (1, 2))
    assert len(one) == len(two) == 6
    # It trains (by 100x the tolerance below), so equal trajectories are not equal constants.
    assert one[0] - one[-1] > 0.02, one
    # Summation order alone leaves them 6e-5 apart by step 6; a gather whose backward drops the
    # other ranks' share of the gradient (measured) is 4e-4 apart at step 4 and 4e-3 at step 6.
    for step, (a, b) in enumerate(zip(one, two), 1):
        assert abs(a - b) < 1e-4 * abs(a), (step, a, b)
