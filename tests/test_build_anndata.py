"""A user's .h5ad -> tokens: backed chunks equal in-memory, symbols mapped, filter_pass honoured."""

import anndata
import datasets
import numpy as np
import pandas as pd
import pytest

from langcell.build_sclibrary.anndata_io import tokenize_anndata
from langcell.build_sclibrary.tokenizer import RankValueTokenizer
from langcell.build_sclibrary.vocab import geneformer_v1_vocab
from langcell.cli import main
from tests.build_helpers import pbmc68k_counts


def test_pbmc68k_h5ad_backed_chunks_equal_in_memory_tokens(tmp_path):
    X, symbols, n_counts, labels = pbmc68k_counts()
    obs = pd.DataFrame({"n_counts": n_counts, "cell_type": pd.Categorical(labels)},
                       index=[f"c{i}" for i in range(X.shape[0])])
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=symbols))
    path = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(path)
    tokens, medians = geneformer_v1_vocab()
    tok = RankValueTokenizer(tokens, medians)
    report = {}
    in_memory = tokenize_anndata(adata, tok, report=report)
    mapped = sum(1 for g in _ids(symbols) if g in medians)
    assert report["n_matched"] == mapped and report["n_genes"] == 765 and report["matched_by"] == "symbol"
    assert report["share"] == round(mapped / 765, 4) and report["share"] > 0.9
    expected = tok.tokenize_csr(X, _ids(symbols), n_counts)
    assert in_memory.num_rows == 700
    assert all(np.array_equal(np.asarray(a, np.int32), b) for a, b in zip(in_memory["input_ids"], expected))
    backed = tokenize_anndata(path, tok, out_dir=tmp_path / "ds", chunk_size=64)
    assert backed["input_ids"] == in_memory["input_ids"]
    assert backed["cell_type"] == labels and backed["length"] == [len(t) for t in expected]
    # Written once, as the folder `save_to_disk` would make, and read back by datasets itself.
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded.features == in_memory.features and loaded["input_ids"] == in_memory["input_ids"]
    in_memory.save_to_disk(str(tmp_path / "reference"))
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert not (tmp_path / ".ds.tmp").exists()

    adata.obs["filter_pass"] = (np.arange(700) % 3 != 0).astype(int)
    adata.write_h5ad(path)
    assert main(["tokenize", "--input", str(path), "--out", str(tmp_path / "cli"), "--chunk-size", "100"]) == 0
    filtered = datasets.load_from_disk(str(tmp_path / "cli"))
    assert filtered.num_rows == 466
    assert filtered["cell_index"] == [i for i in range(700) if i % 3 != 0]
    assert filtered["input_ids"] == [in_memory["input_ids"][i] for i in range(700) if i % 3 != 0]


def _ids(symbols):
    import json

    from tests.build_helpers import REF

    mapping = json.loads((REF / "gene_symbol_to_ensembl.json").read_text())
    return [mapping.get(s, "") for s in symbols]


def test_ensembl_ids_with_versions_and_without_n_counts(tmp_path):
    tokens, medians = geneformer_v1_vocab()
    tok = RankValueTokenizer(tokens, medians, max_length=16)
    genes = [g for g in tokens if g.startswith("ENSG")][:30]
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, (12, 31)).astype(np.float32)
    adata = anndata.AnnData(X=counts, var=pd.DataFrame(index=[g + ".7" for g in genes] + ["ENSG99999999999"]))
    ds = tokenize_anndata(adata, tok)
    expected = tok.tokenize_csr(counts, genes + ["ENSG99999999999"])  # totals over all 31 genes
    assert all(np.array_equal(np.asarray(a, np.int32), b) for a, b in zip(ds["input_ids"], expected))
    assert max(ds["length"]) == 16


def test_every_vocabulary_id_form_is_matched():
    """Versioned ids, mouse-style prefixes and Geneformer's ENSGR ids (PAR genes on Y) all match."""
    from langcell.build_sclibrary.user_anndata import match_genes

    tokens, medians = geneformer_v1_vocab()
    par = sorted(g for g in medians if g.startswith("ENSGR"))
    plain = sorted(g for g in medians if g.startswith("ENSG0"))[:20]
    names = par + [f"{g}.7" for g in plain] + ["ENSMUSG00000000001", "not-a-gene"]
    match = match_genes(pd.DataFrame(index=names), medians, "x.h5ad")
    assert len(par) > 0 and match.kind == "ensembl"
    assert match.gene_ids[:len(par) + 20] == par + plain and match.n_matched == len(par) + 20


