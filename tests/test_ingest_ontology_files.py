"""`langcell ingest ontologies --source obo` on files with the defects real ontology files have.

Each fixture in tests/ontology_files reproduces one: references to terms the file does not
declare (MONDO), OWL with EFO's own IRIs and an undeclared OBI superclass (EFO), obsolete terms
with and without a usable `replaced_by` plus a pruned copy of an UBERON term (CL), and a file
that does not parse.
"""

import json
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

FILES = Path(__file__).parent / "ontology_files"
CELL_TERMS = {"disease_ontology_term_id": "MONDO:0005015", "assay_ontology_term_id": "EFO:0009922",
              "cell_type_ontology_term_id": "CL:0000001", "sex_ontology_term_id": "PATO:0000383",
              "tissue_ontology_term_id": "UBERON:0000178", "development_stage_ontology_term_id": "EFO:0000001",
              "self_reported_ethnicity_ontology_term_id": "CL:0000002", "tissue_general_ontology_term_id": "CL:0000003"}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """Four cells with the fixtures' terms, resolved with one file per ontology (CL first: its
    copy of the UBERON term must not win)."""
    from langcell.ingest.ontology import ingest_ontologies

    ingest = tmp_path_factory.mktemp("ingest")
    (ingest / "cells").mkdir()
    pq.write_table(pa.table({"soma_joinid": list(range(4)), **{c: [v] * 4 for c, v in CELL_TERMS.items()}}),
                   ingest / "cells" / "part-00000.parquet")
    files = [f"CL={FILES / 'cl_obsolete.obo'}", f"UBERON={FILES / 'uberon.obo'}", f"EFO={FILES / 'efo.owl'}",
             f"MONDO={FILES / 'mondo_dangling.obo'}", f"PATO={FILES / 'broken.obo'}"]
    result = ingest_ontologies(ingest, source="obo", ontology_files=files)
    terms = pd.read_parquet(result.terms_path).set_index("term_id")
    return result, terms, json.loads(result.unresolved_path.read_text())


@pytest.mark.parametrize("name, missing", [("mondo_dangling.obo", "MONDO:0700096"), ("efo.owl", "OBI:0000070")])
def test_pronto_alone_raises_on_an_undeclared_superclass(name, missing):
    import pronto

    with warnings.catch_warnings(), pytest.raises(KeyError, match=missing):
        warnings.simplefilter("ignore")
        pronto.Ontology(str(FILES / name))


def test_undeclared_references_are_kept_as_parents_and_reported(resolved):
    _, terms, report = resolved
    diabetes = terms.loc["MONDO:0005015"]
    assert list(diabetes["parents"]) == ["MONDO:0000001", "MONDO:0700096"] and diabetes["label"] == "diabetes mellitus"
    assert "MONDO:0700096" not in terms.index  # kept by id, never invented as a term
    assert {"term_id": "MONDO:0700096", "referenced_by": ["MONDO:0005015"]} in report["dangling"]
    assert report["ontologies"]["MONDO"].endswith("mondo_dangling.obo (2 undeclared terms referenced)")


def test_owl_files_load_with_their_own_iris_as_curies(resolved):
    _, terms, report = resolved
    assay = terms.loc["EFO:0009922"]
    assert assay["label"] == "10x 3' v3" and assay["n_cells"] == 4
    assert list(assay["ancestors"]) == ["EFO:0008913", "EFO:0002694", "OBI:0000070"]
    scrna = terms.loc["EFO:0008913"]
    assert scrna["definition"] == "A sequencing assay of the RNA of single cells." and list(scrna["synonyms"]) == \
        ["scRNA-seq"]
    assert {"term_id": "OBI:0000070", "referenced_by": ["EFO:0008913"]} in report["dangling"]


def test_obsolete_terms_follow_replaced_by_or_are_reported(resolved):
    _, terms, report = resolved
    old = terms.loc["CL:0000001"]
    assert bool(old["deprecated"]) and list(old["parents"]) == ["CL:0000236"]
    assert list(old["ancestors"]) == ["CL:0000236", "CL:0000000"]
    assert list(terms.loc["EFO:0000001", "ancestors"])[:2] == ["EFO:0009922", "EFO:0008913"]  # OWL's IAO_0100001
    assert report["replaced_by"] == {"CL:0000001": "CL:0000236", "EFO:0000001": "EFO:0009922"}
    assert report["obsolete"] == [{"term_id": "CL:0000002", "n_cells": 4, "replaced_by": "CLO:0000019"},
                                  {"term_id": "CL:0000003", "n_cells": 4, "replaced_by": None}]
    assert list(terms.loc["CL:0000003", "ancestors"]) == []


def test_each_id_resolves_in_the_ontology_its_prefix_names(resolved):
    _, terms, _ = resolved
    blood = terms.loc["UBERON:0000178"]
    assert blood["source"].endswith("uberon.obo") and list(blood["parents"]) == ["UBERON:0000179"]


def test_an_unreadable_ontology_is_reported_while_the_others_resolve(resolved):
    result, terms, report = resolved
    assert list(report["ontology_errors"]) == ["PATO"]
    assert report["ontology_errors"]["PATO"].startswith(f"{FILES / 'broken.obo'}: cannot parse as OBO/OWL (")
    assert result.unresolved == {"PATO:0000383": 4}
    assert report["unresolved"][0]["reason"].startswith("ontology PATO not loaded: ")
    assert {"MONDO:0005015", "EFO:0009922", "CL:0000001", "UBERON:0000178"} <= set(terms.index)
