"""The local Census-schema stores: demo-census (real cells from PyPI packages) and synth-census."""

import json
from pathlib import Path

import numpy as np
import pytest

from langcell.core.errors import LangCellError

CENSUS_OBS_COLUMNS = [
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
    "donor_id", "is_primary_data", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id",
    "sex", "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
    "tissue_general", "tissue_general_ontology_term_id",
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from langcell.ingest.demo_census import build_demo_census

    out = tmp_path_factory.mktemp("demo") / "census"
    summary = build_demo_census(out)
    return out, summary


def _read_store(uri):
    import cellxgene_census

    with cellxgene_census.open_soma(uri=str(uri)) as census:
        exp = census["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        X = exp.ms["RNA"].X["raw"].read().coos((len(obs), len(var))).concat().to_scipy().tocsr()
    return obs, var, X


def test_demo_store_opens_with_the_census_api(demo_store):
    import cellxgene_census
    import tiledbsoma

    out, summary = demo_store
    assert summary.n_cells == 1259 and summary.n_genes == 19411
    with cellxgene_census.open_soma(uri=str(out)) as census:
        exp = census["census_data"]["homo_sapiens"]
        with exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter="cell_type == 'B cell'")) as query:
            adata = query.to_anndata("raw")
        assert adata.n_obs == 95 and adata.n_vars == 19411
        assert set(adata.obs["bulk_label"]) == {"CD19+ B"}
        summary_table = census["census_info"]["summary"].read().concat().to_pandas()
        assert dict(zip(summary_table.label, summary_table.value))["total_cell_count"] == "1259"
        presence = cellxgene_census.get_presence_matrix(census, "Homo sapiens")
        assert presence.shape == (2, 19411)
        assert np.asarray(presence.sum(axis=1)).ravel().tolist() == [701, 19411]
    obs, var, X = _read_store(out)
    for column in CENSUS_OBS_COLUMNS + ["raw_sum", "nnz", "n_measured_vars"]:
        assert column in obs.columns, column
    assert obs.dataset_id.value_counts().to_dict() == {"scanpy-pbmc68k-reduced": 700,
                                                        "celltypist-sample-cell-by-gene": 559}
    pbmc = obs.dataset_id == "scanpy-pbmc68k-reduced"
    assert set(obs.loc[pbmc, "assay"]) == {"10x 3' v1"}
    assert set(obs.loc[pbmc, "tissue_ontology_term_id"]) == {"UBERON:0000178"}
    assert set(obs.loc[pbmc, "disease"]) == {"normal"}
    assert set(obs.loc[~pbmc, "cell_type"]) == {"unknown"}
    assert set(obs.sex_ontology_term_id) == {"unknown"} and obs.is_primary_data.all()
    assert var.feature_id.str.match(r"^ENSG\d{11}$").all() and var.feature_id.is_unique
    # Census per-cell summaries agree with X.
    assert np.allclose(obs.raw_sum.to_numpy(), np.asarray(X.sum(axis=1)).ravel())
    assert (obs.nnz.to_numpy() == np.diff(X.indptr)).all()


