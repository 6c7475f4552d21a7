"""Bad inputs end in one-line LangCellErrors (exit 2 from the CLI), with nothing left looking complete."""

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from langcell.build_sclibrary.anndata_io import tokenize_anndata
from langcell.build_sclibrary.build import build_library
from langcell.build_sclibrary.config import load_build_config
from langcell.build_sclibrary.tokenizer import RankValueTokenizer
from langcell.build_sclibrary.vocab import geneformer_v1_vocab
from langcell.cli import main
from langcell.core.errors import LangCellError
from tests.build_helpers import rewrite_manifest, write_ingest


@pytest.fixture()
def ingest(tmp_path):
    write_ingest(tmp_path / "ingest", n_cells=60, n_parts=2)
    return tmp_path / "ingest"


def _fails(ingest, out, match, **overrides):
    with pytest.raises(LangCellError, match=match) as info:
        build_library(ingest, out, load_build_config(None, overrides), progress=False)
    assert "\n" not in str(info.value)
    manifest = out / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False
    return str(info.value)


def test_missing_and_incomplete_manifest(tmp_path, ingest):
    (ingest / "manifest.json").rename(ingest / "moved.json")
    _fails(ingest, tmp_path / "a", "ingest manifest not found")
    (ingest / "moved.json").rename(ingest / "manifest.json")
    rewrite_manifest(ingest, complete=False)
    _fails(ingest, tmp_path / "b", "not complete")


def test_part_checksum_mismatch(tmp_path, ingest):
    manifest = json.loads((ingest / "manifest.json").read_text())
    manifest["parts"][1]["sha256"] = "0" * 64
    (ingest / "manifest.json").write_text(json.dumps(manifest))
    message = _fails(ingest, tmp_path / "lib", "sha256 does not match")
    assert "part-00001.parquet" in message
    assert not list((tmp_path / "lib" / "work" / "parts").glob("part-00001.json"))


def test_missing_ontology_terms(tmp_path, ingest):
    (ingest / "ontology" / "terms.parquet").unlink()
    _fails(ingest, tmp_path / "lib", "langcell ingest ontologies")


def test_other_config_in_same_folder_is_refused(tmp_path, ingest):
    build_library(ingest, tmp_path / "lib", load_build_config(None, {}), progress=False)
    with pytest.raises(LangCellError, match="another configuration"):
        build_library(ingest, tmp_path / "lib", load_build_config(None, {"seed": 9}), progress=False)


def test_cli_prints_one_line_and_exits_2(tmp_path, ingest, capsys):
    rewrite_manifest(ingest, complete=False)
    assert main(["build", "--ingest", str(ingest), "--out", str(tmp_path / "lib"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("langcell build: error: ") and "\n" not in err
    assert main(["build", "--ingest", str(ingest), "--out", str(tmp_path / "lib"), "--fractions", "0.5,0.6,x"]) == 2
    assert main(["build", "--ingest", str(ingest), "--out", str(tmp_path / "l2"), "--fractions", "0.5,0.6,0.1"]) == 2
    assert "fractions" in capsys.readouterr().err


def test_bucket_smaller_than_a_shard_is_refused(tmp_path, ingest, capsys):
    args = ["build", "--ingest", str(ingest), "--out", str(tmp_path / "lib"), "--shard-size", "100"]
    assert main([*args, "--bucket-cells", "99"]) == 2
    assert "bucket_cells (99) must be at least shard_size (100); raise bucket_cells" in capsys.readouterr().err
    assert not (tmp_path / "lib").exists()


def test_holdout_type_absent_is_refused(tmp_path, ingest):
    _fails(ingest, tmp_path / "lib", "no cell has type 'neuron'", holdout_cell_types=["neuron"])


def test_anndata_log_normalised_and_unmatched_genes(tmp_path):
    tokens, medians = geneformer_v1_vocab()
    tok = RankValueTokenizer(tokens, medians)
    genes = [g for g in tokens if g.startswith("ENSG")][:40]
    counts = sp.random(20, 40, density=0.3, random_state=0, format="csr", dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    logged = anndata.AnnData(X=sp.csr_matrix(np.log1p(counts.toarray())))
    logged.var_names = genes
    with pytest.raises(LangCellError, match="non-integer values"):
        tokenize_anndata(logged, tok)
    alien = anndata.AnnData(X=counts)
    alien.var_names = [f"gene{i}" for i in range(40)]
    with pytest.raises(LangCellError, match=r"only 0 of 40 genes \(0.0%, best match var_names as symbol"):
        tokenize_anndata(alien, tok)
    path = tmp_path / "logged.h5ad"
    logged.write_h5ad(path)
    assert main(["tokenize", "--input", str(path), "--out", str(tmp_path / "tok")]) == 2
    assert not (tmp_path / "tok").exists()
    assert not list(tmp_path.glob(".tok*"))
