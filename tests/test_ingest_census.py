"""`langcell ingest census` / `merge`: content, resume after SIGKILL, shards, workers and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from langcell.ingest.census import CRASH_ENV, REQUIRED_OBS, ingest_census, merge_shards
from langcell.cli import main as langcell_main
from langcell.core.errors import LangCellError

REPO = Path(__file__).resolve().parents[1]
N_CELLS, N_GENES = 250, 40


def make_store(root: Path, n_cells: int = N_CELLS, n_genes: int = N_GENES, *, seed: int = 0,
               drop_obs: tuple[str, ...] = (), x_edit=None) -> str:
    """A tiny SOMA store laid out like the Census; ~20% of cells not primary, a few with no counts."""
    import anndata as ad
    import scipy.sparse as sp
    import tiledbsoma
    import tiledbsoma.io

    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=0.15, random_state=seed, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    X = X.tolil()
    for row in (3, 77)[: 1 + (n_cells > 77)]:  # cells without any count: skipped and counted
        X[row, :] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    if x_edit is not None:
        X = x_edit(X)
    obs = {}
    for name in REQUIRED_OBS:
        if name == "is_primary_data":
            obs[name] = rng.random(n_cells) < 0.8
        else:
            obs[name] = pd.Categorical(rng.choice([f"{name}-a", f"{name}-b", f"{name}-c"], n_cells))
    obs["raw_sum"] = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    obs = pd.DataFrame(obs, index=[f"cell{i}" for i in range(n_cells)]).drop(columns=list(drop_obs))
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    var = pd.DataFrame({"feature_id": ids, "feature_name": [f"GENE{i}" for i in range(n_genes)],
                        "feature_length": np.arange(n_genes, dtype=np.int64) + 500,
                        "feature_type": ["protein_coding" if i % 4 else "lncRNA" for i in range(n_genes)]},
                       index=ids)
    tiledbsoma.Collection.create(str(root))
    with tiledbsoma.Collection.open(str(root), "w") as census:
        census.add_new_collection("census_data")
    uri = tiledbsoma.io.from_anndata(f"{root}/census_data/homo_sapiens", ad.AnnData(X=X, obs=obs, var=var),
                                     measurement_name="RNA", X_layer_name="raw")
    with tiledbsoma.Collection.open(f"{root}/census_data", "w") as data, tiledbsoma.Experiment.open(uri) as exp:
        data.set("homo_sapiens", exp, use_relative_uri=True)
    return str(root)


def store_truth(uri: str):
    """The store as AnnData, read the plain way, to compare the ingest against."""
    import tiledbsoma
    import tiledbsoma.io

    with tiledbsoma.Experiment.open(f"{uri}/census_data/homo_sapiens") as exp:
        return tiledbsoma.io.to_anndata(exp, measurement_name="RNA", X_layer_name="raw")


def read_cells(out: Path) -> pd.DataFrame:
    manifest = json.loads((out / "manifest.json").read_text())
    return pd.concat([pq.read_table(out / p["name"]).to_pandas() for p in manifest["parts"]], ignore_index=True)


def folder_digest(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {p["name"]: p["sha256"] for p in manifest["parts"]} | {"genes": manifest["genes_sha256"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("soma") / "store")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """An uninterrupted single-process run that the other runs must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "ingest"
    ingest_census(out, uri=store, cells_per_part=60, chunk_cells=25, progress=False)
    return out


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "langcell.cli", "ingest", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_round_trip_matches_store(store, reference):
    truth = store_truth(store)
    primary = truth.obs["is_primary_data"].to_numpy()
    X = truth.X.tocsr()[primary]
    nonempty = np.diff(X.indptr) > 0
    manifest = json.loads((reference / "manifest.json").read_text())
    cells = read_cells(reference)

    assert manifest["complete"] is True and manifest["format"] == "langcell-ingest/1"
    assert manifest["plan"]["n_cells"] == int(primary.sum())
    assert manifest["n_cells"] == len(cells) == int(nonempty.sum())
    assert manifest["skipped_empty_cells"] == int((~nonempty).sum()) == 2
    assert manifest["warnings"] == ["2 cells without any count in the kept genes were skipped"]
    assert len(manifest["parts"]) == -(-int(primary.sum()) // 60)
    assert [p["rows"] for p in manifest["parts"]] == [len(pq.read_table(reference / p["name"]))
                                                        for p in manifest["parts"]]
    expected_ids = truth.obs.index.to_numpy()[primary][nonempty]
    assert cells["obs_id"].tolist() == expected_ids.tolist()
    assert np.all(np.diff(cells["soma_joinid"].to_numpy()) > 0)
    assert cells["is_primary_data"].all()
    for column in ("cell_type", "tissue", "donor_id", "sex_ontology_term_id"):
        want = truth.obs[column].astype(str).to_numpy()[primary][nonempty]
        assert cells[column].tolist() == want.tolist()
    np.testing.assert_array_equal(cells["raw_sum"].to_numpy(), cells["n_counts"].to_numpy())
    # Rebuild the sparse matrix from the list columns and compare it entry by entry.
    Xn = X[nonempty]
    assert np.array_equal(np.concatenate(cells["gene_index"].to_numpy()), Xn.indices)
    assert np.array_equal(np.concatenate(cells["counts"].to_numpy()), Xn.data)
    assert float(np.concatenate(cells["counts"].to_numpy()).sum()) == float(X.sum())
    schema = pq.read_schema(reference / manifest["parts"][0]["name"])
    assert str(schema.field("gene_index").type) == "list<element: int32>"
    assert str(schema.field("counts").type) == "list<element: float>"
    assert str(schema.field("cell_type").type) == "string"
    genes = pq.read_table(reference / "genes.parquet").to_pandas()
    assert genes["gene_index"].tolist() == list(range(N_GENES))
    assert genes["feature_id"].tolist() == truth.var["feature_id"].tolist()
    assert genes["feature_biotype"].tolist()[:2] == ["lncRNA", "protein_coding"]


@pytest.mark.parametrize("kind", ["synth", "demo"])
def test_census_schema_stores_agree_with_their_obs_summaries(kind, tmp_path):
    """On the project's own Census-schema stores: n_counts equals the store's raw_sum and every
    sparse row has the store's nnz, cell for cell."""
    if kind == "synth":
        from langcell.ingest.synth_census import build_synth_census, load_synth_config

        build_synth_census(tmp_path / "store", 600, seed=3, progress=False,
                           config=load_synth_config(n_genes=400, genes_detected=[50, 200]))
        n_cells = 600
    else:
        from langcell.ingest.demo_census import build_demo_census

        n_cells = build_demo_census(tmp_path / "store", progress=False).n_cells
    manifest = ingest_census(tmp_path / "out", uri=str(tmp_path / "store"), cells_per_part=256, chunk_cells=100,
                             workers=2, progress=False)
    cells = read_cells(tmp_path / "out")
    assert manifest["n_cells"] == len(cells) == n_cells
    np.testing.assert_array_equal(cells["n_counts"].to_numpy(), cells["raw_sum"].to_numpy())
    assert [len(g) for g in cells["gene_index"]] == cells["nnz"].tolist()
    assert all(np.all(np.diff(g) > 0) for g in cells["gene_index"])
    genes = pq.read_table(tmp_path / "out/genes.parquet")
    assert max(int(g.max()) for g in cells["gene_index"]) < genes.num_rows == manifest["n_genes"]
    terms = cells["cell_type_ontology_term_id"]
    assert (terms.str.startswith("CL:") | (terms == "unknown")).all() and terms.str.startswith("CL:").sum() >= 600


def test_var_filter_keeps_n_counts_over_all_genes(store, reference, tmp_path):
    out = tmp_path / "coding"
    manifest = ingest_census(out, uri=store, var_filter="feature_type == 'protein_coding'", progress=False)
    genes = pq.read_table(out / "genes.parquet").to_pandas()
    assert manifest["n_genes"] == len(genes) == N_GENES - N_GENES // 4
    assert set(genes["feature_biotype"]) == {"protein_coding"}
    cells, full = read_cells(out), read_cells(reference)
    full = full.set_index("soma_joinid").loc[cells["soma_joinid"]]
    np.testing.assert_array_equal(cells["n_counts"].to_numpy(), full["n_counts"].to_numpy())
    kept_ids = genes["feature_id"].to_numpy()
    first = cells.iloc[0]
    all_genes = dict(zip(full["gene_index"].iloc[0], full["counts"].iloc[0]))
    want = {int(k): v for k, v in all_genes.items() if int(k) % 4}
    got = {int(kept_ids[i][4:]): v for i, v in zip(first["gene_index"], first["counts"])}
    assert got == want


def test_kill_mid_part_and_after_rename_then_resume(store, reference, tmp_path):
    out = tmp_path / "killed"
    args = ["census", "--uri", store, "--cells-per-part", "60", "--chunk-cells", "25", "--out", str(out)]
    # Killed after the second part's file is in place but before the manifest says so.
    first = cli(*args, env={CRASH_ENV: "part_renamed:2"})
    assert first.returncode == -signal.SIGKILL, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["status"] for p in manifest["parts"]] == ["done", "pending", "pending", "pending"]
    assert manifest["complete"] is False and (out / "cells/part-00001.parquet").exists()
    assert manifest["n_cells"] == manifest["parts"][0]["rows"] == 60 - 1  # cell 3 has no counts
    # Killed halfway through a part: a temporary file is left behind.
    second = cli(*args, env={CRASH_ENV: "chunk_written:2"})
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert list((out / "cells").glob(".part-*.tmp"))
    third = cli(*args)
    assert third.returncode == 0, third.stderr
    assert not list((out / "cells").glob(".part-*.tmp"))
    assert folder_digest(out) == folder_digest(reference)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())
    pd.testing.assert_frame_equal(read_cells(out), read_cells(reference))


