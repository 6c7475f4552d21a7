"""Parameter groups: a learning-rate multiplier per part, the text-encoder freeze, and
parameters no objective trains kept out of the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from langcell.pretrain.config import LossWeights, LrMultipliers, ModelConfig, StageConfig
from langcell.pretrain.engine import _optimizer, freeze_unused
from langcell.pretrain.model import LangCellPretrainModel
from langcell.core.config import from_dict
from tests.pretrain_helpers import MODEL


def _model(with_text=True):
    torch.manual_seed(0)
    return LangCellPretrainModel(from_dict(ModelConfig, MODEL, "test"), with_text=with_text)


def _lrs_by_part(model, opt):
    part_of = {}
    for name, p in model.named_parameters():
        part_of[id(p)] = "crossattention" if ".crossattention." in name else name.split(".")[0]
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            out.setdefault(part_of[id(p)], set()).add(round(group["lr"], 12))
    return {k: sorted(v) for k, v in out.items()}


def test_each_part_gets_its_multiple_of_the_stage_lr_and_the_text_encoder_waits():
    model = _model()
    stage = StageConfig(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1,
                        lr_multipliers=LrMultipliers(cell=1.0, text=0.1, cross=3.0, proj=2.0, heads=0.5),
                        freeze_text_steps=20)
    opt, sched = _optimizer(model, stage)
    # Every trainable parameter is in exactly one group.
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    seen = {}
    for step in range(100):
        seen[step] = _lrs_by_part(model, opt)
        opt.step()
        sched.step()
    # Step 9 ends the others' warm-up; the text encoder's lr is 0 until step 20, then warms up.
    assert seen[9]["cell_bert"] == [1e-3] and seen[9]["cell_proj"] == [2e-3] and seen[9]["logit_scale"] == [2e-3]
    assert seen[9]["mlm_head"] == [5e-4] and seen[9]["ctm_head"] == [5e-4]
    # The cross-attention is fresh even in a pretrained text encoder: its own rate, never held at 0.
    assert seen[0]["crossattention"] == [3e-4] and seen[9]["crossattention"] == [3e-3]
    assert all(seen[s]["text_bert"] == [0.0] for s in range(20))
    assert seen[20]["text_bert"] == [1e-4 / 10] and seen[29]["text_bert"] == [1e-4]
    # Then all decay by the same cosine to min_lr_ratio.
    assert math.isclose(seen[99]["cell_bert"][0], 1e-4, rel_tol=0.05)
    # Decay applies to weight matrices only.
    for group in opt.param_groups:
        assert (group["weight_decay"] > 0) == all(p.ndim >= 2 for p in group["params"])


@pytest.mark.parametrize("stage,weights,frozen", [
    (1, LossWeights(cell_text=0, ctm=0), {"logit_scale"}),
    (1, LossWeights(mlm=0, cell_text=0, ctm=0), {"logit_scale", "mlm_head"}),
    (2, LossWeights(ctm=0), {"ctm_head", "crossattention"}),
    (2, LossWeights(mlm=0, cell_cell=0), {"mlm_head"}),
    (2, LossWeights(cell_text=0), {"logit_scale", "text_proj"}),
])
def test_parameters_no_objective_trains_are_frozen(stage, weights, frozen):
    model = _model(with_text=stage == 2)
    freeze_unused(model, stage, weights)
    for name, p in model.named_parameters():
        assert p.requires_grad != any(f in name for f in frozen), name
