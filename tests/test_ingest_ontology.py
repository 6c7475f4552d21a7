"""`langcell ingest ontologies`: terms for ingested cells from the ontology guide and from OBO files."""

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from langcell.core.errors import LangCellError

TERM_ID_COLUMNS = [
    "assay_ontology_term_id", "cell_type_ontology_term_id", "development_stage_ontology_term_id",
    "disease_ontology_term_id", "self_reported_ethnicity_ontology_term_id", "sex_ontology_term_id",
    "tissue_ontology_term_id", "tissue_general_ontology_term_id",
]
ONTOLOGY_FILES = Path(__file__).parent / "ontology_files"
DEMO_CELL_TYPES = {"CL:0001054", "CL:0000236", "CL:0000792", "CL:0000895", "CL:0000897", "CL:0000623",
                   "CL:0000794", "CL:0000900", "CL:0008001", "CL:0000451"}


@pytest.fixture(scope="module")
def demo_obs(tmp_path_factory):
    """The obs of the demo store, read through the Census API."""
    import cellxgene_census

    from langcell.ingest.demo_census import build_demo_census

    out = tmp_path_factory.mktemp("demo") / "census"
    build_demo_census(out)
    with cellxgene_census.open_soma(uri=str(out)) as census:
        obs = census["census_data"]["homo_sapiens"].obs.read().concat().to_pandas()
    return obs


def _write_ingest(folder, frames):
    """An ingest folder with cells/part-NNNNN.parquet holding the contract's term-id columns."""
    (folder / "cells").mkdir(parents=True)
    for i, frame in enumerate(frames):
        table = pa.Table.from_pandas(frame[["soma_joinid", *TERM_ID_COLUMNS]].astype({c: str for c in TERM_ID_COLUMNS}),
                                     preserve_index=False)
        pq.write_table(table, folder / "cells" / f"part-{i:05d}.parquet")
    return folder


def test_terms_resolve_for_the_demo_cells(tmp_path, demo_obs):
    from langcell.ingest.ontology import ingest_ontologies

    ingest = _write_ingest(tmp_path / "ingest", [demo_obs.iloc[:600], demo_obs.iloc[600:]])
    result = ingest_ontologies(ingest)
    assert result.unresolved == {} and result.n_cell_terms == 13
    terms = pd.read_parquet(result.terms_path).set_index("term_id")
    used = DEMO_CELL_TYPES | {"UBERON:0000178", "PATO:0000461", "EFO:0009901"}
    assert used <= set(terms.index)
    assert terms.loc["CL:0000236", "label"] == "B cell" and terms.loc["CL:0000236", "n_cells"] == 95
    assert list(terms.loc["CL:0000236", "parents"]) == ["CL:0000945"]
    assert list(terms.loc["CL:0000236", "ancestors"])[:2] == ["CL:0000945", "CL:0000542"]
    assert "B lymphocyte" in list(terms.loc["CL:0000236", "synonyms"])
    assert terms.loc["CL:0000236", "definition"].startswith("A lymphocyte of B lineage")
    assert terms.loc["UBERON:0000178", "n_cells"] == 700 and terms.loc["EFO:0009901", "label"] == "10x 3' v1"
    assert terms.loc["CL:0000000", "n_cells"] == 0 and terms.loc["CL:0000000", "label"] == "cell"
    # Closed under ancestors: every ancestor of every term has its own row, with its labels.
    for ancestors in terms["ancestors"]:
        assert set(ancestors) <= set(terms.index)
    assert set(terms.ontology) == {"CL", "UBERON", "PATO", "EFO"}
    # Parents are ancestors at distance 1, never further ones.
    regulatory = terms.loc["CL:0000792"]
    assert set(regulatory["parents"]) == {"CL:0000624", "CL:0000815"}
    assert set(regulatory["parents"]) <= set(regulatory["ancestors"][:2])
    report = json.loads(result.unresolved_path.read_text())
    assert report["n_unresolved"] == 0 and report["unresolved"] == []
    # Placeholders are counted, not reported as unresolved terms.
    assert report["placeholders"]["sex_ontology_term_id:unknown"] == 1259
    assert report["placeholders"]["cell_type_ontology_term_id:unknown"] == 559