def test_demo_counts_are_the_source_counts(demo_store):
    import anndata
    import scanpy

    out, summary = demo_store
    reports = {r.name: r for r in summary.sources}
    pbmc = reports["scanpy pbmc68k_reduced"]
    assert (pbmc.n_symbols, pbmc.n_mapped, pbmc.n_unmapped, pbmc.n_merged) == (765, 701, 64, 0)
    assert pbmc.total_counts == 486651 and pbmc.stored_counts == 465313 and pbmc.max_integer_error < 0.09
    sample = reports["celltypist sample_cell_by_gene"]
    assert (sample.n_symbols, sample.n_mapped, sample.n_unmapped, sample.n_merged) == (32786, 19412, 13374, 1)
    assert sample.total_counts == 3619954 and sample.stored_counts == 3343594
    obs, var, X = _read_store(out)
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 1
    assert X[:700].sum() == 465313 and X[700:].sum() == 3343594

    # Recompute a few pbmc genes straight from scanpy's file, independently of the builder.
    ad = anndata.read_h5ad(Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad")
    symbol_map = json.loads((REPO / "build_sclibrary/reference/geneformer_v1/gene_symbol_to_ensembl.json").read_text())
    raw = ad.raw.to_adata()
    column = {g: i for i, g in enumerate(var.feature_id)}
    for symbol in ("CD79A", "NKG7", "HLA-DRA", "LYZ", "CD3E", "S100A8"):
        expected = np.round(np.expm1(raw[:, symbol].X.toarray().ravel().astype(np.float64))
                            * ad.obs["n_counts"].to_numpy() / 1e4)
        stored = X[:700, column[symbol_map[symbol]]].toarray().ravel()
        assert np.array_equal(stored, expected), symbol
        assert expected.sum() > 0
    assert obs.source_cell_id.iloc[:700].tolist() == list(ad.obs_names)
    assert np.array_equal(obs.source_total_counts.iloc[:700].to_numpy(), ad.obs["n_counts"].to_numpy())


def test_demo_cell_type_table_matches_cl_labels():
    from langcell.ingest.demo_census import PBMC68K_CELL_TYPES
    from langcell.ingest.ontology import GuideSource

    expected = {
        "CD14+ Monocyte": "CD14-positive monocyte",
        "CD19+ B": "B cell",
        "CD4+/CD25 T Reg": "CD4-positive, CD25-positive, alpha-beta regulatory T cell",
        "CD4+/CD45RA+/CD25- Naive T": "naive thymus-derived CD4-positive, alpha-beta T cell",
        "CD4+/CD45RO+ Memory": "CD4-positive, alpha-beta memory T cell",
        "CD56+ NK": "natural killer cell",
        "CD8+ Cytotoxic T": "CD8-positive, alpha-beta cytotoxic T cell",
        "CD8+/CD45RA+ Naive Cytotoxic": "naive thymus-derived CD8-positive, alpha-beta T cell",
        "CD34+": "hematopoietic precursor cell",
        "Dendritic": "dendritic cell",
    }
    guide = GuideSource()
    assert set(PBMC68K_CELL_TYPES) == set(expected)
    for bulk, term_id in PBMC68K_CELL_TYPES.items():
        term = guide.get(term_id)
        assert term.label == expected[bulk] and not term.deprecated, bulk
    # Every T cell label sits under CL's T cell, as the labels claim.
    for bulk in ("CD4+/CD25 T Reg", "CD8+ Cytotoxic T", "CD4+/CD45RO+ Memory"):
        assert "CL:0000084" in guide.get(PBMC68K_CELL_TYPES[bulk]).ancestors


def test_store_output_checks(tmp_path):
    from langcell.ingest.demo_census import build_demo_census
    from langcell.ingest.synth_census import build_synth_census

    not_store = tmp_path / "notes"
    not_store.mkdir()
    (not_store / "readme.txt").write_text("mine")
    with pytest.raises(LangCellError, match="not a SOMA store"):
        build_demo_census(not_store)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LangCellError, match="is a file"):
        build_synth_census(a_file, 10)
    for bad in (0, -3, "10", 2.5, True):
        with pytest.raises(LangCellError, match="--cells"):
            build_synth_census(tmp_path / "s", bad)
    with pytest.raises(LangCellError, match="--workers"):
        build_synth_census(tmp_path / "s", 10, workers=0)
    assert (not_store / "readme.txt").read_text() == "mine" and not (tmp_path / "s").exists()


def _small_config(**overrides):
    from langcell.ingest.synth_census import load_synth_config

    settings = dict(n_genes=3000, genes_detected=[300, 1200], n_datasets=6, donors_per_dataset=2, chunk_cells=500)
    settings.update(overrides)
    return load_synth_config(**settings)