def test_resume_redoes_a_corrupted_done_part(store, reference, tmp_path):
    out = tmp_path / "corrupt"
    ingest_census(out, uri=store, cells_per_part=60, chunk_cells=25, progress=False)
    (out / "cells/part-00002.parquet").write_bytes(b"garbage")
    ingest_census(out, uri=store, cells_per_part=60, chunk_cells=25, progress=False)
    assert folder_digest(out) == folder_digest(reference)


def test_shards_then_merge_equal_a_single_run(store, reference, tmp_path):
    out = tmp_path / "sharded"
    args = ["census", "--uri", store, "--cells-per-part", "60", "--chunk-cells", "25", "--no-progress"]
    assert langcell_main(["ingest", *args, "--shard", "1/2", "--out", str(out)]) == 0
    assert langcell_main(["ingest", "merge", "--out", str(out)]) == 2  # shard 0 has not run yet
    assert langcell_main(["ingest", *args, "--shard", "0/2", "--out", str(out)]) == 0
    shard1 = json.loads((out / "manifest.shard-1-of-2.json").read_text())
    assert [p["name"] for p in shard1["parts"]] == ["cells/part-00001.parquet", "cells/part-00003.parquet"]
    assert langcell_main(["ingest", "merge", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())
    # A part changed after its shard finished is caught by merge.
    part = out / "cells/part-00003.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(LangCellError, match="part-00003.parquet: sha256 differs"):
        merge_shards(out)


def test_two_workers_equal_one(store, reference, tmp_path):
    out = tmp_path / "workers"
    manifest = ingest_census(out, uri=store, cells_per_part=60, chunk_cells=25, workers=2, progress=False)
    assert manifest == json.loads((reference / "manifest.json").read_text())
    assert folder_digest(out) == folder_digest(reference)


def test_a_killed_worker_is_reported_and_resumed(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "worker-killed"
    monkeypatch.setenv(CRASH_ENV, "chunk_written:2")  # each spawned worker SIGKILLs itself mid-part
    with pytest.raises(LangCellError, match=r"worker process died \(.*\); rerun the same command to resume"):
        ingest_census(out, uri=store, cells_per_part=60, chunk_cells=25, workers=2, progress=False)
    assert not any(p["status"] == "done" for p in json.loads((out / "manifest.json").read_text())["parts"])
    monkeypatch.delenv(CRASH_ENV)
    ingest_census(out, uri=store, cells_per_part=60, chunk_cells=25, workers=2, progress=False)
    assert folder_digest(out) == folder_digest(reference)


def test_rerun_with_other_arguments_is_refused(store, reference, tmp_path):
    out = tmp_path / "args"
    ingest_census(out, uri=store, max_cells=100, cells_per_part=60, progress=False)
    with pytest.raises(LangCellError, match=r"max_cells = 100, this run has 150; rerun with the original"):
        ingest_census(out, uri=store, max_cells=150, cells_per_part=60, progress=False)
    with pytest.raises(LangCellError, match=r"obs_filter"):
        ingest_census(out, uri=store, max_cells=100, cells_per_part=60, obs_filter="sex == 'sex-a'", progress=False)
    genes = (out / "genes.parquet").read_bytes()
    with pytest.raises(LangCellError, match=r"var_filter = null, this run has \"feature_type == 'lncRNA'\""):
        ingest_census(out, uri=store, max_cells=100, cells_per_part=60, var_filter="feature_type == 'lncRNA'",
                      progress=False)
    assert (out / "genes.parquet").read_bytes() == genes  # the refused run wrote nothing
    # A shard with other arguments is refused as well, by the other shard's manifest.
    sharded = tmp_path / "sharded"
    ingest_census(sharded, uri=store, cells_per_part=60, shard=(0, 2), progress=False)
    with pytest.raises(LangCellError, match=r"manifest.shard-0-of-2.json: this folder holds an ingest with max_cells"):
        ingest_census(sharded, uri=store, cells_per_part=60, max_cells=10, shard=(1, 2), progress=False)


def test_output_lock_keeps_a_second_run_out(store, tmp_path):
    from langcell.core.files import output_lock

    out = tmp_path / "locked"
    with output_lock(out):
        with pytest.raises(LangCellError, match="locked by pid"):
            ingest_census(out, uri=store, progress=False)


@pytest.mark.parametrize("obs_filter, message", [
    ("is_primary_data == ", "--obs-filter 'is_primary_data == ' is not a valid filter"),
    ("no_such_column == 'x'", "Column no_such_column does not exist"),
    ("cell_type == 'no such type'", "no cell passes --obs-filter"),
])
def test_bad_filters(store, tmp_path, obs_filter, message):
    with pytest.raises(LangCellError, match=message):
        ingest_census(tmp_path / "out", uri=store, obs_filter=obs_filter, progress=False)


def test_bad_var_filter(store, tmp_path):
    with pytest.raises(LangCellError, match="--var-filter 'feature_kind == 1' is not a valid filter"):
        ingest_census(tmp_path / "out", uri=store, var_filter="feature_kind == 1", progress=False)


def test_missing_store_is_one_line_error(tmp_path, capsys):
    code = langcell_main(["ingest", "census", "--uri", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.endswith("nope: store not found; pass --uri a SOMA store folder (see `langcell ingest demo-census`) "
                        "or use --census-version")


def test_not_a_census_layout(tmp_path):
    import tiledbsoma

    tiledbsoma.Collection.create(str(tmp_path / "empty"))
    with pytest.raises(LangCellError, match="no census_data/homo_sapiens experiment"):
        ingest_census(tmp_path / "out", uri=str(tmp_path / "empty"), progress=False)


def test_missing_obs_columns(tmp_path):
    uri = make_store(tmp_path / "store", 30, 5, drop_obs=("cell_type", "tissue_general"))
    with pytest.raises(LangCellError, match="lacks required column.s. cell_type, tissue_general; use a store"):
        ingest_census(tmp_path / "out", uri=uri, progress=False)


def _set_value(value):
    def edit(X):
        X = X.copy()
        X.data[X.indptr[10]] = value  # first count of cell 10
        return X
    return edit


@pytest.mark.parametrize("value, problem", [(2.5, "non-integer"), (-3.0, "negative"), (np.nan, "NaN or infinite")])
def test_bad_counts(tmp_path, value, problem):
    uri = make_store(tmp_path / "store", 30, 5, x_edit=_set_value(value))
    with pytest.raises(LangCellError, match=f"holds {problem} count .* for cell soma_joinid 10; X raw must hold"):
        ingest_census(tmp_path / "out", uri=uri, obs_filter="soma_joinid >= 0", progress=False)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [p["status"] for p in manifest["parts"]] == ["pending"]
    assert not (tmp_path / "out/cells/part-00000.parquet").exists()


def _chunk_inputs(obs_joinids, entries, batch=None):
    """Obs rows and X entries of a chunk as `_build_chunk` takes them: the entries appended to
    RowBuffers in batches of `batch` (all at once by default), as TileDB returns them."""
    import pyarrow as pa

    from langcell.ingest.census import Source, _cells_schema
    from langcell.ingest.coo_rows import RowBuffers

    obs = pa.table({"soma_joinid": pa.array(obs_joinids, pa.int64())})
    cells, genes, counts = (np.asarray(column, dtype) for column, dtype in
                            zip(zip(*entries), (np.int64, np.int64, np.float32)))
    rows = RowBuffers()
    step = batch or max(cells.size, 1)
    for start in range(0, cells.size, step):
        assert rows.append(cells[start:start + step], genes[start:start + step], counts[start:start + step])[0]
    return Source(None, "/store"), obs, rows, np.arange(3, dtype=np.int32), _cells_schema(obs.schema, [])


def test_chunk_builder_sorts_rows_and_drops_empty_cells():
    from langcell.ingest.census import _build_chunk

    source, obs, rows, keep, schema = _chunk_inputs([9, 4, 7], [(9, 2, 5.0), (4, 1, 1.0), (9, 0, 2.0), (4, 0, 0.0)])
    assert not rows.row_major and rows.explicit_zeros == 1
    table = _build_chunk(source, np.array([4, 7, 9]), obs, rows, keep, schema, []).to_pydict()
    assert table == {"soma_joinid": [4, 9], "n_counts": [1.0, 7.0], "gene_index": [[1], [0, 2]],
                     "counts": [[1.0], [2.0, 5.0]]}


def test_duplicate_joinids_and_entries_are_refused():
    from langcell.ingest.census import _build_chunk

    source, obs, rows, keep, schema = _chunk_inputs([4, 7, 7], [(4, 0, 1.0)])
    with pytest.raises(LangCellError, match="/store: obs soma_joinid 7 appears more than once; the store is corrupt"):
        _build_chunk(source, np.array([4, 7]), obs, rows, keep, schema, [])
    source, obs, rows, keep, schema = _chunk_inputs([4, 7], [(4, 0, 1.0), (7, 2, 2.0), (7, 2, 3.0)])
    assert not rows.row_major  # a gene twice in a cell is out of row-major order
    with pytest.raises(LangCellError, match="cell soma_joinid 7 x gene soma_joinid 2 more than once"):
        _build_chunk(source, np.array([4, 7]), obs, rows, keep, schema, [])
    for entries in ([(4, 0, 1.0), (5, 1, 1.0)], [(5, 1, 1.0), (4, 0, 1.0)]):  # row-major or not
        source, obs, rows, keep, schema = _chunk_inputs([4, 7], entries)
        with pytest.raises(LangCellError, match="X raw returned cell soma_joinid 5, which is not among the cells"):
            _build_chunk(source, np.array([4, 7]), obs, rows, keep, schema, [])


def test_bad_arguments(store, tmp_path):
    with pytest.raises(LangCellError, match="--shard '2/2': expected I/N"):
        from langcell.ingest.census import parse_shard
        parse_shard("2/2")
    with pytest.raises(LangCellError, match="--cells-per-part 0: must be at least 1"):
        ingest_census(tmp_path / "o", uri=store, cells_per_part=0)
    with pytest.raises(LangCellError, match="--chunk-counts 0: must be at least 1"):
        ingest_census(tmp_path / "o", uri=store, chunk_counts=0)
    with pytest.raises(LangCellError, match="--chunk-counts 2147483648: a parquet list column holds at most"):
        ingest_census(tmp_path / "o", uri=store, chunk_counts=2 ** 31)
    with pytest.raises(LangCellError, match="--retries -1: must be at least 0"):
        ingest_census(tmp_path / "o", uri=store, retries=-1)


def test_row_major_tiled_and_general_paths_build_the_same_rows():
    """Row-major entries (every run a whole row), tile order (a cell's runs, one per tile of
    genes, apart: the Census' square tiles) and the counting sort (any order) build the same
    rows from the same entries, however TileDB cuts them into batches: explicit zeros, empty
    cells, a cell split across batches and a gene filter included."""
    from langcell.ingest.census import _build_chunk

    rng = np.random.default_rng(0)
    joinids = np.sort(rng.choice(10_000, 300, replace=False))
    dense = rng.integers(0, 4, (300, 40)) * (rng.random((300, 40)) < 0.3)
    dense[::17] = 0  # empty cells
    cells, genes = np.nonzero(dense)
    counts = dense[cells, genes].astype(np.float32)
    counts[::11] = 0  # explicit zeros
    keep = np.where(np.arange(40) % 3 == 0, -1, np.cumsum(np.arange(40) % 3 != 0) - 1).astype(np.int64)
    # Tiles of 64 cells x 16 genes in row-major tile order, entries row-major inside a tile.
    tiled = np.lexsort((genes, cells, genes // 16, cells // 64))
    tables = []
    for order, batch in ((np.arange(cells.size), None), (np.arange(cells.size), 7), (tiled, None), (tiled, 9),
                         (rng.permutation(cells.size), None), (rng.permutation(cells.size), 100)):
        entries = list(zip(joinids[cells[order]], genes[order], counts[order]))
        source, obs, rows, _, schema = _chunk_inputs(joinids, entries, batch)
        path = "rows" if rows.row_major else "tiles" if rows.whole_rows() is not None else "general"
        tables.append((path, _build_chunk(source, joinids, obs, rows, keep, schema, []).to_pydict()))
        assert rows.explicit_zeros == np.count_nonzero(counts == 0)
    assert [path for path, _ in tables] == ["rows", "rows", "tiles", "tiles", "general", "general"]
    assert all(table == tables[0][1] for _, table in tables)
    fast = tables[0][1]
    assert len(fast["soma_joinid"]) < 300 and max(max(g) for g in fast["gene_index"]) < keep.max() + 1
    # n_counts is over all genes, before the gene filter
    kept_cells = np.searchsorted(joinids, fast["soma_joinid"])
    assert np.array_equal(fast["n_counts"], dense[kept_cells].sum(axis=1) - np.bincount(
        cells[counts == 0], weights=dense[cells[counts == 0], genes[counts == 0]], minlength=300)[kept_cells])


def test_row_buffers_grow_and_are_reused():
    """Runs outgrow the first allocation mid-batch and resume where they stopped; a cleared
    buffer keeps its arrays and takes the next chunk into the same memory."""
    from langcell.ingest.coo_rows import RowBuffers

    rng = np.random.default_rng(1)
    cells = np.repeat(np.arange(5000, dtype=np.int64), 3)
    genes = np.tile(np.array([2, 5, 9], np.int64), 5000)
    counts = rng.integers(1, 9, cells.size).astype(np.float32)
    rows = RowBuffers()
    for start in range(0, cells.size, 4000):
        valid, largest = rows.append(cells[start:start + 4000], genes[start:start + 4000], counts[start:start + 4000])
        assert valid and largest == 9
    run_cells, run_starts, run_sums = rows.runs
    assert rows.row_major and np.array_equal(run_cells, np.arange(5000)) and np.array_equal(run_starts,
                                                                                            np.arange(0, 15000, 3))
    assert np.array_equal(run_sums, counts.reshape(-1, 3).sum(axis=1))
    assert np.array_equal(rows.genes, genes) and np.array_equal(rows.counts, counts)
    memory = rows.genes.ctypes.data
    rows.clear()
    rows.append(cells[:30], genes[:30], counts[:30])
    assert rows.genes.ctypes.data == memory and rows.genes.size == 30 and rows.runs[0].size == 10
    bad = counts[:6].copy()
    bad[4] = 1.5
    assert rows.append(cells[:6] + 10, genes[:6], bad) == (False, 9)
    assert not rows.append(cells[:1], genes[:1], np.array([np.nan], np.float32))[0]
    assert not rows.append(cells[:1], genes[:1], np.array([-1], np.float32))[0]




def test_a_finished_part_file_holds_no_arrow_memory(tmp_path):
    """`_write_parts` keeps its finished part files until the run ends (to remove unfinished ones
    on errors); a closed parquet writer still holds its encoding buffers, so each finished file
    must let go of it, or the run's memory grows with every part."""
    import concurrent.futures

    import pyarrow as pa

    from langcell.ingest.census import _PartFile

    offsets = pa.array(np.arange(0, 2_000_001, 2_000, dtype=np.int32))
    table = pa.table({"gene_index": pa.ListArray.from_arrays(offsets, pa.array(np.arange(2_000_000, dtype=np.int32))),
                      "counts": pa.ListArray.from_arrays(offsets, pa.array(np.ones(2_000_000, np.float32)))})
    before = pa.total_allocated_bytes()
    file = _PartFile(tmp_path, {"name": "part-00000.parquet"}, table.schema)
    file.write(table, 1_000)
    done = concurrent.futures.Future()
    done.set_result(None)
    result = file.finish_after(done)
    assert result["rows"] == 1_000 and (tmp_path / "part-00000.parquet").exists()
    assert pa.total_allocated_bytes() - before < 1 << 20


@pytest.fixture(scope="module")
def layout_stores(tmp_path_factory):
    """The same synthetic cells in both X layouts; more than one 2048 x 2048 tile each way."""
    from langcell.ingest.synth_census import build_synth_census, load_synth_config

    root = tmp_path_factory.mktemp("layouts")
    config = load_synth_config(n_genes=4500, genes_detected=[60, 400], n_datasets=3, chunk_cells=700)
    for layout in ("rows", "census"):
        build_synth_census(root / layout, 2500, seed=5, config=config, progress=False, layout=layout)
    return root


def test_census_layout_is_the_census_builders_tiling(layout_stores):
    import tiledbsoma

    with tiledbsoma.SparseNDArray.open(str(layout_stores / "census/census_data/homo_sapiens/ms/RNA/X/raw")) as X:
        options = X.schema_config_options()
    dims = json.loads(options.dims)
    assert [dims[d]["tile"] for d in ("soma_dim_0", "soma_dim_1")] == ["2048", "2048"]
    assert (options.capacity, options.tile_order, options.cell_order, options.allows_duplicates) == \
        (65536, "row-major", "row-major", True)


def test_census_layout_ingests_byte_identical_to_the_row_layout(layout_stores, tmp_path, monkeypatch):
    """Tile-ordered reads take the run sort, never the per-entry counting sort, and give the
    same parts, with chunks cut by the count budget from obs nnz."""
    import langcell.ingest.census as census

    def no_counting_sort(*args):
        raise AssertionError("the counting sort ran")

    monkeypatch.setattr(census, "_general_rows", no_counting_sort)
    digests = {}
    for layout in ("rows", "census"):
        ingest_census(tmp_path / layout, uri=str(layout_stores / layout), cells_per_part=1200, chunk_cells=10**6,
                      chunk_counts=90_000, progress=False)
        digests[layout] = folder_digest(tmp_path / layout)
    assert digests["rows"] == digests["census"]
    # The release's schema versions travel with the ingest (the ontology stage picks its versions by them).
    manifest = json.loads((tmp_path / "census/manifest.json").read_text())
    assert manifest["census_summary"] == {"census_schema_version": "2.1.0", "census_build_date": "synthetic"}
    cells = read_cells(tmp_path / "census")
    assert len(cells) == 2500 and [len(g) for g in cells["gene_index"]] == cells["nnz"].tolist()
    assert max(max(g) for g in cells["gene_index"]) >= 2048  # genes of the second tile column
    groups = []
    for part in sorted((tmp_path / "census/cells").glob("*.parquet")):
        handle = pq.ParquetFile(part)
        counts = [sum(map(len, handle.read_row_group(i, columns=["gene_index"])["gene_index"].to_pylist()))
                  for i in range(handle.num_row_groups)]
        # full up to the budget but the last, which holds what is left of the part
        assert max(counts) <= 90_000 and min(counts[:-1], default=90_000) > 90_000 - 400
        groups.append(len(counts))
    assert groups[0] >= 3


def test_chunk_bounds_keep_to_both_budgets():
    from langcell.ingest.census import chunk_bounds

    nnz = np.array([5, 5, 5, 20, 1, 1, 1, 1, 1])
    assert chunk_bounds(nnz, 100, 10) == [0, 2, 3, 4, 9]  # the 20-count cell is a chunk alone
    assert chunk_bounds(nnz, 2, 100) == [0, 2, 4, 6, 8, 9]
    assert chunk_bounds(np.zeros(5, np.int64), 3, 10) == [0, 3, 5]


def _flaky_reads(monkeypatch, failing: set[int]) -> list[int]:
    """X reads that deliver one batch, then fail with TileDB's error, on the `failing` reads (0:
    the first X read of the run); returns the first soma_joinid of each failed read."""
    import tiledbsoma

    import langcell.ingest.census as census
    import langcell.ingest.retry as retry

    monkeypatch.setattr(retry, "BACKOFF_SECONDS", 0.0)
    real, calls, failed = census._coo_batches, [], []

    def flaky(X, joinids):
        calls.append(None)
        fail = len(calls) - 1 in failing
        for batch in real(X, joinids):
            yield batch
            if fail:
                failed.append(int(joinids[0]))
                raise tiledbsoma.SOMAError("[TileDB::S3] Error: Cannot read object: connection reset")

    monkeypatch.setattr(census, "_coo_batches", flaky)
    return failed


def test_transient_read_errors_are_retried_to_an_identical_result(store, reference, tmp_path, monkeypatch):
    # the first chunk fails twice, the second once, a chunk of the second part once
    failed = _flaky_reads(monkeypatch, failing={0, 1, 3, 7})
    ingest_census(tmp_path / "out", uri=store, cells_per_part=60, chunk_cells=25, retries=2, progress=False)
    assert len(failed) == 4 and len(set(failed)) == 3
    assert folder_digest(tmp_path / "out") == folder_digest(reference)


def test_reads_carry_tiledbs_own_s3_retries(store):
    from langcell.ingest.census import Source, _open_handle

    with _open_handle(Source(None, store)) as handle:
        config = handle.context.tiledb_config
    assert config["vfs.s3.connect_max_tries"] == "10" and config["vfs.s3.request_timeout_ms"] == "30000"


def test_a_read_failing_past_its_retries_names_the_chunk(store, tmp_path, monkeypatch):
    failed = _flaky_reads(monkeypatch, failing={0, 1, 2})
    with pytest.raises(LangCellError) as error:
        ingest_census(tmp_path / "out", uri=store, cells_per_part=60, chunk_cells=25, retries=2, progress=False)
    message = str(error.value)
    assert failed == [failed[0]] * 3 and "\n" not in message
    assert message.startswith(f"{store}: chunk 0 of cells/part-00000.parquet (25 cells, soma_joinid {failed[0]}..")
    assert "read failed 3 times, last with SOMAError: [TileDB::S3] Error: Cannot read object" in message
    assert "rerun the same command to resume" in message
