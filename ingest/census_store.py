"""The store side of `langcell ingest census`: opening a Census release or a local SOMA store,
checking its schema, the cells passing the filter (the plan's input) and genes.parquet."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from langcell.core.errors import LangCellError
from langcell.ingest.retry import S3_RETRY_CONFIG

ORGANISMS = ("homo_sapiens", "mus_musculus")

REQUIRED_OBS = (
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
    "donor_id", "is_primary_data", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id",
    "sex", "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
    "tissue_general", "tissue_general_ontology_term_id",
)

REQUIRED_VAR = ("feature_id", "feature_name", "feature_length")

# Columns this stage computes; a store obs column of the same name (AnnData often carries an
# `n_counts` of its own) is replaced so the contract's meaning always holds.
COMPUTED = ("n_counts", "gene_index", "counts")

# TileDB settings of every read, on top of the Census' defaults. Result buffers of 16 MiB per
# column (the Census asks for 1 GiB) stay below glibc's largest mmap threshold, so the heap hands
# the same pages back for every batch; and TileDB no longer gives freed memory back to the kernel
# after each query. Otherwise a chunk's ~2 GB of result and tile buffers are fresh pages every time,
# and faulting them in cost as much CPU as the read itself (see BENCHMARKS.md, Ingest).
# S3_RETRY_CONFIG: TileDB's own retries of S3 requests, below the per-chunk retries.
READ_CONFIG = {"soma.init_buffer_bytes": 16 << 20, "sm.mem.malloc_trim": "false", **S3_RETRY_CONFIG}



@dataclass(frozen=True)
class Source:
    census_version: str | None
    uri: str | None

    def describe(self) -> str:
        return self.uri if self.uri is not None else f"Census {self.census_version}"

    def as_dict(self) -> dict[str, Any]:
        return {"census_version": self.census_version, "uri": self.uri}



def _open_source(census_version: str | None, uri: str | None):
    import cellxgene_census

    if uri is not None:
        if "://" not in uri:
            # Absolute, so that a rerun from another directory is recognised as the same source.
            uri = os.path.abspath(uri)
            if not os.path.isdir(uri):
                raise LangCellError(f"{uri}: store not found; pass --uri a SOMA store folder (see "
                                    "`langcell ingest demo-census`) or use --census-version")
        source = Source(None, uri)
    else:
        requested = census_version or "stable"
        try:
            release = cellxgene_census.get_census_version_description(requested)["release_build"]
        except Exception as exc:  # network errors and unknown versions alike
            raise LangCellError(f"Census {requested}: cannot resolve the version ({_first_line(exc)}); check "
                                "the network, pick a version from cellxgene_census.get_census_version_directory(), "
                                "or pass --uri LOCAL_STORE") from None
        source = Source(release, None)
    return source, _open_handle(source)



def _open_handle(source: Source):
    import cellxgene_census

    try:
        if source.uri is not None:
            return cellxgene_census.open_soma(uri=source.uri, tiledb_config=READ_CONFIG)
        return cellxgene_census.open_soma(census_version=source.census_version, tiledb_config=READ_CONFIG)
    except Exception as exc:
        raise LangCellError(f"{source.describe()}: cannot open the SOMA store ({_first_line(exc)}); check the "
                            "path or the network") from None



def _experiment(census, source: Source, organism: str):
    try:
        experiment = census["census_data"][organism]
        experiment.ms["RNA"].X["raw"]  # looked up now so a missing layer fails here, with this message
    except Exception:
        raise LangCellError(f"{source.describe()}: no census_data/{organism} experiment with measurement RNA "
                            "and X layer 'raw'; pass a store laid out like the Census or another "
                            "--organism") from None
    return experiment



# Of census_info/summary: what the release is; `langcell ingest ontologies` takes the ontology
# versions of its CELLxGENE schema (`dataset_schema_version`).
SUMMARY_LABELS = ("census_schema_version", "census_build_date", "dataset_schema_version")



def _census_summary(census) -> dict[str, str]:
    """The release's SUMMARY_LABELS where its census_info/summary has them (a local store may not)."""
    try:
        table = census["census_info"]["summary"].read().concat().to_pydict()
    except Exception:  # no census_info in the store: nothing to say about the release
        return {}
    values = dict(zip(table.get("label", []), table.get("value", [])))
    return {label: str(values[label]) for label in SUMMARY_LABELS if label in values}



