"""Ingest speed and memory: `langcell ingest census` against a plain tiledbsoma read of the same cells.

For each size a synthetic Census store (`ingest.synth_census`, cached under --cache) is read twice
in fresh processes: once the plain way (`X["raw"].read().tables()`, nothing kept) and once by
`ingest_census` (single process, writing parquet). Reported: seconds, cells/s, the ratio ingest/plain
(goal <= 1.5) and peak RSS of each process (goal: flat in the number of cells and in the genes per
cell). `--layout census` tiles X as the real Census does (2048 x 2048); `--genes` and
`--genes-detected` make wide cells (e.g. 10,000 genes each, as Smart-seq cells have). Each case is
recorded in its own `###` block of BENCHMARKS.md, Ingest.

    .venv/bin/python -m benchmarks.bench_ingest [--sizes 200000 1000000] [--layout rows|census]
        [--genes 8000] [--genes-detected 1000 5000] [--cache bench_out/ingest]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.record import record_subsection

REPO = Path(__file__).resolve().parents[1]
OBS_FILTER = "is_primary_data == True"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--cache", default=str(REPO / "bench_out" / "ingest"),
                        help="where the synthetic stores are kept between runs")
    parser.add_argument("--layout", choices=("rows", "census"), default="rows", help="X tiling of the stores")
    parser.add_argument("--genes", type=int, default=8000, help="genes of the stores")
    parser.add_argument("--genes-detected", type=int, nargs=2, default=[1000, 5000], metavar=("LOW", "HIGH"),
                        help="range of genes detected per cell")
    parser.add_argument("--chunk-cells", type=int, default=20_000)
    parser.add_argument("--chunk-counts", type=int, default=50_000_000)
    parser.add_argument("--cells-per-part", type=int, default=100_000)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    cache = Path(args.cache)
    rows = []
    for n_cells in args.sizes:
        store = _store(args, cache, n_cells)
        out = cache / f"ingest-{n_cells}"
        shutil.rmtree(out, ignore_errors=True)
        plain = _measure(args, "plain", store)
        ingest = _measure(args, "ingest", store, out)
        if plain["cells"] != ingest["cells"]:
            raise RuntimeError(f"{store}: the plain read saw {plain['cells']} cells, the ingest {ingest['cells']}")
        rows.append({"cells": n_cells, "plain": plain, "ingest": ingest, "stages": _measure(args, "stages", store),
                     "out_bytes": sum(p.stat().st_size for p in out.rglob("*.parquet"))})
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    report = _report(args, rows)
    print(report)
    if not args.no_record:
        record_subsection("Ingest", _case(args), report)
    return 0


def _case(args) -> str:
    low, high = args.genes_detected
    return (f"{args.layout.capitalize()} layout, {args.genes:,} genes, {low:,}-{high:,} detected per cell, "
            f"chunks of at most {args.chunk_cells:,} cells and {args.chunk_counts:,} counts")


def _store(args, cache: Path, n_cells: int) -> Path:
    from langcell.ingest.synth_census import build_synth_census, load_synth_config

    low, high = args.genes_detected
    name = f"synth-{args.layout}-{args.genes}g-{low}-{high}-{n_cells}"
    store, done = cache / name, cache / f"{name}.done"
    if not done.exists():
        # A store without its marker is a build that died: start it over.
        shutil.rmtree(store, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        config = load_synth_config(n_genes=args.genes, genes_detected=[low, high])
        build_synth_census(store, n_cells, seed=0, config=config, layout=args.layout, workers=os.cpu_count() or 1,
                           progress=False)
        done.write_text(f"{time.perf_counter() - started:.1f} s to build\n")
    return store


def _measure(args, mode: str, store: Path, out: Path | None = None) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_ingest", "--child", mode, str(store),
               "--chunk-cells", str(args.chunk_cells), "--chunk-counts", str(args.chunk_counts),
               "--cells-per-part", str(args.cells_per_part)]
    if out is not None:
        command += ["--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench_ingest {mode} on {store} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _child(args) -> int:
    mode, store = args.child
    started = time.perf_counter()
    if mode == "plain":
        import tiledbsoma

        # The whole layer, read sequentially: every synthetic cell is primary, so these are the cells
        # the ingest reads (main() checks the counts agree). An axis query over the same cells held
        # 11 GiB at 200k cells, which would make the baseline a memory test rather than a read.
        nnz = 0
        with tiledbsoma.Experiment.open(f"{store}/census_data/homo_sapiens") as experiment:
            cells = experiment.obs.count
            for table in experiment.ms["RNA"].X["raw"].read().tables():
                nnz += table.num_rows
    elif mode == "stages":
        from langcell.ingest.allocator import keep_arrow_pages

        keep_arrow_pages()
        print(json.dumps(_stage_costs(store, args.chunk_cells, args.chunk_counts)))
        return 0
    else:
        from langcell.ingest.allocator import keep_arrow_pages

        keep_arrow_pages()  # as `langcell ingest census` does
        from langcell.ingest.census import ingest_census

        manifest = ingest_census(args.out, uri=store, obs_filter=OBS_FILTER, chunk_cells=args.chunk_cells,
                                 chunk_counts=args.chunk_counts, cells_per_part=args.cells_per_part, progress=False)
        cells, nnz = manifest["n_cells"] + manifest["skipped_empty_cells"], None
    seconds = time.perf_counter() - started
    peak_mib = _peak_rss_mib()
    print(json.dumps({"seconds": round(seconds, 2), "cells": cells, "nnz": nnz, "peak_rss_mib": round(peak_mib)}))
    return 0


def _stage_costs(store: str, chunk_cells: int, chunk_counts: int, n_chunks: int = 5) -> dict:
    """CPU seconds (user, system) per chunk of the ingest's three stages, run one after another:
    the TileDB read (obs and X batches), building the sparse rows (appending each batch to the
    row buffers, then the table), and parquet encoding. On 2 cores their sum bounds
    how close the overlapped ingest can come to the plain read."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from langcell.ingest import census, coo_rows

    def clock():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return np.array([usage.ru_utime, usage.ru_stime])

    costs = {name: np.zeros(2) for name in ("read", "rows", "encode")}
    # The ingest's own handle (its TileDB settings) and its buffers, reused from chunk to chunk.
    with census._open_handle(census.Source(None, store)) as handle:
        experiment = handle["census_data"]["homo_sapiens"]
        X = experiment.ms["RNA"].X["raw"]
        columns = [name for name in experiment.obs.schema.names if name != "soma_joinid"]
        schema = census._cells_schema(experiment.obs.schema, columns)
        keep_map = np.arange(len(experiment.ms["RNA"].var), dtype=np.int64)
        source = census.Source(None, store)
        rows = coo_rows.RowBuffers()
        counted = 0
        with pq.ParquetWriter(pa.BufferOutputStream(), schema, **census._part_encoding(schema)) as writer:
            # The ingest's chunks (by cells and counts) of the first cells; chunk -1 warms up.
            nnz = experiment.obs.read(coords=(slice(0, 6 * chunk_cells),), column_names=["nnz"]).concat()
            bounds = census.chunk_bounds(nnz["nnz"].to_numpy(), chunk_cells, chunk_counts)
            n_chunks = min(n_chunks, len(bounds) - 2)  # a store of fewer chunks
            for number in range(-1, n_chunks):
                joinids = np.arange(bounds[number + 1], bounds[number + 2], dtype=np.int64)
                spent = {name: np.zeros(2) for name in costs}
                start = clock()
                obs = experiment.obs.read(coords=(joinids,), column_names=["soma_joinid", *columns]).concat()
                rows.clear()
                for batch in census._coo_batches(X, joinids):
                    appending = clock()
                    spent["read"] += appending - start
                    rows.append(*batch)
                    start = clock()
                    spent["rows"] += start - appending
                    counted += batch[2].size * (number >= 0)
                spent["read"] += clock() - start
                start = clock()
                table = census._build_chunk(source, joinids, obs, rows, keep_map, schema, columns)
                spent["rows"] += clock() - start
                start = clock()
                writer.write_table(table)
                spent["encode"] += clock() - start
                if number >= 0:
                    for name in costs:
                        costs[name] += spent[name]
    return {"chunk_cells": chunk_cells, "nnz_per_chunk": counted // n_chunks,
            **{name: [round(float(v) / n_chunks, 2) for v in cost] for name, cost in costs.items()}}