def test_unknown_ids_are_reported_with_counts(tmp_path, caplog):
    from langcell.ingest.ontology import ingest_ontologies

    n = 10
    frame = pd.DataFrame({
        "soma_joinid": range(n),
        "assay_ontology_term_id": ["EFO:0009922"] * n,
        "cell_type_ontology_term_id": ["CL:9999999"] * 3 + ["CL:0000236"] * 5 + ["FOO:0000001"] * 2,
        "development_stage_ontology_term_id": ["HsapDv:0000240"] * 5 + ["na"] * 5,
        "disease_ontology_term_id": ["MONDO:0100096 || PATO:0000461"] * 4 + ["PATO:0000461"] * 6,
        "self_reported_ethnicity_ontology_term_id": ["HANCESTRO:0005,HANCESTRO:0008"] * 7 + ["unknown"] * 3,
        "sex_ontology_term_id": ["PATO:0000383"] * n,
        "tissue_ontology_term_id": ["UBERON:0002048"] * 9 + ["CL:0000057"],
        "tissue_general_ontology_term_id": ["UBERON:0002048"] * 9 + [""],
    })
    ingest = _write_ingest(tmp_path / "ingest", [frame])
    with caplog.at_level(logging.WARNING, logger="langcell.ingest.ontology"):
        result = ingest_ontologies(ingest)
    assert result.unresolved == {"CL:9999999": 3, "FOO:0000001": 2}
    assert "2 term ids resolve in no ontology: CL:9999999 (3 cells), FOO:0000001 (2 cells)" in caplog.text
    report = json.loads((ingest / "ontology" / "unresolved.json").read_text())
    assert report["unresolved"] == [
        {"term_id": "CL:9999999", "n_cells": 3, "columns": {"cell_type_ontology_term_id": 3},
         "reason": f"not in the guide's CL {report['ontologies']['CL'].split(',')[0]}"},
        {"term_id": "FOO:0000001", "n_cells": 2, "columns": {"cell_type_ontology_term_id": 2},
         "reason": "the ontology guide has no ontology for prefix 'FOO'"}]
    terms = pd.read_parquet(ingest / "ontology" / "terms.parquet").set_index("term_id")
    # Joined ids are split and each resolves; a CL id as tissue (cell culture) resolves too.
    assert terms.loc["HANCESTRO:0005", "n_cells"] == 7 and terms.loc["HANCESTRO:0008", "label"] == "Asian ancestry"
    assert terms.loc["MONDO:0100096", "label"] == "COVID-19" and terms.loc["PATO:0000461", "n_cells"] == 10
    assert terms.loc["CL:0000057", "label"] == "fibroblast" and terms.loc["CL:0000057", "n_cells"] == 1
    assert {"unknown", "na", ""}.isdisjoint(terms.index)
    assert report["placeholders"] == {"development_stage_ontology_term_id:na": 5,
                                      "self_reported_ethnicity_ontology_term_id:unknown": 3,
                                      "tissue_general_ontology_term_id:": 1}


def test_obo_source_agrees_with_the_guide(tmp_path):
    from langcell.ingest.ontology import GuideSource, OboSource, resolve_terms, write_obo

    guide = GuideSource()
    ids = sorted(DEMO_CELL_TYPES | {"CL:0000084", "CL:0000576"})
    terms, unresolved = resolve_terms(ids, guide)
    assert unresolved == [] and len(terms) > 40
    obo_path = tmp_path / "cl-subset.obo"
    write_obo(terms.values(), obo_path, ontology="cl")
    assert obo_path.read_text().count("[Term]") == len(terms)
    obo = OboSource({"CL": str(obo_path)})
    for term_id, expected in terms.items():
        parsed = obo.get(term_id)
        assert parsed is not None, term_id
        assert parsed.label == expected.label, term_id
        assert parsed.definition == expected.definition, term_id
        assert parsed.synonyms == expected.synonyms, term_id
        assert parsed.parents == expected.parents, term_id
        assert set(parsed.ancestors) == set(expected.ancestors), term_id
        assert parsed.ancestors[: len(parsed.parents)] == sorted(parsed.parents), term_id
    assert obo.get("UBERON:0000178") is None


