"""bf16 training accumulates gradients in fp32 under every shipped ZeRO config (a real DeepSpeed
engine in bf16 on CPU, gloo): micro-step gradients that bf16 would round away still count."""

from __future__ import annotations

import pytest
import torch

from langcell.pretrain.engine import _init_distributed, load_deepspeed_config

ACCUM = 16


def _update_after_one_step(name: str, drop_fp32_accumulation: bool) -> float:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    cfg = load_deepspeed_config(name, on_gpu=True)  # bf16 on, as on a GPU
    cfg.pop("_path")
    if drop_fp32_accumulation:
        cfg.pop("data_types")
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=ACCUM, gradient_clipping=0.0,
               zero_allow_untested_optimizer=True)
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)
    # d loss / d w = c: one micro-step of 256 and 15 of 1. Averaged over 16 micro-steps: 16 and
    # 15 x 0.0625; in bf16 (8 significant bits) 16 + 0.0625 rounds back to 16.
    for c in [256.0] + [1.0] * (ACCUM - 1):
        engine.backward(engine(torch.tensor([[c]], dtype=torch.bfloat16)).float().sum())
        engine.step()
    return -float(safe_get_full_fp32_param(model.weight))


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_bf16_gradients_accumulate_in_fp32(name):
    _init_distributed()
    cfg = load_deepspeed_config(name, on_gpu=True)
    assert cfg["bf16"]["enabled"] is True and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    exact = (256.0 + (ACCUM - 1)) / ACCUM  # 16.9375
    # At most one bf16 rounding of the sum (ZeRO-1's optimizer hands it on as 17.0); a bf16 sum
    # would have lost all 15 small micro-steps (0.9375).
    assert abs(_update_after_one_step(name, drop_fp32_accumulation=False) - exact) <= 0.0625
    if name != "zero1.json":
        # The same engine accumulating in bf16 loses every small micro-step (ZeRO-1 without
        # fp32 accumulation has no bf16 path to compare with in DeepSpeed).
        assert abs(_update_after_one_step(name, drop_fp32_accumulation=True) - 16.0) < 1e-4


def test_cpu_runs_in_fp32_with_the_same_configs():
    for name in ("zero0.json", "zero1.json", "zero2.json", "zero3.json"):
        assert load_deepspeed_config(name, on_gpu=False)["bf16"]["enabled"] is False
