"""Write local SOMA stores laid out like the CELLxGENE Census, streaming, cell chunk by cell chunk.

`cellxgene_census.open_soma(uri=DIR)` opens what this writes: a collection with `census_info`
(`summary`, `datasets`) and `census_data/<organism>` (an Experiment registered with `.set()`),
measurement `RNA` with `var`, `X/raw` (float32 counts) and `feature_dataset_presence_matrix`.
The obs schema carries every Census obs column, so `langcell ingest census` reads a local store
exactly as it reads the real Census.

The store is built in a hidden folder beside the target and renamed onto it at the end: a killed
build never leaves something at DIR that looks like a finished store.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from langcell.core.errors import LangCellError

# The Census obs columns that hold labels, term ids and ids; all dictionary-encoded as in the
# Census (categorical in pandas).
OBS_LABEL_COLUMNS = (
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
    "donor_id", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id", "sex",
    "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
    "tissue_general", "tissue_general_ontology_term_id",
)
# Per-cell summaries the Census computes over the stored genes; the writer derives them from X.
OBS_SUMMARY_FIELDS = (
    ("raw_sum", pa.float64()), ("nnz", pa.int64()), ("raw_mean_nnz", pa.float64()),
    ("raw_variance_nnz", pa.float64()), ("n_measured_vars", pa.int64()),
)
OBS_FLUSH_ROWS = 1 << 17
GENE_COLUMNS = ("feature_id", "feature_name", "feature_length", "feature_type")


def obs_schema(extra_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64(), nullable=False)]
    fields += [pa.field(name, pa.dictionary(pa.int32(), pa.large_string())) for name in OBS_LABEL_COLUMNS]
    fields.append(pa.field("is_primary_data", pa.bool_()))
    fields += [pa.field(name, kind) for name, kind in OBS_SUMMARY_FIELDS]
    fields += list(extra_fields)
    return pa.schema(fields)


def _var_schema() -> pa.Schema:
    return pa.schema([
        pa.field("soma_joinid", pa.int64(), nullable=False), pa.field("feature_id", pa.large_string()),
        pa.field("feature_name", pa.large_string()), pa.field("feature_type", pa.large_string()),
        pa.field("feature_length", pa.int64()), pa.field("nnz", pa.int64()),
        pa.field("n_measured_obs", pa.int64()),
    ])


# X layouts: "rows", one space tile spanning every gene, so chunks of cells given in row-major
# order are already in TileDB's global order and are written without a sort (about 5x faster than
# unordered writes); "census", the Census builder's X (cellxgene_census_builder
# build_soma/globals.py, CENSUS_DEFAULT_X_LAYERS_PLATFORM_CONFIG): 2048 x 2048 space tiles,
# row-major tile and cell order, 2**16 cells per data tile, duplicates allowed. Reads of that
# layout return each cell as one run per 2048-gene tile. Its zstd level (9 there) is 1 here: the
# level changes the build time, not the order of what a read returns.
X_LAYOUTS = ("rows", "census")
CENSUS_TILE = 2048


def _x_platform_config(n_genes: int, layout: str) -> dict:
    zstd = {"_type": "ZstdFilter", "level": 1}
    if layout == "census":
        return {"tiledb": {"create": {
            "capacity": 2 ** 16,
            "dims": {"soma_dim_0": {"tile": CENSUS_TILE, "filters": [zstd]},
                     "soma_dim_1": {"tile": CENSUS_TILE, "filters": ["ByteShuffleFilter", zstd]}},
            "attrs": {"soma_data": {"filters": ["ByteShuffleFilter", zstd]}},
            "cell_order": "row-major", "tile_order": "row-major", "allows_duplicates": True,
        }}}
    return {"tiledb": {"create": {
        "dims": {"soma_dim_0": {"tile": 2048, "filters": [{"_type": "DeltaFilter"}, zstd]},
                 "soma_dim_1": {"tile": max(int(n_genes), 1), "filters": [{"_type": "ByteShuffleFilter"}, zstd]}},
        "attrs": {"soma_data": {"filters": [{"_type": "ByteShuffleFilter"}, zstd]}},
    }}}


def check_layout(layout: str) -> str:
    if layout not in X_LAYOUTS:
        raise LangCellError(f"--layout {layout!r}: unknown X layout; use one of {', '.join(X_LAYOUTS)}")
    return layout


def global_order(rows: np.ndarray, cols: np.ndarray, layout: str) -> np.ndarray | None:
    """The permutation that puts a row-major chunk into TileDB's global order, None when it is in
    it already. Writes skip TileDB's sort (`sort_coords=False`), so they must come in that order."""
    if layout != "census" or len(rows) == 0:
        return None
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    # Row-major inside a tile and rows sorted in the chunk: a stable sort on the tile suffices.
    tile = (rows // CENSUS_TILE) * (int(cols.max()) // CENSUS_TILE + 1) + cols // CENSUS_TILE
    return np.argsort(tile, kind="stable")


def is_soma_store(path: str | os.PathLike) -> bool:
    """True when `path` holds a SOMA collection with a `census_data` member."""
    import tiledbsoma

    try:
        with tiledbsoma.Collection.open(str(path)) as root:
            return "census_data" in root
    except Exception:  # tiledbsoma raises several types for "not a SOMA object here"
        return False


def check_output(out: str | os.PathLike) -> Path:
    """Refuse to overwrite a folder that is neither empty nor a store this module wrote."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise LangCellError(f"{out}: exists and is a file, not a SOMA store; pass a new folder as --out")
        if any(out.iterdir()) and not is_soma_store(out):
            raise LangCellError(f"{out}: exists and is not a SOMA store (no census_data collection); "
                                "pass an empty or new folder as --out")
    return out


@dataclass
class DatasetInfo:
    """One row of `census_info/datasets`: the provenance of the cells with this dataset_id."""

    dataset_id: str
    title: str
    collection_name: str
    source: str
    n_cells: int
    measured_genes: np.ndarray | None = None  # gene indices the dataset measured; None = all


def _remove_stale_builds(out: Path) -> None:
    """Delete half-built stores of killed runs (`.NAME.building-PID` whose PID is gone)."""
    for stale in out.parent.glob(f".{out.name}.building-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _new_dataframe(parent, name: str, schema: pa.Schema, n_rows: int):
    """A DataFrame created on its own and registered with `.set()`. tiledbsoma 2.3's
    `add_new_dataframe` loses the enumeration values of dictionary columns written through
    the handle it returns (they read back as an empty dictionary); this path keeps them."""
    import tiledbsoma

    frame = tiledbsoma.DataFrame.create(f"{parent.uri.rstrip('/')}/{name}", schema=schema,
                                        index_column_names=["soma_joinid"], domain=[(0, max(n_rows, 1) - 1)],
                                        context=parent.context)
    parent.set(name, frame, use_relative_uri=True)
    return frame


# TileDB checks every coordinate of a write for duplicates, bounds and order; a caller whose
# chunks are unique, sorted and in range by construction can skip that (X writes ~2x faster).
TRUSTED_COORDS_CONFIG = {"sm.check_coord_dups": "false", "sm.check_coord_oob": "false",
                         "sm.check_global_order": "false"}


def cell_summaries(rows, counts, n: int, n_genes: int, cols) -> dict:
    """Per-cell nnz, sum and sum of squares of a row-major COO chunk, and its per-gene nnz."""
    rows = np.asarray(rows)
    counts = np.asarray(counts)
    if len(rows) and np.any(rows[1:] < rows[:-1]):
        raise LangCellError("cell chunk: rows are not sorted; pass COO in row-major order")
    # Rows are sorted, so per-cell sums are segment reductions over the non-empty rows.
    indptr = np.searchsorted(rows, np.arange(n + 1))
    nnz = np.diff(indptr)
    filled = nnz > 0
    raw_sum, sum_sq = np.zeros(n), np.zeros(n)
    if filled.any():
        values = counts.astype(np.float64)
        raw_sum[filled] = np.add.reduceat(values, indptr[:-1][filled])
        sum_sq[filled] = np.add.reduceat(values * values, indptr[:-1][filled])
    return {"nnz": nnz, "raw_sum": raw_sum, "sum_sq": sum_sq,
            "gene_nnz": np.bincount(np.asarray(cols, dtype=np.int64), minlength=n_genes)}


def write_x(array, rows, cols, counts, write_opts, layout: str = "rows") -> None:
    order = global_order(rows, cols, layout)
    if order is not None:
        rows, cols, counts = (np.asarray(a)[order] for a in (rows, cols, counts))
    array.write(pa.Table.from_pydict({"soma_dim_0": np.asarray(rows, dtype=np.int64),
                                      "soma_dim_1": np.asarray(cols, dtype=np.int64),
                                      "soma_data": np.asarray(counts, dtype=np.float32)}),
                platform_config=write_opts)


class XChunkWriter:
    """Writes row chunks into a store's X/raw from another process while the store is being
    built: each write is its own TileDB fragment, so several processes write X in parallel."""

    def __init__(self, x_uri: str, tiledb_config: dict[str, str], layout: str = "rows"):
        import tiledbsoma

        self._layout = layout
        self._array = tiledbsoma.SparseNDArray.open(
            x_uri, "w", context=tiledbsoma.SOMATileDBContext(tiledb_config=tiledb_config))
        self._opts = tiledbsoma.TileDBWriteOptions(sort_coords=False)

    def write(self, rows, cols, counts) -> None:
        if len(counts):
            write_x(self._array, rows, cols, counts, self._opts, self._layout)


class CensusStoreWriter:
    """Create a Census-schema store and append cells to it in soma_joinid order.

    Use as a context manager: `write(obs, rows, cols, counts)` appends one chunk (rows are local
    0..n-1 to the chunk, sorted row-major with cols ascending inside a row); on a clean exit the
    var table (with per-gene nnz), census_info and the presence matrix are written and the
    finished store is renamed onto `out`. `trusted_coords=True` turns off TileDB's coordinate
    checks (TRUSTED_COORDS_CONFIG) for callers whose chunks are correct by construction.
    `layout` is the tiling of X (`X_LAYOUTS`).
    """

    def __init__(self, out: str | os.PathLike, n_cells: int, genes: pd.DataFrame,
                 categories: dict[str, Sequence[str]], organism: str = "homo_sapiens",
                 extra_obs_fields: Sequence[pa.Field] = (), summary: dict[str, str] | None = None,
                 trusted_coords: bool = False, layout: str = "rows"):
        self.out = check_output(out)
        self.layout = check_layout(layout)
        if n_cells <= 0:
            raise LangCellError(f"{out}: a store needs at least one cell, got {n_cells}; pass --cells >= 1")
        missing = [c for c in GENE_COLUMNS if c not in genes.columns]
        if missing:
            raise LangCellError(f"genes table: column {missing[0]} missing; give {', '.join(GENE_COLUMNS)}")
        self.n_cells = int(n_cells)
        self.genes = genes.reset_index(drop=True)
        self.n_genes = len(self.genes)
        self.organism = organism
        self.schema = obs_schema(extra_obs_fields)
        missing = [c for c in OBS_LABEL_COLUMNS if c not in categories]
        if missing:
            raise LangCellError(f"obs categories: column {missing[0]} missing; every Census obs column needs its values")
        self.categories = {c: list(dict.fromkeys(categories[c])) for c in OBS_LABEL_COLUMNS}
        self._codes = {c: {v: i for i, v in enumerate(vals)} for c, vals in self.categories.items()}
        self._dictionaries = {c: pa.array(vals, pa.large_string()) for c, vals in self.categories.items()}
        self.summary = dict(summary or {})
        self.datasets: list[DatasetInfo] = []
        self.n_written = 0
        self.gene_nnz = np.zeros(self.n_genes, dtype=np.int64)
        self.tmp = self.out.parent / f".{self.out.name}.building-{os.getpid()}"
        self.trusted_coords = trusted_coords
        self._obs_pending: list[pa.Table] = []
        self._obs_pending_rows = 0

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "CensusStoreWriter":
        import tiledbsoma

        from langcell.core.files import output_lock

        self.out.parent.mkdir(parents=True, exist_ok=True)
        # One build per store: the lock lives beside the store, which is replaced at the end.
        self._lock = output_lock(self.out.parent / f".{self.out.name}.lock")
        self._lock.__enter__()
        try:
            self._create(tiledbsoma)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _create(self, tiledbsoma) -> None:
        self._frames: list = []
        _remove_stale_builds(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self._tiledb_config = dict(TRUSTED_COORDS_CONFIG) if self.trusted_coords else {}
        self._root = tiledbsoma.Collection.create(
            str(self.tmp), context=tiledbsoma.SOMATileDBContext(tiledb_config=self._tiledb_config))
        census_data = self._root.add_new_collection("census_data")
        # add_new_collection creates the Experiment and registers it with .set() (relative URI,
        # so the finished folder can be moved).
        self._experiment = census_data.add_new_collection(self.organism, tiledbsoma.Experiment)
        self._obs = self._frame(self._experiment, "obs", self.schema, self.n_cells)
        ms = self._experiment.add_new_collection("ms")
        self._rna = ms.add_new_collection("RNA", tiledbsoma.Measurement)
        x = self._rna.add_new_collection("X")
        self._x = x.add_new_sparse_ndarray("raw", type=pa.float32(), shape=(self.n_cells, self.n_genes),
                                           platform_config=_x_platform_config(self.n_genes, self.layout))
        self._write_opts = tiledbsoma.TileDBWriteOptions(sort_coords=False)

    def _frame(self, parent, name: str, schema: pa.Schema, n_rows: int):
        frame = _new_dataframe(parent, name, schema, n_rows)
        # Closed explicitly in __exit__: the parent did not open them, so it does not close them.
        self._frames.append(frame)
        return frame

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                if exc_type is None:
                    self._finish()
            finally:
                for frame in self._frames:
                    frame.close()
                self._root.close()
                if exc_type is not None:
                    shutil.rmtree(self.tmp, ignore_errors=True)
            if exc_type is None:
                self._publish()
        finally:
            self._lock.__exit__(None, None, None)

    def _publish(self) -> None:
        # Move any previous store aside first so that `out` is never a half-replaced mixture.
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- writing ----------------------------------------------------------------------------
    def add_dataset(self, info: DatasetInfo) -> None:
        self.datasets.append(info)

    def encode(self, column: str, values) -> np.ndarray:
        """Codes of `values` in `column`'s fixed category list (for callers that build codes)."""
        lookup = self._codes[column]
        try:
            return np.fromiter((lookup[v] for v in values), dtype=np.int32)
        except KeyError as exc:
            raise LangCellError(f"obs column {column}: value {exc.args[0]!r} is not in its categories; "
                                "list every value when creating the store") from None

    @property
    def x_uri(self) -> str:
        """Where X/raw is being built, for `XChunkWriter`s in other processes."""
        return self._x.uri

    @property
    def tiledb_config(self) -> dict[str, str]:
        return dict(self._tiledb_config)

    def write(self, obs: dict, rows: np.ndarray, cols: np.ndarray, counts: np.ndarray) -> None:
        """Append one chunk. `obs` maps each label column to codes (int32 arrays, from `encode`) or
        to values, plus `is_primary_data`, `n_measured_vars` and the extra fields; rows are local
        to the chunk, row-major, columns ascending within a row."""
        n = len(obs["is_primary_data"])
        summary = cell_summaries(rows, counts, n, self.n_genes, cols)
        if len(counts):
            write_x(self._x, np.asarray(rows, dtype=np.int64) + self.n_written, cols, counts, self._write_opts,
                    self.layout)
        self.append_written(obs, summary)

    def append_written(self, obs: dict, summary: dict) -> None:
        """Append the obs of a chunk whose X rows another process wrote (`XChunkWriter`), with
        that chunk's `cell_summaries`."""
        n = len(obs["is_primary_data"])
        if n == 0:
            return
        start = self.n_written
        if start + n > self.n_cells:
            raise LangCellError(f"{self.out}: more cells written ({start + n}) than declared ({self.n_cells})")
        columns = {"soma_joinid": pa.array(np.arange(start, start + n, dtype=np.int64))}
        for name in OBS_LABEL_COLUMNS:
            values = obs[name]
            codes = values if isinstance(values, np.ndarray) and values.dtype.kind == "i" else self.encode(name, values)
            columns[name] = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), self._dictionaries[name])
        columns["is_primary_data"] = pa.array(np.asarray(obs["is_primary_data"], dtype=bool))
        nnz, raw_sum, sq = summary["nnz"], summary["raw_sum"], summary["sum_sq"]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(nnz > 0, raw_sum / np.maximum(nnz, 1), np.nan)
            # Census's raw_variance_nnz is the sample variance over the non-zero entries.
            var = np.where(nnz > 1, (sq - nnz * mean ** 2) / np.maximum(nnz - 1, 1), np.nan)
        columns.update(raw_sum=pa.array(raw_sum), nnz=pa.array(nnz.astype(np.int64)),
                       raw_mean_nnz=pa.array(mean), raw_variance_nnz=pa.array(var),
                       n_measured_vars=pa.array(np.asarray(obs["n_measured_vars"], dtype=np.int64)))
        for f in self.schema:
            if f.name not in columns:
                columns[f.name] = pa.array(obs[f.name], f.type)
        # Obs goes out in large batches: each DataFrame write has a fixed cost (enumeration
        # checks on every label column) that dominates for chunks of a few thousand cells.
        self._obs_pending.append(pa.table(columns, schema=self.schema))
        self._obs_pending_rows += n
        if self._obs_pending_rows >= OBS_FLUSH_ROWS:
            self._flush_obs()
        self.gene_nnz += summary["gene_nnz"]
        self.n_written += n

    def _flush_obs(self) -> None:
        if self._obs_pending:
            self._obs.write(pa.concat_tables(self._obs_pending).combine_chunks())
        self._obs_pending, self._obs_pending_rows = [], 0

    # -- the tables written once every cell is in -------------------------------------------
    def _finish(self) -> None:
        self._flush_obs()
        if self.n_written != self.n_cells:
            raise LangCellError(f"{self.out}: {self.n_written} cells written but {self.n_cells} declared")
        n_measured_obs = np.zeros(self.n_genes, dtype=np.int64)
        presence_rows, presence_cols = [], []
        for i, ds in enumerate(self.datasets):
            genes = np.arange(self.n_genes) if ds.measured_genes is None else np.asarray(ds.measured_genes)
            n_measured_obs[genes] += ds.n_cells
            presence_rows.append(np.full(len(genes), i, dtype=np.int64))
            presence_cols.append(genes.astype(np.int64))
        var = {"soma_joinid": np.arange(self.n_genes, dtype=np.int64)}
        for name in ("feature_id", "feature_name", "feature_type"):
            var[name] = self.genes[name].astype(str).tolist()
        var["feature_length"] = self.genes["feature_length"].to_numpy(dtype=np.int64)
        var["nnz"] = self.gene_nnz
        var["n_measured_obs"] = n_measured_obs
        schema = _var_schema()
        var_df = self._frame(self._rna, "var", schema, self.n_genes)
        var_df.write(pa.table(var, schema=schema))
        if self.datasets:
            presence = self._rna.add_new_sparse_ndarray("feature_dataset_presence_matrix", type=pa.bool_(),
                                                        shape=(len(self.datasets), self.n_genes))
            r, c = np.concatenate(presence_rows), np.concatenate(presence_cols)
            presence.write(pa.Table.from_pydict({"soma_dim_0": r, "soma_dim_1": c,
                                                 "soma_data": np.ones(len(r), dtype=bool)}))
        self._write_census_info()

    def _write_census_info(self) -> None:
        info = self._root.add_new_collection("census_info")
        summary = {"census_schema_version": "2.1.0", "total_cell_count": str(self.n_cells),
                   "unique_cell_count": str(self.n_cells), f"number_donors_{self.organism}":
                       str(len(self.categories["donor_id"]))}
        summary.update(self.summary)
        labels = list(summary)
        schema = pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False),
                            pa.field("label", pa.large_string()), pa.field("value", pa.large_string())])
        table = self._frame(info, "summary", schema, len(labels))
        table.write(pa.table({"soma_joinid": np.arange(len(labels), dtype=np.int64), "label": labels,
                              "value": [summary[k] for k in labels]}, schema=schema))
        if not self.datasets:
            return
        schema = pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False)]
                           + [pa.field(n, pa.large_string()) for n in
                              ("dataset_id", "dataset_title", "collection_name", "dataset_h5ad_path")]
                           + [pa.field("dataset_total_cell_count", pa.int64())])
        rows = self.datasets
        table = self._frame(info, "datasets", schema, len(rows))
        table.write(pa.table({
            "soma_joinid": np.arange(len(rows), dtype=np.int64), "dataset_id": [d.dataset_id for d in rows],
            "dataset_title": [d.title for d in rows], "collection_name": [d.collection_name for d in rows],
            "dataset_h5ad_path": [d.source for d in rows],
            "dataset_total_cell_count": np.array([d.n_cells for d in rows], dtype=np.int64)}, schema=schema))