def test_synth_config_rejects_bad_settings(tmp_path):
    from langcell.ingest.synth_census import load_synth_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("n_genez: 100\n")
    with pytest.raises(LangCellError, match="unknown key 'n_genez'"):
        load_synth_config(bad)
    with pytest.raises(LangCellError, match="genes_detected"):
        load_synth_config(n_genes=1000, genes_detected=[500, 900])


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    from langcell.ingest.synth_census import build_synth_census

    out = tmp_path_factory.mktemp("synth") / "store"
    summary = build_synth_census(out, 3000, seed=3, config=_small_config(), progress=False)
    return out, summary


def test_synth_store_sizes_and_terms(synth_store):
    from langcell.ingest.ontology import GuideSource

    out, summary = synth_store
    obs, var, X = _read_store(out)
    assert X.shape == (3000, 3000) and len(obs) == 3000 and summary.nnz == X.nnz
    assert summary.n_datasets == obs.dataset_id.nunique() == 6
    assert obs.donor_id.nunique() == 12
    for column in CENSUS_OBS_COLUMNS:
        assert column in obs.columns, column
    detected = np.diff(X.indptr)
    assert detected.min() >= 300 and detected.max() <= 1200
    assert 600 < detected.mean() < 750
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 1
    tokens = json.loads((REPO / "build_sclibrary/reference/geneformer_v1/token_dictionary.json").read_text())
    assert set(var.feature_id) <= set(tokens)
    guide = GuideSource()
    for column in ("cell_type", "tissue", "tissue_general", "disease", "assay", "sex"):
        pairs = obs[[f"{column}_ontology_term_id", column]].drop_duplicates().itertuples(index=False)
        for term_id, label in pairs:
            assert term_id == "unknown" and label == "unknown" or guide.get(term_id).label == label
    # Several ids joined with ',' in one ethnicity value, as the Census writes them.
    assert any("," in v for v in obs.self_reported_ethnicity_ontology_term_id.unique())
    # Overdispersion: variance above the mean for a well-expressed gene within one type.
    t_cells = (obs.cell_type_ontology_term_id == "CL:0000235").to_numpy()
    depth = np.asarray(X[t_cells].sum(axis=1)).ravel()
    norm = X[t_cells].multiply(1 / depth[:, None]).tocsc() * depth.mean()
    means = np.asarray(norm.mean(axis=0)).ravel()
    top = np.argsort(means)[-50:]
    variances = np.asarray(norm[:, top].power(2).mean(axis=0)).ravel() - means[top] ** 2
    assert np.median(variances / means[top]) > 1.5


def test_synth_expression_follows_the_cl_hierarchy(synth_store):
    import scipy.sparse as sp

    out, summary = synth_store
    assert summary.parents["CL:0000624"] == "CL:0000084" and summary.parents["CL:0000792"] == "CL:0000624"
    obs, _, X = _read_store(out)
    logx = np.log1p(sp.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X).toarray()
    centre = logx.mean(axis=0)
    types = obs.cell_type_ontology_term_id.to_numpy()

    def corr(a, b):
        pa_, pb = (logx[types == t].mean(axis=0) - centre for t in (a, b))
        return np.corrcoef(pa_, pb)[0, 1]

    cd4_t, cd4_hep, cd4_b = corr("CL:0000624", "CL:0000084"), corr("CL:0000624", "CL:0000182"), corr("CL:0000624", "CL:0000236")
    assert cd4_t > 0.35 and cd4_t > cd4_hep + 0.3 and cd4_t > cd4_b + 0.3
    # A grandchild (Treg) is closer to its parent (CD4) than to its grandparent (T cell).
    assert corr("CL:0000792", "CL:0000624") > corr("CL:0000792", "CL:0000084") > cd4_hep


