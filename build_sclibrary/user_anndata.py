"""A user's AnnData (an `.h5ad` path or an `AnnData` object), opened and checked in one place.

`langcell tokenize`, `langcell annotate` and `langcell eval` on an `.h5ad` read users' files only
through `open_user_anndata`, so each check exists once and every command answers the same bad
file with the same one-line error. Checked here:
- the path: exists, is a file, is not empty, is HDF5 that anndata can read;
- shape: at least one cell and one gene;
- genes: the var column (var_names or an Ensembl-id / symbol column) matching the vocabulary best,
  Ensembl versions dropped, symbols mapped with Geneformer v1's table; too small a share is
  refused, since tokens would describe a sliver of each cell; a vocabulary gene listed twice is
  refused, since only one of its columns could be ranked;
- counts: `layers['counts']` when present (or the layer asked for), else X; sparse (CSR or CSC)
  or dense; every value finite, >= 0 and an integer, since rank-value tokens of log-normalised or
  scaled data are silently wrong. The first rows are checked on opening, so a bad file fails
  before any work; every chunk read later is checked too.

A file stays on disk: obs and var are read, the counts `rows(start, stop)` at a time.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from langcell.build_sclibrary import rank_kernels
from langcell.core.errors import LangCellError

log = logging.getLogger(__name__)
SYMBOL_MAP = Path(__file__).parent / "reference" / "geneformer_v1" / "gene_symbol_to_ensembl.json"
_ENSEMBL = re.compile(r"^ENS[A-Z]*\d{6,}(\.\d+)?$")  # ENSG, ENSMUSG, and ENSGR (PAR genes on Y)
GENE_ID_COLUMNS = ("ensembl_id", "feature_id", "gene_ids", "gene_id", "ensembl_ids", "gene_ensembl_id")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name")
# Rows checked on opening: enough to catch a log-normalised file at once, cheap on any file.
SAMPLE_ROWS = 1000


@dataclass
class GeneMatch:
    gene_ids: list[str]  # Ensembl id per var row, "" where none is known
    column: str          # "var_names" or "var['<column>']"
    kind: str            # "ensembl" or "symbol"
    n_matched: int
    n_genes: int

    @property
    def share(self) -> float:
        return self.n_matched / max(1, self.n_genes)


def _to_ensembl(names: list[str], symbols: dict[str, str], upper: dict[str, str]) -> tuple[list[str], str]:
    if sum(bool(_ENSEMBL.match(n)) for n in names) >= len(names) / 2:
        return [n.split(".", 1)[0] if _ENSEMBL.match(n) else "" for n in names], "ensembl"
    return [symbols.get(n) or upper.get(n.upper(), "") for n in names], "symbol"


def match_genes(var, vocabulary, source: str, min_share: float = 0.0, gene_column: str | None = None) -> GeneMatch:
    """The var column whose genes best match `vocabulary` (anything supporting `in`), as Ensembl ids.

    With `gene_column` only that column is tried. Refuses a share below `min_share` and a
    vocabulary gene on two rows.
    """
    if gene_column is not None:
        if gene_column not in var.columns:
            raise LangCellError(f"{source}: var has no column {gene_column!r}; pass one of "
                                f"{', '.join(map(str, var.columns)) or 'none (leave --gene-column out)'}")
        columns = [gene_column]
    else:
        columns = [None] + [c for c in (*GENE_ID_COLUMNS, *SYMBOL_COLUMNS) if c in var.columns]
    symbols = json.loads(SYMBOL_MAP.read_text())
    upper = {k.upper(): v for k, v in symbols.items()}
    best = None
    for col in columns:
        names = [str(v) for v in (var.index if col is None else var[col])]
        ids, kind = _to_ensembl(names, symbols, upper)
        match = GeneMatch(ids, "var_names" if col is None else f"var[{col!r}]", kind,
                          sum(1 for g in ids if g in vocabulary), len(names))
        if best is None or match.n_matched > best.n_matched:
            best = match
    log.info("%s: %d of %d genes (%.1f%%, %s as %s) are in the vocabulary", source, best.n_matched,
             best.n_genes, 100 * best.share, best.column, best.kind)
    if best.share < min_share:
        example = ", ".join(str(v) for v in var.index[:3])
        raise LangCellError(f"{source}: only {best.n_matched} of {best.n_genes} genes ({100 * best.share:.1f}%, "
                            f"best match {best.column} as {best.kind}; e.g. {example}) are in the model's gene "
                            f"vocabulary, below {100 * min_share:.0f}%; put Ensembl ids or HGNC symbols of the "
                            "same organism in var_names or var['feature_id']")
    seen: dict[str, int] = {}
    for row, gene in enumerate(best.gene_ids):
        if gene in vocabulary:
            if gene in seen:
                raise LangCellError(f"{source}: gene {gene} is on two rows of {best.column} ({seen[gene]} and {row}); "
                                    "keep one row per gene, e.g. adata[:, ~adata.var_names.duplicated()]")
            seen[gene] = row
    return best


def check_counts(X: sp.csr_matrix, source: str, where: str, first_row: int = 0) -> None:
    """Refuse values raw counts cannot have, naming the first offending cell."""
    data = X.data
    if not data.size or (data.dtype in (np.float32, np.float64) and rank_kernels.counts_ok(data)):
        return
    for bad, what in ((~np.isfinite(data), "NaN or infinite values"), (data < 0, "negative values"),
                      (data != np.round(data), "non-integer values")):
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            row = first_row + int(np.searchsorted(X.indptr, at, side="right")) - 1
            raise LangCellError(f"{source}: {where} has {what} (e.g. {data[at]:g} in row {row}), so it does not "
                                "hold raw counts (log-normalised or scaled?); put the raw counts in X or "
                                "layers['counts']")


def check_path(path: Path) -> None:
    import h5py

    if not path.exists():
        raise LangCellError(f"{path}: file not found; pass an existing .h5ad file")
    if path.is_dir():
        raise LangCellError(f"{path}: is a folder, not a file; pass an .h5ad file")
    if path.stat().st_size == 0:
        raise LangCellError(f"{path}: file is empty (0 bytes); pass an AnnData file written by anndata/scanpy")
    if not h5py.is_hdf5(path):
        raise LangCellError(f"{path}: not an HDF5 file, so not an .h5ad; pass an AnnData file written by "
                            "anndata/scanpy (write_h5ad)")


class UserAnnData:
    """A checked AnnData: `genes` (Ensembl id per var row), `rows()` of raw counts, `obs`, `n_counts`."""

    def __init__(self, obs, var, matrix, source: str, counts_key: str | None, h5=None):
        self.obs = obs
        self.var = var
        self.source = source
        self.counts_key = counts_key
        self.counts_from = f"layers[{counts_key!r}]" if counts_key else "X"
        self.genes: GeneMatch | None = None
        self._h5 = h5
        if getattr(matrix, "format", None) == "csc" and hasattr(matrix, "group"):
            # Rows of a stored CSC matrix cut across every column: anndata reads it whole per
            # slice, so read it once.
            log.info("%s: %s is stored as CSC, read whole into memory; store CSR to read it in chunks",
                        source, self.counts_from)
            matrix = sp.csr_matrix(matrix.to_memory())
        self._matrix = matrix

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_counts(self) -> np.ndarray | None:
        """obs['n_counts'] when present (totals over all genes of the original data), else None.

        A float column keeps its dtype: Geneformer divides the counts by it as stored, so float32
        counts over float32 totals round in float32, and the tokens follow that rounding."""
        if "n_counts" not in self.obs.columns:
            return None
        totals = self.obs["n_counts"].to_numpy()
        return totals if totals.dtype.kind == "f" else totals.astype(np.float64)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of cells start..stop as CSR, checked."""
        matrix = self._matrix
        group = getattr(matrix, "group", None)  # a backed sparse matrix's HDF5 group
        if getattr(matrix, "format", None) == "csr" and group is not None:
            # Three slices read straight from HDF5: half the time of anndata's general slicing.
            indptr = group["indptr"][start:stop + 1]
            lo, hi = int(indptr[0]), int(indptr[-1])
            block = sp.csr_matrix((group["data"][lo:hi], group["indices"][lo:hi], indptr - lo),
                                  shape=(stop - start, matrix.shape[1]))
        else:
            block = matrix[start:stop]
            block = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        check_counts(block, self.source, self.counts_from, start)
        return block

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()

    def __enter__(self) -> "UserAnnData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_h5ad(path: Path, source: str, layer: str | None) -> UserAnnData:
    """obs, var and the counts matrix of an .h5ad, the matrix left on disk.

    Read with h5py rather than anndata's backed mode, which loads every layer into memory.
    """
    import h5py
    from anndata.io import read_elem, sparse_dataset

    # No chunk cache: rows are read once, in order, so caching a chunk only added a copy of every
    # chunk (anndata writes chunked datasets) from the cache into the result: a third of the read.
    h5 = h5py.File(path, "r", rdcc_nbytes=0)
    try:
        layers = list(h5["layers"].keys()) if "layers" in h5 else []
        key = _counts_key(layers, layer, source)
        node = h5[f"layers/{key}"] if key else h5.get("X")
        if node is None:
            raise LangCellError(f"{source}: X is empty and there is no layers['counts']; put raw counts in X "
                                "or layers['counts']")
        try:
            obs, var = read_elem(h5["obs"]), read_elem(h5["var"])
            matrix = sparse_dataset(node) if isinstance(node, h5py.Group) else node
        except LangCellError:
            raise
        except Exception as exc:  # anndata raises many types for a damaged or foreign HDF5 layout
            raise LangCellError(f"{source}: not a readable .h5ad file ({type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0]}); pass an AnnData file written by "
                                "anndata/scanpy") from None
        return UserAnnData(obs, var, matrix, source, key, h5)
    except BaseException:
        h5.close()
        raise


