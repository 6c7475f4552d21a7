"""`langcell annotate`: zero-shot cell types for a user's .h5ad, written back into a copy of it.

Built for files larger than memory:
- counts are read in row chunks straight from the HDF5 file (X or layers['counts'], sparse or
  dense), never the whole matrix;
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

from langcell.errors import LangCellError
from eval.data import check_counts, resolve_gene_ids
from eval.model_io import cell_max_length, load_model
from eval.ontology import CellOntology
from eval.prompts import class_text, model_prompt
from eval.scoring import TopKScorer, pad_cells
from eval.settings import AUTO_TOP_K, AUTO_TOP_K_ABOVE

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
        return Candidates([ontology.labels[t] for t in terms], [ontology.description(t, prompt) for t in terms],
                          ["ontology"] * len(terms))
    names = [str(c).strip() for c in (cell_types or []) if str(c).strip()]
    if not names:
        raise LangCellError("--cell-types: the candidate list is empty; give cell types or --ontology-root CL:...")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LangCellError(f"--cell-types: '{dup}' is listed twice; give each candidate once")
    texts, sources = [], []
    for name in names:
        term = ontology.term_for(name)
        texts.append(ontology.description(term, prompt) if term else class_text(prompt, name, ""))
        sources.append("ontology" if term else "free text")
    return Candidates(names, texts, sources)


class _CountRows:
    """Row slices of X or layers['counts'] read from the open HDF5 file."""

    def __init__(self, h5, source: str):
        from anndata.io import sparse_dataset

        key = "layers/counts" if "layers" in h5 and "counts" in h5["layers"] else "X"
        self.name = "layers['counts']" if key != "X" else "X"
        node = h5[key]
        self.sparse = not hasattr(node, "shape")
        if self.sparse:
            enc = node.attrs.get("encoding-type", "")
            if enc != "csr_matrix":
                raise LangCellError(f"{source}: {self.name} is stored as {enc or 'an unknown format'}; "
                                    "annotate reads row chunks and needs CSR (adata.X = adata.X.tocsr())")
            self.node = sparse_dataset(node)
        else:
            self.node = node
        self.n_obs = self.node.shape[0]

    def __getitem__(self, rows: slice):
        import scipy.sparse as sp

        return self.node[rows] if self.sparse else sp.csr_matrix(np.asarray(self.node[rows]))


def annotate(model: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike,
             cell_types: list[str] | None = None, ontology_root: str | None = None, *,
             ontology_terms: str | None = None, chunk_size: int = 4096, batch_size: int = 32,
             top_k: int | None = None, alpha: float = 0.1, min_gene_overlap: float = 0.25,
             device: str = "cpu", text_tokenizer: str | None = None) -> dict:
    """Annotate `input` into `output`; returns a summary (cells, candidates, prediction counts,
    scoring). `top_k=None` is LangCell's exact formula, or top-AUTO_TOP_K above AUTO_TOP_K_ABOVE
    candidates, said on stderr and in `uns['langcell']`."""
    import sys

    import h5py
    from anndata.io import read_elem, write_elem
    from tqdm import tqdm

    from eval.data import make_tokenizer

    input, output = Path(input), Path(output)
    if not input.is_file():
        raise LangCellError(f"{input}: input file not found; pass an existing .h5ad")
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
    with h5py.File(input, "r") as src:
        var = read_elem(src["var"])
        rows = _CountRows(src, str(input))
        if rows.n_obs:
            check_counts(rows[slice(0, min(rows.n_obs, 1000))], str(input), rows.name)
        gene_ids, share, used = resolve_gene_ids(var, vocab.token_dictionary, str(input), min_gene_overlap)
        n_counts_col = "n_counts" if "obs" in src and "n_counts" in src["obs"] else None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.annotate.tmp"
    shutil.copyfile(input, tmp)
    try:
        n = rows.n_obs
        pred = np.empty(n, dtype=object)
        score = np.zeros(n, dtype=np.float32)
        top3 = np.empty(n, dtype=object)
        names = np.asarray(cands.names, dtype=object)
        with h5py.File(input, "r") as src, h5py.File(tmp, "r+") as dst:
            rows = _CountRows(src, str(input))
            obs = read_elem(dst["obs"])
            n_counts = obs["n_counts"].to_numpy(np.float64) if n_counts_col else None
            obsm = dst["obsm"] if "obsm" in dst else dst.create_group("obsm")
            if "obsm" not in src:
                obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
            if OBSM_KEY in obsm:
                del obsm[OBSM_KEY]
            emb = obsm.create_dataset(OBSM_KEY, shape=(n, scorer.text_embeds.shape[1]), dtype="float32",
                                      chunks=(min(max(n, 1), 1024), scorer.text_embeds.shape[1]))
            emb.attrs["encoding-type"], emb.attrs["encoding-version"] = "array", "0.2.0"
            with tqdm(total=n, desc="annotate", unit="cell") as bar:
                for start in range(0, n, chunk_size):
                    stop = min(n, start + chunk_size)
                    seqs = tokenizer.tokenize_csr(rows[slice(start, stop)], gene_ids,
                                                  None if n_counts is None else n_counts[start:stop])
                    chunk_emb = np.zeros((stop - start, emb.shape[1]), np.float32)
                    for b in range(0, len(seqs), batch_size):
                        ids, mask = pad_cells(seqs[b:b + batch_size], vocab.pad_id)
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
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    counts = {str(k): int(v) for k, v in zip(*np.unique(pred.astype(str), return_counts=True))} if n else {}
    return {"n_cells": int(n), "n_candidates": len(cands.names), "gene_overlap": share, "gene_ids_from": used,
            "counts_from": rows.name, "candidates": dict(zip(cands.names, cands.sources)), "predictions": counts,
            **scoring}
