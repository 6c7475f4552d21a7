"""The demo's figures for BENCHMARKS.md: `langcell demo` from an empty folder, timed, per seed.

`python -m benchmarks.bench_demo [--out bench_out/demo] [--config default] [--seeds 0 1 2]`
deletes OUT, runs the whole demo (stores, ingest, build, both pre-training stages, export, the
learning curve, eval suite) once per pre-training seed, one after the other, and records each
seed's wall time and numbers, and their mean, in the "## Demo" section.
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
import time
from pathlib import Path

from benchmarks.record import record_section

REPO = Path(__file__).resolve().parents[1]
# The goal of "Pre-training that learns": mean over 3 seeds on the held-out real PBMCs.
GOAL_ACCURACY, GOAL_MACRO_F1 = 0.65, 0.45


def seed_row(out: Path, seconds: float) -> dict:
    summary = json.loads((out / "demo_summary.json").read_text())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    finetune = metrics.get("finetune", {}).get("results", {})
    return {"seed": summary["seed"], "minutes": seconds / 60, "accuracy": summary["zero_shot"]["accuracy"],
            "macro_f1": summary["zero_shot"]["macro_f1"], "sim_accuracy": summary["similarity_only"]["accuracy"],
            "ctm": summary["stage2"].get("ctm", float("nan")), "cell_text": summary["stage2"].get("cell_text"),
            "finetune": {k: v.get("accuracy_mean") for k, v in finetune.items()},
            "peaks": {row["step"]: row["gb"] for row in summary.get("peak_memory_gb", [])}, "summary": summary}


def format_section(rows: list[dict], command: str) -> str:
    first = rows[0]["summary"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("accuracy", "macro_f1", "sim_accuracy", "ctm", "minutes")}
    lines = [
        f"Command: `{command}`, each seed from an empty output folder (installation excluded). Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, no GPU; {datetime.date.today().isoformat()}.",
        "",
        f"Zero-shot on {first['n_test']} held-out real PBMCs (10 types); chance {first['chance']:.3f}, majority "
        f"class {first['majority']:.3f}, logistic regression on the labelled PBMCs pre-training saw "
        f"{first['logreg']['accuracy']:.3f} (macro-F1 {first['logreg']['macro_f1']:.3f}). The matching loss "
        f"of a head that learned nothing is {first['ctm_prior_entropy']:.3f}.",
        "",
        "| seed | whole run (min) | accuracy | macro-F1 | similarity-only accuracy | fused - similarity | "
        "final ctm loss | fine-tune accuracy (LangCell-CE / logreg) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ft = r["finetune"]
        ft_text = f"{ft.get('langcell_ce', float('nan')):.3f} / {ft.get('logreg', float('nan')):.3f}" if ft else "-"
        lines.append(f"| {r['seed']} | {r['minutes']:.1f} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['sim_accuracy']:.3f} | {r['accuracy'] - r['sim_accuracy']:+.3f} | {r['ctm']:.3f} | "
                     f"{ft_text} |")
    lines.append(f"| **mean** | {mean['minutes']:.1f} | **{mean['accuracy']:.3f}** | **{mean['macro_f1']:.3f}** | "
                 f"{mean['sim_accuracy']:.3f} | {mean['accuracy'] - mean['sim_accuracy']:+.3f} | {mean['ctm']:.3f} | |")
    met = mean["accuracy"] >= GOAL_ACCURACY and mean["macro_f1"] >= GOAL_MACRO_F1
    fusion_holds = sum(r["accuracy"] >= r["sim_accuracy"] for r in rows)
    slowest = max(r["minutes"] for r in rows)
    lines += ["", f"Goal (mean of the seeds): accuracy >= {GOAL_ACCURACY}, macro-F1 >= {GOAL_MACRO_F1}: "
              f"{'met' if met else 'NOT met'}; each run within 30 minutes on 2 cores: "
              f"{'met' if slowest <= 30 else 'NOT met'} (slowest {slowest:.1f} min). Each seed's learning curve "
              "is its `learning_curve.png`.",
              "", f"Goal: fusing the matching head (alpha 0.1) does not lower accuracy below similarity alone: "
              f"{'met' if fusion_holds == len(rows) else 'NOT met'} (fused >= similarity on {fusion_holds} of "
              f"{len(rows)} seeds)."]
    measured = [r for r in rows if r["peaks"]]
    if measured:
        steps = list(dict.fromkeys(name for r in measured for name in r["peaks"]))
        lines += ["", "Peak resident memory of each step (GB; the process's high-water mark reset as the step "
                  "starts, pre-training's logged by its own process):", "",
                  "| step | " + " | ".join(f"seed {r['seed']}" for r in measured) + " |",
                  "|---|" + "---|" * len(measured)]
        lines += [f"| {name} | " + " | ".join(f"{r['peaks'][name]:.2f}" if name in r["peaks"] else "-"
                                             for r in measured) + " |" for name in steps]
        worst = max(v for r in measured for v in r["peaks"].values())
        lines += ["", f"Goal: under 4 GB in every step: {'met' if worst < 4 else 'NOT met'} (highest {worst:.2f} GB)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench_out" / "demo"))
    parser.add_argument("--config", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        started = time.time()
        subprocess.run([sys.executable, "-m", "langcell.cli", "demo", "--out", str(folder), "--config", args.config,
                        "--seed", str(seed)], cwd=REPO, check=True)
        rows.append(seed_row(folder, time.time() - started))
    section = format_section(rows, f"langcell demo --out DIR --config {args.config} --seed S")
    print(section)
    if not args.no_record:
        record_section("Demo", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
