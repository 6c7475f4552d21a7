"""LangCell's dense per-file tokenizer, the baseline of `bench_tokenizer`, as a user runs it.

Written from the description of LangCell's `LangCellTranscriptomeTokenizer` (Geneformer's
`TranscriptomeTokenizer`): read the whole h5ad, densify the file's coding genes
(`X[:, coding].toarray()`), normalise by n_counts x 10,000, divide by the medians, then per cell
take the non-zeros and argsort them (`kind="stable"`, so ties order like ours and the outputs
compare exactly); then `Dataset.from_dict(...)` with the obs columns and `save_to_disk`, as
LangCell's README does. Geneformer's `create_dataset` also runs a per-row `map` to cut cells to
2,048 tokens and add `length`; here both happen in the tokenizing loop, which only makes the
reference faster.

`python -m benchmarks.langcell_reference_tokenizer IN.h5ad OUT` is the whole process the
benchmark times: it imports only what that script needs (anndata, numpy, datasets; the
vocabulary is read from its JSON files, not through langcell).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

VOCAB_DIR = Path(__file__).resolve().parents[1] / "build_sclibrary" / "reference" / "geneformer_v1"


def geneformer_v1_vocab() -> tuple[dict, dict]:
    """Geneformer v1's token dictionary (with `<cls>` appended, as LangCell does) and medians."""
    tokens = json.loads((VOCAB_DIR / "token_dictionary.json").read_text())
    medians = json.loads((VOCAB_DIR / "gene_median_dictionary.json").read_text())
    tokens["<cls>"] = max(tokens.values()) + 1
    return tokens, medians


def tokenize_cell(gene_vector: np.ndarray, gene_tokens: np.ndarray) -> np.ndarray:
    nonzero = np.nonzero(gene_vector)[0]
    order = np.argsort(-gene_vector[nonzero], kind="stable")
    return gene_tokens[nonzero][order]


def dense_tokenize(adata, tokens: dict, medians: dict, max_length: int = 2048) -> list[np.ndarray]:
    """Tokens of every cell of an in-memory AnnData: `<cls>` then at most max_length - 1 genes."""
    var_ids = np.asarray(adata.var_names)
    coding_loc = np.where([g in medians for g in var_ids])[0]
    norm_factor_vector = np.array([medians[g] for g in var_ids[coding_loc]])
    coding_tokens = np.array([tokens[g] for g in var_ids[coding_loc]])
    n_counts = adata.obs["n_counts"].values
    X = adata.X[:, coding_loc].toarray()
    X_norm = X / n_counts[:, None] * 10_000 / norm_factor_vector
    cls = np.array([tokens["<cls>"]])
    return [np.concatenate([cls, tokenize_cell(X_norm[i], coding_tokens)[:max_length - 1]])
            for i in range(X_norm.shape[0])]


def main(argv: list[str] | None = None) -> int:
    import anndata
    from datasets import Dataset

    source, out = argv if argv is not None else sys.argv[1:]
    tokens, medians = geneformer_v1_vocab()
    adata = anndata.read_h5ad(source)
    cells = dense_tokenize(adata, tokens, medians)
    columns = {"input_ids": cells, "length": [len(c) for c in cells]}
    columns.update({str(k): adata.obs[k].tolist() for k in adata.obs.keys()})
    Dataset.from_dict(columns).save_to_disk(out)
    print(f"{len(cells):,} cells tokenized to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
