"""The vectorised tokenizer equals a plain per-cell Geneformer reference, ties and real cells included."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from langcell.build_sclibrary.tokenizer import RankValueTokenizer
from langcell.build_sclibrary.vocab import geneformer_v1_vocab
from langcell.core.errors import LangCellError
from tests.build_helpers import REF, pbmc68k_counts, reference_tokens


def _synthetic(rng, n_vocab=120):
    genes = [f"ENSG{i:011d}" for i in range(n_vocab)]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    tokens["<cls>"] = len(tokens)
    # Three distinct medians only, and small counts below: most cells have tied values.
    medians = {g: float(rng.choice([0.5, 1.0, 2.0])) for g in genes}
    return genes, tokens, medians


@pytest.mark.parametrize("block_nnz", [1 << 18, 37])
def test_random_cells_with_ties_equal_reference(block_nnz):
    rng = np.random.default_rng(1)
    genes, tokens, medians = _synthetic(rng)
    # Columns: vocab genes shuffled, a duplicated vocab gene, and genes outside the vocabulary.
    gene_ids = list(rng.permutation(genes + [f"OTHER{i}" for i in range(30)])) + [genes[5]]
    n_cells = 400
    X = sp.random(n_cells, len(gene_ids), density=0.25, random_state=2, format="csr",
                  data_rvs=lambda n: rng.integers(1, 4, n)).astype(np.float32)
    X.data[X.indptr[7]:X.indptr[8]] = 0  # a cell without counts
    X.data[::50] = 0  # explicit zeros are no counts
    tok = RankValueTokenizer(tokens, medians, max_length=25)
    tok._block_nnz = block_nnz  # tiny blocks: a block of one row wider than the budget, many blocks
    for n_counts in (None, np.asarray(X.sum(axis=1)).ravel().astype(np.float32) + 7):
        got = tok.tokenize_csr(X, gene_ids, n_counts)
        dense = X.toarray()
        totals = dense.sum(axis=1, dtype=np.float64) if n_counts is None else n_counts
        ties = 0
        for i in range(n_cells):
            expected = reference_tokens(gene_ids, dense[i], totals[i], tokens, medians, 25)
            assert got[i].dtype == np.int32
            assert np.array_equal(got[i], expected), i
            values = dense[i][[c for c, g in enumerate(gene_ids) if g in medians]]
            ties += len(values[values > 0]) - len(np.unique(values[values > 0]))
        assert ties > 1000  # the data really exercises tie breaking
    assert np.array_equal(got[7], [tokens["<cls>"]])
    lengths = [len(t) for t in got]
    assert max(lengths) == 25 and min(lengths) == 1


def test_unsorted_indices_and_csc_input_give_same_tokens():
    rng = np.random.default_rng(3)
    genes, tokens, medians = _synthetic(rng, 60)
    X = sp.random(50, 60, density=0.3, random_state=4, format="csr",
                  data_rvs=lambda n: rng.integers(1, 9, n)).astype(np.float32)
    tok = RankValueTokenizer(tokens, medians)
    expected = tok.tokenize_csr(X, genes)
    shuffled = X.copy()
    for i in range(shuffled.shape[0]):
        lo, hi = shuffled.indptr[i], shuffled.indptr[i + 1]
        perm = rng.permutation(hi - lo) + lo
        shuffled.indices[lo:hi] = shuffled.indices[perm]
        shuffled.data[lo:hi] = shuffled.data[perm]
    shuffled.has_sorted_indices = False
    # The same counts with one entry split in two (a non-canonical CSR): Geneformer sums them.
    split = sp.csr_matrix((np.concatenate([X.data[:1] - 1, [1.0], X.data[1:]]).astype(np.float32),
                           np.concatenate([X.indices[:1], X.indices[:1], X.indices[1:]]),
                           np.concatenate([[0], X.indptr[1:] + 1])), shape=X.shape)
    assert not split.has_canonical_format
    for other in (shuffled, X.tocsc(), X.toarray(), split):
        got = tok.tokenize_csr(other, genes)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("data_dtype,totals_dtype", [
    (np.float32, np.float32), (np.float32, np.float64), (np.float64, np.float32), (np.int32, np.float32),
    (np.int64, np.int64), (np.uint16, np.float32)])
def test_arithmetic_rounds_in_numpys_dtypes(data_dtype, totals_dtype):
    """Medians 1, 3 and 7 with counts that are multiples of them make values equal in exact
    arithmetic, so their order (or tie) is decided by rounding: float32 and float64 differ."""
    rng = np.random.default_rng(5)
    genes = [f"ENSG{i:011d}" for i in range(90)]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}, "<cls>": 92}
    medians = {g: float((1, 3, 7)[i % 3]) for i, g in enumerate(genes)}
    factor = np.array([(1, 3, 7)[i % 3] for i in range(90)])
    counts = rng.integers(1, 6, (300, 90)) * factor * (rng.random((300, 90)) < 0.5)
    X = sp.csr_matrix(counts.astype(data_dtype))
    n_counts = (counts.sum(axis=1) + rng.integers(0, 10_000, 300)).astype(totals_dtype)
    tok = RankValueTokenizer(tokens, medians)
    got = tok.tokenize_csr(X, genes, n_counts)
    dense = X.toarray()
    for i in range(300):
        assert np.array_equal(got[i], reference_tokens(genes, dense[i], n_counts[i], tokens, medians, 2048)), i
    # The case is sensitive: computing in the other precision changes some cells' order.
    promoted = (X.data[:1] / n_counts[:1]).dtype
    other = np.float64 if promoted != np.float64 else np.float32
    changed = sum(not np.array_equal(got[i], reference_tokens(genes, dense[i].astype(other), other(n_counts[i]),
                                                                tokens, medians, 2048)) for i in range(300))
    assert changed > 0


@pytest.mark.parametrize("max_length", [2048, 40])
def test_order_is_exact_where_float32_cannot_tell_values_apart(max_length):
    """The sort keys are the values rounded to float32: values a few float64 ulps apart, beyond
    float32's range (inf) or below it (0) share a key, and only the exact order may decide;
    a short max_length cuts rows inside such runs."""
    rng = np.random.default_rng(11)
    genes = [f"ENSG{i:011d}" for i in range(300)]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}, "<cls>": 302}
    scale = rng.choice([1.0, 3.0, 1e-60, 1e60, 1e-300, 1e300], 300)
    medians = {g: float(scale[i] * (1 + (i % 5) * 2.0 ** -52)) for i, g in enumerate(genes)}
    counts = rng.integers(1, 4, (200, 300)) * (rng.random((200, 300)) < 0.6)
    X = sp.csr_matrix(counts.astype(np.float64))
    n_counts = counts.sum(axis=1).astype(np.float64)
    tok = RankValueTokenizer(tokens, medians, max_length=max_length)
    got = tok.tokenize_csr(X, genes, n_counts)
    for i in range(200):
        assert np.array_equal(got[i], reference_tokens(genes, counts[i].astype(np.float64), n_counts[i], tokens,
                                                       medians, max_length)), i
    values = counts[0] / n_counts[0] * 10_000 / np.array(list(medians.values()))
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, as the keys do
        shared = values[values > 0].astype(np.float32)
    assert len(np.unique(shared)) < len(np.unique(values[values > 0])) - 50  # many keys shared

def test_pbmc68k_real_cells_equal_reference():
    X, symbols, n_counts, _ = pbmc68k_counts()
    symbol_map = json.loads((REF / "gene_symbol_to_ensembl.json").read_text())
    gene_ids = [symbol_map.get(s, s) for s in symbols]
    tokens, medians = geneformer_v1_vocab()
    tok = RankValueTokenizer(tokens, medians)
    got = tok.tokenize_csr(X, gene_ids, n_counts)
    dense = X.toarray()
    assert len(got) == 700
    for i in range(700):
        assert np.array_equal(got[i], reference_tokens(gene_ids, dense[i], n_counts[i], tokens, medians, 2048)), i
    lengths = np.array([len(t) for t in got])
    assert lengths.min() > 50 and lengths.max() <= 2048
    assert all(t[0] == 25426 for t in got)


def test_vocab_medians_mismatch_and_missing_cls_are_refused():
    tokens, medians = geneformer_v1_vocab()
    broken = dict(medians)
    broken.pop("ENSG00000000003")
    with pytest.raises(LangCellError, match="vocab/medians mismatch"):
        RankValueTokenizer(tokens, broken)
    no_cls = {k: v for k, v in tokens.items() if k != "<cls>"}
    with pytest.raises(LangCellError, match="<cls>"):
        RankValueTokenizer(no_cls, medians)
    tok = RankValueTokenizer(tokens, medians)
    assert tok.tokenize_csr(sp.csr_matrix((0, 2)), ["ENSG00000000003", "x"]) == []
    # Counts on genes none of which is in the vocabulary: every cell is just <cls>.
    no_vocab = tok.tokenize_csr(sp.csr_matrix(np.ones((3, 2), np.float32)), ["x", "y"])
    assert [t.tolist() for t in no_vocab] == [[tokens["<cls>"]]] * 3
    with pytest.raises(LangCellError, match="gene ids"):
        tok.tokenize_csr(sp.csr_matrix((2, 3)), ["a", "b"])


def test_threads_give_the_same_tokens():
    X, symbols, n_counts, _ = pbmc68k_counts()
    symbol_map = json.loads((REF / "gene_symbol_to_ensembl.json").read_text())
    gene_ids = [symbol_map.get(s, s) for s in symbols]
    tokens, medians = geneformer_v1_vocab()
    results = []
    for threads in (1, 3):
        tok = RankValueTokenizer(tokens, medians, max_length=300, threads=threads)
        tok._block_nnz = 5_000  # dozens of blocks, so the threads share them
        results.append(tok.tokenize_csr_flat(X, gene_ids, n_counts))
    (flat1, offsets1), (flat3, offsets3) = results
    assert np.array_equal(offsets1, offsets3) and np.array_equal(flat1, flat3)
    assert offsets1[-1] > 700 * 50