def test_obo_part_of_counts_as_a_parent(tmp_path):
    from langcell.ingest.ontology import OboSource

    path = tmp_path / "mini.obo"
    path.write_text("format-version: 1.4\nontology: mini\n\n"
                    "[Term]\nid: UBERON:0000178\nname: blood\nis_a: UBERON:0000179\n"
                    "relationship: part_of UBERON:0002390\n\n"
                    "[Term]\nid: UBERON:0000179\nname: haemolymphatic fluid\n\n"
                    "[Term]\nid: UBERON:0002390\nname: hematopoietic system\nis_a: UBERON:0000467\n\n"
                    "[Term]\nid: UBERON:0000467\nname: anatomical system\n\n"
                    "[Typedef]\nid: part_of\nname: part of\n")
    blood = OboSource({"UBERON": str(path)}).get("UBERON:0000178")
    assert blood.parents == ["UBERON:0000179", "UBERON:0002390"]
    assert blood.ancestors == ["UBERON:0000179", "UBERON:0002390", "UBERON:0000467"]


def test_ingest_ontologies_with_obo_files(tmp_path, demo_obs):
    from langcell.ingest.ontology import GuideSource, ingest_ontologies, resolve_terms, write_obo

    terms, _ = resolve_terms(sorted(DEMO_CELL_TYPES), GuideSource())
    write_obo(terms.values(), tmp_path / "cl.obo")
    ingest = _write_ingest(tmp_path / "ingest", [demo_obs])
    result = ingest_ontologies(ingest, source="obo", ontology_files=[f"CL={tmp_path / 'cl.obo'}"])
    # The file holds CL only: UBERON, PATO and EFO ids are reported, never silently dropped.
    # n_cells counts cells: tissue and tissue_general are both blood in the same 700 cells.
    assert result.unresolved == {"UBERON:0000178": 700, "PATO:0000461": 700, "EFO:0009901": 700}
    blood = json.loads(result.unresolved_path.read_text())["unresolved"][-1]
    assert blood == {"term_id": "UBERON:0000178", "n_cells": 700,
                     "columns": {"tissue_general_ontology_term_id": 700, "tissue_ontology_term_id": 700},
                     "reason": "no --ontology-file for prefix 'UBERON', and no loaded ontology declares it; "
                               "add --ontology-file UBERON=FILE"}
    obo_terms = pd.read_parquet(result.terms_path).set_index("term_id")
    guide_result = ingest_ontologies(ingest, source="guide")
    guide_terms = pd.read_parquet(guide_result.terms_path).set_index("term_id")
    cl = sorted(obo_terms.index)
    assert len(cl) == len(terms) and set(cl) <= set(guide_terms.index)
    for column in ("label", "definition", "n_cells"):
        assert obo_terms.loc[cl, column].tolist() == guide_terms.loc[cl, column].tolist()
    for column in ("parents", "synonyms"):
        assert [list(v) for v in obo_terms.loc[cl, column]] == [list(v) for v in guide_terms.loc[cl, column]]