def _check_schema(experiment, source: Source, organism: str) -> list[str]:
    obs_names = experiment.obs.schema.names
    missing = [name for name in REQUIRED_OBS if name not in obs_names]
    if missing:
        raise LangCellError(f"{source.describe()}: obs of {organism} lacks required column(s) {', '.join(missing)}; "
                            "use a store with the Census obs schema")
    var_names = experiment.ms["RNA"].var.schema.names
    missing = [name for name in REQUIRED_VAR if name not in var_names]
    if missing:
        raise LangCellError(f"{source.describe()}: var of {organism}/RNA lacks required column(s) "
                            f"{', '.join(missing)}; use a store with the Census var schema")
    return [name for name in obs_names if name != "soma_joinid" and name not in COMPUTED]



def _plan_joinids(experiment, source: Source, obs_filter: str, max_cells: int | None) -> np.ndarray:
    import tiledbsoma

    try:
        with experiment.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter)) as query:
            joinids = query.obs_joinids().to_numpy()
    except Exception as exc:
        raise LangCellError(_filter_error(source, "--obs-filter", obs_filter, exc)) from None
    joinids = np.sort(joinids.astype(np.int64, copy=False))
    duplicate = _first_duplicate(joinids)
    if duplicate is not None:
        raise LangCellError(f"{source.describe()}: obs soma_joinid {duplicate} appears more than once; the store "
                            "is corrupt, rebuild it")
    if joinids.size == 0:
        raise LangCellError(f"{source.describe()}: no cell passes --obs-filter {obs_filter!r}; loosen the filter")
    return joinids[:max_cells] if max_cells is not None else joinids



def _genes(experiment, source: Source, var_filter: str | None) -> tuple[pa.Table, np.ndarray]:
    """genes.parquet's table (kept genes in store order) and a map var soma_joinid -> gene_index (-1: dropped)."""
    var = experiment.ms["RNA"].var
    table = var.read().concat()
    table = table.take(pa.array(np.argsort(table["soma_joinid"].to_numpy(), kind="stable")))
    var_joinids = table["soma_joinid"].to_numpy()
    if var_joinids.size == 0:
        raise LangCellError(f"{source.describe()}: var of RNA is empty; use a store with genes")
    n_store_genes = int(var_joinids.max()) + 1
    if var_filter is not None:
        try:
            kept = var.read(value_filter=var_filter, column_names=["soma_joinid"]).concat()["soma_joinid"]
        except Exception as exc:
            raise LangCellError(_filter_error(source, "--var-filter", var_filter, exc)) from None
        mask = np.isin(var_joinids, kept.to_numpy())
        if not mask.any():
            raise LangCellError(f"{source.describe()}: no gene passes --var-filter {var_filter!r}; loosen the filter")
        table = table.filter(pa.array(mask))
        var_joinids = var_joinids[mask]
    keep_map = np.full(n_store_genes, -1, dtype=np.int32)
    keep_map[var_joinids] = np.arange(var_joinids.size, dtype=np.int32)
    names = table.schema.names
    # The Census' `feature_type` holds the GENCODE biotype; CELLxGENE's `feature_biotype` only says
    # "gene" or "spike-in", so it is the fallback and its "gene" says nothing.
    biotype_column = next((c for c in ("feature_type", "feature_biotype") if c in names), None)
    values = _plain(table[biotype_column]).to_pylist() if biotype_column else [None] * table.num_rows
    biotype = pa.array([value if value and value != "gene" else "unknown" for value in values], pa.string())
    genes = pa.table({
        "gene_index": pa.array(np.arange(table.num_rows, dtype=np.int32)),
        "feature_id": _plain(table["feature_id"]).cast(pa.string()),
        "feature_name": _plain(table["feature_name"]).cast(pa.string()),
        "feature_length": table["feature_length"].cast(pa.int64()),
        "feature_biotype": biotype,
    })
    return genes, keep_map



def _genes_parquet(genes: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(genes, sink, compression="zstd")
    return sink.getvalue().to_pybytes()



def _filter_error(source: Source, flag: str, text: str, exc: BaseException) -> str:
    return (f"{source.describe()}: {flag} {text!r} is not a valid filter ({_first_line(exc)}); write it over "
            "existing columns, e.g. \"is_primary_data == True and tissue_general == 'blood'\"")



def _plain_type(arrow_type: pa.DataType) -> pa.DataType:
    """Parquet column type for an obs column: categories become their values, large strings strings."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_large_string(arrow_type):
        return pa.string()
    if pa.types.is_large_binary(arrow_type):
        return pa.binary()
    return arrow_type



def _plain(column):
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column



def _first_duplicate(sorted_values: np.ndarray) -> int | None:
    values = np.sort(sorted_values)
    repeated = np.flatnonzero(values[1:] == values[:-1])
    return int(values[repeated[0]]) if repeated.size else None



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).removeprefix("SOMAError: ")
