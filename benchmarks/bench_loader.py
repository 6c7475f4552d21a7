"""Loader throughput of one rank against what one H100 at 40% MFU consumes for `base`.

The loader is training's own (`pretrain.engine.training_loader` with `configs/pretrain/base.yaml`:
its shuffle buffer, bucketing and token budget): shards read, cells shuffled, batched and
collated, and in stage 2 identity texts sampled and tokenized. It runs with 0, 1 and 2 worker
processes on a synthetic library of cells of 256..2,048 tokens; the first batches (filling the
shuffle buffer, starting workers) are left out. The demand is computed, not measured: 40% of an
H100's 989 TFLOP/s of bf16 over the FLOPs `pretrain.flops` counts for one cell of the measured
mean length (both SimCSE views and the masked-gene head in stage 1; in stage 2 also its text and
three matching pairs). `base`'s text tokenizer (PubMedBERT) cannot be downloaded here, so stage 2
tokenizes with all-MiniLM-L6-v2's (also BERT WordPiece) and counts FLOPs of a BERT-base text
encoder (PubMedBERT's shape).

    .venv/bin/python -m benchmarks.bench_loader [--cells 40000] [--batches 150] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.record import record_section

H100_BF16_FLOPS = 989e12
MFU = 0.40
GOAL = 4.0
BERT_BASE_TEXT = SimpleNamespace(num_hidden_layers=12, hidden_size=768, intermediate_size=3072)


def _measure(cfg, model_cfg, stage: int, shards, tokenizer: str, workers: int, warmup: int, batches: int) -> dict:
    from langcell.pretrain.engine import training_loader
    cfg.data.num_workers = workers
    it = iter(training_loader(cfg, model_cfg, stage, shards, tokenizer, rank=0, world=1, on_gpu=False))
    for _ in range(warmup):
        next(it)
    cells = tokens = texts = text_tokens = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        cells += b["cell_ids"].shape[0]
        tokens += int(b["n_tokens"])
        if stage == 2:
            texts += int(b["has_text"].sum())
            text_tokens += int(b["text_mask"][b["text_index"]][b["has_text"]].sum())
    seconds = time.perf_counter() - t0
    return {"cells_per_s": cells / seconds, "mean_length": tokens / cells,
            "text_share": texts / cells if stage == 2 else 0.0,
            "mean_text_length": text_tokens / max(texts, 1)}


def _demand(model_cfg, stage: int, measured: dict, mask_prob: float) -> float:
    """Cells/s one H100 at 40% MFU trains at the measured mean lengths."""
    from langcell.pretrain.flops import StepShapes, step_flops
    cell = model_cfg.cell
    length = round(measured["mean_length"])
    shapes = StepShapes(cell_lengths=[length], cell_views=2, masked_tokens=round(mask_prob * length))
    flops = step_flops(cell, None, model_cfg.proj_dim, shapes)
    if stage == 2:
        lt = round(measured["mean_text_length"])
        with_text = StepShapes(cell_lengths=[length], cell_views=2, masked_tokens=round(mask_prob * length),
                               text_lengths=[lt], match_pairs=[(lt, length)] * 3, match_cells=[length])
        flops = (measured["text_share"] * step_flops(cell, BERT_BASE_TEXT, model_cfg.proj_dim, with_text)
                 + (1 - measured["text_share"]) * flops)
    return MFU * H100_BF16_FLOPS / flops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_loader", description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=40000, help="cells in the synthetic library")
    parser.add_argument("--batches", type=int, default=150, help="batches timed per case")
    parser.add_argument("--warmup", type=int, default=10, help="batches left out first")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    from langcell.pretrain.config import load_model_config, load_pretrain_config
    from langcell.pretrain.data import library_shards
    from langcell.pretrain.model import resolve_text_model_path
    from langcell.pretrain.synthetic import write_synthetic_library

    cfg, model_cfg = load_pretrain_config("base"), load_model_config("base")
    work = Path(tempfile.mkdtemp(prefix="bench_loader."))
    rows = []
    try:
        lib = write_synthetic_library(work / "lib", n_cells=args.cells, n_shards=16, min_len=256, max_len=2048,
                                      unlabelled_every=3)
        shards = [p for p, _ in library_shards(lib)]
        tokenizer = resolve_text_model_path("all-MiniLM-L6-v2")
        for stage in (1, 2):
            for workers in args.workers:
                measured = _measure(cfg, model_cfg, stage, shards, tokenizer, workers, args.warmup, args.batches)
                demand = _demand(model_cfg, stage, measured, cfg.mask_prob)
                rows.append({"stage": stage, "workers": workers, **measured, "demand": demand})
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = _report(args, cfg, rows)
    print(report)
    if not args.no_record:
        record_section("Pre-training (loader)", report)
    return 0


def _report(args, cfg, rows: list[dict]) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} cores (shared)"
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_loader --cells {args.cells} --batches {args.batches}` "
        f"({datetime.date.today().isoformat()}, {cpu}). One rank's loader with `base`'s data settings (shuffle "
        f"buffer {cfg.data.shuffle_buffer:,}, token budget {cfg.data.tokens_per_batch:,}); synthetic cells of "
        f"256..2,048 tokens, a third without identity text; {args.warmup} batches of warm-up, then {args.batches} "
        "timed. Demand: cells/s one H100 at 40% MFU trains for `base` at the measured lengths (computed from "
        "the FLOP count).",
        "",
        "| stage | workers | loader cells/s | mean cell tokens | H100 @ 40% MFU needs (cells/s) | loader / need |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = r["cells_per_s"] / r["demand"]
        lines.append(f"| {r['stage']} | {r['workers']} | {r['cells_per_s']:,.0f} | {r['mean_length']:,.0f} | "
                     f"{r['demand']:,.0f} | **{ratio:.1f}x** |")
    best = {s: max(r["cells_per_s"] / r["demand"] for r in rows if r["stage"] == s) for s in (1, 2)}
    met = all(v >= GOAL for v in best.values())
    lines += ["", f"Goal: the loader supplies at least {GOAL:.0f}x the demand per rank: "
              f"{'met' if met else 'NOT met'} (best stage 1 {best[1]:.1f}x, stage 2 {best[2]:.1f}x)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
