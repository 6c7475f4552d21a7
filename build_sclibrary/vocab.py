"""Gene vocabulary and non-zero medians: Geneformer v1's, or computed from the ingested corpus.

Corpus medians come from one streaming pass with a mergeable sketch: per gene, a histogram of
log10(normalised expression) with `bins_per_decade` bins. Two sketches merge by adding counts, so
parts, workers and machines can each sketch their cells and the sums give the corpus medians.
An order statistic is read as the geometric centre of its bin, so its relative error is at most
10**(0.5 / bins_per_decade) - 1 (0.45 % at the default 128); the median of an even count is the
mean of the two middle estimates, within the same bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file

from langcell.build_sclibrary.tokenizer import CLS, MASK, PAD, TARGET_SUM

REFERENCE_DIR = Path(__file__).parent / "reference" / "geneformer_v1"
CODING_BIOTYPES = frozenset({"protein_coding", "miRNA"})
UNKNOWN_BIOTYPES = frozenset({"", "unknown", "none", "nan", "na"})


class MedianSketch:
    """Mergeable per-gene log-spaced histogram of non-zero normalised expression values."""

    def __init__(self, n_genes: int, bins_per_decade: int = 128, low: float = 1e-3, high: float = 1e5):
        self.n_genes = int(n_genes)
        self.bins_per_decade = int(bins_per_decade)
        self.low, self.high = float(low), float(high)
        self.n_bins = int(np.ceil(np.log10(self.high / self.low) * self.bins_per_decade))
        self.counts = np.zeros(self.n_genes * self.n_bins, dtype=np.int64)

    def params(self) -> dict:
        return {"n_genes": self.n_genes, "bins_per_decade": self.bins_per_decade, "low": self.low, "high": self.high}

    def add(self, genes: np.ndarray, values: np.ndarray) -> None:
        """Count `values` (> 0) of genes `genes` (indices 0..n_genes-1)."""
        if genes.size == 0:
            return
        b = np.floor((np.log10(values) - np.log10(self.low)) * self.bins_per_decade).astype(np.int64)
        np.clip(b, 0, self.n_bins - 1, out=b)
        np.add.at(self.counts, genes.astype(np.int64) * self.n_bins + b, 1)

    def merge(self, other: "MedianSketch") -> None:
        if other.params() != self.params():
            raise LangCellError(f"median sketch: cannot merge sketches with different parameters "
                                f"({other.params()} vs {self.params()}); rebuild with one configuration")
        self.counts += other.counts

    def save(self, path: str | os.PathLike) -> None:
        nonzero = np.flatnonzero(self.counts)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, index=nonzero, count=self.counts[nonzero],
                         params=np.array(json.dumps(self.params())))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MedianSketch":
        with np.load(path) as data:
            sketch = cls(**json.loads(str(data["params"])))
            sketch.counts[data["index"]] = data["count"]
        return sketch

    def n_values(self) -> np.ndarray:
        return self.counts.reshape(self.n_genes, self.n_bins).sum(axis=1)

    def medians(self) -> np.ndarray:
        """Per gene the estimated non-zero median; NaN for genes never seen."""
        table = self.counts.reshape(self.n_genes, self.n_bins)
        cumulative = np.cumsum(table, axis=1)
        total = cumulative[:, -1]
        centres = self.low * 10.0 ** ((np.arange(self.n_bins) + 0.5) / self.bins_per_decade)
        seen = total > 0
        low_k = np.where(seen, (total - 1) // 2, 0)
        high_k = np.where(seen, total // 2, 0)
        low_bin = _bin_of_rank(cumulative, low_k)
        high_bin = _bin_of_rank(cumulative, high_k)
        median = (centres[low_bin] + centres[high_bin]) / 2.0
        median[~seen] = np.nan
        return median


def _bin_of_rank(cumulative: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per row, the first bin whose cumulative count exceeds k (0-based rank)."""
    # Genes never seen have no such bin; clip them to a valid index (their median becomes NaN).
    return np.minimum((cumulative <= k[:, None]).sum(axis=1), cumulative.shape[1] - 1)


def sketch_chunk(sketch: MedianSketch, X, n_counts: np.ndarray, gene_map: np.ndarray) -> None:
    """Add one CSR chunk of raw counts: values counts / n_counts * 10,000 of the mapped genes."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    genes = gene_map[X.indices]
    keep = (genes >= 0) & (X.data > 0)
    values = X.data[keep] / n_counts[rows[keep]] * TARGET_SUM
    sketch.add(genes[keep], values)


def select_corpus_genes(gene_ids: list[str], biotypes: list[str]) -> np.ndarray:
    """Indices of the genes eligible for a corpus vocabulary (protein-coding and miRNA where known)."""
    keep = [i for i, (gene, biotype) in enumerate(zip(gene_ids, biotypes))
            if gene and (biotype in CODING_BIOTYPES or biotype.strip().lower() in UNKNOWN_BIOTYPES)]
    return np.asarray(keep, dtype=np.int64)


def corpus_vocab(gene_ids: list[str], selected: np.ndarray, sketch: MedianSketch) -> tuple[dict, dict]:
    """Token dictionary and medians of the selected genes that the corpus expresses at least once."""
    medians = sketch.medians()
    expressed = [(gene_ids[int(g)], float(medians[i])) for i, g in enumerate(selected) if np.isfinite(medians[i])]
    if not expressed:
        raise LangCellError("corpus vocab: no selected gene is expressed in any cell; check the ingest's counts")
    expressed.sort()
    tokens = {PAD: 0, MASK: 1}
    for gene, _ in expressed:
        tokens.setdefault(gene, len(tokens))
    tokens[CLS] = len(tokens)
    return tokens, {gene: median for gene, median in expressed}


def geneformer_v1_vocab() -> tuple[dict, dict]:
    with open(REFERENCE_DIR / "token_dictionary.json") as handle:
        tokens = json.load(handle)
    with open(REFERENCE_DIR / "gene_median_dictionary.json") as handle:
        medians = json.load(handle)
    tokens[CLS] = max(tokens.values()) + 1
    return tokens, medians


def write_vocab(vocab_dir: str | os.PathLike, tokens: dict, medians: dict) -> dict:
    """Write both files atomically; return their sha256 (the vocab hash the manifest records)."""
    vocab_dir = Path(vocab_dir)
    atomic_write_json(vocab_dir / "gene_median_dictionary.json", medians)
    # Token order matters to readers that iterate it; keep insertion (= token id) order.
    with atomic_path(vocab_dir / "token_dictionary.json") as tmp:
        tmp.write_text(json.dumps(tokens, indent=0) + "\n")
    return vocab_hashes(vocab_dir)


def vocab_hashes(vocab_dir: str | os.PathLike) -> dict:
    vocab_dir = Path(vocab_dir)
    return {name: sha256_file(vocab_dir / name) for name in ("token_dictionary.json", "gene_median_dictionary.json")}


def copy_reference_extras(vocab_dir: str | os.PathLike) -> None:
    """The symbol map and provenance README travel with a geneformer-v1 vocab (eval maps symbols)."""
    for name in ("gene_symbol_to_ensembl.json", "README.md"):
        atomic_write_bytes(Path(vocab_dir) / name, (REFERENCE_DIR / name).read_bytes())
