"""Tokenize a user's AnnData (`.h5ad` or in memory) into a `datasets.Dataset`.

Reads the file in backed mode, `chunk_size` rows at a time, so memory follows the chunk, not the
file. Genes are matched by Ensembl id (version suffixes dropped) or, when var holds symbols, via
the Geneformer v1 symbol map; a file matching too few genes is refused, since its cells would
be tokenized from a sliver of their expression. X (or `layer`) must hold raw counts: a
non-integer value means log-normalised or scaled data, which rank-value encoding would silently
misrank. Cells are kept where `obs["filter_pass"] == 1` when that column exists (as Geneformer),
otherwise all cells are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from langcell.errors import LangCellError

from build_sclibrary.tokenizer import RankValueTokenizer

log = logging.getLogger(__name__)
SYMBOL_MAP = Path(__file__).parent / "reference" / "geneformer_v1" / "gene_symbol_to_ensembl.json"
_ENSEMBL = re.compile(r"^ENS[A-Z]*\d{6,}(\.\d+)?$")  # ENSG, ENSMUSG, and ENSGR (PAR genes on Y)
GENE_COLUMNS = ("ensembl_id", "feature_id", "gene_ids", "gene_id")


@dataclass
class GeneMatch:
    gene_ids: list[str]
    kind: str  # "ensembl" or "symbol"
    n_matched: int
    n_genes: int

    @property
    def share(self) -> float:
        return self.n_matched / max(1, self.n_genes)


def match_genes(var_names: list[str], tokenizer: RankValueTokenizer, source: str,
                min_gene_match: float = 0.5) -> GeneMatch:
    """Ensembl ids for var (None-like '' where unknown) and the share found in the vocabulary."""
    names = [str(v) for v in var_names]
    ensembl_like = sum(bool(_ENSEMBL.match(n)) for n in names)
    if names and ensembl_like >= len(names) / 2:
        ids = [n.split(".", 1)[0] if _ENSEMBL.match(n) else "" for n in names]
        kind = "ensembl"
    else:
        with open(SYMBOL_MAP) as handle:
            symbols = json.load(handle)
        upper = {k.upper(): v for k, v in symbols.items()}
        ids = [symbols.get(n) or upper.get(n.upper(), "") for n in names]
        kind = "symbol"
    vocab = tokenizer.gene_medians
    matched = sum(1 for g in ids if g in vocab)
    result = GeneMatch(ids, kind, matched, len(names))
    log.info("%s: %d of %d genes (%.1f%%, by %s) are in the vocabulary", source, matched, len(names),
             100 * result.share, kind)
    if result.share < min_gene_match:
        example = ", ".join(names[:3])
        raise LangCellError(f"{source}: only {matched} of {len(names)} genes ({100 * result.share:.1f}%, matched by "
                            f"{kind}; e.g. {example}) are in the gene vocabulary, below {100 * min_gene_match:.0f}%; "
                            "put Ensembl ids or HGNC symbols of the same organism in var (or pass gene_column)")
    return result


def _open(path_or_adata):
    import anndata

    if isinstance(path_or_adata, anndata.AnnData):
        return path_or_adata, "AnnData"
    path = Path(path_or_adata)
    if not path.is_file():
        raise LangCellError(f"{path}: file not found; pass an existing .h5ad file")
    try:
        return anndata.read_h5ad(path, backed="r"), str(path)
    except (OSError, KeyError, ValueError) as exc:
        raise LangCellError(f"{path}: not a readable .h5ad file ({str(exc).splitlines()[0]}); "
                            "pass an AnnData file written by anndata/scanpy") from None


def _rows(adata, layer: str | None, start: int, stop: int):
    matrix = adata.layers[layer] if layer else adata.X
    group = getattr(matrix, "group", None)  # a backed sparse matrix's HDF5 group
    if getattr(matrix, "format", None) == "csr" and group is not None:
        # Three slices read straight from HDF5: half the time of anndata's general slicing.
        indptr = group["indptr"][start:stop + 1]
        lo, hi = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix((group["data"][lo:hi], group["indices"][lo:hi], indptr - lo),
                             shape=(stop - start, matrix.shape[1]))
    block = matrix[start:stop]
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    if not sp.issparse(block):
        block = sp.csr_matrix(np.asarray(block))
    return sp.csr_matrix(block)


def _check_counts(X: sp.csr_matrix, source: str, layer: str | None) -> None:
    data = X.data
    where = f"layers[{layer!r}]" if layer else "X"
    if data.size and np.any(data < 0):
        raise LangCellError(f"{source}: {where} has negative values (scaled data); pass raw counts "
                            "(e.g. adata.raw or a counts layer via layer=)")
    if data.size and not np.array_equal(data, np.round(data)):
        raise LangCellError(f"{source}: {where} has non-integer values (log-normalised or scaled data); "
                            "rank-value tokens need raw counts, pass the counts layer (layer=) or undo the normalisation")


def tokenize_anndata(path_or_adata, tokenizer: RankValueTokenizer, out_dir: str | os.PathLike | None = None,
                     chunk_size: int = 2048, layer: str | None = None, gene_column: str | None = None,
                     obs_columns: list[str] | None = None, min_gene_match: float = 0.5, progress: bool = False,
                     report: dict | None = None):
    """Rank-value tokens of every cell (passing `filter_pass` when present) as a `datasets.Dataset`
    with `input_ids`, `length`, `cell_index` (row in the AnnData) and the obs columns.

    With `out_dir` the dataset is saved there (`load_from_disk` reads it) and returned memory-mapped;
    otherwise it is built in memory. `n_counts` comes from obs when present, else the row sums of
    all genes. Cells with no expressed vocabulary gene get just `<cls>` (length 1). A `report`
    dict receives the gene match (n_genes, n_matched, share, matched_by) and cell counts.
    """
    import datasets
    from tqdm import tqdm

    adata, source = _open(path_or_adata)
    if gene_column is not None and gene_column not in adata.var.columns:
        raise LangCellError(f"{source}: var has no column {gene_column!r}; pass one of "
                            f"{', '.join(map(str, adata.var.columns)) or 'none (use var_names)'}")
    if gene_column is None:
        gene_column = next((c for c in GENE_COLUMNS if c in adata.var.columns), None)
    var_names = list(adata.var[gene_column]) if gene_column else list(adata.var_names)
    if layer is not None and layer not in adata.layers:
        raise LangCellError(f"{source}: no layer {layer!r}; available: {', '.join(adata.layers.keys()) or 'none'}")
    match = match_genes(var_names, tokenizer, source, min_gene_match)
    if report is not None:
        report.update(n_genes=match.n_genes, n_matched=match.n_matched, share=round(match.share, 4),
                      matched_by=match.kind)
    obs = adata.obs
    keep = np.ones(adata.n_obs, dtype=bool)
    if "filter_pass" in obs.columns:
        keep = obs["filter_pass"].to_numpy() == 1
    columns = [c for c in (obs_columns if obs_columns is not None else list(obs.columns))]
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise LangCellError(f"{source}: obs has no column {missing[0]!r}; pass existing obs columns")
    obs_n_counts = obs["n_counts"].to_numpy() if "n_counts" in obs.columns else None
    if report is not None:
        report.update(n_cells=int(adata.n_obs), n_cells_kept=int(keep.sum()),
                      n_counts_from="obs.n_counts" if obs_n_counts is not None else "row sums")

    schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32())), pa.field("length", pa.int64()),
                        pa.field("cell_index", pa.int64())] + [pa.field(str(c), _arrow_type(obs[c])) for c in columns])
    batches = []
    sink = writer = None
    work = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        work = out_dir.parent / f".{out_dir.name}.tmp"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        sink = pa.OSFile(str(work / "cells.arrow"), "wb")
        writer = pa.ipc.new_stream(sink, schema)
    try:
        with tqdm(total=int(keep.sum()), unit="cells", desc="tokenize", disable=not progress) as bar:
            for start in range(0, adata.n_obs, chunk_size):
                stop = min(adata.n_obs, start + chunk_size)
                X = _rows(adata, layer, start, stop)
                _check_counts(X, source, layer)
                rows = np.flatnonzero(keep[start:stop])
                if rows.size == 0:
                    continue
                if rows.size < X.shape[0]:
                    X = X[rows]
                n_counts = obs_n_counts[start:stop][rows] if obs_n_counts is not None else None
                flat, offsets = tokenizer.tokenize_csr_flat(X, match.gene_ids, n_counts)
                ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, pa.int32()))
                arrays = [ids, pa.array(np.diff(offsets)), pa.array(start + rows)]
                arrays += [pa.array(_column_values(obs[c].iloc[start:stop].iloc[rows]), schema.field(str(c)).type)
                           for c in columns]
                batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
                if writer is not None:
                    writer.write_batch(batch)
                else:
                    batches.append(batch)
                bar.update(rows.size)
        if writer is None:
            return datasets.Dataset(pa.Table.from_batches(batches, schema=schema))
        writer.close()
        sink.close()
        dataset = datasets.Dataset.from_file(str(work / "cells.arrow"))
        staged = work / "dataset"
        dataset.save_to_disk(str(staged))
        del dataset
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
        shutil.rmtree(work)
        return datasets.load_from_disk(str(out_dir))
    except BaseException:
        if writer is not None:
            writer.close()
            sink.close()
        if work is not None and work.exists():
            shutil.rmtree(work)
        raise


def _arrow_type(series) -> pa.DataType:
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
        return pa.string()
    if pd.api.types.is_bool_dtype(series.dtype):
        return pa.bool_()
    if pd.api.types.is_integer_dtype(series.dtype):
        return pa.int64()
    if pd.api.types.is_float_dtype(series.dtype):
        return pa.float64()
    return pa.string()


def _column_values(series) -> list:
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
        return [None if pd.isna(v) else str(v) for v in series.tolist()]
    return series.tolist()
