"""Small ingest folders that follow the ingest -> build contract exactly (docs/DEVELOPING.md),
and a plain per-cell reference of Geneformer's rank-value encoding for the build tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REF = Path(__file__).resolve().parents[1] / "build_sclibrary" / "reference" / "geneformer_v1"

CELL_TYPES = [("B cell", "CL:0000236", "A lymphocyte of B lineage that is capable of B cell mediated immunity."),
              ("T cell", "CL:0000084", "A type of lymphocyte whose defining characteristic is the expression of a "
                                       "T cell receptor complex."),
              ("monocyte", "CL:0000576", "Myeloid mononuclear recirculating leukocyte"),
              ("unknown", "unknown", "")]
TERMS = [
    ("CL:0000236", "CL", "B cell", "A lymphocyte of B lineage that is capable of B cell mediated immunity.",
     ["B lymphocyte", "B-cell"], ["CL:0000542"]),
    ("CL:0000084", "CL", "T cell", CELL_TYPES[1][2], ["T lymphocyte"], ["CL:0000542"]),
    ("CL:0000576", "CL", "monocyte", "Myeloid mononuclear recirculating leukocyte", [], []),
    ("CL:0000542", "CL", "lymphocyte", "A lymphocyte is a leukocyte.", [], []),
    ("UBERON:0000178", "UBERON", "blood", "A fluid that is composed of blood plasma and erythrocytes.", [], []),
    ("PATO:0000461", "PATO", "normal", "", [], []),
    ("MONDO:0005015", "MONDO", "diabetes mellitus", "A metabolic disease.", [], []),
    ("PATO:0000384", "PATO", "male", "A biological sex quality inhering in an individual.", [], []),
    ("EFO:0009922", "EFO", "10x 3' v3", "", [], []),
    ("HsapDv:0000087", "HsapDv", "human adult stage", "", [], []),
]


def write_ingest(root: Path, n_cells: int = 240, n_parts: int = 3, n_datasets: int = 6, seed: int = 0,
                 n_vocab_genes: int = 150, empty_vocab_cells: int = 3, vocab: str = "geneformer",
                 dataset_blocks: bool = False) -> dict:
    """An ingest folder with `n_cells` cells in `n_parts` parts; returns facts the tests check.
    `dataset_blocks`: cells stored dataset by dataset, as the Census does (else each cell's
    dataset is drawn at random)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "cells").mkdir(exist_ok=True)
    (root / "ontology").mkdir(exist_ok=True)
    tokens = json.loads((REF / "token_dictionary.json").read_text())
    vocab_genes = [g for g in tokens if g.startswith("ENSG")][:n_vocab_genes]
    other = [f"ENSG9{i:010d}" for i in range(20)]  # not in the Geneformer vocabulary
    gene_ids = list(rng.permutation(vocab_genes + other))
    biotypes = ["protein_coding" if g in vocab_genes else "lncRNA" for g in gene_ids]
    if vocab == "mouse":
        gene_ids = [f"ENSMUSG{i:011d}" for i in range(len(gene_ids))]
        biotypes = ["unknown"] * len(gene_ids)
    genes = pa.table({"gene_index": pa.array(np.arange(len(gene_ids)), pa.int32()),
                      "feature_id": gene_ids, "feature_name": [f"SYM{i}" for i in range(len(gene_ids))],
                      "feature_length": pa.array(rng.integers(500, 5000, len(gene_ids)), pa.int64()),
                      "feature_biotype": biotypes})
    pq.write_table(genes, root / "genes.parquet")
    other_cols = np.array([i for i, g in enumerate(gene_ids) if g in other], dtype=np.int32)
    parts = []
    joinid = 0
    per_part = np.array_split(np.arange(n_cells), n_parts)
    for p, cells in enumerate(per_part):
        rows = {k: [] for k in ("soma_joinid", "n_counts", "gene_index", "counts")}
        obs = {k: [] for k in ("dataset_id", "donor_id", "cell_type", "cell_type_ontology_term_id", "tissue",
                               "tissue_ontology_term_id", "disease", "disease_ontology_term_id",
                               "development_stage", "development_stage_ontology_term_id", "sex",
                               "sex_ontology_term_id", "assay", "assay_ontology_term_id",
                               "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id",
                               "suspension_type", "tissue_type", "tissue_general",
                               "tissue_general_ontology_term_id")}
        flags = []
        for c in cells:
            joinid += int(rng.integers(1, 4))
            if c < empty_vocab_cells:
                idx = np.sort(rng.choice(other_cols, 5, replace=False))
            else:
                k = int(rng.integers(5, 60))
                idx = np.sort(rng.choice(len(gene_ids), k, replace=False)).astype(np.int32)
            counts = rng.integers(1, 4, idx.size).astype(np.float32)  # small integers: many ties
            rows["soma_joinid"].append(joinid)
            rows["n_counts"].append(float(counts.sum() + rng.integers(0, 50)))  # genes outside the store too
            rows["gene_index"].append(idx.astype(np.int32))
            rows["counts"].append(counts)
            ds = int(rng.integers(0, n_datasets))
            if dataset_blocks:
                ds = int(c) * n_datasets // n_cells
            label, term, _ = CELL_TYPES[int(rng.integers(0, len(CELL_TYPES)))]
            obs["dataset_id"].append(f"dataset-{ds}")
            obs["donor_id"].append(f"donor-{ds}-{int(rng.integers(0, 3))}")
            obs["cell_type"].append(label)
            obs["cell_type_ontology_term_id"].append(term)
            obs["tissue"].append("blood")
            obs["tissue_ontology_term_id"].append("UBERON:0000178")
            sick = rng.random() < 0.3
            obs["disease"].append("diabetes mellitus" if sick else "normal")
            obs["disease_ontology_term_id"].append("MONDO:0005015" if sick else "PATO:0000461")
            obs["development_stage"].append("human adult stage")
            obs["development_stage_ontology_term_id"].append("HsapDv:0000087")
            obs["sex"].append("male")
            obs["sex_ontology_term_id"].append("PATO:0000384")
            obs["assay"].append("10x 3' v3")
            obs["assay_ontology_term_id"].append("EFO:0009922")
            obs["self_reported_ethnicity"].append("unknown")
            obs["self_reported_ethnicity_ontology_term_id"].append("unknown")
            obs["suspension_type"].append("cell")
            obs["tissue_type"].append("tissue")
            obs["tissue_general"].append("blood")
            obs["tissue_general_ontology_term_id"].append("UBERON:0000178")
            flags.append(True)
        table = pa.table({"soma_joinid": pa.array(rows["soma_joinid"], pa.int64()),
                          **{k: pa.array(v, pa.string()) for k, v in obs.items()},
                          "is_primary_data": pa.array(flags, pa.bool_()),
                          "n_counts": pa.array(rows["n_counts"], pa.float64()),
                          "gene_index": pa.array(rows["gene_index"], pa.list_(pa.int32())),
                          "counts": pa.array(rows["counts"], pa.list_(pa.float32()))})
        name = f"cells/part-{p:05d}.parquet"
        pq.write_table(table, root / name)
        parts.append({"name": name, "rows": len(cells), "joinid_min": int(rows["soma_joinid"][0]),
                      "joinid_max": int(rows["soma_joinid"][-1]), "sha256": _sha(root / name), "status": "done"})
    terms = pa.table({"term_id": [t[0] for t in TERMS], "ontology": [t[1] for t in TERMS],
                      "label": [t[2] for t in TERMS], "definition": [t[3] for t in TERMS],
                      "synonyms": pa.array([t[4] for t in TERMS], pa.list_(pa.string())),
                      "parents": pa.array([t[5] for t in TERMS], pa.list_(pa.string())),
                      "ancestors": pa.array([t[5] for t in TERMS], pa.list_(pa.string()))})
    pq.write_table(terms, root / "ontology" / "terms.parquet")
    manifest = {"format": "langcell-ingest/1", "complete": True,
                "source": {"census_version": None, "uri": "test"}, "organism": "homo_sapiens",
                "obs_filter": "is_primary_data == True", "var_filter": None, "max_cells": None,
                "n_genes": len(gene_ids), "genes_sha256": _sha(root / "genes.parquet"), "parts": parts,
                "n_cells": n_cells}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"gene_ids": gene_ids, "n_cells": n_cells, "empty": empty_vocab_cells}


