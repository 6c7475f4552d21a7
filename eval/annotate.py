"""`langcell annotate`: zero-shot cell types for a user's .h5ad, written back into a copy of it.

Built for files larger than memory:
- the input is opened and checked by `build_sclibrary.user_anndata`, and its counts (X or
  layers['counts'], CSR or dense) are read in row chunks straight from the HDF5 file, never the
  whole matrix (a CSC matrix is read whole, since its rows cut across every column);
- the output is a byte copy of the input into which only `obs` (rewritten with the three new
  columns appended), `obsm['X_langcell']` (filled chunk by chunk) and `uns['langcell']` (how the
  cells were scored) are written, through h5py and anndata's element writer, so X, layers, var,
  the rest of uns and every other field stay byte-identical;
- the copy is renamed onto the output path only when complete.
What does stay in memory: obs and var (one row per cell/gene, small next to X) and the
predictions (a few strings and floats per cell). The copy needs the input's size in free disk.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from langcell.core.errors import LangCellError
from langcell.build_sclibrary.user_anndata import check_path, open_user_anndata
from langcell.eval.model_io import LoadedModel, open_model
from langcell.eval.ontology import CellOntology
from langcell.eval.prompts import class_text, model_prompt
from langcell.eval.scoring import TopKScorer, pad_cells
from langcell.eval.settings import AUTO_TOP_K, AUTO_TOP_K_ABOVE

OBS_COLUMNS = ("langcell_prediction", "langcell_score", "langcell_top3")
OBSM_KEY = "X_langcell"
UNS_KEY = "langcell"


@dataclass
class Candidates:
    names: list[str]     # what goes into obs
    texts: list[str]     # what the text encoder reads
    sources: list[str]   # "ontology" or "free text"


def candidate_types(cell_types: list[str] | None, ontology_root: str | None, ontology: CellOntology,
                    prompt: dict) -> Candidates:
    """Candidates and their texts in the model's class prompt: CL terms with their definition,
    free text as a name without one."""
    if ontology_root:
        terms = ontology.descendants(ontology_root)
        if len(terms) < 2:
            raise LangCellError(f"--ontology-root: {ontology_root} ({ontology.labels[ontology_root]}) has "
                                f"{len(terms)} descendant(s), so there is nothing to choose between; pick a broader "
                                "term, e.g. CL:0000542 (lymphocyte)")
        return Candidates([ontology.labels[t] for t in terms], [ontology.description(t, prompt) for t in terms],
                          ["ontology"] * len(terms))
    names = [str(c).strip() for c in (cell_types or []) if str(c).strip()]
    if not names:
        raise LangCellError("--cell-types: the candidate list is empty; give cell types or --ontology-root CL:...")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LangCellError(f"--cell-types: '{dup}' is listed twice; give each candidate once")
    if len(names) < 2:
        raise LangCellError(f"--cell-types: only one candidate ('{names[0]}'), so every cell would get it; "
                            "give at least two cell types")
    texts, sources = [], []
    for name in names:
        term = ontology.term_for(name)
        texts.append(ontology.description(term, prompt) if term else class_text(prompt, name, ""))
        sources.append("ontology" if term else "free text")
    return Candidates(names, texts, sources)


def annotate(model: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike,
             cell_types: list[str] | None = None, ontology_root: str | None = None, *,
             ontology_terms: str | None = None, chunk_size: int = 4096, batch_size: int = 32,
             top_k: int | None = None, alpha: float = 0.1, min_gene_overlap: float = 0.25,
             device: str = "cpu", text_tokenizer: str | None = None) -> dict:
    """Annotate `input` into `output`; returns a summary (cells, candidates, prediction counts,
    scoring). `top_k=None` is LangCell's exact formula, or top-AUTO_TOP_K above AUTO_TOP_K_ABOVE
    candidates, said on stderr and in `uns['langcell']`."""
    source, input, output = str(input), Path(input), Path(output)
    # The file's own checks need the model's vocabulary; a wrong path need not wait for the model.
    check_path(input)
    loaded = open_model(model, device, text_tokenizer)
    plan = _plan(loaded, cell_types, ontology_root, ontology_terms, top_k, alpha)
    with open_user_anndata(source, loaded.vocab.token_dictionary, min_gene_match=min_gene_overlap) as user:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.parent / f".{output.name}.annotate.tmp"
        shutil.copyfile(input, tmp)
        try:
            pred = _annotate_file(user, tmp, plan, loaded, chunk_size, batch_size)
            os.replace(tmp, output)
        finally:
            if tmp.exists():
                tmp.unlink()
    return _summary(user, plan, pred)


def annotate_adata(adata, model, cell_types: list[str] | None = None, ontology_root: str | None = None, *,
                   key_added: str = UNS_KEY, copy: bool = False, ontology_terms: str | None = None,
                   chunk_size: int = 4096, batch_size: int = 32, top_k: int | None = None, alpha: float = 0.1,
                   min_gene_overlap: float = 0.25, layer: str | None = None, gene_column: str | None = None):
    """`annotate` on an AnnData in memory (or backed): the same fields, named from `key_added`
    (`{key}_prediction`, `{key}_score`, `{key}_top3` in obs, `X_{key}` in obsm, `uns[key]`; the
    default is the CLI's names). `model` is a `LoadedModel` or what `open_model` takes. Writes into
    `adata` and returns None, or into a copy that it returns when `copy`."""
    loaded = model if isinstance(model, LoadedModel) else open_model(model)
    plan = _plan(loaded, cell_types, ontology_root, ontology_terms, top_k, alpha)
    with open_user_anndata(adata, loaded.vocab.token_dictionary, layer=layer, gene_column=gene_column,
                           min_gene_match=min_gene_overlap) as user:
        parts = list(_score_chunks(user, plan, loaded, chunk_size, batch_size))
    best, score, emb = (np.concatenate([part[i] for part in parts]) for i in (2, 3, 4))
    target = adata.copy() if copy else adata
    for column, values in zip(OBS_COLUMNS, _obs_values(plan, best, score)):
        target.obs[column.replace(UNS_KEY, key_added, 1)] = values
    target.obsm[f"X_{key_added}"] = emb
    target.uns[key_added] = plan.scoring
    return target if copy else None


@dataclass
class _Plan:
    candidates: Candidates
    names: np.ndarray   # candidate names, object array, indexed by the scorer's class index
    scorer: TopKScorer
    scoring: dict       # what uns records about how the cells were scored


def _plan(loaded: LoadedModel, cell_types, ontology_root, ontology_terms, top_k, alpha) -> _Plan:
    import sys

    ontology = CellOntology.load(ontology_terms)
    cands = candidate_types(cell_types, ontology_root, ontology, model_prompt(loaded.net))
    n_cands = len(cands.names)
    if top_k is None and n_cands > AUTO_TOP_K_ABOVE:
        top_k = AUTO_TOP_K
        print(f"langcell annotate: {n_cands} candidates (> {AUTO_TOP_K_ABOVE}): matching head on each cell's "
              f"{top_k} most similar only, not LangCell's exact formula; pass --top-k {n_cands} for exact",
              file=sys.stderr)
    exact = top_k is None or top_k >= n_cands
    scoring = {"scoring": "exact" if exact else "top-k", "top_k": None if exact else int(top_k),
               "n_candidates": n_cands, "alpha": float(alpha), "class_prompt": model_prompt(loaded.net)["template"]}
    scorer = TopKScorer(loaded.net, cands.texts, alpha=alpha, top_k=top_k)
    return _Plan(cands, np.asarray(cands.names, dtype=object), scorer, scoring)


def _score_chunks(user, plan: _Plan, loaded: LoadedModel, chunk_size: int, batch_size: int):
    """(start, stop, best [n, <=3] candidate indices best first, fused score of the best [n],
    embeddings [n, width]) for each `chunk_size` rows of `user`: the one scoring loop of both the
    file and the in-memory annotate."""
    width, k = plan.scorer.text_embeds.shape[1], min(3, len(plan.names))
    for start, stop, batches in loaded.cell_chunks(user, chunk_size, batch_size, "annotate"):
        best = np.zeros((stop - start, k), np.int64)
        score = np.zeros(stop - start, np.float32)
        embeds = np.zeros((stop - start, width), np.float32)
        for offset, ids, mask in batches:
            res = plan.scorer.score(ids, mask)
            fused = res.fused.numpy()
            at = slice(offset, offset + len(ids))
            best[at] = np.argsort(-fused, axis=1)[:, :k]
            score[at] = fused[np.arange(len(ids)), best[at, 0]]
            embeds[at] = res.embeds.numpy()
        yield start, stop, best, score, embeds


def _obs_values(plan: _Plan, best: np.ndarray, score: np.ndarray) -> tuple:
    """The obs columns' values, in OBS_COLUMNS order, as the file and in-memory paths store them."""
    import pandas as pd

    names = plan.names
    pred = pd.Categorical(names[best[:, 0]].astype(str))
    top3 = np.asarray(["; ".join(names[row]) for row in best], dtype=object).astype(str)
    return pred, score, top3


def _summary(user, plan: _Plan, pred) -> dict:
    counts = {str(k): int(v) for k, v in zip(*np.unique(np.asarray(pred).astype(str), return_counts=True))}
    cands = plan.candidates
    return {"n_cells": user.n_obs, "n_candidates": len(cands.names), "gene_overlap": round(user.genes.share, 4),
            "gene_ids_from": f"{user.genes.column} as {user.genes.kind}", "counts_from": user.counts_from,
            "candidates": dict(zip(cands.names, cands.sources)), "predictions": counts, **plan.scoring}


def _annotate_file(user, tmp: Path, plan: _Plan, loaded: LoadedModel, chunk_size: int, batch_size: int):
    """Write predictions into obs, embeddings into obsm and the scoring into uns of `tmp` (a copy
    of the input), embeddings chunk by chunk; returns the predictions."""
    import h5py
    from anndata.io import read_elem, write_elem

    n, width = user.n_obs, plan.scorer.text_embeds.shape[1]
    best, score = np.zeros((n, min(3, len(plan.names))), np.int64), np.zeros(n, np.float32)
    with h5py.File(tmp, "r+") as dst:
        obs = read_elem(dst["obs"])
        had_obsm = "obsm" in dst
        obsm = dst["obsm"] if had_obsm else dst.create_group("obsm")
        if not had_obsm:
            obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
        if OBSM_KEY in obsm:
            del obsm[OBSM_KEY]
        emb = obsm.create_dataset(OBSM_KEY, shape=(n, width), dtype="float32", chunks=(min(n, 1024), width))
        emb.attrs["encoding-type"], emb.attrs["encoding-version"] = "array", "0.2.0"
        for start, stop, chunk_best, chunk_score, chunk_emb in _score_chunks(user, plan, loaded, chunk_size,
                                                                              batch_size):
            best[start:stop], score[start:stop], emb[start:stop] = chunk_best, chunk_score, chunk_emb
        values = _obs_values(plan, best, score)
        for col, column_values in zip(OBS_COLUMNS, values):
            obs[col] = column_values
        del dst["obs"]
        write_elem(dst, "obs", obs)
        if "uns" not in dst:
            write_elem(dst, "uns", {})
        if UNS_KEY in dst["uns"]:
            del dst["uns"][UNS_KEY]
        write_elem(dst["uns"], UNS_KEY, plan.scoring)
    return values[0]
