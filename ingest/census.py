"""`langcell ingest census`: stream cells from the CELLxGENE Census (or a local SOMA store) into parquet parts.

How a run works
---------------
1. Open the store (`cellxgene_census.open_soma`): a Census version, resolved to its release build
   so that "stable" moving to a new release can never mix two releases in one folder, or a local
   store `--uri`.
2. Plan: the soma_joinids of the cells passing `--obs-filter`, ascending, cut to `--max-cells`,
   split into parts of `--cells-per-part` cells. The plan depends only on the store and the
   arguments, so every rerun and every shard computes the same plan. Each part is described by
   its joinid range and row count; a part's cells are "the cells passing the filter in
   [joinid_min, joinid_max]", so no list of joinids has to be stored.
3. `genes.parquet` (genes passing `--var-filter`, in store order) and the manifest with every part
   `pending` are written before any cell is read.
4. Each part is read in chunks of at most `--chunk-cells` cells and `--chunk-counts` counts
   (each cell's count from obs `nnz`, which the Census carries; without it chunks are cut by cells
   only), so a chunk of Smart-seq cells with 10k genes each is as big in memory as one of 10x
   cells: obs rows and X `raw` for those joinids only. A read that fails with a TileDB/S3 error
   is retried `--retries` times with exponential backoff (`ingest.retry`). TileDB returns a
   chunk's entries in small batches, each appended to reusable sparse-row buffers by one
   compiled pass (`ingest.coo_rows`); the chunk is written as one parquet row
   group to a temporary file that is renamed to `cells/part-NNNNN.parquet` when complete. Only
   then does the manifest mark the part `done` with its sha256. Reading, encoding and finishing
   files overlap, also across parts (`_write_parts`). Memory follows the chunk size, never the
   number of cells.

Resuming
--------
Rerun the same command after a crash or a SIGKILL: parts that are `done`, present and whose
sha256 matches are kept; every other part is rewritten from the store. Parquet is written
deterministically (fixed schema, fixed compression, row groups at chunk boundaries, no pandas
metadata), so a resumed folder is byte-identical to an uninterrupted run with the same
`--chunk-cells` and `--chunk-counts`. A rerun with another source, organism, filter, `--max-cells` or
`--cells-per-part`, or on a store whose content changed, is refused.

Parallel runs and SLURM
-----------------------
`--workers N` runs N processes (spawn; each opens its own SOMA handle) on disjoint parts; only
the parent writes the manifest.

`--shard i/N` is for a SLURM array: every task runs the same command with the same `--out` on a
shared file system and takes parts i, i+N, i+2N, ...::

    #SBATCH --array=0-7
    langcell ingest census --census-version 2025-01-30 --shard $SLURM_ARRAY_TASK_ID/8 --out /scratch/ingest
    # then, once all tasks have finished (e.g. sbatch --dependency=afterok:<array job id>):
    langcell ingest merge --out /scratch/ingest

Each shard writes its parts straight into `cells/` and keeps its own
`manifest.shard-I-of-N.json`; nothing is copied. A failed task is resumed by resubmitting that
array index. `merge` checks that all N shards are complete and agree on source, filters and
plan, verifies every part (sha256, row count, soma_joinids sorted, unique and inside the part's
range, ranges disjoint, rows + skipped empty cells equal to the plan) and writes `manifest.json`,
identical to the one a single run writes.

Cells with no counts in the kept genes are skipped (the count is in the manifest's
`skipped_empty_cells` and per part `empty_cells`). `joinid_min`/`joinid_max` are the planned
range of the part, which holds the part's cells even when its first or last cell was skipped.
"""

from __future__ import annotations

import concurrent.futures
import collections
import concurrent.futures.process
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from langcell.ingest import coo_rows
from langcell.ingest.retry import DEFAULT_RETRIES, S3_RETRY_CONFIG, with_retries
from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, atomic_write_bytes, atomic_write_json, output_lock, read_json, sha256_file

FORMAT = "langcell-ingest/1"
ORGANISMS = ("homo_sapiens", "mus_musculus")
DEFAULT_OBS_FILTER = "is_primary_data == True"
DEFAULT_CHUNK_CELLS = 20_000
# 20,000 cells of 2,500 genes, the chunk whose memory BENCHMARKS.md measures; about 16 bytes a
# count per chunk in flight (TileDB's results appended to int32 genes and float32 counts, the
# copy into rows where the tiling needs it, the parquet encoding).
DEFAULT_CHUNK_COUNTS = 50_000_000
DEFAULT_CELLS_PER_PART = 100_000

REQUIRED_OBS = (
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
    "donor_id", "is_primary_data", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id",
    "sex", "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
    "tissue_general", "tissue_general_ontology_term_id",
)
REQUIRED_VAR = ("feature_id", "feature_name", "feature_length")
# Columns this stage computes; a store obs column of the same name (AnnData often carries an
# `n_counts` of its own) is replaced so the contract's meaning always holds.
COMPUTED = ("n_counts", "gene_index", "counts")
# Settings that define what a folder holds; a rerun must repeat them exactly.
IDENTITY_KEYS = ("format", "source", "organism", "obs_filter", "var_filter", "max_cells", "cells_per_part",
                 "plan", "n_genes", "genes_sha256")
