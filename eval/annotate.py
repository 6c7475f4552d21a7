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
from langcell.eval.model_io import cell_max_length, load_model
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
    import sys

    from langcell.eval.data import make_tokenizer

    source, input, output = str(input), Path(input), Path(output)
    # The file's own checks need the model's vocabulary; a wrong path need not wait for the model.
    check_path(input)
    ontology = CellOntology.load(ontology_terms)
    net, vocab = load_model(model, device, text_tokenizer)
    cands = candidate_types(cell_types, ontology_root, ontology, model_prompt(net))
    tokenizer = make_tokenizer(vocab, cell_max_length(net))
    n_cands = len(cands.names)
    if top_k is None and n_cands > AUTO_TOP_K_ABOVE:
        top_k = AUTO_TOP_K
        print(f"langcell annotate: {n_cands} candidates (> {AUTO_TOP_K_ABOVE}): matching head on each cell's "
              f"{top_k} most similar only, not LangCell's exact formula; pass --top-k {n_cands} for exact",
              file=sys.stderr)
    exact = top_k is None or top_k >= n_cands
    scoring = {"scoring": "exact" if exact else "top-k", "top_k": None if exact else int(top_k),
               "n_candidates": n_cands, "alpha": float(alpha), "class_prompt": model_prompt(net)["template"]}
    scorer = TopKScorer(net, cands.texts, alpha=alpha, top_k=top_k)
    with open_user_anndata(source, vocab.token_dictionary, min_gene_match=min_gene_overlap) as user:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.parent / f".{output.name}.annotate.tmp"
        shutil.copyfile(input, tmp)
        try:
            pred = _annotate_into(user, tmp, scorer, tokenizer, vocab.pad_id, np.asarray(cands.names, dtype=object),
                                  chunk_size, batch_size, scoring)
            os.replace(tmp, output)
        finally:
            if tmp.exists():
                tmp.unlink()
    counts = {str(k): int(v) for k, v in zip(*np.unique(pred.astype(str), return_counts=True))}
    return {"n_cells": user.n_obs, "n_candidates": len(cands.names), "gene_overlap": round(user.genes.share, 4),
            "gene_ids_from": f"{user.genes.column} as {user.genes.kind}", "counts_from": user.counts_from,
            "candidates": dict(zip(cands.names, cands.sources)), "predictions": counts, **scoring}


def _annotate_into(user, tmp: Path, scorer, tokenizer, pad_id: int, names, chunk_size: int, batch_size: int,
                   scoring: dict):
    """Write predictions into obs, embeddings into obsm and `scoring` into uns of `tmp` (a copy of
    the input); returns the predictions."""
    import h5py
    from anndata.io import read_elem, write_elem
    from tqdm import tqdm

    n = user.n_obs
    pred = np.empty(n, dtype=object)
    score = np.zeros(n, dtype=np.float32)
    top3 = np.empty(n, dtype=object)
    n_counts = user.n_counts
    with h5py.File(tmp, "r+") as dst:
        obs = read_elem(dst["obs"])
        had_obsm = "obsm" in dst
        obsm = dst["obsm"] if had_obsm else dst.create_group("obsm")
        if not had_obsm:
            obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
        if OBSM_KEY in obsm:
            del obsm[OBSM_KEY]
        width = scorer.text_embeds.shape[1]
        emb = obsm.create_dataset(OBSM_KEY, shape=(n, width), dtype="float32", chunks=(min(n, 1024), width))
        emb.attrs["encoding-type"], emb.attrs["encoding-version"] = "array", "0.2.0"
        with tqdm(total=n, desc="annotate", unit="cell") as bar:
            for start in range(0, n, chunk_size):
                stop = min(n, start + chunk_size)
                seqs = tokenizer.tokenize_csr(user.rows(start, stop), user.genes.gene_ids,
                                              None if n_counts is None else n_counts[start:stop])
                chunk_emb = np.zeros((stop - start, width), np.float32)
                for b in range(0, len(seqs), batch_size):
                    ids, mask = pad_cells(seqs[b:b + batch_size], pad_id)
                    res = scorer.score(ids, mask)
                    fused = res.fused.numpy()
                    best = np.argsort(-fused, axis=1)[:, :3]
                    at = slice(start + b, start + b + len(ids))
                    pred[at] = names[best[:, 0]]
                    score[at] = fused[np.arange(len(ids)), best[:, 0]]
                    top3[at] = ["; ".join(names[r]) for r in best]
                    chunk_emb[b:b + len(ids)] = res.embeds.numpy()
                    bar.update(len(ids))
                emb[start:stop] = chunk_emb
        for col, values in zip(OBS_COLUMNS, (pred, score, top3)):
            obs[col] = values
        obs["langcell_prediction"] = obs["langcell_prediction"].astype("category")
        obs["langcell_top3"] = obs["langcell_top3"].astype(str)
        del dst["obs"]
        write_elem(dst, "obs", obs)
        if "uns" not in dst:
            write_elem(dst, "uns", {})
        if UNS_KEY in dst["uns"]:
            del dst["uns"][UNS_KEY]
        write_elem(dst["uns"], UNS_KEY, scoring)
    return pred

