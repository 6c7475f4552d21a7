"""Geneformer's rank-value encoding over a sparse chunk of cells (compiled loops in `rank_kernels`).

Per cell (Geneformer / LangCell): keep the vocabulary genes; divide raw counts by the cell's
total over ALL genes and multiply by 10,000; divide each gene by its non-zero median over the
corpus; drop zeros; order by that value, largest first; map to token ids; `<cls>` first and at
most `max_length` tokens in all.

Ties (equal scaled values) keep the order of the genes' columns in the input, i.e. exactly what
`np.argsort(-values, kind="stable")` over Geneformer's per-cell vector gives. Geneformer itself
calls the default (unstable) argsort, whose tie order is an implementation detail of numpy and
the CPU; the stable order is the only one that is reproducible, and it equals Geneformer's output
whenever the cell has no ties.

Arithmetic follows numpy's promotion exactly as Geneformer writes it:
`counts / n_counts * 10_000 / median` with the dtypes of the inputs (float32 counts with float32
totals stay float32 until the float64 medians), so outputs match a dense reference bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from langcell.build_sclibrary import rank_kernels
from langcell.core.errors import LangCellError

PAD, MASK, CLS = "<pad>", "<mask>", "<cls>"
TARGET_SUM = 10_000


def _special(token_dictionary: Mapping[str, int]) -> set[str]:
    return {k for k in token_dictionary if k.startswith("<") and k.endswith(">")}


class RankValueTokenizer:
    """Rank-value tokens for cells given as a CSR matrix of raw counts.

    `token_dictionary` maps Ensembl ids (and `<pad>`, `<mask>`, `<cls>`) to token ids and must
    contain `<cls>`; `gene_medians` maps every gene of the dictionary to its non-zero median.
    """

    def __init__(self, token_dictionary: Mapping[str, int], gene_medians: Mapping[str, float],
                 max_length: int = 2048, source: str = "vocab", threads: int = 1):
        if CLS not in token_dictionary:
            raise LangCellError(f"{source}: token dictionary has no '{CLS}' token; "
                                "append it (LangCell uses the next id after the genes)")
        if max_length < 2:
            raise LangCellError(f"{source}: max_length must be at least 2 (<cls> and one gene), got {max_length}")
        special = _special(token_dictionary)
        genes = [g for g in token_dictionary if g not in special]
        missing = [g for g in genes if g not in gene_medians]
        extra = [g for g in gene_medians if g not in token_dictionary]
        if missing or extra:
            example = (missing or extra)[0]
            raise LangCellError(
                f"{source}: vocab/medians mismatch ({len(missing)} genes of the token dictionary have no "
                f"median, {len(extra)} medians have no token; e.g. {example}); use the token dictionary and "
                "gene medians written together by one `langcell build`")
        medians = np.array([gene_medians[g] for g in genes], dtype=np.float64)
        if not np.all(np.isfinite(medians)) or np.any(medians <= 0):
            bad = genes[int(np.flatnonzero(~(np.isfinite(medians) & (medians > 0)))[0])]
            raise LangCellError(f"{source}: gene median of {bad} is not a positive number; rebuild the vocab")
        self.token_dictionary = dict(token_dictionary)
        self.gene_medians = dict(gene_medians)
        self.max_length = int(max_length)
        # Row blocks run on this many threads (the compiled loops release the GIL);
        # 1 where processes already share the cores, e.g. `langcell build --workers`.
        self.threads = max(1, int(threads))
        self.cls_id = int(token_dictionary[CLS])
        self.pad_id = int(token_dictionary.get(PAD, 0))
        self._gene_token = {g: int(token_dictionary[g]) for g in genes}
        self._plan_cache: dict[int, tuple] = {}
        # Entries per block of rows (rows x longest row): several blocks per chunk for the threads.
        self._block_nnz = 1 << 19

    @classmethod
    def from_vocab_dir(cls, vocab_dir: str | os.PathLike, max_length: int = 2048,
                       threads: int = 1) -> "RankValueTokenizer":
        """Load `token_dictionary.json` and `gene_median_dictionary.json` from a `LIB/vocab` folder."""
        from langcell.core.files import read_json

        tokens = read_json(os.path.join(vocab_dir, "token_dictionary.json"), "token dictionary")
        medians = read_json(os.path.join(vocab_dir, "gene_median_dictionary.json"), "gene medians")
        return cls(tokens, medians, max_length=max_length, source=str(vocab_dir), threads=threads)

    def gene_plan(self, gene_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per column of `gene_ids` its position among the vocabulary columns (-1: not in the
        vocabulary), and per vocabulary column (ascending) its token and median.

        A gene id listed twice keeps its first column only, as a dict lookup by id would.
        """
        key = id(gene_ids)
        cached = self._plan_cache.get(key)
        if cached is not None and cached[0] is gene_ids:
            return cached[1]
        cols, tokens, medians, seen = [], [], [], set()
        for col, gene in enumerate(gene_ids):
            token = self._gene_token.get(gene)
            if token is None or gene in seen:
                continue
            seen.add(gene)
            cols.append(col)
            tokens.append(token)
            medians.append(self.gene_medians[gene])
        position = np.full(len(gene_ids), -1, dtype=np.int64)
        position[cols] = np.arange(len(cols))
        plan = (position, np.asarray(tokens, dtype=np.int32), np.asarray(medians, dtype=np.float64))
        # The build calls this once per chunk with the same gene list object; keep one entry.
        self._plan_cache = {key: (gene_ids, plan)}
        return plan

    def tokenize_csr(self, X, gene_ids: Sequence[str], n_counts: np.ndarray | None = None) -> list[np.ndarray]:
        """Token ids (int32, `<cls>` first) for each row of `X` (cells x genes, raw counts).

        `n_counts` is each cell's total over all genes; by default the row sums of `X`.
        A cell with no expressed vocabulary gene yields just `[<cls>]`.
        """
        flat, offsets = self.tokenize_csr_flat(X, gene_ids, n_counts)
        return np.split(flat, offsets[1:-1]) if offsets.size > 1 else []

    def tokenize_csr_flat(self, X, gene_ids: Sequence[str],
                          n_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like `tokenize_csr` but as one flat int32 array plus row offsets (n_cells + 1)."""
        if not sp.issparse(X) or X.format != "csr":
            X = sp.csr_matrix(X)
        n_cells, n_genes = X.shape
        if len(gene_ids) != n_genes:
            raise LangCellError(f"tokenize_csr: X has {n_genes} genes but {len(gene_ids)} gene ids were given; "
                                "pass one id per column")
        if n_counts is None:
            n_counts = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
        else:
            n_counts = np.asarray(n_counts).ravel()
            if n_counts.shape[0] != n_cells:
                raise LangCellError(f"tokenize_csr: n_counts has {n_counts.shape[0]} values for {n_cells} cells; "
                                    "pass one total per cell")
        bad = np.flatnonzero(~(n_counts > 0))
        if bad.size and X[bad].count_nonzero():
            raise LangCellError("tokenize_csr: a cell with counts has a total (n_counts) <= 0; "
                                "pass each cell's total counts over all genes")
        position, tokens, medians = self.gene_plan(gene_ids)
        if not X.has_canonical_format:
            # Unsorted columns or repeated entries: sort and sum them, as a dense matrix would hold them.
            X = X.copy()
            X.sum_duplicates()
        data, totals = _promoted(X.data, n_counts)
        limit = self.max_length - 1
        # Blocks of a few hundred rows: the threads share a chunk, each call's overhead is amortised.
        blocks = list(_row_blocks(X.indptr, self._block_nnz))

        def run(block):
            return self._tokenize_block(X.indptr, X.indices, data, totals, *block, position, tokens, medians, limit)

        if self.threads > 1 and len(blocks) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(self.threads, len(blocks))) as pool:
                results = list(pool.map(run, blocks))
        else:
            results = [run(block) for block in blocks]
        flats = [flat for flat, _ in results]
        lengths = [length for _, length in results]
        flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.int32)
        offsets = np.zeros(n_cells + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return flat, offsets

    def _tokenize_block(self, indptr, indices, data, totals, r0, r1, position, tokens, medians, limit):
        bound = int(np.minimum(np.diff(indptr[r0:r1 + 1]), limit).sum()) + (r1 - r0)
        flat = np.empty(bound, dtype=np.int32)
        length = np.empty(r1 - r0, dtype=np.int64)
        used = rank_kernels.rank_rows(indptr, indices, data, totals, data.dtype.type(TARGET_SUM), position, medians,
                                      tokens, r0, r1, limit, self.cls_id, flat, length)
        return flat[:used], length


def _promoted(data: np.ndarray, n_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and totals in the dtype numpy gives `counts / n_counts` (Geneformer's expression), so
    the compiled arithmetic rounds exactly as numpy does (long double inputs are computed in float64)."""
    dtype = np.true_divide(np.ones(1, data.dtype), np.ones(1, n_counts.dtype)).dtype
    if dtype != np.float32:
        dtype = np.dtype(np.float64)
    return data.astype(dtype, copy=False), n_counts.astype(dtype, copy=False)


def _row_blocks(indptr: np.ndarray, block_nnz: int):
    """Consecutive row ranges whose size (rows x longest row, a bound on their entries) stays near `block_nnz`."""
    n_rows = indptr.size - 1
    lengths = np.diff(indptr)
    r0 = 0
    while r0 < n_rows:
        # Estimate from the mean row length of the next rows, then shrink to fit the widest row.
        probe = lengths[r0:r0 + 64]
        rows = max(1, int(block_nnz // max(1, int(probe.max()))))
        r1 = min(n_rows, r0 + rows)
        width = int(lengths[r0:r1].max())
        while r1 - r0 > 1 and (r1 - r0) * width > block_nnz:
            r1 = r0 + max(1, (r1 - r0) // 2)
            width = int(lengths[r0:r1].max())
        yield r0, r1
        r0 = r1