def test_bad_inputs_are_one_line_errors(tmp_path):
    from langcell.ingest.ontology import OboSource, ingest_ontologies, make_source

    with pytest.raises(LangCellError, match="ingest folder not found"):
        ingest_ontologies(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LangCellError, match="no cell parquet files"):
        ingest_ontologies(tmp_path / "empty")
    (tmp_path / "bad" / "cells").mkdir(parents=True)
    (tmp_path / "bad" / "cells" / "part-00000.parquet").write_text("not parquet")
    with pytest.raises(LangCellError, match="not a readable parquet file"):
        ingest_ontologies(tmp_path / "bad")
    (tmp_path / "cols" / "cells").mkdir(parents=True)
    pq.write_table(pa.table({"soma_joinid": [0]}), tmp_path / "cols" / "cells" / "part-00000.parquet")
    with pytest.raises(LangCellError, match="no \\*_ontology_term_id columns"):
        ingest_ontologies(tmp_path / "cols")
    with pytest.raises(LangCellError, match="unknown ontology source"):
        make_source("ols")
    with pytest.raises(LangCellError, match="--ontology-file 'cl.obo': expected PREFIX=PATH_OR_URL"):
        make_source("obo", ["cl.obo"])
    with pytest.raises(LangCellError, match="--ontology-file CL: given twice"):
        make_source("obo", ["CL=a.obo", "CL=b.obo"])
    with pytest.raises(LangCellError, match="--ontology-file: only used with --source obo"):
        make_source("guide", ["CL=a.obo"])
    (tmp_path / "junk.obo").write_text("this is not an ontology\n")
    # Nothing listens on the discard port: the download fails at once, offline too. With no
    # ontology loaded at all there is nothing to resolve: an error naming each file.
    with pytest.raises(LangCellError, match="no ontology could be loaded .*nope.obo: cannot read .*junk.obo: cannot "
                                            "parse as OBO/OWL .*127.0.0.1:9/cl.obo: cannot download"):
        OboSource({"CL": str(tmp_path / "nope.obo"), "UBERON": str(tmp_path / "junk.obo"),
                   "EFO": "http://127.0.0.1:9/cl.obo"})


def test_cli_ontologies(tmp_path, demo_obs, capsys):
    import argparse

    from langcell.ingest import cli

    parser = argparse.ArgumentParser(prog="langcell")
    cli.add_commands(parser.add_subparsers(dest="command"))
    ingest = _write_ingest(tmp_path / "ingest", [demo_obs])
    args = parser.parse_args(["ingest", "ontologies", "--ingest", str(ingest)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "used by cells" in out and "0 unresolved ids" in out
    args = parser.parse_args(["ingest", "ontologies", "--ingest", str(ingest), "--ontology-file", "CL=x.obo"])
    with pytest.raises(LangCellError, match="--source obo"):
        args.handler(args)
    args = parser.parse_args(["ingest", "ontologies", "--ingest", str(ingest), "--source", "obo",
                              "--ontology-file", f"CL={ONTOLOGY_FILES / 'cl_obsolete.obo'}",
                              "--ontology-file", f"EFO={ONTOLOGY_FILES / 'efo.owl'}"])
    assert args.handler(args) == 0
    report = json.loads((ingest / "ontology" / "unresolved.json").read_text())
    assert sorted(report["ontologies"]) == ["CL", "EFO"] and report["ontology_errors"] == {}


def test_guide_versions_follow_the_census_schema_and_say_which(tmp_path):
    import cellxgene_ontology_guide

    from langcell.ingest.ontology import ingest_ontologies

    data = Path(cellxgene_ontology_guide.__file__).parent / "data"
    schemas = json.loads((data / "ontology_info.json").read_text())
    newest = json.loads((data / "latest_ontology_info.json").read_text())["ontologies"]["CL"]["version"]
    schema = next(s for s in sorted(schemas) if schemas[s]["ontologies"]["CL"]["version"] != newest)
    named = schemas[schema]["ontologies"]["CL"]["version"]
    frame = pd.DataFrame({"soma_joinid": [0], **{c: ["CL:0000236"] for c in TERM_ID_COLUMNS}})
    for version, expected, why in ((schema, named, f"{named}, as CELLxGENE schema {schema} names it"),
                                   ("4.0.0", newest, f"{newest}, the newest the guide ships (the guide does not "
                                                     "list schema 4.0.0)"),
                                   (None, newest, f"{newest}, the newest the guide ships (the ingest names no "
                                                  "CELLxGENE schema version)")):
        ingest = _write_ingest(tmp_path / str(version), [frame])
        summary = {"dataset_schema_version": version} if version else {}
        (ingest / "manifest.json").write_text(json.dumps({"complete": True, "census_summary": summary}))
        result = ingest_ontologies(ingest)
        terms = pd.read_parquet(result.terms_path).set_index("term_id")
        assert terms.loc["CL:0000236", "source"] == f"guide:CL {expected}"
        report = json.loads(result.unresolved_path.read_text())
        assert report["census_schema"] == version and report["ontologies"]["CL"] == why
