"""Reading an ingest folder (docs/DEVELOPING.md, contract ingest -> build) safely and in chunks.

The build trusts nothing it has not checked: the manifest must say `complete`, every part must be
`done` with a file whose sha256 matches, and genes.parquet must match `genes_sha256`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from langcell.core.errors import LangCellError
from langcell.core.files import read_json, sha256_file

INGEST_FORMAT = "langcell-ingest/1"
# Identity columns copied into meta.json / the HF datasets (labels and their term ids).
ASPECTS = ("cell_type", "tissue", "disease", "development_stage", "sex", "assay", "self_reported_ethnicity")
META_COLUMNS = tuple(c for a in ASPECTS for c in (a, f"{a}_ontology_term_id")) + ("dataset_id", "donor_id")
REQUIRED_COLUMNS = ("soma_joinid", "n_counts", "gene_index", "counts", "dataset_id", "cell_type",
                    "cell_type_ontology_term_id")


@dataclass
class Ingest:
    root: Path
    manifest: dict
    gene_ids: list[str]
    biotypes: list[str]

    @property
    def parts(self) -> list[dict]:
        return self.manifest["parts"]

    def part_path(self, part: dict) -> Path:
        return self.root / part["name"]


def open_ingest(root: str | os.PathLike) -> Ingest:
    """Validate the manifest and genes.parquet of an ingest folder (part checksums come later)."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise LangCellError(f"{manifest_path}: ingest manifest not found; run `langcell ingest census --out {root}` "
                            "(or pass the folder it wrote)")
    manifest = read_json(manifest_path, "ingest manifest")
    if manifest.get("format") != INGEST_FORMAT:
        raise LangCellError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {INGEST_FORMAT!r}; "
                            "pass a folder written by `langcell ingest`")
    if manifest.get("complete") is not True:
        raise LangCellError(f"{manifest_path}: ingest is not complete; rerun `langcell ingest` on it until it finishes")
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not parts:
        raise LangCellError(f"{manifest_path}: no parts listed; rerun `langcell ingest`")
    for part in parts:
        if part.get("status") != "done" or not part.get("sha256") or not part.get("name"):
            raise LangCellError(f"{manifest_path}: part {part.get('name')!r} is not done; rerun `langcell ingest`")
        if not (root / part["name"]).is_file():
            raise LangCellError(f"{root / part['name']}: part file missing; rerun `langcell ingest` to rewrite it")
    genes_path = root / "genes.parquet"
    if not genes_path.is_file():
        raise LangCellError(f"{genes_path}: not found; rerun `langcell ingest`")
    if manifest.get("genes_sha256") and sha256_file(genes_path) != manifest["genes_sha256"]:
        raise LangCellError(f"{genes_path}: sha256 does not match the manifest's genes_sha256; "
                            "the file changed after ingest, rerun `langcell ingest`")
    genes = pq.read_table(genes_path)
    missing = [c for c in ("gene_index", "feature_id") if c not in genes.column_names]
    if missing:
        raise LangCellError(f"{genes_path}: column {missing[0]!r} missing; rerun `langcell ingest`")
    index = genes["gene_index"].to_numpy()
    if not np.array_equal(index, np.arange(index.size)):
        raise LangCellError(f"{genes_path}: gene_index is not 0..n-1 in order; rerun `langcell ingest`")
    if manifest.get("n_genes") is not None and int(manifest["n_genes"]) != index.size:
        raise LangCellError(f"{genes_path}: {index.size} genes but the manifest says {manifest['n_genes']}; "
                            "rerun `langcell ingest`")
    gene_ids = [str(g) for g in genes["feature_id"].to_pylist()]
    biotypes = ([str(b) if b is not None else "unknown" for b in genes["feature_biotype"].to_pylist()]
                if "feature_biotype" in genes.column_names else ["unknown"] * len(gene_ids))
    return Ingest(root=root, manifest=manifest, gene_ids=gene_ids, biotypes=biotypes)


def verify_part(ingest: Ingest, part: dict) -> Path:
    path = ingest.part_path(part)
    if sha256_file(path) != part["sha256"]:
        raise LangCellError(f"{path}: sha256 does not match the ingest manifest; the part is corrupt or was "
                            "changed, rerun `langcell ingest` on that folder to rewrite it")
    return path


def part_columns(path: Path) -> list[str]:
    names = pq.read_schema(path).names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise LangCellError(f"{path}: column {missing[0]!r} missing; the ingest does not follow the contract, "
                            "rerun `langcell ingest`")
    return names


def read_obs(path: Path, columns: list[str]) -> pa.Table:
    """Only `columns` of a part, string columns dictionary-encoded so millions of rows stay small."""
    names = part_columns(path)
    present = [c for c in columns if c in names]
    table = pq.read_table(path, columns=present, read_dictionary=[c for c in present if c != "soma_joinid"])
    for name in columns:
        if name not in present:
            table = table.append_column(name, pa.array(["unknown"] * table.num_rows, pa.string()))
    return table


def iter_chunks(path: Path, n_genes: int, chunk_rows: int) -> Iterator[tuple[pa.Table, sp.csr_matrix, np.ndarray]]:
    """(obs columns, counts CSR cells x n_genes, n_counts) per chunk of `chunk_rows` cells."""
    names = part_columns(path)
    obs_cols = ["soma_joinid"] + [c for c in META_COLUMNS if c in names]
    handle = pq.ParquetFile(path)
    for batch in handle.iter_batches(batch_size=chunk_rows, columns=obs_cols + ["n_counts", "gene_index", "counts"]):
        table = pa.Table.from_batches([batch])
        genes = table["gene_index"].combine_chunks()
        counts = table["counts"].combine_chunks()
        offsets = genes.offsets.to_numpy()
        indptr = (offsets - offsets[0]).astype(np.int64)
        indices = genes.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        data = counts.flatten().to_numpy(zero_copy_only=False)
        if indices.size != data.size:
            raise LangCellError(f"{path}: gene_index and counts differ in length; rerun `langcell ingest`")
        if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
            raise LangCellError(f"{path}: gene_index outside 0..{n_genes - 1}; genes.parquet does not belong to "
                                "these parts, rerun `langcell ingest`")
        X = sp.csr_matrix((data, indices, indptr), shape=(table.num_rows, n_genes))
        n_counts = table["n_counts"].to_numpy().astype(np.float64, copy=False)
        obs = table.select(obs_cols)
        for name in META_COLUMNS:
            if name not in names:
                obs = obs.append_column(name, pa.array(["unknown"] * obs.num_rows, pa.string()))
        yield obs, X, n_counts
