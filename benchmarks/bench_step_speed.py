"""Training steps on CPU against the code of an earlier commit, side by side in one run.

Both sides train the same models on the same synthetic library, one after the other, each as
`langcell pretrain` in its own process (what a user runs):
  ours      this checkout
  baseline  a git worktree of `--baseline` run from its own tree (default: the code when the
            throughput issue was filed, before one-pass SimCSE views, device-side losses and the
            shared matching keys and values)
Cases: stage 1 (masked genes + cell-cell contrast) then stage 2 (all four objectives) of the
`minilm` model and of a reduced `base` (base's cell and text widths, 2 layers each, random text
weights: PubMedBERT cannot be downloaded here). Reported per case: cells/s over the steps after
warm-up as each side logs them (whole steps, loader included), the ratio (goal >= 2x), and both
sides' mean losses over those steps: stage 2's objectives were corrected in between (positives by
meaning), so only stage 1's losses are expected to agree.

    .venv/bin/python -m benchmarks.bench_step_speed [--steps 10] [--warmup 3] [--baseline REV] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.record import record_section

REPO = Path(__file__).resolve().parents[1]
# The code when "Training throughput" was filed: the commit before the first of its changes.
BASELINE = "1978d83^"
MAX_LEN = 2048
BATCH = 8
CELL_BASE = {"vocab_size": 25427, "hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
             "intermediate_size": 1024, "max_position_embeddings": 2048, "hidden_act": "relu",
             "hidden_dropout_prob": 0.02, "attention_probs_dropout_prob": 0.02, "pooling": "mean"}
CELL_MINILM = {"vocab_size": 25427, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 256, "max_position_embeddings": 2048, "pooling": "mean"}
TEXT_BASE = {"random_init": True, "hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_length": 128}


def _model_config(name: str, baseline: bool) -> dict:
    # The text model's field was renamed (name_or_path -> init_from) and text pooling added since.
    key = "name_or_path" if baseline else "init_from"
    if name == "minilm":
        text = {key: "all-MiniLM-L6-v2", "max_length": 128, **({} if baseline else {"pooling": "mean"})}
        return {"cell": CELL_MINILM, "text": text, "proj_dim": 256}
    text = {key: "all-MiniLM-L6-v2", **TEXT_BASE, **({} if baseline else {"pooling": "cls"})}
    return {"cell": CELL_BASE, "text": text, "proj_dim": 256, "init_temperature": 0.07}


def _pretrain_config(model_path: Path, steps: int) -> dict:
    stage = {"max_steps": steps, "lr": 1e-4, "warmup_steps": 1, "min_lr_ratio": 0.1, "weight_decay": 0.01}
    return {"model": str(model_path), "seed": 0, "micro_batch_size": BATCH, "grad_accum_steps": 1,
            "deepspeed_config": "zero2.json", "activation_checkpointing": False, "checkpoint_every": 10**9,
            "log_every": 1, "peak_flops_per_device": 0.0,
            "data": {"shuffle_buffer": 64, "bucket_batches": 8, "num_workers": 0, "max_length": MAX_LEN},
            "stage1": {**stage, "losses": {"mlm": 1.0, "cell_cell": 1.0, "cell_text": 0.0, "ctm": 0.0}},
            "stage2": {**stage, "losses": {"mlm": 1.0, "cell_cell": 1.0, "cell_text": 1.0, "ctm": 1.0}}}


def _side(tree: Path | None, lib: Path, work: Path, model: str, steps: int, warmup: int) -> dict:
    """One model's two stages with one side's code; per stage: cells/s after warm-up, mean losses."""
    import yaml
    name = "baseline" if tree else "ours"
    folder = work / f"{name}-{model}"
    folder.mkdir()
    model_path = folder / "model.yaml"
    model_path.write_text(yaml.safe_dump(_model_config(model, baseline=tree is not None)))
    config = folder / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_pretrain_config(model_path, steps)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if tree:
        env["PYTHONPATH"] = str(tree)  # the old layout imports its stages from the tree's top level
    out = {}
    for stage in (1, 2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "langcell.cli", "pretrain", "--config", str(config), "--data", str(lib),
                        "--out", str(folder / "run"), "--stage", str(stage)],
                       cwd=tree or REPO, env=env, check=True, capture_output=True, text=True)
        rows = [json.loads(x) for x in (folder / "run" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        rows = rows[warmup:]
        seconds = sum(BATCH / r["cells_per_s"] for r in rows)
        tokens = sum(r["tokens_per_s"] * BATCH / r["cells_per_s"] for r in rows)
        keys = [k for k in ("loss", "mlm", "cell_cell", "cell_text", "ctm") if k in rows[0]]
        out[stage] = {"cells_per_s": BATCH * len(rows) / seconds, "tokens_per_s": tokens / seconds,
                      "process_s": time.perf_counter() - t0,
                      "losses": {k: sum(r[k] for r in rows) / len(rows) for k in keys}, "steps": len(rows)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_step_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps of each stage and side")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the rate")
    parser.add_argument("--cells", type=int, default=512)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code to compare against")
    parser.add_argument("--models", nargs="+", default=["minilm", "base-reduced"])
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    from langcell.pretrain.synthetic import write_synthetic_library
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="bench_step_speed."))
    tree = work / "baseline-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True, capture_output=True)
    try:
        lib = write_synthetic_library(work / "lib", n_cells=args.cells, n_shards=4, min_len=256, max_len=MAX_LEN)
        results = {}
        for model in args.models:
            results[model] = {"baseline": _side(tree, lib, work, model, args.steps, args.warmup),
                              "ours": _side(None, lib, work, model, args.steps, args.warmup)}
            print(json.dumps({model: results[model]}), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    report = _report(args, rev, results)
    print(report)
    if not args.no_record:
        record_section("Pre-training (step speed against earlier code)", report)
    return 0


def _report(args, rev: str, results: dict) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} cores (shared)"
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_step_speed --steps {args.steps} --warmup {args.warmup} "
        f"--cells {args.cells}` ({datetime.date.today().isoformat()}, {cpu}, torch CPU, DeepSpeed ZeRO-2 single "
        f"process). Baseline: commit {rev}, run from a git worktree. Micro-batch {BATCH}, synthetic cells of "
        f"256..{MAX_LEN:,} tokens; cells/s over steps {args.warmup + 1}..{args.steps} as each side logs them.",
        "",
        "| model | stage | baseline cells/s | ours cells/s | ratio | ratio of real tokens/s | baseline losses | "
        "our losses |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for model, sides in results.items():
        for stage in (1, 2):
            b, o = sides["baseline"][stage], sides["ours"][stage]
            fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d["losses"].items())  # noqa: E731
            lines.append(f"| {model} | {stage} | {b['cells_per_s']:.2f} | {o['cells_per_s']:.2f} | "
                         f"**{o['cells_per_s'] / b['cells_per_s']:.2f}x** | {o['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
                         f"{fmt(b)} | {fmt(o)} |")
    lines += ["", "The two sides' loaders batch the cells differently (the new one reads several shards at once), so "
              "the same steps can hold cells of other lengths; tokens/s corrects for that.",
              "", "Goal: ratio >= 2x in every row. Stage-2 losses differ by design (positives by meaning since the "
              "baseline); stage 1's should agree within the noise of different masks."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
