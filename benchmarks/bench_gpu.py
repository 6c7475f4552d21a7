"""`make bench-gpu`: the `base` recipe on every GPU of this host, per ZeRO stage, on synthetic cells.

For ZeRO stages 1, 2 and 3 it runs `langcell pretrain` under torchrun on all local GPUs, stage 1
then stage 2 of `configs/pretrain/base.yaml` (model, token budget, bf16, loader workers as
shipped) for `--steps` steps each, on a synthetic library of cells of 256..2,048 tokens. From
each run's metrics (steps after the first `--warmup` left out): cells/s, tokens/s and MFU over
all GPUs, peak memory of rank 0's GPU; beside them one rank's loader cells/s (`bench_loader`'s
measure) at the same settings. Results go to BENCHMARKS.md "GPU (make bench-gpu)".

Without a GPU it says so and records nothing.

    .venv/bin/python -m benchmarks.bench_gpu [--steps 300] [--warmup 50] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.record import record_section

REPO = Path(__file__).resolve().parents[1]


def _config(work: Path, zero: int, steps: int, model: str, cpu_smoke: bool) -> Path:
    import yaml

    from langcell.pretrain.config import PRETRAIN_CONFIG_DIR
    cfg = yaml.safe_load((PRETRAIN_CONFIG_DIR / "base.yaml").read_text())
    cfg.update(model=model, deepspeed_config=f"zero{zero}.json", checkpoint_every=10**9, log_every=10)
    for stage in ("stage1", "stage2"):
        cfg[stage].update(max_steps=steps, warmup_steps=min(cfg[stage]["warmup_steps"], steps // 5))
    if cpu_smoke:  # a check of this script on a machine without a GPU: small and quick
        cfg.update(log_every=1)
        cfg["data"].update(shuffle_buffer=64, num_workers=0, tokens_per_batch=4096)
    path = work / f"zero{zero}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, lib: Path, out: Path, gpus: int, warmup: int) -> dict:
    results = {}
    for stage in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               "-m", "langcell.cli", "pretrain", "--config", str(config), "--data", str(lib), "--out", str(out),
               "--stage", str(stage)]
        subprocess.run(cmd, cwd=REPO, check=True)
        rows = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["step"] > warmup] or rows[-1:]
        mean = lambda k: (sum(r[k] for r in rows) / len(rows)) if rows[0].get(k) is not None else None  # noqa: E731
        results[stage] = {"cells_per_s": mean("cells_per_s"), "tokens_per_s": mean("tokens_per_s"),
                          "mfu": mean("mfu"), "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each stage and ZeRO stage")
    parser.add_argument("--warmup", type=int, default=50, help="first steps left out of the means")
    parser.add_argument("--cells", type=int, default=None, help="synthetic cells (default: enough for the steps)")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    import torch
    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu_smoke:
        print("bench_gpu: no GPU on this machine; nothing measured, BENCHMARKS.md left as it is")
        return 0
    from benchmarks.bench_loader import _measure
    from langcell.pretrain.config import load_model_config, load_pretrain_config
    from langcell.pretrain.data import library_shards
    from langcell.pretrain.model import resolve_text_model_path
    from langcell.pretrain.synthetic import write_synthetic_library

    model = "tiny" if args.cpu_smoke else "base"
    procs = max(gpus, 1)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu."))
    try:
        # Enough cells that no rank reads a cell twice in a stage (about 28 cells a step at 32k tokens).
        cells = args.cells or max(2000, 40 * args.steps * procs)
        lib = write_synthetic_library(work / "lib", n_cells=cells, n_shards=max(16, 2 * procs), min_len=256,
                                      max_len=2048, unlabelled_every=3)
        runs = {}
        for zero in (1, 2, 3):
            runs[zero] = _run(_config(work, zero, args.steps, model, args.cpu_smoke), lib, work / f"run{zero}",
                              procs, args.warmup)
            print(json.dumps({f"zero{zero}": runs[zero]}), flush=True)
        cfg, model_cfg = load_pretrain_config("base"), load_model_config("base")
        shards = [p for p, _ in library_shards(lib)]
        loader = _measure(cfg, model_cfg, 1, shards, resolve_text_model_path("all-MiniLM-L6-v2"),
                          cfg.data.num_workers, warmup=10, batches=100)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if gpus else "CPU (smoke check of this script)"
    report = _report(args, device, procs, runs, loader)
    print(report)
    if not args.no_record and not args.cpu_smoke:
        record_section("GPU (make bench-gpu)", report)
    return 0


def _report(args, device: str, procs: int, runs: dict, loader: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"Command: `make bench-gpu` (`python -m benchmarks.bench_gpu --steps {args.steps} --warmup {args.warmup}`, "
        f"{datetime.date.today().isoformat()}), {procs} x {device}. `configs/pretrain/base.yaml` as shipped "
        f"(bf16, token budget, loader workers), synthetic cells of 256..2,048 tokens; means over steps "
        f"{args.warmup + 1}..{args.steps}.",
        "",
        "| ZeRO | stage | cells/s (all GPUs) | tokens/s | MFU | peak memory, rank 0 (GiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for zero, stages in runs.items():
        for stage, r in stages.items():
            lines.append(f"| {zero} | {stage} | {fmt(r['cells_per_s'], ',.0f')} | {fmt(r['tokens_per_s'], ',.0f')} | "
                         f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_memory_gb'], '.1f')} |")
    lines += ["", f"One rank's loader (stage 1, {loader['mean_length']:,.0f} tokens a cell on average): "
              f"{loader['cells_per_s']:,.0f} cells/s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
