"""A small synthetic annotation task with a known answer, and a tiny model trained on it.

Tests, the zero-shot benchmark and CPU smoke runs need a model whose predictions mean
something without a GPU pre-training run: six real CL cell types (descriptions from the Cell
Ontology), each marked by its own signature genes in raw counts, two batches with a shifted
background, and a LangCell model of the `tiny` shape trained for a few dozen steps with the
few-shot loss, then exported through pretrain's `save_langcell` so that every eval path loads it
exactly as it loads a real export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# B cell, T cell, CD4+ alpha-beta T cell (a T cell descendant, for ontology-aware scoring),
# natural killer cell, monocyte, platelet.
SYNTHETIC_TYPES = ("CL:0000236", "CL:0000084", "CL:0000624", "CL:0000623", "CL:0000576", "CL:0000233")


def gene_ids(n_genes: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]


def write_vocab(folder: str | Path, n_genes: int) -> Path:
    """token_dictionary.json (<pad>=0, <mask>=1, genes, <cls> last) and unit medians."""
    from langcell.core.files import atomic_write_json

    folder = Path(folder)
    genes = gene_ids(n_genes)
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    tokens["<cls>"] = len(tokens)
    atomic_write_json(folder / "token_dictionary.json", tokens)
    atomic_write_json(folder / "gene_median_dictionary.json", {g: 1.0 for g in genes})
    return folder


def make_adata(n_per_class: int = 40, n_genes: int = 120, n_signature: int = 10, seed: int = 0,
               types=SYNTHETIC_TYPES, ontology=None, background: float = 0.3):
    """Raw-count AnnData: obs cell_type, cell_type_ontology_term_id, dataset_id (two batches)."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from langcell.eval.ontology import CellOntology

    ontology = ontology or CellOntology.load()
    rng = np.random.default_rng(seed)
    n_cells = n_per_class * len(types)
    labels = np.repeat(np.arange(len(types)), n_per_class)
    batch = rng.integers(0, 2, n_cells)
    rate = np.full((n_cells, n_genes), background)
    # Batch 1 raises a block of background genes that no signature uses.
    rate[batch == 1, n_genes - 15:] += 1.5
    for c in range(len(types)):
        sig = np.arange(c * n_signature, (c + 1) * n_signature)
        rate[np.ix_(labels == c, sig)] += rng.uniform(2.0, 6.0, n_signature)
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({
        "cell_type": [ontology.labels[types[c]] for c in labels],
        "cell_type_ontology_term_id": [types[c] for c in labels],
        "dataset_id": [f"batch{b}" for b in batch],
    }, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=gene_ids(n_genes))
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def many_types(n: int, seed: int = 0, ontology=None) -> tuple[str, ...]:
    """n CL cell types that have a definition, drawn with a fixed seed (for scaling benchmarks)."""
    from langcell.eval.ontology import CellOntology

    ontology = ontology or CellOntology.load()
    pool = sorted(t for t, d in ontology.definitions.items() if d)
    return tuple(sorted(np.random.default_rng(seed).choice(pool, n, replace=False)))


def class_texts(labels: list[str], ontology=None) -> list[str]:
    from langcell.eval.ontology import CellOntology
    from langcell.pretrain.export import LANGCELL_CLASS_PROMPT

    ontology = ontology or CellOntology.load()
    return [ontology.description(ontology.term_for(lab), LANGCELL_CLASS_PROMPT) for lab in labels]


def tiny_model(vocab_dir: str | Path, hidden: int = 32, pooling: str | None = None, seed: int = 0):
    """An untrained LangCell model of the `tiny` shape over `vocab_dir`'s genes, dropout off.

    `pooling` sets the recorded cell pooling (`cls` or `mean`); None keeps the tiny config's.
    """
    import torch

    from langcell.pretrain.config import load_model_config
    from langcell.pretrain.model import LangCellPretrainModel, load_text_tokenizer

    torch.manual_seed(seed)
    tokens = json.loads((Path(vocab_dir) / "token_dictionary.json").read_text())
    cfg = load_model_config("tiny")
    cfg.cell.vocab_size = len(tokens)
    cfg.cell.hidden_size = hidden
    cfg.cell.intermediate_size = 2 * hidden
    cfg.cell.num_attention_heads = 2
    cfg.cell.max_position_embeddings = 128
    cfg.cell.pooling = pooling or cfg.cell.pooling
    cfg.text.hidden_size = hidden
    cfg.text.intermediate_size = 2 * hidden
    cfg.text.num_attention_heads = 2
    cfg.cell.hidden_dropout_prob = cfg.cell.attention_probs_dropout_prob = 0.0
    model = LangCellPretrainModel(cfg)
    # No dropout: with 32-wide states its noise swamps the small [CLS] differences that a few
    # dozen steps build, and the random text encoder then never separates the descriptions.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    model.text_tokenizer = load_text_tokenizer(cfg.text)
    model.token_dictionary = tokens
    return model


def tokenize_adata(adata, vocab_dir: str | Path, max_length: int = 128) -> list:
    """`adata`'s cells as rank-value token sequences of `vocab_dir`'s vocabulary."""
    from langcell.build_sclibrary.tokenizer import RankValueTokenizer

    tokenizer = RankValueTokenizer.from_vocab_dir(Path(vocab_dir), max_length=max_length)
    return tokenizer.tokenize_csr(adata.X, list(adata.var_names))


def train_tiny_export(out: str | Path, adata, vocab_dir: str | Path, steps: int = 150, seed: int = 0,
                      hidden: int = 32, lr: float = 2e-3, batch_size: int = 16,
                      match_negatives: int | None = None, pooling: str | None = None) -> Path:
    """Train a tiny LangCell model on `adata`'s cells with the few-shot loss and export it."""
    from langcell.eval.train import train_fewshot
    from langcell.pretrain.export import LANGCELL_CLASS_PROMPT, save_langcell

    model = tiny_model(vocab_dir, hidden, pooling, seed)
    seqs = tokenize_adata(adata, vocab_dir)
    types = sorted(adata.obs["cell_type"].astype(str).unique())
    labels = np.asarray([types.index(t) for t in adata.obs["cell_type"].astype(str)])
    epochs = max(1, int(np.ceil(steps * batch_size / len(seqs))))
    train_fewshot(model, seqs, labels, class_texts(types), epochs=epochs, lr=lr, batch_size=batch_size,
                  seed=seed, desc="tiny model", match_on_margin=True, match_negatives=match_negatives)
    return save_langcell(model, out, vocab_dir=vocab_dir, class_prompt=LANGCELL_CLASS_PROMPT)