# TileDB settings of every read, on top of the Census' defaults. Result buffers of 16 MiB per
# column (the Census asks for 1 GiB) stay below glibc's largest mmap threshold, so the heap hands
# the same pages back for every batch; and TileDB no longer gives freed memory back to the kernel
# after each query. Otherwise a chunk's ~2 GB of result and tile buffers are fresh pages every time,
# and faulting them in cost as much CPU as the read itself (see BENCHMARKS.md, Ingest).
# S3_RETRY_CONFIG: TileDB's own retries of S3 requests, below the per-chunk retries.
READ_CONFIG = {"soma.init_buffer_bytes": 16 << 20, "sm.mem.malloc_trim": "false", **S3_RETRY_CONFIG}
# Test hook: "EVENT:K" SIGKILLs the process the K-th time EVENT happens, so tests can kill a run
# at exactly the moments that matter (mid-part, after a rename but before the manifest update).
CRASH_ENV = "LANGCELL_INGEST_CRASH_AT"
PART_NAME = "cells/part-{:05d}.parquet"


@dataclass(frozen=True)
class Source:
    census_version: str | None
    uri: str | None

    def describe(self) -> str:
        return self.uri if self.uri is not None else f"Census {self.census_version}"

    def as_dict(self) -> dict[str, Any]:
        return {"census_version": self.census_version, "uri": self.uri}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def ingest_census(out: str | os.PathLike, *, census_version: str | None = None, uri: str | None = None,
                  organism: str = "homo_sapiens", obs_filter: str = DEFAULT_OBS_FILTER,
                  var_filter: str | None = None, max_cells: int | None = None,
                  chunk_cells: int = DEFAULT_CHUNK_CELLS, chunk_counts: int = DEFAULT_CHUNK_COUNTS,
                  cells_per_part: int = DEFAULT_CELLS_PER_PART, workers: int = 1,
                  shard: tuple[int, int] | None = None, retries: int = DEFAULT_RETRIES,
                  progress: bool = True) -> dict[str, Any]:
    """Ingest cells into `out` (resuming whatever a previous identical run finished); return the manifest.

    Without `census_version` and `uri` the "stable" Census is used (network). `shard=(i, n)`
    takes parts i, i+n, ... and writes `manifest.shard-i-of-n.json`; `merge_shards(out)` then
    writes `manifest.json`.
    """
    _check_arguments(census_version, uri, organism, max_cells, chunk_cells, chunk_counts, cells_per_part, workers,
                     shard, retries)
    out = Path(out)
    lock = output_lock(out) if shard is None else _shard_lock(out, *shard)
    with lock:
        source, census = _open_source(census_version, uri)
        with census:
            experiment = _experiment(census, source, organism)
            obs_columns = _check_schema(experiment, source, organism)
            joinids = _plan_joinids(experiment, source, obs_filter, max_cells)
            genes, keep_map = _genes(experiment, source, var_filter)
            summary = _census_summary(census)
        # The big joinid array is only needed for the plan; parts re-derive their own cells.
        plan, parts = _make_plan(joinids, cells_per_part)
        del joinids
        genes_bytes = _genes_parquet(genes)
        identity = {"format": FORMAT, "source": source.as_dict(), "organism": organism,
                    "obs_filter": obs_filter, "var_filter": var_filter, "max_cells": max_cells,
                    "cells_per_part": cells_per_part, "plan": plan, "n_genes": genes.num_rows,
                    "genes_sha256": hashlib.sha256(genes_bytes).hexdigest()}
        # Checked before anything is written, so a refused rerun leaves the folder as it was.
        _check_folder_identity(out, identity)
        # Every shard writes the same bytes, so concurrent atomic renames of this file are harmless.
        atomic_write_bytes(out / "genes.parquet", genes_bytes)
        if shard is not None:
            parts = parts[shard[0]::shard[1]]
        manifest_path = out / (_shard_manifest_name(*shard) if shard else "manifest.json")
        manifest = _start_manifest(manifest_path, identity, parts, shard)
        manifest["census_summary"] = summary
        _remove_stale_temporaries(out, manifest["parts"])
        atomic_write_json(manifest_path, manifest)

        pending = [part for part in manifest["parts"] if part["status"] != "done"]
        task = _PartTask(source=source, organism=organism, obs_filter=obs_filter, keep_map=keep_map,
                         obs_columns=obs_columns, chunk_cells=chunk_cells, chunk_counts=chunk_counts,
                         retries=retries, out=str(out))
        _run_parts(task, pending, manifest, manifest_path, workers, progress)
        _finish(manifest)
        atomic_write_json(manifest_path, manifest)
        return manifest


def merge_shards(out: str | os.PathLike) -> dict[str, Any]:
    """Check the shard manifests in `out` and every part they list; write and return `manifest.json`."""
    out = Path(out)
    if not out.is_dir():
        raise LangCellError(f"{out}: folder not found; pass the --out folder the shards wrote to")
    with output_lock(out):
        shard_files = sorted(out.glob("manifest.shard-*-of-*.json"))
        if not shard_files:
            raise LangCellError(f"{out}: no manifest.shard-I-of-N.json found; run `langcell ingest census "
                                "--shard I/N --out` this folder first")
        manifests = [read_json(path, "shard manifest") for path in shard_files]
        counts = {m.get("shard", {}).get("count") for m in manifests}
        if len(counts) != 1:
            raise LangCellError(f"{out}: shard manifests of different shard counts {sorted(map(str, counts))}; "
                                "delete the manifests of the old sharding and rerun those shards")
        count = counts.pop()
        found = {m["shard"]["index"] for m in manifests}
        missing = sorted(set(range(count)) - found)
        if missing:
            raise LangCellError(f"{out}: shard(s) {missing} of {count} have no manifest; run `langcell ingest "
                                f"census --shard {missing[0]}/{count}` with the same arguments")
        first = manifests[0]
        for path, manifest in zip(shard_files, manifests):
            for key in IDENTITY_KEYS:
                if manifest.get(key) != first.get(key):
                    raise LangCellError(f"{path}: '{key}' differs from {shard_files[0].name}; all shards must "
                                        "run with the same arguments on the same store")
            if not manifest.get("complete"):
                index = manifest["shard"]["index"]
                raise LangCellError(f"{path}: shard {index}/{count} is not complete; rerun it with "
                                    f"`--shard {index}/{count}` and the same arguments, then merge again")
        if sha256_file(out / "genes.parquet") != first["genes_sha256"]:
            raise LangCellError(f"{out / 'genes.parquet'}: sha256 differs from the shard manifests; rerun any "
                                "shard to rewrite it, then merge again")
        parts = sorted((part for m in manifests for part in m["parts"]), key=lambda p: p["name"])
        _verify_parts(out, first, parts)
        merged = {key: first[key] for key in IDENTITY_KEYS}
        merged["census_summary"] = first.get("census_summary", {})
        merged["parts"] = parts
        _finish(merged)
        atomic_write_json(out / "manifest.json", merged)
        return merged


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise LangCellError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. "
                            "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------------------------------------
