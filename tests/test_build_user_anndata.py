"""A user's AnnData reads the same whatever its layout, and every chunk is checked, not just the first."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from langcell.build_sclibrary.user_anndata import SAMPLE_ROWS, open_user_anndata
from langcell.eval import synthetic
from langcell.core.errors import LangCellError

VOCAB = {g: 1.0 for g in synthetic.gene_ids(20)}


def _counts(n_cells=30, seed=0):
    return sp.csr_matrix(np.random.default_rng(seed).poisson(1.0, (n_cells, 24)).astype(np.float32))


def _var():
    # 20 vocabulary genes with versions, 4 unknown ones; symbols in a column anndata users often have.
    return pd.DataFrame({"feature_name": [f"S{i}" for i in range(24)]},
                        index=[f"{g}.3" for g in synthetic.gene_ids(20)] + [f"ENSG9{i:010d}" for i in range(4)])


@pytest.mark.parametrize("layout", ["csr", "csc", "dense", "counts layer", "in memory"])
def test_every_layout_gives_the_same_rows_and_genes(tmp_path, layout):
    counts = _counts()
    X = {"csr": counts, "csc": sp.csc_matrix(counts), "dense": counts.toarray()}.get(layout, counts)
    adata = anndata.AnnData(X=X, var=_var(), obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]))
    if layout == "counts layer":
        adata.layers["counts"] = counts
        adata.X = sp.csr_matrix(np.log1p(counts.toarray()))  # what scanpy users leave in X
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    with open_user_anndata(adata if layout == "in memory" else path, VOCAB) as user:
        assert user.counts_from == ("layers['counts']" if layout == "counts layer" else "X")
        assert (user.genes.n_matched, user.genes.n_genes, user.genes.kind) == (20, 24, "ensembl")
        assert user.genes.gene_ids[:20] == synthetic.gene_ids(20) and user.genes.share == pytest.approx(20 / 24)
        got = sp.vstack([user.rows(0, 7), user.rows(7, 30)])
        assert (got != counts).nnz == 0 and user.n_obs == 30 and user.n_counts is None


def test_symbols_in_a_var_column_are_matched_when_var_names_are_not_genes():
    symbols = ["CD3E", "MS4A1", "NKG7", "LYZ"]
    adata = anndata.AnnData(X=_counts(n_cells=3)[:, :4], var=pd.DataFrame({"gene_symbols": symbols},
                                                                          index=["a", "b", "c", "d"]))
    from langcell.build_sclibrary.vocab import geneformer_v1_vocab

    _, medians = geneformer_v1_vocab()
    with open_user_anndata(adata, medians) as user:
        assert user.genes.column == "var['gene_symbols']" and user.genes.kind == "symbol"
        assert user.genes.n_matched == 4 and all(g.startswith("ENSG") for g in user.genes.gene_ids)


def test_a_bad_value_after_the_sampled_rows_fails_its_chunk_naming_the_cell(tmp_path):
    counts = _counts(n_cells=SAMPLE_ROWS + 50).tolil()
    counts[SAMPLE_ROWS + 7, 2] = 0.5
    adata = anndata.AnnData(X=counts.tocsr(), var=_var())
    adata.write_h5ad(tmp_path / "late.h5ad")
    with open_user_anndata(tmp_path / "late.h5ad", VOCAB) as user:
        user.rows(0, SAMPLE_ROWS)
        expected = rf"late.h5ad: X has non-integer values \(e.g. 0.5 in row {SAMPLE_ROWS + 7}\)"
        with pytest.raises(LangCellError, match=expected):
            user.rows(SAMPLE_ROWS, SAMPLE_ROWS + 50)


def test_the_file_is_closed_when_a_check_fails(tmp_path):
    import h5py

    adata = anndata.AnnData(X=_counts(), var=pd.DataFrame(index=[f"x{i}" for i in range(24)]))
    path = tmp_path / "unknown.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(LangCellError, match="only 0 of 24 genes") as info:
        open_user_anndata(path, VOCAB)
    # The traceback, kept alive here, still references the reader: only an explicit close frees the file.
    assert info.traceback and len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)) == 0


_FLOAT_VALUES = [(0.0, None), (-0.0, None), (7.0, None), (3e6, None), (2.0 ** 60, None), (0.5, "non-integer"),
                 (1e-30, "non-integer"), (-1.0, "negative"), (np.nan, "NaN or infinite"),
                 (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite")]


@pytest.mark.parametrize("dtype, value, problem", [(d, v, p) for d in (np.float32, np.float64) for v, p in _FLOAT_VALUES]
                         + [(np.int64, 7, None), (np.int64, -1, "negative"), (np.uint16, 7, None)])
def test_count_check_accepts_whole_numbers_only(dtype, value, problem):
    """The one-pass compiled check and the located error agree on every kind of value."""
    from langcell.build_sclibrary import rank_kernels
    from langcell.build_sclibrary.user_anndata import check_counts

    data = np.array([1, 2, value, 4]).astype(dtype)
    if data.dtype.kind == "f":
        assert rank_kernels.counts_ok(data) == (problem is None)
    X = sp.csr_matrix((data, [0, 1, 2, 3], [0, 2, 4]), shape=(2, 4))
    if problem is None:
        check_counts(X, "x.h5ad", "X", first_row=10)
    else:
        with pytest.raises(LangCellError, match=rf"x.h5ad: X has {problem} values \(e.g. .* in row 11\)"):
            check_counts(X, "x.h5ad", "X", first_row=10)
