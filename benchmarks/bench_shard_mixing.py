"""Shard mixing: how many datasets a training batch sees, and what the shuffled shard order costs.

One synthetic Census store (`ingest.synth_census`, 50 datasets by default) stores its cells dataset
by dataset, as the real Census does; it is ingested once. The same ingest is then built
side by side in one run, alternating, each build a fresh process (wall time and peak RSS its own):
- `old`: `build_sclibrary/`, `configs/`, `langcell/` and `ingest/` of `--baseline` (the last commit
  that wrote shards in ingest order), extracted with `git archive` into a temporary folder that
  comes first on sys.path;
- `new`: this checkout (seeded random order over each split, build_sclibrary/shuffle.py); the time
  of its cut (reading the buckets back and writing the shards) is also taken on its own.

Mixing, on the train split: mean number of distinct datasets per batch of 64 cells
- `stored`: 64 consecutive cells, reading the shards in the manifest's order;
- `trainer`: the batches `pretrain.data.CellStream` makes (rank 0 of 1: shards in its seeded
  order, its shuffle buffer, length bucketing), one epoch;
- `uniform`: 64 consecutive cells of a uniform random permutation of the same cells (mean of 5).

Scale: the GPU recipe (configs/pretrain/base.yaml) reads 10,000-cell shards with a 20,000-cell
buffer and Census datasets hold several shards' worth of cells; here shards are `--shard-size`
cells, the buffer 2 shards and `--bucket-cells` 10 shards, so the buffer-to-shard and
dataset-to-shard ratios stay Census-like on a small library.

    .venv/bin/python -m benchmarks.bench_shard_mixing [--cells 40000] [--datasets 50] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Build scLibrary (shard mixing)"
BASELINE = "65111c089bde25fa0ccc8e735467f246534b8041"
BATCH = 64
# The baseline's build code with what it imports as it was then: its top-level `ingest` and its
# `langcell` (errors/files/config before they moved to langcell.core).
BASELINE_FOLDERS = ("build_sclibrary", "configs", "langcell", "ingest")


def _child_build(package: str, ingest: str, out: str, shard_size: int, bucket_cells: int) -> dict:
    """One timed build, in a fresh process whose sys.path starts with the old or the new build code."""
    build_mod = importlib.import_module(f"{package}.build")
    load_build_config = importlib.import_module(f"{package}.config").load_build_config

    overrides = {"shard_size": shard_size, "workers": 1}
    timed = {}
    if hasattr(build_mod, "_cut_shards"):  # the new build: time its cut too
        overrides["bucket_cells"] = bucket_cells
        cut = build_mod._cut_shards

        def timed_cut(*args, **kwargs):
            started = time.perf_counter()
            try:
                return cut(*args, **kwargs)
            finally:
                timed["seconds"] = time.perf_counter() - started

        build_mod._cut_shards = timed_cut
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    manifest = build_mod.build_library(ingest, out, load_build_config(None, overrides), progress=False)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    return {"code": str(Path(build_mod.__file__).resolve().parents[1]), "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "cut_seconds": round(timed["seconds"], 2) if timed else None,
            "n_cells": manifest["n_cells"], "train_shards": len(manifest["splits"]["train"]["shards"]),
            "peak_rss_mb": round(_peak_rss_mb())}


def _child_warm(package: str) -> dict:
    """Tokenize a few cells with `tree`'s tokenizer, so that numba compiles (and caches) its
    kernels outside the timed builds."""
    import scipy.sparse as sp

    tokenizer_mod = importlib.import_module(f"{package}.tokenizer")
    geneformer_v1_vocab = importlib.import_module(f"{package}.vocab").geneformer_v1_vocab

    tokens, medians = geneformer_v1_vocab()
    genes = [g for g in tokens if g in medians][:50]
    X = sp.random(4, len(genes), density=0.5, random_state=0, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    tokenizer_mod.RankValueTokenizer(tokens, medians).tokenize_csr(X, genes, None)
    return {"code": str(Path(tokenizer_mod.__file__).resolve().parents[1])}


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): on a machine shared with other
    jobs it moves far less with their load than wall time does."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _child(tree: Path, call: str) -> dict:
    """`call` (a function of this module, given the build package's import name as its first
    argument) in a fresh process whose build code is `tree`'s."""
    # The baseline predates the langcell namespace: its build code is the top-level package.
    package = "langcell.build_sclibrary" if tree == ROOT else "build_sclibrary"
    code = (f"import sys, json; sys.path[:0] = [{str(tree)!r}, {str(ROOT)!r}]; "
            f"import benchmarks.bench_shard_mixing as bench; print(json.dumps(bench.{call.format(package=repr(package))}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{call} with {tree} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["code"] != str(tree.resolve()):
        raise RuntimeError(f"{call} ran {measured['code']}'s code, not {tree}'s")
    return measured


def _build(tree: Path, ingest: Path, out: Path, args) -> dict:
    return _child(tree, f"_child_build({{package}}, {str(ingest)!r}, {str(out)!r}, {args.shard_size}, "
                        f"{args.bucket_cells})")


def _train_cells(lib: Path) -> tuple[list[int], dict[int, str]]:
    """Train keys in stored order (shards as the manifest lists them) and key -> dataset_id."""
    manifest = json.loads((lib / "manifest.json").read_text())
    keys, dataset = [], {}
    for entry in manifest["splits"]["train"]["shards"]:
        with tarfile.open(lib / entry["name"]) as tar:
            for member in tar:
                if member.name.endswith(".meta.json"):
                    meta = json.loads(tar.extractfile(member).read())
                    keys.append(int(member.name.split(".")[0]))
                    dataset[keys[-1]] = meta["dataset_id"]
    return keys, dataset


def _mean_distinct(datasets: list[str]) -> float:
    return float(np.mean([len(set(datasets[i:i + BATCH])) for i in range(0, len(datasets) - BATCH + 1, BATCH)]))


def _trainer_distinct(lib: Path, dataset: dict[int, str], args) -> float:
    from langcell.pretrain.data import CellStream, library_shards

    stream = CellStream([p for p, _ in library_shards(lib)], rank=0, world=1, seed=0, batch_size=BATCH,
                        shuffle_buffer=2 * args.shard_size, bucket_batches=32, max_length=2048, with_text=False)
    counts = []
    for batch in stream:
        counts.append(len({dataset[int(k)] for k in batch["soma_joinid"]}))
        if len(counts) == len(dataset) // BATCH:
            return float(np.mean(counts))
    raise RuntimeError(f"{lib}: the stream ended")


def _mixing(lib: Path, args) -> dict:
    keys, dataset = _train_cells(lib)
    rng = np.random.default_rng(0)
    uniform = [_mean_distinct([dataset[k] for k in rng.permutation(sorted(keys))]) for _ in range(5)]
    return {"stored": _mean_distinct([dataset[k] for k in keys]), "trainer": _trainer_distinct(lib, dataset, args),
            "uniform": float(np.mean(uniform)), "cells": len(keys), "datasets": len(set(dataset.values()))}


def _make_ingest(tmp: Path, args) -> float:
    from langcell.ingest.census import ingest_census
    from langcell.ingest.ontology import ingest_ontologies
    from langcell.ingest.synth_census import build_synth_census, load_synth_config

    started = time.perf_counter()
    config = load_synth_config(None, n_datasets=args.datasets)
    build_synth_census(tmp / "store", args.cells, seed=0, config=config, progress=False)
    ingest_census(tmp / "ingest", uri=str(tmp / "store"), obs_filter="is_primary_data == True",
                  cells_per_part=max(1000, args.cells // 8), progress=False)
    ingest_ontologies(tmp / "ingest", source="guide")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: the baseline's child processes import this module with the baseline's
    # `langcell` first on sys.path, which has no langcell.core for benchmarks.record.
    from benchmarks.record import record_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=40_000)
    parser.add_argument("--datasets", type=int, default=50)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--bucket-cells", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3, help="builds of each kind, alternating")
    parser.add_argument("--baseline", default=BASELINE, help="commit whose build writes shards in ingest order")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_shard_mixing_") as tmp_name:
        tmp = Path(tmp_name)
        made = _make_ingest(tmp, args)
        print(f"made a {args.cells:,}-cell, {args.datasets}-dataset ingest in {made:.0f}s", flush=True)
        old_tree = tmp / "old"
        old_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline, *BASELINE_FOLDERS], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        for tree in (old_tree, ROOT):
            _child(tree, "_child_warm({package})")
        runs = {"old": [], "new": []}
        for repeat in range(args.repeats):
            for kind, tree in (("old", old_tree), ("new", ROOT)):
                out = tmp / f"lib-{kind}-{repeat}"
                runs[kind].append(_build(tree, tmp / "ingest", out, args))
                print(kind, json.dumps(runs[kind][-1]), flush=True)
        mixing = {kind: _mixing(tmp / f"lib-{kind}-0", args) for kind in runs}
    if mixing["old"]["uniform"] != mixing["new"]["uniform"]:
        raise RuntimeError("the old and new builds' train splits hold different cells")
    uniform = mixing["new"]["uniform"]
    print(json.dumps(mixing), flush=True)
    report = _report(args, runs, mixing, uniform, load, made)
    print(report)
    if not args.no_record:
        record_section(SECTION, report)
    return 0


def _report(args, runs: dict, mixing: dict, uniform: float, load: float, made: float) -> str:
    best = {kind: min(r["seconds"] for r in rs) for kind, rs in runs.items()}
    best_cpu = {kind: min(r["cpu_seconds"] for r in rs) for kind, rs in runs.items()}
    ratio, cpu_ratio = best["new"] / best["old"], best_cpu["new"] / best_cpu["old"]
    new, old = mixing["new"], mixing["old"]
    cut = [r["cut_seconds"] for r in runs["new"]]
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_shard_mixing --cells {args.cells} --datasets "
             f"{args.datasets} --shard-size {args.shard_size} --bucket-cells {args.bucket_cells} --repeats "
             f"{args.repeats}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), no GPU, Python "
             f"{platform.python_version()}; date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load "
             f"average before the run {load:.1f}.",
             f"Input: a synth-census store of {args.cells:,} cells stored dataset by dataset ({args.datasets} "
             f"datasets, Dirichlet sizes; made and ingested in {made:.0f}s, outside the timing), built with "
             f"`--split-by dataset`, 1 worker, shards of {args.shard_size} cells, buckets of {args.bucket_cells}; "
             f"train: {new['cells']:,} cells of {new['datasets']} datasets. Old = `build_sclibrary/` of "
             f"{args.baseline[:7]} (ingest order), new = this checkout, alternating, each a fresh process.", "",
             f"Distinct datasets per batch of {BATCH} train cells:", "",
             "| order | stored (consecutive in shard order) | trainer (CellStream batches, buffer 2 shards) |",
             "| --- | ---: | ---: |",
             f"| old: ingest order | {old['stored']:.2f} | {old['trainer']:.2f} |",
             f"| new: seeded random over the split | {new['stored']:.2f} | {new['trainer']:.2f} |",
             f"| uniform shuffle of the split | {uniform:.2f} | |", "",
             "Build time of each run (wall and CPU seconds, user + system) and peak RSS:", "",
             "| build | wall (s) | best wall (s) | CPU (s) | best CPU (s) | peak RSS (MB) |",
             "| --- | --- | ---: | --- | ---: | ---: |"]
    for kind in ("old", "new"):
        wall = ", ".join(f"{r['seconds']:.1f}" for r in runs[kind])
        cpu = ", ".join(f"{r['cpu_seconds']:.1f}" for r in runs[kind])
        lines.append(f"| {kind} | {wall} | {best[kind]:.1f} | {cpu} | {best_cpu[kind]:.1f} | "
                     f"{max(r['peak_rss_mb'] for r in runs[kind]):,} |")
    cut_seconds = ", ".join(f"{c:.1f}" for c in cut)
    lines += ["", f"The new build's cut (buckets read back, shuffled, written as shards): {cut_seconds} s of "
              "its runs. Here the spill files stay in the page cache; on a Census-size library the cut reads "
              "and writes every shard's bytes once more from disk, on the finalizing machine's --workers.", "",
              f"Goals: trainer batches of the new order >= 80% of a uniform shuffle: "
              f"{'met' if new['trainer'] >= 0.8 * uniform else 'NOT met'} ({new['trainer'] / uniform:.0%}; stored "
              f"order {new['stored'] / uniform:.0%}; old order {old['trainer'] / uniform:.0%}); build time new/old "
              f"<= 1.3: {'met' if max(ratio, cpu_ratio) <= 1.3 else 'NOT met'} (best of each: wall {ratio:.2f}x, "
              f"CPU {cpu_ratio:.2f}x; the CPU ratio is the steadier one on a shared machine)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