# Opening the store and checking it
# ---------------------------------------------------------------------------------------------
def _check_arguments(census_version, uri, organism, max_cells, chunk_cells, chunk_counts, cells_per_part, workers,
                     shard, retries):
    if census_version is not None and uri is not None:
        raise LangCellError("--census-version and --uri both given; pass one source")
    if organism not in ORGANISMS:
        raise LangCellError(f"--organism {organism!r}: not a Census organism; use one of {', '.join(ORGANISMS)}")
    for name, value in (("--chunk-cells", chunk_cells), ("--chunk-counts", chunk_counts),
                        ("--cells-per-part", cells_per_part), ("--workers", workers)):
        if value < 1:
            raise LangCellError(f"{name} {value}: must be at least 1")
    if chunk_counts > np.iinfo(np.int32).max:
        raise LangCellError(f"--chunk-counts {chunk_counts}: a parquet list column holds at most 2**31 - 1 counts "
                            "per row group; pass a smaller budget")
    if retries < 0:
        raise LangCellError(f"--retries {retries}: must be at least 0")
    if max_cells is not None and max_cells < 1:
        raise LangCellError(f"--max-cells {max_cells}: must be at least 1 (leave it out for all cells)")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise LangCellError(f"--shard {shard[0]}/{shard[1]}: expected I/N with 0 <= I < N")


def _open_source(census_version: str | None, uri: str | None):
    import cellxgene_census

    if uri is not None:
        if "://" not in uri:
            # Absolute, so that a rerun from another directory is recognised as the same source.
            uri = os.path.abspath(uri)
            if not os.path.isdir(uri):
                raise LangCellError(f"{uri}: store not found; pass --uri a SOMA store folder (see "
                                    "`langcell ingest demo-census`) or use --census-version")
        source = Source(None, uri)
    else:
        requested = census_version or "stable"
        try:
            release = cellxgene_census.get_census_version_description(requested)["release_build"]
        except Exception as exc:  # network errors and unknown versions alike
            raise LangCellError(f"Census {requested}: cannot resolve the version ({_first_line(exc)}); check "
                                "the network, pick a version from cellxgene_census.get_census_version_directory(), "
                                "or pass --uri LOCAL_STORE") from None
        source = Source(release, None)
    return source, _open_handle(source)


def _open_handle(source: Source):
    import cellxgene_census

    try:
        if source.uri is not None:
            return cellxgene_census.open_soma(uri=source.uri, tiledb_config=READ_CONFIG)
        return cellxgene_census.open_soma(census_version=source.census_version, tiledb_config=READ_CONFIG)
    except Exception as exc:
        raise LangCellError(f"{source.describe()}: cannot open the SOMA store ({_first_line(exc)}); check the "
                            "path or the network") from None


def _experiment(census, source: Source, organism: str):
    try:
        experiment = census["census_data"][organism]
        experiment.ms["RNA"].X["raw"]  # looked up now so a missing layer fails here, with this message
    except Exception:
        raise LangCellError(f"{source.describe()}: no census_data/{organism} experiment with measurement RNA "
                            "and X layer 'raw'; pass a store laid out like the Census or another "
                            "--organism") from None
    return experiment


# Of census_info/summary: what the release is; `langcell ingest ontologies` takes the ontology
# versions of its CELLxGENE schema (`dataset_schema_version`).
SUMMARY_LABELS = ("census_schema_version", "census_build_date", "dataset_schema_version")


def _census_summary(census) -> dict[str, str]:
    """The release's SUMMARY_LABELS where its census_info/summary has them (a local store may not)."""
    try:
        table = census["census_info"]["summary"].read().concat().to_pydict()
    except Exception:  # no census_info in the store: nothing to say about the release
        return {}
    values = dict(zip(table.get("label", []), table.get("value", [])))
    return {label: str(values[label]) for label in SUMMARY_LABELS if label in values}


def _check_schema(experiment, source: Source, organism: str) -> list[str]:
    obs_names = experiment.obs.schema.names
    missing = [name for name in REQUIRED_OBS if name not in obs_names]
    if missing:
        raise LangCellError(f"{source.describe()}: obs of {organism} lacks required column(s) {', '.join(missing)}; "
                            "use a store with the Census obs schema")
    var_names = experiment.ms["RNA"].var.schema.names
    missing = [name for name in REQUIRED_VAR if name not in var_names]
    if missing:
        raise LangCellError(f"{source.describe()}: var of {organism}/RNA lacks required column(s) "
                            f"{', '.join(missing)}; use a store with the Census var schema")
    return [name for name in obs_names if name != "soma_joinid" and name not in COMPUTED]


