"""Batch balance across ranks: per-rank batching against token-budget batching, on 8 simulated ranks.

On several ranks a step lasts as long as its slowest rank. One synthetic library
(`pretrain.synthetic.write_synthetic_library`, cell lengths uniform in 200..2,048 tokens) is
streamed by 8 `pretrain.data.CellStream`s (ranks 0..7 of 8, one after the other in this process,
no training), each for `--steps` batches, with configs/pretrain/base.yaml's batching settings
(max_length 2,048, 4 open shards, windows of 32 batches) and widths padded to multiples of 8 as
on GPUs:
- `per-rank`: `data.tokens_per_batch` null, 16 cells a batch from each rank's own length-sorted
  windows, in an order shuffled per rank (the batching before token budgets);
- `budget`: `data.tokens_per_batch` 32,768 (16 cells at 2,048 tokens, more when shorter), a
  target length drawn alike on every rank, cells picked from the rank's shuffle buffer; once per
  `--buffers` size.
Per step, over the 8 ranks: max/mean of the real tokens (mean over steps, and 95th percentile)
and of the padded tokens; then the padding share, cells and real tokens per rank and step, and
the share of the work that is real tokens when every step lasts as long as its rank with the
most padded tokens (all ranks' real tokens / (8 x that rank's padded tokens)). Loader rate: cells
batched per second of this process, stream setup (the budget's length sample), tar reading and
collation included (a shared machine: indicative only).

    .venv/bin/python -m benchmarks.bench_batch_balance [--steps 400] [--buffers 1000 4000] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SECTION = "Pre-training (batch balance across ranks)"
WORLD = 8
MAX_LENGTH = 2048
MICRO_BATCH = 16
TOKENS_PER_BATCH = 32768
BUCKET_BATCHES = 32
GOAL = 1.1


def _steps(lib: Path, steps: int, buffer: int, tokens_per_batch: int | None) -> dict:
    """Real tokens, padded tokens and cells of every rank's first `steps` batches ([steps, WORLD])."""
    from langcell.pretrain.data import CellStream, library_shards

    shards = [p for p, _ in library_shards(lib)]
    real, padded, cells = (np.zeros((steps, WORLD), dtype=np.int64) for _ in range(3))
    started = time.perf_counter()
    for rank in range(WORLD):
        stream = CellStream(shards, rank=rank, world=WORLD, seed=0, batch_size=MICRO_BATCH, shuffle_buffer=buffer,
                            bucket_batches=BUCKET_BATCHES, max_length=MAX_LENGTH, with_text=False, pad_multiple=8,
                            open_shards=4, tokens_per_batch=tokens_per_batch)
        for step, batch in enumerate(itertools.islice(iter(stream), steps)):
            real[step, rank], padded[step, rank] = int(batch["n_tokens"]), int(batch["n_padded"])
            cells[step, rank] = batch["cell_ids"].shape[0]
    seconds = time.perf_counter() - started
    if tokens_per_batch is not None and not (cells == cells[:, :1]).all():
        raise RuntimeError("budgeted ranks batched different numbers of cells at a step")
    ratio = real.max(1) / real.mean(1)
    return {"buffer": buffer, "tokens_per_batch": tokens_per_batch,
            "real_max_over_mean": float(ratio.mean()), "real_max_over_mean_p95": float(np.percentile(ratio, 95)),
            "padded_max_over_mean": float((padded.max(1) / padded.mean(1)).mean()),
            "padding_share": float(1 - real.sum() / padded.sum()),
            "cells_per_step": float(cells.mean()), "real_tokens_per_step": float(real.mean()),
            "real_share_of_slowest": float(real.sum() / (WORLD * padded.max(1).sum())),
            "cells_per_s": float(cells.sum() / seconds)}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.record import record_section
    from langcell.pretrain.synthetic import write_synthetic_library

    parser = argparse.ArgumentParser(prog="bench_batch_balance", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="batches of each rank")
    parser.add_argument("--buffers", type=int, nargs="+", default=[1000, 4000],
                        help="shuffle buffer sizes (cells per rank) of the budgeted runs; the per-rank run uses the "
                             "largest")
    parser.add_argument("--cells", type=int, default=64_000, help="cells of the library (8 shards a rank)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_batch_balance."))
    try:
        started = time.perf_counter()
        lib = write_synthetic_library(work / "lib", n_cells=args.cells, n_shards=8 * WORLD, vocab_size=4096,
                                      min_len=200, max_len=MAX_LENGTH)
        made = time.perf_counter() - started
        print(f"wrote a {args.cells:,}-cell library in {made:.0f}s", flush=True)
        runs = [_steps(lib, args.steps, max(args.buffers), None)]
        runs += [_steps(lib, args.steps, buffer, TOKENS_PER_BATCH) for buffer in sorted(args.buffers)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for run in runs:
        print(json.dumps(run), flush=True)
    report = _report(args, runs, load, made)
    print(report)
    if not args.no_record:
        record_section(SECTION, report)
    return 0


def _report(args, runs: list[dict], load: float, made: float) -> str:
    budget = [r for r in runs if r["tokens_per_batch"] is not None]
    worst = max(r["real_max_over_mean"] for r in budget)
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_batch_balance --steps {args.steps} --buffers "
             f"{' '.join(map(str, args.buffers))} --cells {args.cells}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), no GPU, Python "
             f"{platform.python_version()}; date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load "
             f"average before the run {load:.1f}.",
             f"Input: a synthetic library of {args.cells:,} cells ({8 * WORLD} shards, lengths uniform in "
             f"200..{MAX_LENGTH:,} tokens; written in {made:.0f}s), streamed by {WORLD} ranks of {WORLD} in one "
             "process, "
             f"{args.steps} batches each: base.yaml's batching (max_length {MAX_LENGTH:,}, windows of {BUCKET_BATCHES} "
             f"batches, 4 open shards), widths padded to multiples of 8. Per-rank: {MICRO_BATCH} cells a batch; "
             f"budget: data.tokens_per_batch {TOKENS_PER_BATCH:,}. base.yaml's own buffer is 20,000 cells.", "",
             "| batching | shuffle buffer (cells) | max/mean real tokens per step (mean) | (95th pct) | max/mean "
             "padded tokens | padding share | cells per rank and step | real tokens per rank and step | real share "
             "of the slowest rank's work | loader cells/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        name = "per-rank, 16 cells" if r["tokens_per_batch"] is None else f"budget, {r['tokens_per_batch']:,} tokens"
        lines.append(f"| {name} | {r['buffer']:,} | {r['real_max_over_mean']:.3f} | "
                     f"{r['real_max_over_mean_p95']:.3f} | "
                     f"{r['padded_max_over_mean']:.3f} | {r['padding_share']:.1%} | {r['cells_per_step']:.1f} | "
                     f"{r['real_tokens_per_step']:,.0f} | {r['real_share_of_slowest']:.1%} | "
                     f"{r['cells_per_s']:,.0f} |")
    lines += ["", f"Goal: max/mean real tokens per step <= {GOAL} with token budgets: "
              f"{'met' if worst <= GOAL else 'NOT met'} (worst buffer: {worst:.3f}; per-rank batching: "
              f"{runs[0]['real_max_over_mean']:.3f})."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
