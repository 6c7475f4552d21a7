"""Evaluation data: token sequences, labels and an expression matrix for the baselines.

DATA is either a tokenized `datasets` folder (`LIB/hf/test`, or Geneformer/LangCell-tokenized
cells without `<cls>`: see `prepare_cells`) or an `.h5ad` of raw counts, opened and checked by
`build_sclibrary.user_anndata` and tokenized with build's `RankValueTokenizer` and the model's
own vocabulary.

The baselines (logistic regression, kNN, PCA) need an expression matrix:
- from an `.h5ad`: log1p of counts scaled to 10,000 per cell over all genes (scanpy's usual
  normalisation), the input those baselines are normally given;
- from an HF dataset, which keeps only the ranked tokens: a rank pseudo-expression in vocabulary
  space, gene at rank r of a cell with L genes -> (L - r) / L. The baselines then see exactly the
  information the cell encoder sees (which genes, in which order), but not the magnitudes, so
  pass the `.h5ad` when it exists for the usual baseline numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from langcell.core.errors import LangCellError

# Rows read from an .h5ad at a time; the baselines need the whole matrix in memory anyway.
CHUNK_ROWS = 4096


@dataclass
class EvalData:
    input_ids: list            # one int array per cell, <cls> first, at most the model's positions
    obs: "object"              # pandas DataFrame, one row per cell
    expression: "object"       # scipy.sparse.csr_matrix [cells, genes] (see module doc)
    expression_kind: str       # "log1p_cp10k" or "rank_pseudo"
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx) -> "EvalData":
        idx = np.asarray(idx)
        return EvalData([self.input_ids[i] for i in idx], self.obs.iloc[idx].reset_index(drop=True),
                        self.expression[idx], self.expression_kind, self.source)


def log_normalise(counts, n_counts=None):
    import scipy.sparse as sp

    counts = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel() if n_counts is None else np.asarray(n_counts, float)
    scale = np.where(totals > 0, 1e4 / np.maximum(totals, 1e-12), 0.0)
    out = sp.diags(scale.astype(np.float32)) @ counts
    out.data = np.log1p(out.data)
    return sp.csr_matrix(out)


def rank_pseudo_expression(input_ids, vocab_size: int, special_ids=(0, 1)):
    """[cells, vocab] CSR: the gene at rank r of a cell with L genes gets (L - r) / L."""
    import scipy.sparse as sp

    genes = [np.asarray(seq[1:], dtype=np.int64) for seq in input_ids]  # seq[0] is <cls>
    genes = [g[~np.isin(g, special_ids)] for g in genes]
    lengths = np.array([len(g) for g in genes], dtype=np.int64)
    cols = np.concatenate(genes) if genes else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(genes)), lengths)
    rank = np.arange(len(cols)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    vals = (np.repeat(lengths, lengths) - rank) / np.maximum(np.repeat(lengths, lengths), 1)
    return sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(len(genes), vocab_size))


def prepare_cells(seqs, token_dictionary: dict, max_length: int, source: str) -> list:
    """Token sequences as the cell encoder reads them, whoever tokenized them.

    Geneformer and LangCell tokenize without `<cls>`; LangCell's collator prepends it and cuts
    the cell to 2,048 tokens (`max_length`, the position table), and so does this. An id outside
    the model's vocabulary means another vocabulary tokenized the file: a LangCellError.
    """
    cls_id, vocab_size = int(token_dictionary["<cls>"]), len(token_dictionary)
    out = []
    for i, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) and (seq.max() >= vocab_size or seq.min() < 0):
            bad = int(seq.max() if seq.max() >= vocab_size else seq.min())
            raise LangCellError(f"{source}: cell {i} has token id {bad} outside the model's vocabulary of "
                                f"{vocab_size}; tokenize the data with the model's gene vocabulary (MODEL/vocab/)")
        if not len(seq) or seq[0] != cls_id:
            seq = np.concatenate([[cls_id], seq])
        out.append(seq[:max_length])
    return out


def make_tokenizer(vocab, max_length: int = 2048):
    from langcell.build_sclibrary.tokenizer import RankValueTokenizer

    return RankValueTokenizer(vocab.token_dictionary, vocab.gene_medians, max_length=max_length)


def load_h5ad(path: Path, vocab, min_gene_overlap: float, max_length: int) -> EvalData:
    import scipy.sparse as sp

    from langcell.build_sclibrary.user_anndata import open_user_anndata

    with open_user_anndata(path, vocab.token_dictionary, min_gene_match=min_gene_overlap) as user:
        counts = sp.vstack([user.rows(start, min(user.n_obs, start + CHUNK_ROWS))
                            for start in range(0, user.n_obs, CHUNK_ROWS)], format="csr")
        ids = make_tokenizer(vocab, max_length).tokenize_csr(counts, user.genes.gene_ids, user.n_counts)
        return EvalData(list(ids), user.obs.reset_index(drop=True).copy(), log_normalise(counts),
                        "log1p_cp10k", str(path))


def load_hf(path: Path, vocab, max_cells: int | None = None, seed: int = 0, max_length: int = 2048) -> EvalData:
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise LangCellError(f"{path}: holds several splits {splits}; pass one split folder, e.g. {path}/test")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise LangCellError(f"{path}: not a `datasets` folder; pass LIB/hf/<split> or an .h5ad") from None
    if "input_ids" not in ds.column_names:
        raise LangCellError(f"{path}: no 'input_ids' column; pass a tokenized split from `langcell build`")
    if max_cells is not None and len(ds) > max_cells:
        # Subsample before anything is materialised: a test split can hold millions of cells.
        ds = ds.select(np.sort(np.random.default_rng(seed).choice(len(ds), max_cells, replace=False)))
    obs = ds.remove_columns(["input_ids"]).to_pandas()
    ids = prepare_cells(ds["input_ids"], vocab.token_dictionary, max_length, str(path))
    expr = rank_pseudo_expression(ids, max(vocab.token_dictionary.values()) + 1)
    return EvalData(ids, obs, expr, "rank_pseudo", str(path))


def check_data_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LangCellError(f"{path}: data not found; pass LIB/hf/<split> or an .h5ad file")
    return path


def load_eval_data(path, vocab, label_key: str | None = "cell_type", batch_key: str | None = None,
                   min_gene_overlap: float = 0.25, max_cells: int | None = None, seed: int = 0,
                   max_length: int = 2048) -> EvalData:
    """Load DATA (HF split folder or .h5ad), check the label/batch columns, optionally subsample."""
    path = check_data_path(path)
    # A datasets split is a folder; any file (or an .h5ad path, whatever it is) is a user's AnnData.
    if path.is_file() or path.suffix == ".h5ad":
        data = load_h5ad(path, vocab, min_gene_overlap, max_length)
    else:
        data = load_hf(path, vocab, max_cells, seed, max_length)
    for key, what in ((label_key, "--label-key"), (batch_key, "--batch-key")):
        if key is not None and key not in data.obs.columns:
            raise LangCellError(f"{path}: column '{key}' missing; pass {what} with one of "
                                f"{', '.join(map(str, data.obs.columns[:20]))}")
    if label_key is not None:
        data.obs[label_key] = data.obs[label_key].astype(str)
    if max_cells is not None and len(data) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(data), max_cells, replace=False))
        data = data.subset(keep)
    if len(data) == 0:
        raise LangCellError(f"{path}: no cells; pass a non-empty dataset")
    return data


def stratified_split(labels, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with every class on both sides where it has >= 2 cells."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        n_test = int(round(len(idx) * test_size)) if len(idx) > 1 else 0
        n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.asarray(train, int)), np.sort(np.asarray(test, int))


def few_shot_split(labels, n_shot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n cells per class for training, the rest for testing; classes with <= n cells are dropped
    from both, since they would leave nothing to test."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        if len(idx) <= n_shot:
            continue
        train.extend(idx[:n_shot])
        test.extend(idx[n_shot:])
    return np.sort(np.asarray(train, int)), np.sort(np.asarray(test, int))