@pytest.mark.parametrize("totals_dtype", [np.float32, np.float64, np.int64])
def test_obs_n_counts_divide_in_their_stored_dtype(tmp_path, totals_dtype):
    """float32 counts over float32 totals round in float32, as Geneformer's expression does; the
    values are built to tie in exact arithmetic, so float32 and float64 order some cells apart."""
    from scipy import sparse as sp

    from tests.build_helpers import reference_tokens

    rng = np.random.default_rng(5)
    genes = [f"ENSG{i:011d}" for i in range(90)]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}, "<cls>": 92}
    medians = {g: float((1, 3, 7)[i % 3]) for i, g in enumerate(genes)}
    factor = np.array([(1, 3, 7)[i % 3] for i in range(90)])
    counts = (rng.integers(1, 6, (300, 90)) * factor * (rng.random((300, 90)) < 0.5)).astype(np.float32)
    n_counts = (counts.sum(axis=1) + rng.integers(0, 10_000, 300)).astype(totals_dtype)
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"n_counts": n_counts}, index=[f"c{i}" for i in range(300)]),
                    var=pd.DataFrame(index=genes)).write_h5ad(path)
    got = tokenize_anndata(path, RankValueTokenizer(tokens, medians), out_dir=tmp_path / "ds", chunk_size=64)["input_ids"]
    expected = [reference_tokens(genes, counts[i], n_counts[i], tokens, medians, 2048) for i in range(300)]
    assert all(np.array_equal(np.asarray(a, np.int32), b) for a, b in zip(got, expected))
    in_float64 = [reference_tokens(genes, counts[i].astype(np.float64), np.float64(n_counts[i]), tokens, medians, 2048)
                  for i in range(300)]
    changed = sum(not np.array_equal(np.asarray(a, np.int32), b) for a, b in zip(got, in_float64))
    assert (changed > 0) == (totals_dtype == np.float32)


def test_a_bad_chunk_read_ahead_fails_the_run_and_leaves_nothing(tmp_path):
    """Chunks are read and checked on a thread ahead of the tokenizer: a bad one past the rows
    checked on opening still fails the run with its row, and no output folder is left."""
    from scipy import sparse as sp

    from langcell.build_sclibrary.user_anndata import SAMPLE_ROWS
    from langcell.core.errors import LangCellError

    tokens, medians = geneformer_v1_vocab()
    genes = sorted(medians)[:40]
    counts = np.random.default_rng(0).poisson(1.0, (SAMPLE_ROWS + 300, 40)).astype(np.float32)
    counts[SAMPLE_ROWS + 250, 3] = 0.5
    path = tmp_path / "late.h5ad"
    anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=genes)).write_h5ad(path)
    with pytest.raises(LangCellError, match=rf"X has non-integer values \(e.g. 0.5 in row {SAMPLE_ROWS + 250}\)"):
        tokenize_anndata(path, RankValueTokenizer(tokens, medians), out_dir=tmp_path / "ds", chunk_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.h5ad"]


def test_langcell_tokenize_never_imports_datasets(tmp_path):
    """The command writes its folder and never opens it, so it loads no `datasets` (a third of a
    second of every run); the folder still opens with `load_from_disk`, features and all."""
    import subprocess
    import sys

    tokens, medians = geneformer_v1_vocab()
    genes = sorted(medians)[:40]
    counts = np.random.default_rng(1).poisson(1.0, (50, 40)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["a", "b"] * 25)}, index=[f"c{i}" for i in range(50)])
    anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "x.h5ad")
    code = ("import sys; from langcell.cli import main; "
            f"rc = main(['tokenize', '--input', {str(tmp_path / 'x.h5ad')!r}, '--out', {str(tmp_path / 'ds')!r}]); "
            "print(rc, 'datasets' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "50 cells tokenized" in run.stdout and run.stdout.split()[-2:] == ["0", "False"]
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    in_memory = tokenize_anndata(tmp_path / "x.h5ad", RankValueTokenizer(tokens, medians))
    assert loaded.features == in_memory.features and loaded["input_ids"] == in_memory["input_ids"]
    assert loaded["cell_type"] == ["a", "b"] * 25