def _plan_joinids(experiment, source: Source, obs_filter: str, max_cells: int | None) -> np.ndarray:
    import tiledbsoma

    try:
        with experiment.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter)) as query:
            joinids = query.obs_joinids().to_numpy()
    except Exception as exc:
        raise LangCellError(_filter_error(source, "--obs-filter", obs_filter, exc)) from None
    joinids = np.sort(joinids.astype(np.int64, copy=False))
    duplicate = _first_duplicate(joinids)
    if duplicate is not None:
        raise LangCellError(f"{source.describe()}: obs soma_joinid {duplicate} appears more than once; the store "
                            "is corrupt, rebuild it")
    if joinids.size == 0:
        raise LangCellError(f"{source.describe()}: no cell passes --obs-filter {obs_filter!r}; loosen the filter")
    return joinids[:max_cells] if max_cells is not None else joinids


def _genes(experiment, source: Source, var_filter: str | None) -> tuple[pa.Table, np.ndarray]:
    """genes.parquet's table (kept genes in store order) and a map var soma_joinid -> gene_index (-1: dropped)."""
    var = experiment.ms["RNA"].var
    table = var.read().concat()
    table = table.take(pa.array(np.argsort(table["soma_joinid"].to_numpy(), kind="stable")))
    var_joinids = table["soma_joinid"].to_numpy()
    if var_joinids.size == 0:
        raise LangCellError(f"{source.describe()}: var of RNA is empty; use a store with genes")
    n_store_genes = int(var_joinids.max()) + 1
    if var_filter is not None:
        try:
            kept = var.read(value_filter=var_filter, column_names=["soma_joinid"]).concat()["soma_joinid"]
        except Exception as exc:
            raise LangCellError(_filter_error(source, "--var-filter", var_filter, exc)) from None
        mask = np.isin(var_joinids, kept.to_numpy())
        if not mask.any():
            raise LangCellError(f"{source.describe()}: no gene passes --var-filter {var_filter!r}; loosen the filter")
        table = table.filter(pa.array(mask))
        var_joinids = var_joinids[mask]
    keep_map = np.full(n_store_genes, -1, dtype=np.int32)
    keep_map[var_joinids] = np.arange(var_joinids.size, dtype=np.int32)
    names = table.schema.names
    # The Census' `feature_type` holds the GENCODE biotype; CELLxGENE's `feature_biotype` only says
    # "gene" or "spike-in", so it is the fallback and its "gene" says nothing.
    biotype_column = next((c for c in ("feature_type", "feature_biotype") if c in names), None)
    values = _plain(table[biotype_column]).to_pylist() if biotype_column else [None] * table.num_rows
    biotype = pa.array([value if value and value != "gene" else "unknown" for value in values], pa.string())
    genes = pa.table({
        "gene_index": pa.array(np.arange(table.num_rows, dtype=np.int32)),
        "feature_id": _plain(table["feature_id"]).cast(pa.string()),
        "feature_name": _plain(table["feature_name"]).cast(pa.string()),
        "feature_length": table["feature_length"].cast(pa.int64()),
        "feature_biotype": biotype,
    })
    return genes, keep_map


