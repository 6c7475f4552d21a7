"""Shared fixtures of the pretrain tests: a tiny library and tiny configs in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from langcell.pretrain.synthetic import write_synthetic_library

REPO = Path(__file__).resolve().parent.parent
VOCAB = 600  # a small gene vocabulary keeps the MLM head cheap on 2 CPU cores

MODEL = {
    "cell": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128,
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "text": {"init_from": "all-MiniLM-L6-v2", "random_init": True, "hidden_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "max_length": 32},
    "proj_dim": 256,
}


def stage(steps: int, lr: float = 2e-3, losses=None) -> dict:
    return {"max_steps": steps, "lr": lr, "warmup_steps": 2, "min_lr_ratio": 0.5, "weight_decay": 0.0,
            "losses": losses or {"mlm": 1.0, "cell_cell": 1.0, "cell_text": 1.0, "ctm": 1.0}}


def write_setup(tmp: Path, *, steps1: int = 6, steps2: int = 6, n_cells: int = 96, n_shards: int = 4,
                micro_batch_size: int = 8, deepspeed: str = "zero2.json", checkpoint_every: int = 100,
                unlabelled_every: int = 0, **extra) -> tuple[Path, Path]:
    """(library, pretrain config path) under tmp; every `unlabelled_every`-th cell has no text."""
    lib = write_synthetic_library(tmp / "lib", n_cells=n_cells, n_shards=n_shards, vocab_size=VOCAB,
                                  min_len=12, max_len=48, seed=1, unlabelled_every=unlabelled_every)
    (tmp / "model.yaml").write_text(yaml.safe_dump(MODEL))
    cfg = {"model": str(tmp / "model.yaml"), "seed": 0, "micro_batch_size": micro_batch_size,
           "deepspeed_config": deepspeed, "checkpoint_every": checkpoint_every, "log_every": 1,
           "peak_flops_per_device": 0.0,
           "data": {"shuffle_buffer": 32, "bucket_batches": 2, "num_workers": 0, "max_length": 128},
           "stage1": stage(steps1, losses={"mlm": 1.0, "cell_cell": 1.0, "cell_text": 0.0, "ctm": 0.0}),
           "stage2": stage(steps2)}
    cfg.update(extra)
    (tmp / "pretrain.yaml").write_text(yaml.safe_dump(cfg))
    return lib, tmp / "pretrain.yaml"


def env() -> dict:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
             PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`langcell ...` in a fresh process; with nproc > 1 under torchrun (gloo on CPU)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), "-m", "langcell.cli", *args]
    else:
        cmd = [sys.executable, "-m", "langcell.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell_type_batch(model, ids, mask, texts: list[str]) -> dict:
    """A stage-2 batch whose cells each have one text naming their cell type (one aspect)."""
    import torch
    unique = list(dict.fromkeys(texts))
    t_ids, t_mask = model.tokenize_texts(unique)
    codes = torch.zeros(len(texts), 7, dtype=torch.long)
    codes[:, 0] = torch.tensor([unique.index(t) + 1 for t in texts])
    aspects = torch.zeros(len(texts), 7, dtype=torch.bool)
    aspects[:, 0] = True
    return {"cell_ids": ids, "cell_mask": mask, "text_ids": t_ids, "text_mask": t_mask,
            "text_index": codes[:, 0] - 1, "has_text": torch.ones(len(texts), dtype=torch.bool),
            "term_codes": codes, "text_aspects": aspects}