def test_synth_is_deterministic_for_any_workers_and_rebuild_replaces(tmp_path):
    from langcell.ingest.synth_census import build_synth_census

    config = _small_config(n_genes=1500, genes_detected=[200, 600], chunk_cells=200)
    build_synth_census(tmp_path / "a", 700, seed=11, config=config, progress=False)
    build_synth_census(tmp_path / "b", 700, seed=11, config=config, progress=False, workers=2)
    build_synth_census(tmp_path / "c", 700, seed=12, config=config, progress=False)
    obs_a, var_a, X_a = _read_store(tmp_path / "a")
    obs_b, var_b, X_b = _read_store(tmp_path / "b")
    obs_c, _, X_c = _read_store(tmp_path / "c")
    assert obs_a.astype(str).equals(obs_b.astype(str)) and var_a.equals(var_b)
    assert (X_a != X_b).nnz == 0
    assert X_a.shape == X_c.shape and ((X_a != X_c).nnz > 0 or not obs_a.astype(str).equals(obs_c.astype(str)))
    # Building again over an existing store replaces it whole, leaving no temporary folders,
    # and clears what a killed build (a pid that no longer runs) left behind.
    (tmp_path / ".a.building-999999999").mkdir()
    build_synth_census(tmp_path / "a", 300, seed=11, config=config, progress=False)
    assert len(_read_store(tmp_path / "a")[0]) == 300
    assert not [p.name for p in tmp_path.iterdir() if ".building-" in p.name or ".old-" in p.name]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a", "b", "c"]


def test_one_build_per_store(tmp_path):
    import pandas as pd

    from langcell.ingest.soma_store import OBS_LABEL_COLUMNS, CensusStoreWriter

    genes = pd.DataFrame({"feature_id": ["ENSG00000000003"], "feature_name": ["TSPAN6"],
                          "feature_length": [0], "feature_type": ["unknown"]})
    categories = {c: ["unknown"] for c in OBS_LABEL_COLUMNS}
    first = CensusStoreWriter(tmp_path / "store", 1, genes, categories)
    first.__enter__()
    try:
        with pytest.raises(LangCellError, match="locked by pid"):
            CensusStoreWriter(tmp_path / "store", 1, genes, categories).__enter__()
        obs = {c: ["unknown"] for c in OBS_LABEL_COLUMNS}
        obs.update(is_primary_data=[True], n_measured_vars=[1])
        first.write(obs, np.array([0]), np.array([0]), np.array([3.0]))
    finally:
        first.__exit__(None, None, None)
    obs, var, X = _read_store(tmp_path / "store")
    assert X.toarray().tolist() == [[3.0]] and obs.raw_sum.tolist() == [3.0] and var.nnz.tolist() == [1]
    # A build that ends short of its declared cells publishes nothing.
    with pytest.raises(LangCellError, match="0 cells written but 1 declared"):
        with CensusStoreWriter(tmp_path / "other", 1, genes, categories):
            pass
    assert not (tmp_path / "other").exists()


def test_cli_store_commands(tmp_path, capsys):
    import argparse

    from langcell.ingest import cli

    parser = argparse.ArgumentParser(prog="langcell")
    cli.add_commands(parser.add_subparsers(dest="command"))
    config = tmp_path / "synth.yaml"
    from langcell.ingest.synth_census import DEFAULT_CONFIG

    config.write_text(DEFAULT_CONFIG.read_text().replace("n_genes: 8000", "n_genes: 2000")
                      .replace("genes_detected: [1000, 5000]", "genes_detected: [200, 800]"))
    args = parser.parse_args(["ingest", "synth-census", "--cells", "400", "--out", str(tmp_path / "s"),
                              "--config", str(config), "--seed", "1", "--no-progress", "--layout", "census"])
    assert args.handler(args) == 0
    assert "400 cells x 2000 genes" in capsys.readouterr().out
    import tiledbsoma

    with tiledbsoma.SparseNDArray.open(str(tmp_path / "s/census_data/homo_sapiens/ms/RNA/X/raw")) as X:
        assert json.loads(X.schema_config_options().dims)["soma_dim_1"]["tile"] == "2048"
    args = parser.parse_args(["ingest", "synth-census", "--cells", "-1", "--out", str(tmp_path / "t")])
    with pytest.raises(LangCellError, match="--cells"):
        args.handler(args)
