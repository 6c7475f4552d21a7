"""glibc's mmap threshold and CPU pre-training: speed and peak memory of whole `langcell pretrain`
processes of the demo, per threshold.

On CPU the trainer fixes the threshold at 4 MiB (pretrain/engine.py); glibc's own variable
`MALLOC_MMAP_THRESHOLD_`, which the trainer leaves alone, sets the others here. 32 MiB stands for
glibc's default, whose dynamic threshold climbs to that value once large blocks are freed. Each
case runs stage 1 (from scratch) and stage 2 (from a finished stage 1) of the demo config on a
demo's library, the thresholds alternating, `--repeats` times. Reported: cells/s as the trainer
logs it (mean over the run), the process's peak resident memory and its system CPU time (page
faults of fresh mappings land there).

    .venv/bin/python -m benchmarks.bench_malloc [--demo-dir bench_out/demo/seed1] [--no-record]

The demo folder defaults to the one `benchmarks.bench_demo` leaves (it runs first in `make bench`);
one without a finished stage 1 is completed first with `langcell demo --seed 1`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.record import record_section

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = {"1 MiB": 1 << 20, "4 MiB (default)": None, "32 MiB (glibc's ceiling)": 32 << 20}


def run_stage(demo: Path, stage: int, steps: int, threshold: int | None) -> dict:
    """One `langcell pretrain` process: mean logged cells/s, peak RSS (GB), system CPU seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        if stage == 2:
            shutil.copytree(demo / "run" / "stage1", run / "stage1")
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        env["DS_ACCELERATOR"] = "cpu"
        if threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "langcell.cli", "pretrain", "--config", "demo", "--data",
                        str(demo / "sclibrary"), "--out", str(run), "--stage", str(stage), "--seed", "1",
                        "--max-steps", str(steps)], env=env, check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [json.loads(line) for line in (run / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
    return {"cells_per_s": sum(r["cells_per_s"] for r in rows) / len(rows),
            "peak_gb": max(r["peak_memory_gb"] for r in rows),
            "sys_s": after.ru_stime - before.ru_stime}


def _each(runs: list[dict], key: str, fmt: str) -> str:
    """One table cell: every repeat's value, in run order."""
    return " / ".join(format(r[key], fmt) for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_malloc", description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=REPO / "bench_out" / "demo" / "seed1",
                        help="a `langcell demo --seed 1` output (its sclibrary/ and run/stage1/)")
    parser.add_argument("--stage1-steps", type=int, default=30)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if not (args.demo_dir / "run" / "stage1" / "done.json").is_file():
        subprocess.run([sys.executable, "-m", "langcell.cli", "demo", "--out", str(args.demo_dir), "--seed", "1"],
                       cwd=REPO, check=True)
    results = {(name, stage): [] for name in THRESHOLDS for stage in (1, 2)}
    for _ in range(args.repeats):
        for stage, steps in ((1, args.stage1_steps), (2, args.stage2_steps)):
            for name, threshold in THRESHOLDS.items():
                results[(name, stage)].append(run_stage(args.demo_dir, stage, steps, threshold))
                print(name, stage, results[(name, stage)][-1], flush=True)
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_malloc --demo-dir {args.demo_dir} --stage1-steps "
        f"{args.stage1_steps} --stage2-steps {args.stage2_steps} --repeats {args.repeats}` "
        f"({datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores). "
        "Whole `langcell pretrain` processes of the demo config (seed 1) on that demo's library; stage 2 starts "
        "from its stage 1. Each cell: the runs in order, thresholds alternating.",
        "",
        "| mmap threshold | stage | cells/s | peak RSS GB | system CPU s |",
        "|---|---|---|---|---|",
    ]
    for (name, stage), runs in results.items():
        lines.append(f"| {name} | {stage} | {_each(runs, 'cells_per_s', '.1f')} | {_each(runs, 'peak_gb', '.2f')} | "
                     f"{_each(runs, 'sys_s', '.1f')} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record_section("Pre-training (glibc mmap threshold)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