def _peak_rss_mib() -> float:
    # VmHWM is this process image's own peak; ru_maxrss would carry over the peak of the parent
    # that built the store, because Linux keeps it across fork + exec.
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), flags=re.M)
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _report(args, rows: list[dict]) -> str:
    cores = os.cpu_count()
    lines = [
        f"Command: `nice -n 10 .venv/bin/python -m benchmarks.bench_ingest --sizes {' '.join(map(str, args.sizes))} "
        f"--layout {args.layout} --genes {args.genes} --genes-detected {' '.join(map(str, args.genes_detected))} "
        f"--chunk-cells {args.chunk_cells} --chunk-counts {args.chunk_counts} --cells-per-part {args.cells_per_part}`",
        f"Machine: {platform.machine()}, {cores} cores (shared with other jobs), Python {platform.python_version()}; "
        f"date {datetime.date.today().isoformat()}. Stores: `ingest.synth_census --layout {args.layout}` "
        f"({args.genes:,} genes, {args.genes_detected[0]:,}-{args.genes_detected[1]:,} detected per cell), page cache "
        "warm. Each measurement is a fresh process.",
        "",
        "| cells | nnz | plain read s | ingest s | ingest / plain | ingest cells/s | plain peak RSS MiB "
        "| ingest peak RSS MiB | parquet MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        plain, ingest = row["plain"], row["ingest"]
        lines.append(f"| {row['cells']:,} | {plain['nnz']:,} | {plain['seconds']:.1f} | {ingest['seconds']:.1f} | "
                     f"{ingest['seconds'] / plain['seconds']:.2f} | {ingest['cells'] / ingest['seconds']:,.0f} | "
                     f"{plain['peak_rss_mib']:,} | {ingest['peak_rss_mib']:,} | {row['out_bytes'] / 1e6:,.0f} |")
    lines += ["", "CPU seconds per chunk of the three ingest stages run one after another (user + system; "
              "`--child stages`), against the plain read's wall time for as many counts:", "",
              "| cells | counts per chunk | TileDB read | sparse rows | parquet encode | sum | 2 cores x plain read s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        stages, plain = row["stages"], row["plain"]
        cpu = {name: sum(stages[name]) for name in ("read", "rows", "encode")}
        plain_per_chunk = plain["seconds"] * stages["nnz_per_chunk"] / plain["nnz"]
        lines.append(f"| {row['cells']:,} | {stages['nnz_per_chunk']:,} | "
                     + " | ".join(f"{cpu[n]:.2f} ({stages[n][1]:.2f} sys)" for n in ("read", "rows", "encode"))
                     + f" | {sum(cpu.values()):.2f} | {2 * plain_per_chunk:.2f} |")
    worst = max(row["ingest"]["seconds"] / row["plain"]["seconds"] for row in rows)
    small, large = min(rows, key=lambda r: r["cells"]), max(rows, key=lambda r: r["cells"])
    growth = large["ingest"]["peak_rss_mib"] / small["ingest"]["peak_rss_mib"]
    floors = []
    for row in rows:
        stages, plain = row["stages"], row["plain"]
        plain_per_chunk = plain["seconds"] * stages["nnz_per_chunk"] / plain["nnz"]
        floors.append(sum(sum(stages[n]) for n in ("read", "rows", "encode")) / (os.cpu_count() or 1) / plain_per_chunk)
    lines += ["", f"The plain read keeps {cores} cores busy by itself, so the ingest's own work (rows + encode) cannot "
              f"hide behind it: with every core at 100% the ingest would take {min(floors):.2f}x..{max(floors):.2f}x "
              "the plain read (sum of the stages / cores / plain read per chunk); the measured ratio is that floor "
              "plus imperfect overlap.",
              "", "A ratio below 1 is possible: the plain read uses tiledbsoma's default 1 GiB result buffers, fresh "
              "pages for every read whose faults cost it about as much system time as user time; the ingest reads "
              "with 16 MiB buffers that the heap recycles (`ingest.census.READ_CONFIG`)."]
    lines += ["", f"Goals: ingest <= 1.5x the plain read ({'met' if worst <= 1.5 else 'NOT met'}: worst "
              f"{worst:.2f}x); peak RSS flat in the number of cells ({large['cells'] / small['cells']:.0f}x the "
              f"cells -> {growth:.2f}x the ingest peak RSS, set by --chunk-counts and --chunk-cells)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
