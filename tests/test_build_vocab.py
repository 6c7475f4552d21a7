"""Corpus medians from the mergeable sketch against exact medians, and corpus vocabularies."""

import numpy as np
import scipy.sparse as sp

from langcell.build_sclibrary.build import build_library
from langcell.build_sclibrary.config import BuildConfig, load_build_config
from langcell.build_sclibrary.vocab import MedianSketch, corpus_vocab, select_corpus_genes, sketch_chunk
from langcell.core.files import read_json
from tests.build_helpers import write_ingest


def _cells(rng, n_cells=3000, n_genes=200):
    density = rng.uniform(0.002, 0.5, n_genes)  # genes seen in 6 .. 1500 cells: odd and even counts
    mask = rng.random((n_cells, n_genes)) < density
    counts = np.where(mask, rng.negative_binomial(2, 0.3, (n_cells, n_genes)) + 1, 0).astype(np.float32)
    n_counts = counts.sum(axis=1).astype(np.float64) + rng.integers(100, 5000, n_cells)
    return sp.csr_matrix(counts), n_counts


def test_sketch_medians_within_one_percent_of_exact_and_merge_equals_whole():
    rng = np.random.default_rng(0)
    X, n_counts = _cells(rng)
    gene_map = np.arange(X.shape[1])
    whole = MedianSketch(X.shape[1])
    sketch_chunk(whole, X, n_counts, gene_map)
    left, right = MedianSketch(X.shape[1]), MedianSketch(X.shape[1])
    sketch_chunk(left, X[:1234], n_counts[:1234], gene_map)
    sketch_chunk(right, X[1234:], n_counts[1234:], gene_map)
    left.merge(right)
    assert np.array_equal(left.counts, whole.counts)

    dense = X.toarray()
    normalised = dense / n_counts[:, None] * 10_000
    exact = np.array([np.median(col[col > 0]) for col in normalised.T])
    estimate = whole.medians()
    relative = np.abs(estimate - exact) / exact
    assert relative.max() <= 0.01, relative.max()
    assert relative.max() > 0  # an approximation, not a copy of the exact values
    assert np.array_equal(whole.n_values(), (dense > 0).sum(axis=0))


def test_sketch_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    X, n_counts = _cells(rng, 200, 30)
    sketch = MedianSketch(30, bins_per_decade=64)
    sketch_chunk(sketch, X, n_counts, np.arange(30))
    sketch.save(tmp_path / "s.npz")
    loaded = MedianSketch.load(tmp_path / "s.npz")
    assert loaded.params() == sketch.params()
    assert np.array_equal(loaded.counts, sketch.counts)


def test_corpus_gene_selection_and_vocab_layout():
    gene_ids = ["ENSG3", "ENSG1", "ENSG2", "ENSG4"]
    biotypes = ["protein_coding", "lncRNA", "miRNA", "unknown"]
    selected = select_corpus_genes(gene_ids, biotypes)
    assert selected.tolist() == [0, 2, 3]
    sketch = MedianSketch(3)
    sketch.add(np.array([0, 0, 1]), np.array([1.0, 3.0, 7.0]))  # selected gene 2 (ENSG4) never expressed
    tokens, medians = corpus_vocab(gene_ids, selected, sketch)
    assert list(tokens) == ["<pad>", "<mask>", "ENSG2", "ENSG3", "<cls>"]
    assert list(tokens.values()) == [0, 1, 2, 3, 4]
    assert abs(medians["ENSG3"] - 2.0) / 2.0 < 0.01 and abs(medians["ENSG2"] - 7.0) / 7.0 < 0.01


def test_corpus_vocab_build_on_mouse_ingest(tmp_path):
    write_ingest(tmp_path / "ingest", n_cells=90, n_parts=2, vocab="mouse", empty_vocab_cells=0)
    config = load_build_config(None, {"vocab": "corpus", "shard_size": 40})
    manifest = build_library(tmp_path / "ingest", tmp_path / "lib", config, progress=False)
    tokens = read_json(tmp_path / "lib" / "vocab" / "token_dictionary.json")
    medians = read_json(tmp_path / "lib" / "vocab" / "gene_median_dictionary.json")
    genes = [g for g in tokens if g.startswith("ENSMUSG")]
    assert len(genes) == len(medians) > 100  # biotypes unknown: every expressed gene is kept
    assert tokens["<cls>"] == len(tokens) - 1 and tokens["<pad>"] == 0 and tokens["<mask>"] == 1
    assert manifest["complete"] and manifest["n_cells"] == 90
    assert isinstance(config, BuildConfig)
