"""Two-process torchrun (gloo, DS_ACCELERATOR=cpu): gathered losses, ZeRO-2 and ZeRO-3 training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pretrain.losses import cell_cell_contrastive, cell_text_contrastive
from tests.pretrain_helpers import REPO, _port, env, read_metrics, run_cli, write_setup

GATHER_SCRIPT = r'''
import sys, torch, torch.distributed as dist
import pretrain.losses as losses
from pretrain.losses import cell_cell_contrastive, cell_text_contrastive, gather_with_grad
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
path = type(gather_with_grad(c).grad_fn).__name__
torch.save({"loss": loss.detach(), "c": c.grad, "t": t.grad, "v": v.grad, "path": path},
           sys.argv[1] + f"/rank{rank}.pt")
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


@pytest.mark.slow
@pytest.mark.parametrize("zero,micro,accum", [("zero2.json", 8, 1), ("zero3.json", 4, 2)])
def test_two_process_training_losses_fall_and_export(tmp_path, zero, micro, accum):
    """Half the cells have no identity text, so some micro-batches of a rank have none at all:
    ZeRO must still see every rank step through the same parameters."""
    from pretrain.engine import consolidated_state_dict
    from pretrain.export import load_langcell
    lib, cfg = write_setup(tmp_path, steps1=14, steps2=10, deepspeed=zero, micro_batch_size=micro,
                           grad_accum_steps=accum, unlabelled_every=2)
    run = tmp_path / "run"
    for stage in ("1", "2"):
        r = run_cli(["pretrain", "--config", str(cfg), "--data", str(lib), "--out", str(run), "--stage", stage],
                    nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = read_metrics(run / "stage1" / "metrics.jsonl"), read_metrics(run / "stage2" / "metrics.jsonl")
    assert len(m1) == 14 and len(m2) == 10
    first, last = _falls(m1)
    assert last < first - 0.3, (first, last)
    first, last = _falls(m2)
    assert last < first - 0.05, (first, last)
    # ZeRO partitions optimizer state (and for ZeRO-3 the weights) per rank.
    tag = (run / "stage2" / "checkpoints" / "latest").read_text().strip()
    assert len(list((run / "stage2" / "checkpoints" / tag).glob("*zero_pp_rank_*optim_states.pt"))) == 2

    r = run_cli(["export", "--run", str(run), "--out", str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_langcell(tmp_path / "export")
    state = consolidated_state_dict(run / "stage2" / "checkpoints")
    assert torch.equal(model.text_proj.weight, state["text_proj.weight"])
    assert torch.equal(model.cell_bert.encoder.layer[1].output.dense.weight,
                       state["cell_bert.encoder.layer.1.output.dense.weight"])
