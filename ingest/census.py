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

Where the code is
-----------------
This module: the entry point and reading a chunk (TileDB's X batches into sparse rows, checked,
and the chunk's table); `census_store`: opening and checking the store, the filtered cells and
genes; `census_manifest`: the plan, manifests, resuming, shard locks and merge; `census_parts`:
chunking parts and writing their parquet files; `census_pool`: running parts in this process or
on worker processes.

Cells with no counts in the kept genes are skipped (the count is in the manifest's
`skipped_empty_cells` and per part `empty_cells`). `joinid_min`/`joinid_max` are the planned
range of the part, which holds the part's cells even when its first or last cell was skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_write_bytes, atomic_write_json, output_lock
from langcell.ingest import coo_rows
from langcell.ingest.census_manifest import (FORMAT, _check_folder_identity, _finish, _make_plan,
                                             _remove_stale_temporaries, _shard_lock, _shard_manifest_name,
                                             _start_manifest)
from langcell.ingest.census_parts import _PartTask
from langcell.ingest.census_pool import _run_parts
from langcell.ingest.census_store import (ORGANISMS, Source, _census_summary, _check_schema, _experiment,
                                          _first_duplicate, _genes, _genes_parquet, _open_source, _plain,
                                          _plan_joinids)
# This module stays the ingest's one import point: the command, tests and benchmarks reach the
# parts of the other census_* modules through it.
from langcell.ingest.census_manifest import merge_shards, parse_shard  # noqa: F401
from langcell.ingest.census_parts import (CRASH_ENV, _cells_schema, _part_encoding, _PartFile,  # noqa: F401
                                          chunk_bounds)
from langcell.ingest.census_store import READ_CONFIG, REQUIRED_OBS, _open_handle  # noqa: F401
from langcell.ingest.retry import DEFAULT_RETRIES

DEFAULT_OBS_FILTER = "is_primary_data == True"

DEFAULT_CHUNK_CELLS = 20_000

# 20,000 cells of 2,500 genes, the chunk whose memory BENCHMARKS.md measures; about 16 bytes a
# count per chunk in flight (TileDB's results appended to int32 genes and float32 counts, the
# copy into rows where the tiling needs it, the parquet encoding).
DEFAULT_CHUNK_COUNTS = 50_000_000

DEFAULT_CELLS_PER_PART = 100_000



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
        task = _PartTask(read_chunk=_read_chunk, build_chunk=_build_chunk, source=source, organism=organism,
                         obs_filter=obs_filter, keep_map=keep_map, obs_columns=obs_columns, chunk_cells=chunk_cells, chunk_counts=chunk_counts,
                         retries=retries, out=str(out))
        _run_parts(task, pending, manifest, manifest_path, workers, progress)
        _finish(manifest)
        atomic_write_json(manifest_path, manifest)
        return manifest



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
