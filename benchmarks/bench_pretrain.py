"""Pre-training throughput: our stage-1 training step against a plain padded baseline.

Both train the same `tiny` model with the same objectives (masked genes + cell-cell
contrast, two encoder passes, AdamW) on the same synthetic shards (cell lengths uniform in
256..2,048 tokens), on this machine, one after the other:
  ours      `pretrain.engine.pretrain` (DeepSpeed ZeRO-2, streaming loader, length-bucketed
            batches padded to their longest cell; loader time included)
  baseline  a plain loop over the same shards in file order, every batch padded to 2,048
            tokens, no bucketing (what a Geneformer-style collator with max-length padding does)
Reported: cells/s of each (first steps skipped as warm-up), the ratio (goal >= 2x) and the
padding share. On a GPU it also runs the `base` model in bf16 and reports MFU; without a GPU
that part is skipped and says so.

    .venv/bin/python -m benchmarks.bench_pretrain [--steps 8] [--cells 256] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.record import record_section

MAX_LEN = 2048


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps of each side")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the rate")
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from langcell.pretrain.synthetic import write_synthetic_library
    work = Path(tempfile.mkdtemp(prefix="bench_pretrain."))
    try:
        lib = write_synthetic_library(work / "lib", n_cells=args.cells, n_shards=4, min_len=256, max_len=MAX_LEN)
        ours = _ours(args, lib, work)
        base = _baseline(args, lib)
        gpu = _gpu_mfu(args, lib, work) if torch.cuda.is_available() else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"ours": ours, "baseline": base, "ratio": ours["cells_per_s"] / base["cells_per_s"], "gpu": gpu}
    print(json.dumps(result), flush=True)
    report = _report(args, result)
    print(report)
    if not args.no_record:
        record_section("Pre-training", report)
    return 0


def _config(args, work: Path, model: str, steps: int) -> Path:
    import yaml
    cfg = {"model": model, "seed": 0, "micro_batch_size": args.batch, "deepspeed_config": "zero2.json",
           "checkpoint_every": 10**9, "log_every": 1, "peak_flops_per_device": 989.0e12,
           "data": {"shuffle_buffer": 64, "bucket_batches": 8, "num_workers": 1, "max_length": MAX_LEN},
           "stage1": {"max_steps": steps, "lr": 1e-4, "warmup_steps": 1,
                      "losses": {"mlm": 1.0, "cell_cell": 1.0, "cell_text": 0.0, "ctm": 0.0}}}
    path = work / f"{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ours(args, lib: Path, work: Path) -> dict:
    from langcell.pretrain.engine import pretrain
    run = work / "run"
    pretrain(_config(args, work, "tiny", args.steps), lib, run, 1)
    rows = [json.loads(x) for x in (run / "stage1" / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    seconds = sum(args.batch / r["cells_per_s"] for r in rows)
    padding = sum(r["padding_share"] for r in rows) / len(rows)
    return {"cells_per_s": args.batch * len(rows) / seconds, "padding_share": padding, "steps": len(rows)}


def _baseline(args, lib: Path) -> dict:
    """Same model, objectives and optimizer; batches in file order, all padded to 2,048."""
    import io
    import itertools

    import numpy as np
    import torch
    from webdataset.tariterators import tarfile_samples

    from langcell.pretrain.config import load_model_config, load_pretrain_config
    from langcell.pretrain.data import library_shards
    from langcell.pretrain.model import LangCellPretrainModel
    torch.manual_seed(0)
    cfg = load_pretrain_config("tiny")
    model = LangCellPretrainModel(load_model_config("tiny"), with_text=False).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    samples = tarfile_samples([{"url": str(p)} for p, _ in library_shards(lib)])
    cells = (np.load(io.BytesIO(s["input_ids.npy"])) for s in samples)
    times, real = [], 0
    for step in range(max(args.warmup + 3, args.steps // 2)):
        t0 = time.perf_counter()
        batch = list(itertools.islice(cells, args.batch))
        ids = torch.zeros(len(batch), MAX_LEN, dtype=torch.long)
        for i, c in enumerate(batch):
            ids[i, : len(c)] = torch.from_numpy(c.astype(np.int64))
        loss, _ = model({"cell_ids": ids, "cell_mask": (ids != 0).long()}, stage=1, weights=cfg.stage1.losses,
                        mask_prob=0.15, simcse_temperature=0.05)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            real += sum(len(c) for c in batch)
    n = len(times)
    return {"cells_per_s": args.batch * n / sum(times), "padding_share": 1 - real / (n * args.batch * MAX_LEN),
            "steps": n}


def _gpu_mfu(args, lib: Path, work: Path) -> dict:
    """GPU only: the `base` model (Geneformer-12L + BERT-base text) in bf16, stage 1; MFU as logged."""
    from langcell.pretrain.engine import pretrain
    run = work / "run_gpu"
    pretrain(_config(args, work, "base", args.steps), lib, run, 1)
    rows = [json.loads(x) for x in (run / "stage1" / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    import torch
    return {"device": torch.cuda.get_device_name(0),
            "cells_per_s": sum(r["cells_per_s"] for r in rows) / len(rows),
            "mfu": sum(r["mfu"] for r in rows) / len(rows)}


def _report(args, r: dict) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} cores (shared)"
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_pretrain --steps {args.steps} --cells {args.cells}` "
        f"({datetime.date.today().isoformat()}, {cpu}, torch CPU, DeepSpeed ZeRO-2 single process).",
        f"Model `tiny` (cell BERT 2 x 64, vocab 25,427), stage 1 (masked genes + cell-cell contrast), "
        f"micro-batch {args.batch}, synthetic cells of 256..2,048 tokens (uniform).",
        "",
        "| training step | cells/s | padding share |",
        "| --- | ---: | ---: |",
        f"| ours (streamed, length-bucketed, dynamic padding) | {r['ours']['cells_per_s']:.2f} | "
        f"{r['ours']['padding_share']:.1%} |",
        f"| baseline (same model, every batch padded to 2,048, no bucketing) | {r['baseline']['cells_per_s']:.2f} | "
        f"{r['baseline']['padding_share']:.1%} |",
        "",
        f"Ratio ours / baseline: **{r['ratio']:.2f}x** (goal >= 2x).",
    ]
    if r["gpu"]:
        lines.append(f"GPU ({r['gpu']['device']}), `base` model, bf16: {r['gpu']['cells_per_s']:.0f} cells/s, "
                     f"MFU {r['gpu']['mfu']:.1%}.")
    else:
        lines.append("GPU MFU: skipped (no GPU on this machine); rerun this command on a GPU host to fill it in.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