def _genes_parquet(genes: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(genes, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _filter_error(source: Source, flag: str, text: str, exc: BaseException) -> str:
    return (f"{source.describe()}: {flag} {text!r} is not a valid filter ({_first_line(exc)}); write it over "
            "existing columns, e.g. \"is_primary_data == True and tissue_general == 'blood'\"")


# ---------------------------------------------------------------------------------------------
# Plan and manifest
# ---------------------------------------------------------------------------------------------
def _make_plan(joinids: np.ndarray, cells_per_part: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    digest = hashlib.sha256(joinids.astype("<i8", copy=False).tobytes()).hexdigest()
    parts = []
    for number, start in enumerate(range(0, joinids.size, cells_per_part)):
        block = joinids[start:start + cells_per_part]
        parts.append({"name": PART_NAME.format(number), "planned_rows": int(block.size),
                      "joinid_min": int(block[0]), "joinid_max": int(block[-1]),
                      "rows": None, "empty_cells": None, "sha256": None, "status": "pending"})
    plan = {"n_cells": int(joinids.size), "n_parts": len(parts), "joinids_sha256": digest}
    return plan, parts


def _shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index}-of-{count}.json"


def _start_manifest(path: Path, identity: dict[str, Any], parts: list[dict[str, Any]],
                    shard: tuple[int, int] | None) -> dict[str, Any]:
    fresh = dict(identity, parts=parts)
    if shard is not None:
        fresh["shard"] = {"index": shard[0], "count": shard[1]}
    _finish(fresh)
    if not path.exists():
        return fresh
    old = read_json(path, "ingest manifest")
    done = {part["name"]: part for part in old.get("parts", []) if part.get("status") == "done"}
    out = path.parent
    for part in fresh["parts"]:
        previous = done.get(part["name"])
        if previous is not None and (out / part["name"]).is_file() \
                and sha256_file(out / part["name"]) == previous["sha256"]:
            part.update(previous)
    _finish(fresh)
    return fresh


def _check_folder_identity(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to add to a folder whose manifests (single run or any shard) describe another ingest."""
    for path in sorted(out.glob("manifest*.json")):
        old = read_json(path, "ingest manifest")
        for key in IDENTITY_KEYS:
            if old.get(key) != identity[key]:
                raise LangCellError(f"{path}: this folder holds an ingest with {key} = {json.dumps(old.get(key))}, "
                                    f"this run has {json.dumps(identity[key])}; rerun with the original arguments "
                                    "or use another --out")


def _remove_stale_temporaries(out: Path, parts: list[dict[str, Any]]) -> None:
    # A SIGKILLed writer leaves its temporary file; only this run's parts are touched because
    # other shards may be writing theirs into the same folder right now.
    for part in parts:
        final = out / part["name"]
        for tmp in final.parent.glob(f".{final.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _finish(manifest: dict[str, Any]) -> None:
    parts = manifest["parts"]
    done = [part for part in parts if part["status"] == "done"]
    manifest["complete"] = len(done) == len(parts)
    manifest["n_cells"] = sum(part["rows"] for part in done)
    manifest["skipped_empty_cells"] = skipped = sum(part["empty_cells"] for part in done)
    manifest["warnings"] = [f"{skipped} cells without any count in the kept genes were skipped"] if skipped else []


def _verify_parts(out: Path, identity: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    plan = identity["plan"]
    expected = [PART_NAME.format(n) for n in range(plan["n_parts"])]
    names = [part["name"] for part in parts]
    if names != expected:
        lacking = sorted(set(expected) - set(names)) or sorted(set(names) - set(expected))
        raise LangCellError(f"{out}: shard manifests do not list exactly the planned parts (e.g. {lacking[0]}); "
                            "rerun the shards with the same arguments")
    previous_max = -1
    for part in parts:
        path = out / part["name"]
        if not path.is_file():
            raise LangCellError(f"{path}: part listed as done is missing; rerun its shard")
        if sha256_file(path) != part["sha256"]:
            raise LangCellError(f"{path}: sha256 differs from the shard manifest; rerun its shard")
        joinids = pq.read_table(path, columns=["soma_joinid"])["soma_joinid"].to_numpy()
        if joinids.size != part["rows"] or part["rows"] + part["empty_cells"] != part["planned_rows"]:
            raise LangCellError(f"{path}: {joinids.size} rows, manifest says {part['rows']} of "
                                f"{part['planned_rows']} planned; rerun its shard")
        if joinids.size and (np.any(np.diff(joinids) <= 0) or joinids[0] < part["joinid_min"]
                             or joinids[-1] > part["joinid_max"]):
            raise LangCellError(f"{path}: soma_joinids unsorted, repeated or outside "
                                f"[{part['joinid_min']}, {part['joinid_max']}]; rerun its shard")
        if part["joinid_min"] <= previous_max:
            raise LangCellError(f"{path}: joinid range overlaps the previous part; rerun the shards")
        previous_max = part["joinid_max"]
    if sum(part["planned_rows"] for part in parts) != plan["n_cells"]:
        raise LangCellError(f"{out}: parts plan {sum(p['planned_rows'] for p in parts)} cells, the plan has "
                            f"{plan['n_cells']}; rerun the shards")


@contextlib.contextmanager
def _shard_lock(out: Path, index: int, count: int) -> Iterator[None]:
    """Shared lock on the folder (shards run side by side; merge and unsharded runs are kept out)
    plus an exclusive lock on this shard (the same array index never runs twice at once)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LangCellError(f"{out}: an unsharded run or a merge holds this folder; wait for it to "
                                "finish") from None
        with output_lock(out / ".shards" / f"{index}-of-{count}"):
            yield


# ---------------------------------------------------------------------------------------------
# Running parts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PartTask:
    source: Source
    organism: str
    obs_filter: str
    keep_map: np.ndarray
    obs_columns: list[str]
    chunk_cells: int
    chunk_counts: int
    retries: int
    out: str


def _run_parts(task: _PartTask, pending: list[dict[str, Any]], manifest: dict[str, Any], manifest_path: Path,
               workers: int, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(part["planned_rows"] for part in manifest["parts"])
    done_cells = total - sum(part["planned_rows"] for part in pending)
    bar = tqdm(total=total, initial=done_cells, unit="cells", unit_scale=True, disable=not progress,
               desc=f"ingest {manifest_path.parent.name}", smoothing=0.1)

    def record(result: dict[str, Any]) -> None:
        part = next(p for p in manifest["parts"] if p["name"] == result["name"])
        part.update(result, status="done")
        _finish(manifest)
        atomic_write_json(manifest_path, manifest)
        _crash_point("manifest_written")

    try:
        if workers == 1 or len(pending) <= 1:
            with _open_handle(task.source) as census:
                experiment = _experiment(census, task.source, task.organism)
                for result in _write_parts(experiment, task, pending, bar.update, _row_buffers()):
                    record(result)
        else:
            _run_pool(task, pending, record, bar, workers)
    finally:
        bar.close()


def _run_pool(task, pending, record, bar, workers) -> None:
    # spawn: a forked child would inherit the parent's TileDB threads and their locks.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context,
                                                initializer=_worker_init, initargs=(queue,)) as pool:
        futures = {pool.submit(_worker_part, task, part) for part in pending}
        try:
            while futures:
                finished, futures = concurrent.futures.wait(futures, timeout=0.2,
                                                            return_when=concurrent.futures.FIRST_COMPLETED)
                _drain(queue, bar)
                for future in finished:
                    record(future.result())
            _drain(queue, bar)
        except concurrent.futures.process.BrokenProcessPool:
            raise LangCellError("ingest worker process died (killed, or out of memory); rerun the same command to "
                                "resume, with a smaller --chunk-counts or fewer --workers if memory is short") from None
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _drain(queue, bar) -> None:
    import queue as queue_module

    while True:
        try:
            bar.update(queue.get_nowait())
        except queue_module.Empty:
            return


_WORKER: dict[str, Any] = {}


def _worker_init(queue) -> None:
    _WORKER["queue"] = queue


def _worker_part(task: _PartTask, part: dict[str, Any]) -> dict[str, Any]:
    # One SOMA handle per worker process, reused across its parts.
    if "census" not in _WORKER:
        _WORKER["census"] = _open_handle(task.source)
        _WORKER["experiment"] = _experiment(_WORKER["census"], task.source, task.organism)
        _WORKER["buffers"] = _row_buffers()
    return next(_write_parts(_WORKER["experiment"], task, [part], _WORKER["queue"].put, _WORKER["buffers"]))


def _row_buffers() -> list[coo_rows.RowBuffers]:
    """The chunks in flight in `_write_parts` (one being read, one being encoded, one built in
    between), each with its own buffers, kept across parts so the run settles on one allocation."""
    return [coo_rows.RowBuffers() for _ in range(3)]


@dataclass(frozen=True)
class _Step:
    part: dict[str, Any]
    joinids: np.ndarray
    number: int  # of the chunk within its part
    first: bool
    last: bool


def _write_parts(experiment, task: _PartTask, parts: list[dict[str, Any]], advance: Callable[[int], None],
                 buffers: list[coo_rows.RowBuffers]) -> Iterator[dict[str, Any]]:
    """Write `parts` through one pipeline; yield each part's result, in order, once its file is in place.

    TileDB reads chunk k+1 into the next buffers while parquet encodes chunk k-1 (both release the
    GIL) and this thread turns chunk k into a table. Chunk k+1 takes the buffers of chunk k-2,
    whose write has been waited for. Writes stay in chunk order, so each file is deterministic.
    The pipeline runs on across part boundaries, and a part's file is finished (fsync, rename,
    sha256) in a third thread, so neither lane waits for the other at the end of a part.
    """
    source, X = task.source, experiment.ms["RNA"].X["raw"]
    schema = _cells_schema(experiment.obs.schema, task.obs_columns)
    plan = _chunk_plan(experiment, task, parts)
    step = next(plan, None)
    if step is None:
        return
    files: list[_PartFile] = []
    finishing: collections.deque = collections.deque()
    # The pools are left (waiting for their threads) before an unfinished file is removed, also on errors.
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as lanes, concurrent.futures.ThreadPoolExecutor(1) as finisher:
            def read(step: _Step, number: int):
                what = (f"{source.describe()}: chunk {step.number} of {step.part['name']} ({step.joinids.size} "
                        f"cells, soma_joinid {step.joinids[0]}..{step.joinids[-1]})")
                return lanes.submit(with_retries, functools.partial(
                    _read_chunk, experiment, X, source, step.joinids, task.obs_columns, task.keep_map.size,
                    buffers[number % len(buffers)]), what, task.retries)

            reading, writing, number = read(step, 0), None, 0
            while step is not None:
                obs = reading.result()
                following = next(plan, None)
                if following is not None:
                    reading = read(following, number + 1)
                table = _build_chunk(source, step.joinids, obs, buffers[number % len(buffers)], task.keep_map,
                                     schema, task.obs_columns)
                if writing is not None:
                    writing.result()
                    _chunk_written(advance, previous)
                if step.first:
                    files.append(_PartFile(Path(task.out), step.part, schema))
                writing = lanes.submit(files[-1].write, table, step.joinids.size)
                if step.last:
                    finishing.append(finisher.submit(files[-1].finish_after, writing))
                while finishing and finishing[0].done():
                    yield finishing.popleft().result()
                previous, step, number = step.joinids.size, following, number + 1
            writing.result()
            _chunk_written(advance, previous)
            while finishing:
                yield finishing.popleft().result()
    finally:
        for file in files:
            file.abort()


def _chunk_plan(experiment, task: _PartTask, parts: list[dict[str, Any]]) -> Iterator[_Step]:
    for part in parts:
        joinids, nnz = _part_joinids(experiment, task, part)
        bounds = chunk_bounds(nnz, task.chunk_cells, task.chunk_counts)
        for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            yield _Step(part, joinids[start:stop], number, start == 0, stop == joinids.size)


def chunk_bounds(nnz: np.ndarray, chunk_cells: int, chunk_counts: int) -> list[int]:
    """Where chunks of consecutive cells start, and the end: each at most `chunk_cells` cells and
    `chunk_counts` counts, unless a single cell holds more counts (it is then a chunk alone)."""
    total = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
    bounds = [0]
    while bounds[-1] < nnz.size:
        start = bounds[-1]
        stop = int(np.searchsorted(total, total[start] + chunk_counts, side="right")) - 1
        bounds.append(min(max(stop, start + 1), start + chunk_cells, nnz.size))
    return bounds


def _part_joinids(experiment, task: _PartTask, part: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The part's soma_joinids (ascending) and each cell's number of stored counts where obs has
    the Census' `nnz` (zeros where it does not: chunks are then cut by cells only)."""
    source = task.source
    columns = ["soma_joinid", "nnz"] if "nnz" in task.obs_columns else ["soma_joinid"]

    def read():
        return experiment.obs.read(coords=(slice(part["joinid_min"], part["joinid_max"]),),
                                   value_filter=task.obs_filter, column_names=columns).concat()

    found = with_retries(read, f"{source.describe()}: cells of {part['name']}", task.retries)
    order = np.argsort(found["soma_joinid"].to_numpy(), kind="stable")
    joinids = found["soma_joinid"].to_numpy().astype(np.int64, copy=False)[order]
    if joinids.size != part["planned_rows"]:
        raise LangCellError(f"{source.describe()}: {joinids.size} cells pass the filter in soma_joinid "
                            f"[{part['joinid_min']}, {part['joinid_max']}], the plan has {part['planned_rows']}; "
                            "the store changed since the plan was made, ingest into a new --out")
    if "nnz" not in columns:
        return joinids, np.zeros(joinids.size, np.int64)
    # A missing nnz says nothing about the cell's size: the --chunk-cells cap still holds.
    return joinids, np.maximum(found["nnz"].fill_null(0).to_numpy().astype(np.int64)[order], 0)


class _PartFile:
    """One part's parquet file, written under a temporary name and renamed into place when complete."""

    def __init__(self, out: Path, part: dict[str, Any], schema: pa.Schema):
        self._name, self._final = part["name"], out / part["name"]
        self._files = contextlib.ExitStack()
        tmp = self._files.enter_context(atomic_path(self._final))
        self._writer = self._files.enter_context(pq.ParquetWriter(tmp, schema, **_part_encoding(schema)))
        self._rows = self._empty = 0
        self._done = False

    def write(self, table: pa.Table, cells: int) -> None:
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._rows += table.num_rows
        self._empty += cells - table.num_rows

    def finish_after(self, writing: concurrent.futures.Future) -> dict[str, Any]:
        """Once the last write is done: close, rename into place, and the part's manifest entry."""
        writing.result()
        self._files.close()
        # A closed writer still holds its encoding buffers (~190 MB a part here) until it is freed.
        self._writer = None
        self._done = True
        _crash_point("part_renamed")
        return {"name": self._name, "rows": self._rows, "empty_cells": self._empty,
                "sha256": sha256_file(self._final)}

    def abort(self) -> None:
        """Remove the temporary file of a part that was not finished."""
        if not self._done:
            self._done = True
            self._files.__exit__(LangCellError, LangCellError("ingest stopped"), None)


def _chunk_written(advance: Callable[[int], None], cells: int) -> None:
    _crash_point("chunk_written")
    advance(int(cells))


def _part_encoding(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options of a part; the count columns are most of its bytes and of its CPU.

    Measured on 20,000 cells x 2,500 counts against zstd with plain encoding: gene indices, ascending
    within a cell, as deltas and counts byte-stream-split before zstd level 1 encode in 0.64x the
    CPU, decode in 0.57x and take 0.45x the bytes. Dictionary encoding is kept for the label columns
    only (on the lists it costs a third of the encoding time and saves nothing after zstd), and
    min/max statistics for the scalar columns only (on the lists a third of what is left).
    """
    lists = [field.name for field in schema if pa.types.is_list(field.type)]
    return {"compression": "zstd", "compression_level": 1,
            "use_dictionary": [field.name for field in schema if pa.types.is_string(field.type)],
            "write_statistics": [field.name for field in schema if field.name not in lists],
            "column_encoding": {"gene_index.list.element": "DELTA_BINARY_PACKED",
                                "counts.list.element": "BYTE_STREAM_SPLIT"}}


def _cells_schema(obs_schema: pa.Schema, obs_columns: list[str]) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64())]
    for name in obs_columns:
        fields.append(pa.field(name, _plain_type(obs_schema.field(name).type)))
    fields += [pa.field("n_counts", pa.float64()), pa.field("gene_index", pa.list_(pa.int32())),
               pa.field("counts", pa.list_(pa.float32()))]
    return pa.schema(fields)


def _read_chunk(experiment, X, source: Source, joinids: np.ndarray, obs_columns: list[str], n_genes: int,
                rows: coo_rows.RowBuffers) -> pa.Table:
    """The I/O of one chunk: its obs rows (returned) and the X entries of its cells, appended to
    `rows` batch by batch and checked on the way."""
    obs = experiment.obs.read(coords=(joinids,), column_names=["soma_joinid", *obs_columns]).concat()
    rows.clear()
    for cells, genes, data in _coo_batches(X, joinids):
        valid, largest = rows.append(cells, genes, data)
        if not valid:
            _check_counts(source, data, cells)
        if largest >= n_genes:
            raise LangCellError(f"{source.describe()}: X raw has gene soma_joinid {largest} beyond var; "
                                "the store is corrupt, rebuild it")
    return obs


def _coo_batches(X, joinids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(cells, genes, counts) of X's entries in the rows `joinids`, one TileDB result batch at a time."""
    for batch in X.read(coords=(joinids, slice(None))).tables():
        yield tuple(batch[name].to_numpy() for name in ("soma_dim_0", "soma_dim_1", "soma_data"))


def _build_chunk(source: Source, joinids: np.ndarray, obs: pa.Table, rows: coo_rows.RowBuffers,
                 keep_map: np.ndarray, schema: pa.Schema, obs_columns: list[str]) -> pa.Table:
    """Obs rows and sparse count rows of `joinids` (ascending) as a table in `schema`, empty cells
    dropped. The list columns are views of `rows`' arrays: write the table before `rows` is reused."""
    obs = obs.take(pa.array(np.argsort(obs["soma_joinid"].to_numpy(), kind="stable")))
    obs_joinids = obs["soma_joinid"].to_numpy()
    if obs_joinids.size != joinids.size or not np.array_equal(obs_joinids, joinids):
        duplicate = _first_duplicate(obs_joinids)
        what = f"soma_joinid {duplicate} appears more than once" if duplicate is not None else \
            f"{obs_joinids.size} obs rows for {joinids.size} soma_joinids"
        raise LangCellError(f"{source.describe()}: obs {what}; the store is corrupt, rebuild it")

    whole_rows = rows.whole_rows()
    if whole_rows is not None:
        run_cells, starts, n_counts, indices, values = whole_rows
        row_of = np.minimum(np.searchsorted(joinids, run_cells), joinids.size - 1)
        outside = run_cells[joinids[row_of] != run_cells]
        if outside.size:
            _raise_outside(source, int(outside[0]))
        indptr = np.append(starts, indices.size)
    else:
        indptr, indices, values = _general_rows(source, joinids, rows.entry_cells(), rows.genes, rows.counts,
                                                keep_map.size)
        n_counts = coo_rows.row_sums(indptr, values)
        row_of = np.flatnonzero(indptr[1:] > indptr[:-1])
        indptr, n_counts = np.append(indptr[:-1][row_of], indptr[-1]), n_counts[row_of]
    if not _is_identity(keep_map):
        gene_index = keep_map[indices]
        kept = gene_index >= 0
        # keep_map grows with the var joinid, so each row's kept genes stay ascending.
        indptr = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])[indptr]
        indices, values = gene_index[kept].astype(np.int32), values[kept]
        nonempty = indptr[1:] > indptr[:-1]
        row_of, n_counts = row_of[nonempty], n_counts[nonempty]
        indptr = np.append(indptr[:-1][nonempty], indptr[-1])
    if indptr[-1] > np.iinfo(np.int32).max:
        raise LangCellError(f"{source.describe()}: a chunk holds {indptr[-1]} counts, more than a parquet list "
                            "column takes; lower --chunk-counts")
    offsets = pa.array(indptr.astype(np.int32))
    if row_of.size != joinids.size:
        obs = obs.take(pa.array(row_of))
    columns = [obs["soma_joinid"].cast(pa.int64())]
    columns += [_plain(obs[name]).cast(schema.field(name).type) for name in obs_columns]
    columns += [pa.array(n_counts, pa.float64()),
                pa.ListArray.from_arrays(offsets, pa.array(indices)),
                pa.ListArray.from_arrays(offsets, pa.array(values))]
    return pa.Table.from_arrays(columns, schema=schema)


def _is_identity(keep_map: np.ndarray) -> bool:
    """True when no gene is filtered out (checked per chunk: O(genes), not O(counts))."""
    return bool(keep_map.size == 0 or (keep_map[-1] == keep_map.size - 1
                                       and np.array_equal(keep_map, np.arange(keep_map.size))))


def _general_rows(source: Source, joinids: np.ndarray, cells: np.ndarray, genes: np.ndarray, data: np.ndarray,
                  n_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO entries in any order (runs of a cell interleaving) -> CSR rows over `joinids` by a
    counting sort, O(nnz)."""
    import scipy.sparse as sp

    if data.size == 0:
        return np.zeros(joinids.size + 1, dtype=np.int64), genes, data
    local = _local_rows(joinids, cells)
    if local.min() < 0:
        _raise_outside(source, int(cells[np.argmin(local)]))
    matrix = sp.csr_matrix((data, (local, genes)), shape=(joinids.size, n_genes))
    if matrix.nnz != data.size:
        _raise_duplicate(source, cells, genes)
    return matrix.indptr, matrix.indices, matrix.data


def _local_rows(joinids: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Row of each entry's cell within the chunk (`joinids` ascending); TileDB's C++ hash indexer
    is several times faster than a numpy binary search or lookup table here."""
    import tiledbsoma

    return tiledbsoma.IntIndexer(joinids).get_indexer(cells).astype(np.int32)


def _raise_outside(source: Source, cell: int):
    raise LangCellError(f"{source.describe()}: X raw returned cell soma_joinid {cell}, which is not among the cells "
                        "read; the store is corrupt, rebuild it")


def _raise_duplicate(source: Source, cells: np.ndarray, genes: np.ndarray):
    order = np.lexsort((genes, cells))
    cells, genes = cells[order], genes[order]
    at = int(np.flatnonzero((cells[1:] == cells[:-1]) & (genes[1:] == genes[:-1]))[0])
    raise LangCellError(f"{source.describe()}: X raw holds cell soma_joinid {int(cells[at])} x gene soma_joinid "
                        f"{int(genes[at])} more than once; the store is corrupt, rebuild it")


def _check_counts(source: Source, data: np.ndarray, cells: np.ndarray) -> None:
    """Raise unless every count is a finite non-negative integer."""
    for bad, problem in ((~np.isfinite(data), "NaN or infinite"), (data < 0, "negative"),
                         (data != np.floor(data), "non-integer")):
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise LangCellError(f"{source.describe()}: X raw holds {problem} count {data[at]!r} for cell "
                                f"soma_joinid {int(cells[at])}; X raw must hold raw integer counts, point --uri at "
                                "the raw layer")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _plain_type(arrow_type: pa.DataType) -> pa.DataType:
    """Parquet column type for an obs column: categories become their values, large strings strings."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_large_string(arrow_type):
        return pa.string()
    if pa.types.is_large_binary(arrow_type):
        return pa.binary()
    return arrow_type


def _plain(column):
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column


def _first_duplicate(sorted_values: np.ndarray) -> int | None:
    values = np.sort(sorted_values)
    repeated = np.flatnonzero(values[1:] == values[:-1])
    return int(values[repeated[0]]) if repeated.size else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).removeprefix("SOMAError: ")


_CRASH_COUNTS: dict[str, int] = {}


def _crash_point(event: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec or not spec.startswith(event + ":"):
        return
    _CRASH_COUNTS[event] = _CRASH_COUNTS.get(event, 0) + 1
    if _CRASH_COUNTS[event] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
