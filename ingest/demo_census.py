"""`langcell ingest demo-census`: a small, real, Census-schema SOMA store built offline.

Cells come from data that ships inside PyPI packages, so the demo and the tests need no network:
- scanpy's `pbmc68k_reduced`: 700 PBMCs of one healthy donor (Zheng et al. 2017, 10x 3' v1),
  10 FACS-derived labels in `obs.bulk_labels`. Its `raw.X` is log1p(counts / n_counts * 1e4), so
  the counts come back as round(expm1(raw.X) * n_counts / 1e4) (checked to be integers);
  `raw` keeps only 765 genes, while `n_counts` is the library size over all genes: it is kept
  as `source_total_counts`.
- celltypist's `sample_cell_by_gene.csv`: 559 cells, raw counts, no labels, tissue, donor or
  assay: those columns say 'unknown'.

Gene symbols become Ensembl ids through the Geneformer v1 symbol table, then GENCODE v44
(celltypist ships it) for symbols that table lacks and GENCODE names uniquely. Symbols neither
maps are dropped (a Census var holds Ensembl ids), symbols mapping to one id are summed; the
counts are reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from langcell.core.errors import LangCellError

GENEFORMER_DIR = Path(__file__).resolve().parents[1] / "build_sclibrary" / "reference" / "geneformer_v1"

# pbmc68k bulk labels (FACS-sorted populations) -> CL. Checked against CL labels in the tests.
PBMC68K_CELL_TYPES = {
    "CD14+ Monocyte": "CL:0001054",                # CD14-positive monocyte
    "CD19+ B": "CL:0000236",                       # B cell
    "CD4+/CD25 T Reg": "CL:0000792",               # CD4-positive, CD25-positive, alpha-beta regulatory T cell
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",    # naive thymus-derived CD4-positive, alpha-beta T cell
    "CD4+/CD45RO+ Memory": "CL:0000897",           # CD4-positive, alpha-beta memory T cell
    "CD56+ NK": "CL:0000623",                      # natural killer cell
    "CD8+ Cytotoxic T": "CL:0000794",              # CD8-positive, alpha-beta cytotoxic T cell
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8-positive, alpha-beta T cell
    # CD34+ sorted PBMCs are circulating stem and progenitor cells: the CL term for that pool.
    "CD34+": "CL:0008001",                         # hematopoietic precursor cell
    "Dendritic": "CL:0000451",                     # dendritic cell
}
PBMC68K_DATASET = "scanpy-pbmc68k-reduced"
CELLTYPIST_DATASET = "celltypist-sample-cell-by-gene"
INTEGER_TOLERANCE = 0.1  # float32 log1p storage puts recovered counts within 0.082 of an integer

_UNKNOWN = "unknown"


@dataclass
class SourceReport:
    name: str
    n_cells: int
    n_symbols: int
    n_mapped: int
    n_unmapped: int
    n_merged: int
    total_counts: float   # over all of the source's genes
    stored_counts: float  # over the genes that map to Ensembl ids (what the store holds)
    max_integer_error: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DemoSummary:
    out: Path
    n_cells: int
    n_genes: int
    sources: list[SourceReport] = field(default_factory=list)


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LangCellError(f"{package}: package not installed; run `make install` (it ships the demo data)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise LangCellError(f"{path}: file missing from the installed {package}; reinstall {package}")
    return path


def symbol_to_ensembl() -> tuple[dict[str, str], dict[str, str]]:
    """(Geneformer v1 symbol -> id, GENCODE v44 symbol -> id for symbols GENCODE names once)."""
    try:
        geneformer = json.loads((GENEFORMER_DIR / "gene_symbol_to_ensembl.json").read_text())
    except OSError as exc:
        raise LangCellError(f"{GENEFORMER_DIR}: gene_symbol_to_ensembl.json unreadable ({exc.strerror}); "
                            "restore build_sclibrary/reference/geneformer_v1 from git") from None
    gencode = pd.read_csv(_package_file("celltypist", "data", "samples", "GENCODEv44_Gene_id2name.csv"),
                          header=None, names=["feature_id", "feature_name"], dtype=str)
    unique = gencode.drop_duplicates("feature_name", keep=False)
    return geneformer, dict(zip(unique["feature_name"], unique["feature_id"]))


def map_symbols(symbols: list[str], maps: tuple[dict[str, str], dict[str, str]]) -> list[str | None]:
    primary, fallback = maps
    return [primary.get(s) or fallback.get(s) for s in symbols]


def _to_ensembl(X, symbols: list[str], maps, name: str, n_cells: int, total: float, err: float):
    """Columns of X (cells x symbols, scipy sparse) summed per Ensembl id; drops unmapped."""
    import scipy.sparse as sp

    ids = map_symbols(symbols, maps)
    keep = [i for i, g in enumerate(ids) if g is not None]
    kept_ids = [ids[i] for i in keep]
    unique_ids, inverse = np.unique(np.array(kept_ids, dtype=object), return_inverse=True)
    merge = sp.csr_matrix((np.ones(len(keep)), (np.arange(len(keep)), inverse)),
                          shape=(len(keep), len(unique_ids)))
    Xg = (sp.csr_matrix(X)[:, keep] @ merge).tocsr()
    names = {}
    for i in keep:
        names.setdefault(ids[i], symbols[i])
    report = SourceReport(name=name, n_cells=n_cells, n_symbols=len(symbols), n_mapped=len(keep),
                          n_unmapped=len(symbols) - len(keep), n_merged=len(keep) - len(unique_ids),
                          total_counts=total, stored_counts=float(Xg.sum()), max_integer_error=err)
    return Xg, list(unique_ids), names, report


def load_pbmc68k():
    """(counts csr cells x symbols, symbols, obs DataFrame, max distance to an integer)."""
    import anndata
    import scipy.sparse as sp
    import warnings

    path = _package_file("scanpy", "datasets", "10x_pbmc68k_reduced.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the file predates anndata's obsp layout
        adata = anndata.read_h5ad(path)
    if adata.raw is None or "n_counts" not in adata.obs or "bulk_labels" not in adata.obs:
        raise LangCellError(f"{path}: expected raw, obs.n_counts and obs.bulk_labels; reinstall scanpy")
    log_norm = sp.csr_matrix(adata.raw.X, dtype=np.float64)
    scale = adata.obs["n_counts"].to_numpy(dtype=np.float64) / 1e4
    values = np.expm1(log_norm.data) * np.repeat(scale, np.diff(log_norm.indptr))
    counts = np.round(values)
    err = float(np.abs(values - counts).max()) if len(values) else 0.0
    if err > INTEGER_TOLERANCE:
        raise LangCellError(f"{path}: raw.X does not give integer counts (off by {err:.3f}); "
                            "this scanpy ships a different pbmc68k_reduced")
    X = sp.csr_matrix((counts.astype(np.float32), log_norm.indices, log_norm.indptr), shape=log_norm.shape)
    X.eliminate_zeros()
    labels = adata.obs["bulk_labels"].astype(str)
    unknown = sorted(set(labels) - set(PBMC68K_CELL_TYPES))
    if unknown:
        raise LangCellError(f"{path}: bulk label {unknown[0]!r} has no CL term in PBMC68K_CELL_TYPES; add it")
    obs = pd.DataFrame({"source_cell_id": adata.obs_names.astype(str), "bulk_label": labels.to_numpy(),
                        "source_total_counts": adata.obs["n_counts"].to_numpy(dtype=np.float64)})
    return X, list(adata.raw.var_names.astype(str)), obs, err


def load_celltypist_sample():
    """(counts csr cells x symbols, symbols, obs DataFrame, max distance to an integer)."""
    import scipy.sparse as sp

    path = _package_file("celltypist", "data", "samples", "sample_cell_by_gene.csv")
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split(",")[1:]
        cells, rows = [], []
        # np.fromstring parses a 32,786-value row in C; pandas takes 5-15 s for this file.
        for line in handle:
            name, rest = line.rstrip("\n").split(",", 1)
            cells.append(name)
            rows.append(np.fromstring(rest, sep=","))
    dense = np.vstack(rows)
    if dense.shape[1] != len(header):
        raise LangCellError(f"{path}: rows have {dense.shape[1]} values for {len(header)} genes; reinstall celltypist")
    counts = np.round(dense)
    err = float(np.abs(dense - counts).max())
    if err > 1e-6:
        raise LangCellError(f"{path}: values are not counts (off an integer by {err:.3g}); reinstall celltypist")
    obs = pd.DataFrame({"source_cell_id": cells, "source_total_counts": counts.sum(axis=1)})
    return sp.csr_matrix(counts.astype(np.float32)), header, obs, err


def build_demo_census(out: str | os.PathLike, progress: bool = True) -> DemoSummary:
    """Write the demo store (pbmc68k_reduced then the celltypist sample) at `out`."""
    import pyarrow as pa
    import scipy.sparse as sp

    from langcell.ingest.ontology import GuideSource
    from langcell.ingest.soma_store import OBS_LABEL_COLUMNS, CensusStoreWriter, DatasetInfo, check_output

    from tqdm import tqdm

    check_output(out)
    bar = tqdm(total=3, unit="step", desc="demo-census", disable=not progress)
    guide = GuideSource()
    maps = symbol_to_ensembl()
    sources = []
    X, symbols, obs, err = load_pbmc68k()
    sources.append((PBMC68K_DATASET, *_to_ensembl(X, symbols, maps, "scanpy pbmc68k_reduced", X.shape[0],
                                                   float(X.sum()), err), obs))
    bar.update()
    X, symbols, obs, err = load_celltypist_sample()
    sources.append((CELLTYPIST_DATASET, *_to_ensembl(X, symbols, maps, "celltypist sample_cell_by_gene",
                                                      X.shape[0], float(X.sum()), err), obs))
    bar.update()

    gene_ids = sorted(set().union(*(set(s[2]) for s in sources)))
    position = {g: i for i, g in enumerate(gene_ids)}
    names: dict[str, str] = {}
    for s in sources:
        for g, n in s[3].items():
            names.setdefault(g, n)
    genes = pd.DataFrame({"feature_id": gene_ids, "feature_name": [names[g] for g in gene_ids],
                          # GENCODE length and biotype are not in any shipped table: 0 / unknown.
                          "feature_length": np.zeros(len(gene_ids), dtype=np.int64), "feature_type": _UNKNOWN})

    blocks, obs_frames, datasets = [], [], []
    for dataset_id, Xg, ids, _, report, src_obs in sources:
        cols = np.array([position[g] for g in ids], dtype=np.int64)
        remap = sp.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), cols)), shape=(len(ids), len(gene_ids)))
        blocks.append((Xg @ remap).tocsr())
        frame = _obs_for(dataset_id, src_obs, guide)
        frame["n_measured_vars"] = len(ids)
        obs_frames.append(frame)
        datasets.append(DatasetInfo(dataset_id=dataset_id, title=report.name, collection_name="langcell demo",
                                    source=report.name, n_cells=Xg.shape[0], measured_genes=cols))
    X = sp.vstack(blocks).tocsr()
    X.sort_indices()
    obs = pd.concat(obs_frames, ignore_index=True)
    categories = {c: list(dict.fromkeys(obs[c])) for c in OBS_LABEL_COLUMNS}
    extra = [pa.field("source_cell_id", pa.large_string()), pa.field("bulk_label", pa.large_string()),
             pa.field("source_total_counts", pa.float64())]
    writer = CensusStoreWriter(out, X.shape[0], genes, categories, extra_obs_fields=extra,
                               summary={"census_build_date": "demo", "source": "scanpy pbmc68k_reduced; "
                                        "celltypist sample_cell_by_gene"})
    with writer:
        for d in datasets:
            writer.add_dataset(d)
        coo = X.tocoo()
        columns = {c: obs[c].tolist() for c in OBS_LABEL_COLUMNS}
        columns.update({"is_primary_data": obs["is_primary_data"].to_numpy(),
                        "n_measured_vars": obs["n_measured_vars"].to_numpy(),
                        "source_cell_id": obs["source_cell_id"].tolist(),
                        "bulk_label": obs["bulk_label"].tolist(),
                        "source_total_counts": obs["source_total_counts"].to_numpy()})
        writer.write(columns, coo.row, coo.col, coo.data)
    bar.update()
    bar.close()
    return DemoSummary(out=Path(out), n_cells=X.shape[0], n_genes=len(gene_ids), sources=[s[4] for s in sources])


def _obs_for(dataset_id: str, src: pd.DataFrame, guide) -> pd.DataFrame:
    n = len(src)
    if dataset_id == PBMC68K_DATASET:
        cell_type_ids = src["bulk_label"].map(PBMC68K_CELL_TYPES)
        # Zheng et al. 2017: fresh PBMCs of one healthy donor ("Donor A"), 10x GemCode (3' v1).
        fixed = {"assay_ontology_term_id": "EFO:0009901", "disease_ontology_term_id": "PATO:0000461",
                 "tissue_ontology_term_id": "UBERON:0000178", "tissue_general_ontology_term_id": "UBERON:0000178",
                 "donor_id": "pbmc68k-donor-A"}
        bulk = src["bulk_label"]
    else:
        cell_type_ids = pd.Series([_UNKNOWN] * n)
        fixed = {"assay_ontology_term_id": _UNKNOWN, "disease_ontology_term_id": _UNKNOWN,
                 "tissue_ontology_term_id": _UNKNOWN, "tissue_general_ontology_term_id": _UNKNOWN,
                 "donor_id": _UNKNOWN}
        bulk = pd.Series([""] * n)

    def label(term_id: str) -> str:
        return _UNKNOWN if term_id == _UNKNOWN else guide.label(term_id)

    frame = pd.DataFrame({"dataset_id": [dataset_id] * n,
                          "cell_type_ontology_term_id": cell_type_ids.to_numpy(),
                          "cell_type": [label(t) for t in cell_type_ids]})
    for column, term_id in fixed.items():
        frame[column] = term_id
        if column.endswith("_ontology_term_id"):
            frame[column[: -len("_ontology_term_id")]] = label(term_id)
    # Neither source records sex, ancestry or age: the Census's 'unknown' for all three.
    for column in ("sex", "self_reported_ethnicity", "development_stage"):
        frame[column] = _UNKNOWN
        frame[f"{column}_ontology_term_id"] = _UNKNOWN
    frame["suspension_type"] = "cell"
    frame["tissue_type"] = "tissue"
    frame["is_primary_data"] = True
    frame["source_cell_id"] = src["source_cell_id"].to_numpy()
    frame["bulk_label"] = bulk.to_numpy()
    frame["source_total_counts"] = src["source_total_counts"].to_numpy(dtype=np.float64)
    return frame
