"""Activation memory of one training step per pre-training config, with and without activation
checkpointing, measured on this machine.

Each measurement is a fresh process that builds the config's model, runs one forward and backward
pass of the stage's objectives on N synthetic cells of L tokens (packed, as training runs them)
and reports its peak resident memory above what it held before the pass. Two sizes per case
give the memory per token (the slope: activations; parameter gradients and the rest do not grow
with tokens), which is then scaled to the config's tokens per micro-batch. CPU figures are fp32;
in bf16 on a GPU the activations take about half. With attention dropout (every config's cell
encoder) SDPA runs its math path on a CPU, which keeps each cell's heads x L x L probabilities
and dropout mask for backward; a GPU runs the same call with its flash kernel, dropout included,
which keeps O(L) per cell. The case "fused" measures that: the cell encoder's attention dropout
set to 0, so that the CPU's own flash kernel runs. `base`'s text encoder is BERT-base-shaped with
random weights (BiomedBERT cannot be downloaded here; its activations have the same shapes).

    .venv/bin/python -m benchmarks.bench_memory [--configs tiny demo base] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from benchmarks.record import record_section

REPO = Path(__file__).resolve().parents[1]
# Cells of a measurement: (length, cells at the small size); the large size doubles the cells.
SIZES = {"tiny": (128, 8), "demo": (512, 4), "base": (1024, 1)}
BERT_BASE_TEXT = {"random_init": True, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model_config(config: str):
    from langcell.core.config import from_dict
    from langcell.pretrain.config import ModelConfig, load_model_config, load_pretrain_config
    from dataclasses import asdict
    cfg = load_model_config(load_pretrain_config(config).model)
    if config == "base":
        cfg = from_dict(ModelConfig, {**asdict(cfg), "text": {**asdict(cfg.text), "init_from": "all-MiniLM-L6-v2",
                                                               **BERT_BASE_TEXT}}, "bench")
    return cfg


def measure_one(config: str, stage: int, checkpointing: bool, cells: int, length: int, fused: bool = False) -> float:
    """Peak MB above the starting resident memory of one forward+backward (run in its own process)."""
    import torch

    from langcell.pretrain.config import LossWeights, load_pretrain_config
    from langcell.pretrain.losses import pretrain_losses
    from langcell.pretrain.model import LangCellPretrainModel, load_text_tokenizer

    torch.manual_seed(0)
    pcfg = load_pretrain_config(config)
    mcfg = _model_config(config)
    if fused:
        mcfg.cell.attention_probs_dropout_prob = 0.0
    model = LangCellPretrainModel(mcfg, with_text=stage == 2, warm_start=False).train()
    if checkpointing:
        model.enable_activation_checkpointing()
    vocab = mcfg.cell.vocab_size
    ids = torch.randint(2, vocab - 1, (cells, length))
    ids[:, 0] = vocab - 1
    batch = {"cell_ids": ids, "cell_mask": torch.ones_like(ids)}
    weights = getattr(pcfg, f"stage{stage}").losses
    if stage == 2:
        model.text_tokenizer = load_text_tokenizer(mcfg.text)
        texts = [f"cell type: type {i}. tissue: blood." for i in range(cells)]
        t_ids, t_mask = model.tokenize_texts(texts)
        codes = torch.zeros(cells, 7, dtype=torch.long)
        codes[:, 0] = torch.arange(1, cells + 1)
        aspects = torch.zeros(cells, 7, dtype=torch.bool)
        aspects[:, 0] = True
        batch.update(text_ids=t_ids, text_mask=t_mask, text_index=torch.arange(cells),
                     has_text=torch.ones(cells, dtype=torch.bool), term_codes=codes, text_aspects=aspects)
        # The demo's stage 2 trains no cell-only objective; measure the text side with all of them.
        weights = LossWeights(mlm=weights.mlm, cell_cell=weights.cell_cell, cell_text=1.0, ctm=1.0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    loss, _ = pretrain_losses(model, batch, stage, weights, pcfg.mask_prob, pcfg.simcse_temperature,
                              cell_lengths=[length] * cells)
    loss.backward()
    return (_rss_kb("VmHWM") - before) / 1024


def _run(config: str, stage: int, checkpointing: bool, cells: int, length: int, fused: bool) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--one", config, str(stage),
                          str(int(checkpointing)), str(cells), str(length), str(int(fused))],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mb"]


def _micro_batch_tokens(config: str) -> int:
    from langcell.pretrain.config import load_pretrain_config
    cfg = load_pretrain_config(config)
    return cfg.data.tokens_per_batch or cfg.micro_batch_size * cfg.data.max_length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(SIZES))
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        config, stage, ckpt, cells, length, fused = args.one
        print(json.dumps({"mb": measure_one(config, int(stage), bool(int(ckpt)), int(cells), int(length),
                                            bool(int(fused)))}))
        return 0
    rows = []
    for config in args.configs:
        length, cells = SIZES[config]
        budget = _micro_batch_tokens(config)
        for stage in (1, 2):
            for ckpt, fused in ((False, False), (True, False), (False, True)):
                small = _run(config, stage, ckpt, cells, length, fused)
                large = _run(config, stage, ckpt, 2 * cells, length, fused)
                per_k = (large - small) / (cells * length) * 1024
                rows.append({"config": config, "stage": stage, "checkpointing": ckpt, "fused": fused, "small_mb": small,
                             "large_mb": large, "mb_per_1k_tokens": per_k, "budget": budget,
                             "at_budget_gb": per_k * budget / 1024 / 1024})
                print(json.dumps(rows[-1]), flush=True)
    report = _report(args, rows)
    print(report)
    if not args.no_record:
        record_section("Pre-training (activation memory)", report)
    return 0


def _report(args, rows: list[dict]) -> str:
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_memory --configs {' '.join(args.configs)}` "
        f"({datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, torch CPU, fp32, packed "
        "cells). One forward and backward of the stage's objectives per fresh process, on cells of "
        + ", ".join(f"{SIZES[c][0]:,} tokens ({c})" for c in args.configs)
        + "; peak resident memory above the process's memory before the pass, at two cell counts. Per 1k tokens ="
        " the difference between the two, per token of the added cells (activations; the parameters' gradients "
        "do not grow with tokens); at budget = that slope x the config's tokens per micro-batch "
        "(`data.tokens_per_batch`, else micro_batch_size x max_length). Stage 2 counts all four objectives.",
        "",
        "| config | stage | checkpointing | cell attention | peak MB (N cells) | peak MB (2N cells) | MB per 1k tokens | tokens per micro-batch | activations at budget, GB fp32 |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        attention = "fused (dropout 0)" if r["fused"] else "math (dropout)"
        lines.append(f"| {r['config']} | {r['stage']} | {'on' if r['checkpointing'] else 'off'} | {attention} | {r['small_mb']:.0f} | "
                     f"{r['large_mb']:.0f} | {r['mb_per_1k_tokens']:.1f} | {r['budget']:,} | {r['at_budget_gb']:.2f} |")
    lines += ["", "Cell attention: \"math (dropout)\" is the config as it runs on a CPU, where attention dropout keeps "
              "SDPA on its math path, which stores every cell's heads x L x L probabilities and dropout mask for "
              "backward. \"fused (dropout 0)\" sets the cell encoder's attention dropout to 0 so that the CPU runs "
              "its flash kernel, which stores O(L) per cell: what a GPU's flash kernel stores with the dropout "
              "applied inside the kernel, so those rows stand for a GPU's activations (in fp32)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
