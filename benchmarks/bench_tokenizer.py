"""Tokenizer throughput and peak memory: ours (sparse, chunked) vs LangCell's dense per-file tokenizer.

One run, same machine, same h5ad (default 20k cells x 30k genes, ~1,800 detected genes per cell,
Geneformer v1 vocabulary on 22k of the genes). Every case runs in its own subprocess so its peak
RSS (`ru_maxrss`) is its own. Both tokenizers must produce the same tokens (sha256 over all
cells' int32 tokens), or the benchmark fails.

Cases:
- `langcell-dense`: LangCell's tokenize_anndata as described by its code: read the whole h5ad,
  densify the coding genes of the file (`X[:, coding].toarray()`), normalise by n_counts x 10,000,
  divide by the medians, then per cell take the non-zeros and argsort them (written here from
  that description; `kind="stable"` so ties order like ours and outputs compare exactly).
- `ours-h5ad`: `RankValueTokenizer.tokenize_csr` over the same file read in backed mode,
  4,096 rows at a time, sorting on every core (`threads`), as `langcell tokenize` does.
- `ours-tokenize-anndata`: `langcell tokenize` (`tokenize_anndata`, every core) on the same file,
  writing a `datasets` dataset with the obs columns; its tokens are read back after timing.
- `ours-stream-20k` / `ours-stream-1m`: the tokenizer alone, one thread, over a stream of 4,096-cell CSR
  chunks: the file's 20k cells held in memory once and streamed 1x / 50x (1,000,000 cells), to
  show that memory does not grow with the number of cells. Input generation is outside the timing.

Library imports happen before each case's clock starts (the same for every case); reading the
file, loading the vocabulary and compiling or loading the tokenizer's kernels are timed.

End to end, `langcell build` of a synthetic ingest (`--build-cells`, default 100,000 cells,
synth-census defaults) is timed with 1 and 2 worker processes; store, ingest and ontologies
are made before the clock starts.

`python -m benchmarks.bench_tokenizer [--cells 20000] [--no-record]` writes the table into the
"Build scLibrary (tokenizer)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.record import record_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Build scLibrary (tokenizer)"
CHUNK = 4096


def _vocab():
    from langcell.build_sclibrary.vocab import geneformer_v1_vocab

    return geneformer_v1_vocab()


def make_h5ad(path: Path, n_cells: int, n_genes: int, detected: int, seed: int = 0) -> float:
    """Raw counts with ~`detected` genes per cell; n_counts = X.sum(axis=1) as LangCell's preprocess."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    tokens, medians = _vocab()
    vocab_genes = [g for g in tokens if g in medians]
    n_vocab = min(len(vocab_genes), int(n_genes * 0.73))
    rng = np.random.default_rng(seed)
    genes = list(rng.permutation(vocab_genes)[:n_vocab]) + [f"ENSG9{i:010d}" for i in range(n_genes - n_vocab)]
    genes = list(rng.permutation(genes))
    weights = rng.lognormal(0, 1.5, n_genes)
    weights /= weights.sum()
    blocks = []
    for start in range(0, n_cells, 2000):
        rows = min(2000, n_cells - start)
        draws = int(detected * 1.24)  # draws with replacement; duplicates merge into counts
        cols = rng.choice(n_genes, size=(rows, draws), p=weights)
        data = rng.geometric(0.5, size=(rows, draws)).astype(np.float32)
        indptr = np.arange(rows + 1) * draws
        block = sp.csr_matrix((data.ravel(), cols.ravel(), indptr), shape=(rows, n_genes))
        block.sum_duplicates()
        blocks.append(block)
    X = sp.vstack(blocks).tocsr()
    obs = pd.DataFrame({"n_counts": np.asarray(X.sum(axis=1)).ravel()},  # float32, as X.sum gives
                       index=[f"cell{i}" for i in range(n_cells)])
    anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return X.nnz / n_cells


class _Digest:
    def __init__(self):
        self.sha = hashlib.sha256()
        self.cells = 0
        self.tokens = 0

    def add(self, cell_tokens) -> None:
        for t in cell_tokens:
            t = np.asarray(t, dtype=np.int32)
            self.sha.update(len(t).to_bytes(4, "little"))
            self.sha.update(t.tobytes())
            self.cells += 1
            self.tokens += len(t)