def read_part_arrays(root: Path):
    """All cells of an ingest: (soma_joinid, n_counts, list of (gene_index, counts), dataset_id)."""
    out = []
    for part in json.loads((root / "manifest.json").read_text())["parts"]:
        t = pq.read_table(root / part["name"]).to_pydict()
        for j, n, g, c, d, ct in zip(t["soma_joinid"], t["n_counts"], t["gene_index"], t["counts"], t["dataset_id"],
                                     t["cell_type"]):
            out.append((j, n, np.asarray(g), np.asarray(c, dtype=np.float32), d, ct))
    return out


def reference_tokens(gene_ids, counts_dense_row, n_counts, tokens: dict, medians: dict, max_length: int):
    """Geneformer's per-cell algorithm written plainly: a stable sort of -value over the columns."""
    if not np.any(counts_dense_row):
        return np.array([tokens["<cls>"]], dtype=np.int32)
    keep = _vocab_columns(tuple(gene_ids), id(tokens), id(medians), tokens, medians)
    values = counts_dense_row[keep] / n_counts * 10_000 / np.array([medians[gene_ids[i]] for i in keep])
    nonzero = np.nonzero(values)[0]
    order = np.argsort(-values[nonzero], kind="stable")
    gene_tokens = np.array([tokens[gene_ids[keep[i]]] for i in nonzero[order]], dtype=np.int32)
    return np.concatenate([[tokens["<cls>"]], gene_tokens[:max_length - 1]]).astype(np.int32)


_COLUMNS: dict = {}


def _vocab_columns(gene_ids: tuple, tokens_id: int, medians_id: int, tokens: dict, medians: dict) -> list:
    """First column of each vocabulary gene, in column order (cached: the tests call this per cell)."""
    key = (gene_ids, tokens_id, medians_id)
    if key not in _COLUMNS:
        seen, keep = set(), []
        for i, g in enumerate(gene_ids):
            if g in medians and g in tokens and g not in seen:
                seen.add(g)
                keep.append(i)
        _COLUMNS.clear()
        _COLUMNS[key] = keep
    return _COLUMNS[key]


def rewrite_manifest(root: Path, **changes) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pbmc68k_counts():
    """scanpy's bundled pbmc68k_reduced as raw counts: (CSR float32, symbols, n_counts, labels)."""
    import scanpy as sc
    import scipy.sparse as sp

    adata = sc.datasets.pbmc68k_reduced()
    n_counts = adata.obs["n_counts"].to_numpy().astype(np.float64)
    raw = adata.raw.X.toarray() if sp.issparse(adata.raw.X) else np.asarray(adata.raw.X)
    counts = np.round(np.expm1(raw) * n_counts[:, None] / 1e4).astype(np.float32)
    return (sp.csr_matrix(counts), list(adata.raw.var_names), n_counts,
            adata.obs["bulk_labels"].astype(str).tolist())