def _counts_key(layers, layer: str | None, source: str) -> str | None:
    if layer is not None and layer not in layers:
        raise LangCellError(f"{source}: no layer {layer!r}; available: {', '.join(layers) or 'none'} "
                            "(leave the layer out to read layers['counts'] or X)")
    return layer if layer is not None else ("counts" if "counts" in layers else None)


def open_user_anndata(path_or_adata, vocabulary, *, layer: str | None = None, gene_column: str | None = None,
                      min_gene_match: float = 0.25) -> UserAnnData:
    """Open and check a user's AnnData; every problem is a one-line LangCellError.

    `vocabulary` holds the model's gene ids (a token dictionary or medians dict). `layer` names
    the layer with raw counts; by default layers['counts'] when present, else X. A path is read
    lazily (close the result, or use it in a `with`); an AnnData object is read as it is.
    """
    import anndata

    if isinstance(path_or_adata, anndata.AnnData) and path_or_adata.isbacked:
        # A backed AnnData's counts are its file's: read them as a path's are, by rows.
        path_or_adata = path_or_adata.filename
    if isinstance(path_or_adata, anndata.AnnData):
        adata, source = path_or_adata, "AnnData"
        key = _counts_key(list(adata.layers.keys()), layer, source)
        matrix = adata.layers[key] if key else adata.X
        if matrix is None:
            raise LangCellError(f"{source}: X is empty and there is no layers['counts']; put raw counts in X "
                                "or layers['counts']")
        user = UserAnnData(adata.obs, adata.var, matrix, source, key)
    else:
        check_path(Path(path_or_adata))
        user = _read_h5ad(Path(path_or_adata), str(path_or_adata), layer)
    try:
        _check(user, vocabulary, gene_column, min_gene_match)
    except BaseException:
        user.close()
        raise
    return user


def _check(user: UserAnnData, vocabulary, gene_column, min_gene_match) -> None:
    source = user.source
    if user.n_obs == 0:
        raise LangCellError(f"{source}: no cells (obs has 0 rows); pass a file with at least one cell")
    if len(user.var) == 0:
        raise LangCellError(f"{source}: no genes (var has 0 rows); pass a file with the genes' counts")
    if tuple(user._matrix.shape) != (user.n_obs, len(user.var)):
        raise LangCellError(f"{source}: {user.counts_from} is {user._matrix.shape[0]} x {user._matrix.shape[1]} "
                            f"but obs and var give {user.n_obs} x {len(user.var)}; write the file with anndata")
    user.genes = match_genes(user.var, vocabulary, source, min_gene_match, gene_column)
    user.rows(0, min(user.n_obs, SAMPLE_ROWS))