def tokenize_cell(gene_vector: np.ndarray, gene_tokens: np.ndarray) -> np.ndarray:
    nonzero = np.nonzero(gene_vector)[0]
    order = np.argsort(-gene_vector[nonzero], kind="stable")
    return gene_tokens[nonzero][order]


def langcell_dense(path: str, max_length: int = 2048) -> _Digest:
    """LangCell-style: whole file, densified coding genes, normalise, argsort per cell."""
    import anndata

    tokens, medians = _vocab()
    adata = anndata.read_h5ad(path)
    var_ids = np.asarray(adata.var_names)
    coding_loc = np.where([g in medians for g in var_ids])[0]
    norm_factor_vector = np.array([medians[g] for g in var_ids[coding_loc]])
    coding_tokens = np.array([tokens[g] for g in var_ids[coding_loc]])
    n_counts = adata.obs["n_counts"].values
    X = adata.X[:, coding_loc].toarray()
    X_norm = X / n_counts[:, None] * 10_000 / norm_factor_vector
    cls = np.array([tokens["<cls>"]])
    digest = _Digest()
    digest.add([np.concatenate([cls, tokenize_cell(X_norm[i], coding_tokens)[:max_length - 1]])
                for i in range(X_norm.shape[0])])
    return digest


def ours_h5ad(path: str, max_length: int = 2048) -> _Digest:
    import anndata

    from langcell.build_sclibrary.tokenizer import RankValueTokenizer

    tokens, medians = _vocab()
    tok = RankValueTokenizer(tokens, medians, max_length=max_length, threads=os.cpu_count() or 1)
    adata = anndata.read_h5ad(path, backed="r")
    gene_ids = list(adata.var_names)
    n_counts = adata.obs["n_counts"].to_numpy()
    digest = _Digest()
    for start in range(0, adata.n_obs, CHUNK):
        X = adata.X[start:start + CHUNK]
        digest.add(tok.tokenize_csr(X, gene_ids, n_counts[start:start + CHUNK]))
    return digest


def ours_stream(path: str, repeats: int, max_length: int = 2048):
    """The tokenizer alone over `repeats` passes of the file's cells in CHUNK-cell CSR chunks."""
    import anndata

    from langcell.build_sclibrary.tokenizer import RankValueTokenizer

    tokens, medians = _vocab()
    tok = RankValueTokenizer(tokens, medians, max_length=max_length)
    adata = anndata.read_h5ad(path)
    X, gene_ids, n_counts = adata.X, list(adata.var_names), adata.obs["n_counts"].to_numpy()
    chunks = [(X[s:s + CHUNK], n_counts[s:s + CHUNK]) for s in range(0, X.shape[0], CHUNK)]
    del adata, X
    first = _Digest()  # tokens of the first pass, to compare with the other cases
    cells = n_tokens = 0
    elapsed = 0.0
    for repeat in range(repeats):
        started = time.perf_counter()
        for block, totals in chunks:
            result = tok.tokenize_csr(block, gene_ids, totals)
            cells += len(result)
            n_tokens += sum(len(t) for t in result)
            if repeat == 0:
                first.add(result)
        elapsed += time.perf_counter() - started
    return first, cells, n_tokens, elapsed


def ours_tokenize_anndata(path: str, out: str, max_length: int = 2048):
    from langcell.build_sclibrary.anndata_io import tokenize_anndata
    from langcell.build_sclibrary.tokenizer import RankValueTokenizer

    tokens, medians = _vocab()
    tokenize_anndata(path, RankValueTokenizer(tokens, medians, max_length=max_length, threads=os.cpu_count() or 1),
                     out_dir=out, chunk_size=CHUNK)


def _dataset_digest(out: str) -> _Digest:
    import datasets

    digest = _Digest()
    ids = datasets.load_from_disk(out).data.column("input_ids")
    for chunk in ids.chunks:
        offsets, values = chunk.offsets.to_numpy(), chunk.values.to_numpy()
        digest.add(np.split(values, offsets[1:-1]) if len(chunk) else [])
    return digest


def build_case(ingest: str, workers: int) -> dict:
    from langcell.build_sclibrary.build import build_library
    from langcell.build_sclibrary.config import load_build_config

    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        started = time.perf_counter()
        manifest = build_library(ingest, Path(tmp) / "lib", load_build_config(None, {"workers": workers}),
                                 progress=False)
        seconds = time.perf_counter() - started
    cells = sum(split["n_cells"] for split in manifest["splits"].values())
    return {"case": f"build-{workers}", "cells": cells, "seconds": round(seconds, 2),
            "cells_per_s": round(cells / seconds, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _import_libraries() -> None:
    import anndata  # noqa: F401
    import datasets  # noqa: F401
    import scipy.sparse  # noqa: F401

    import langcell.build_sclibrary.anndata_io  # noqa: F401
    import langcell.build_sclibrary.build  # noqa: F401


def run_case(case: str, path: str, repeats: int) -> dict:
    _import_libraries()
    started = time.perf_counter()
    if case == "ours-tokenize-anndata":
        with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
            ours_tokenize_anndata(path, f"{tmp}/dataset")
            seconds = time.perf_counter() - started
            digest = _dataset_digest(f"{tmp}/dataset")
        sha, cells, n_tokens = digest.sha.hexdigest(), digest.cells, digest.tokens
    elif case == "langcell-dense":
        digest = langcell_dense(path)
        seconds = time.perf_counter() - started
        sha, cells, n_tokens = digest.sha.hexdigest(), digest.cells, digest.tokens
    elif case == "ours-h5ad":
        digest = ours_h5ad(path)
        seconds = time.perf_counter() - started
        sha, cells, n_tokens = digest.sha.hexdigest(), digest.cells, digest.tokens
    else:
        first, cells, n_tokens, seconds = ours_stream(path, repeats)
        sha = first.sha.hexdigest()
    peak_mb = _peak_rss_mb()
    return {"case": case, "cells": cells, "tokens": n_tokens, "seconds": round(seconds, 2),
            "cells_per_s": round(cells / seconds, 1), "peak_rss_mb": round(peak_mb, 1), "sha256": sha}


def _build_cases(tmp: Path, n_cells: int) -> list[dict]:
    from langcell.ingest.census import ingest_census
    from langcell.ingest.ontology import ingest_ontologies
    from langcell.ingest.synth_census import build_synth_census

    started = time.perf_counter()
    build_synth_census(tmp / "store", n_cells, seed=0, progress=False)
    ingest_census(tmp / "ingest", uri=str(tmp / "store"), obs_filter="is_primary_data == True",
                  cells_per_part=max(1000, n_cells // 8), progress=False)
    ingest_ontologies(tmp / "ingest")
    print(f"made a {n_cells:,}-cell ingest in {time.perf_counter() - started:.0f}s", flush=True)
    results = []
    for workers in (1, 2):
        result = _subprocess("build", tmp, 1, "--ingest", str(tmp / "ingest"), "--workers", str(workers))
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux keeps that across exec, so a child would report
    its parent's peak (the parent held the generated matrix)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subprocess(case: str, path: Path, repeats: int = 1, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_tokenizer", "--case", case, "--h5ad", str(path),
                          "--repeats", str(repeats), *extra], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=30_000)
    parser.add_argument("--detected", type=int, default=1_800)
    parser.add_argument("--big-cells", type=int, default=1_000_000, help="cells of the long streaming case")
    parser.add_argument("--build-cells", type=int, default=100_000, help="cells of the end-to-end build (0: skip)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--ingest", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--h5ad", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case == "build":
        print(json.dumps(build_case(args.ingest, args.workers)))
        return 0
    if args.case:
        print(json.dumps(run_case(args.case, args.h5ad, args.repeats)))
        return 0

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
        path = Path(tmp) / "cells.h5ad"
        started = time.perf_counter()
        detected = make_h5ad(path, args.cells, args.genes, args.detected)
        print(f"generated {path.name} ({path.stat().st_size / 1e6:.0f} MB, {detected:.0f} genes per cell) in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
        repeats = max(1, round(args.big_cells / args.cells))
        results = []
        for case, reps in (("ours-h5ad", 1), ("langcell-dense", 1), ("ours-tokenize-anndata", 1),
                           ("ours-stream-20k", 1), ("ours-stream-1m", repeats)):
            result = _subprocess("ours-stream" if case.startswith("ours-stream") else case, path, reps)
            result["case"] = case
            print(json.dumps(result), flush=True)
            results.append(result)
        builds = _build_cases(Path(tmp), args.build_cells) if args.build_cells else []
    shas = {r["sha256"] for r in results}
    if len(shas) != 1:
        raise SystemExit(f"tokens differ between cases: {[(r['case'], r['sha256'][:12]) for r in results]}")
    by = {r["case"]: r for r in results}
    base = by["langcell-dense"]
    mean_len = by["ours-h5ad"]["tokens"] / by["ours-h5ad"]["cells"]
    lines = [f"`python -m benchmarks.bench_tokenizer` ({args.cells:,} cells x {args.genes:,} genes, "
             f"{detected:,.0f} detected genes per cell, mean {mean_len:.0f} tokens per cell; "
             f"{os.cpu_count()} cores, {platform.machine()}, one process per case; "
             f"{dt.date.today().isoformat()}). Same tokens in every case (sha256 {base['sha256'][:12]}).", "",
             "| case | threads | cells | cells/s | x LangCell dense | peak RSS (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        threads = os.cpu_count() if r["case"] in ("ours-h5ad", "ours-tokenize-anndata") else 1
        lines.append(f"| {r['case']} | {threads} | {r['cells']:,} | {r['cells_per_s']:,.0f} | "
                     f"{r['cells_per_s'] / base['cells_per_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    lines += ["", "langcell-dense: LangCell's per-file dense tokenizer re-implemented from its description "
              "(whole file read, coding genes densified, per-cell argsort). ours-h5ad: backed h5ad read in "
              f"{CHUNK}-cell chunks + tokenizer. ours-stream-*: the tokenizer alone over {CHUNK}-cell CSR chunks of "
              f"the same cells held in memory, streamed once (20k) and {repeats}x ({by['ours-stream-1m']['cells']:,} "
              "cells); its RSS includes the 20k cells held as input."]
    ours = [by["ours-h5ad"], by["ours-tokenize-anndata"], by["ours-stream-20k"], by["ours-stream-1m"]]
    speedups = [r["cells_per_s"] / base["cells_per_s"] for r in ours]
    peak = max(r["peak_rss_mb"] for r in ours)
    flat = by["ours-stream-1m"]["peak_rss_mb"] - by["ours-stream-20k"]["peak_rss_mb"]
    lines += ["", f"Goals: throughput >= 20x LangCell dense: {'met' if min(speedups) >= 20 else 'NOT met'} "
              f"({min(speedups):.1f}x..{max(speedups):.1f}x); peak RSS < 1.5 GB: "
              f"{'met' if peak < 1536 else 'NOT met'} ({peak:,.0f} MB); RSS from {args.cells:,} to "
              f"{by['ours-stream-1m']['cells']:,} cells: {flat:+.1f} MB. Load average before the run: "
              f"{load:.1f} (shared machine; both tokenizers ran under the same load)."]
    if builds:
        lines += ["", f"End to end: `langcell build` of a {args.build_cells:,}-cell synthetic ingest (synth-census "
                  "defaults: 8,000 genes, 1,000-5,000 detected per cell; Geneformer v1 vocabulary; tokens, texts, "
                  "webdataset shards, `datasets` splits, stats and manifest), from an empty output folder.", "",
                  "| workers | cells | seconds | cells/s | peak RSS of the parent (MB) |", "| ---: | ---: | ---: | ---: | ---: |"]
        for r in builds:
            lines.append(f"| {r['case'].split('-')[1]} | {r['cells']:,} | {r['seconds']:.1f} | {r['cells_per_s']:,.0f} | "
                         f"{r['peak_rss_mb']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record_section(SECTION.removeprefix("## "), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
