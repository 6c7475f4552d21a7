"""The notebook API (`langcell.load_model`, `.embed_cells`, `.embed_texts`, `langcell.annotate`,
`langcell.tokenize`) on the demo's cells, against the CLI's file-to-file path and LangCell's own
outputs. The model is the LangCell release-layout fixture with its stand-in tokenizer inside."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import langcell
from langcell.cli import main as cli_main
from langcell.core.errors import LangCellError
from langcell.eval.annotate import OBS_COLUMNS, annotate as annotate_file
from langcell.ingest.demo_census import load_pbmc68k, map_symbols, symbol_to_ensembl

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "langcell_release_layout"
REF = json.loads((FIXTURE / "reference_outputs.json").read_text())
N_CELLS = 40
CELL_TYPES = ["B cell", "T cell", "monocyte"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    export = root / "models" / "langcell-base"
    shutil.copytree(FIXTURE / "checkpoint", export)
    shutil.copytree(FIXTURE / "text_vocab", export / "tokenizer")
    X, symbols, obs, _ = load_pbmc68k()
    adata = anndata.AnnData(X=X[:N_CELLS], obs=obs.iloc[:N_CELLS].set_index("source_cell_id"),
                            var=pd.DataFrame(index=symbols))
    adata.write_h5ad(root / "my_cells.h5ad")
    model = langcell.load_model(export)
    return {"root": root, "export": export, "h5ad": root / "my_cells.h5ad", "model": model}


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(r"<!-- notebook example: .*? -->\n```python\n(.*?)```", readme, re.S).group(1)


def test_readme_example_runs_on_the_demo_cells(world, monkeypatch):
    monkeypatch.chdir(world["root"])
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    cells, texts, adata = scope["cells"], scope["texts"], scope["adata"]
    width = len(REF["cell_embeddings"][0])
    assert cells.shape == (N_CELLS, width) and cells.dtype == np.float32
    assert np.allclose(np.linalg.norm(cells, axis=1), 1, atol=1e-5)
    assert texts.shape == (2, width) and scope["similarity"].shape == (N_CELLS, 2)
    assert set(adata.obs["langcell_prediction"]) <= set(CELL_TYPES)
    assert adata.obsm["X_langcell"].shape == (N_CELLS, width)
    assert scope["tokens"].num_rows == N_CELLS and "input_ids" in scope["tokens"].column_names


def test_in_memory_and_backed_annotate_write_what_the_cli_writes(world, tmp_path):
    out = tmp_path / "annotated.h5ad"
    annotate_file(world["export"], world["h5ad"], out, CELL_TYPES)
    cli = anndata.read_h5ad(out)
    memory = anndata.read_h5ad(world["h5ad"])
    assert langcell.annotate(memory, world["model"], cell_types=CELL_TYPES) is None
    backed = anndata.read_h5ad(world["h5ad"], backed="r")
    langcell.annotate(backed, world["model"], cell_types=CELL_TYPES, key_added="lc")
    for got, key in ((memory, "langcell"), (backed, "lc")):
        for column in OBS_COLUMNS:
            ours, theirs = got.obs[column.replace("langcell", key, 1)], cli.obs[column]
            assert ours.dtype == theirs.dtype, column
            if column == "langcell_score":
                assert np.allclose(ours.to_numpy(), theirs.to_numpy(), atol=1e-6)
            else:
                assert ours.astype(str).tolist() == theirs.astype(str).tolist()
        assert np.allclose(got.obsm[f"X_{key}"], cli.obsm["X_langcell"], atol=1e-6)
        assert got.uns[key] == dict(cli.uns["langcell"])
    # LangCell's per-cell top-1 is the first of the top 3
    assert [t.split("; ")[0] for t in cli.obs["langcell_top3"]] == cli.obs["langcell_prediction"].astype(str).tolist()


def test_annotate_copy_leaves_the_input_alone(world):
    adata = anndata.read_h5ad(world["h5ad"])
    copy = langcell.annotate(adata, world["model"], cell_types=CELL_TYPES, copy=True)
    assert "X_langcell" not in adata.obsm and "langcell_prediction" not in adata.obs and "langcell" not in adata.uns
    assert copy is not adata and copy.obsm["X_langcell"].shape[0] == N_CELLS
    with pytest.raises(LangCellError, match="only one candidate"):
        langcell.annotate(adata, world["model"], cell_types=["B cell"])


def test_embed_cells_is_the_annotate_embedding_for_symbols_and_ensembl_ids(world):
    adata = anndata.read_h5ad(world["h5ad"])
    by_symbol = world["model"].embed_cells(adata, batch_size=7)
    annotated = langcell.annotate(adata, world["model"], cell_types=CELL_TYPES, copy=True)
    assert np.allclose(by_symbol, annotated.obsm["X_langcell"], atol=1e-6)
    ids = map_symbols(list(adata.var_names), symbol_to_ensembl())
    keep = [i for i, g in enumerate(ids) if g is not None and ids.index(g) == i]
    ensembl = adata[:, keep].copy()
    ensembl.var_names = [ids[i] for i in keep]
    assert np.allclose(world["model"].embed_cells(ensembl, batch_size=16), by_symbol, atol=1e-5)
    assert not np.allclose(by_symbol[0], by_symbol[1], atol=1e-3)


def test_embed_texts_reproduces_langcell_text_embeddings(world):
    got = world["model"].embed_texts(REF["texts"], batch_size=2)
    assert np.abs(got - np.array(REF["text_embeddings"])).max() < 1e-4
    with pytest.raises(LangCellError, match="non-empty list"):
        world["model"].embed_texts("B cell")


def test_tokenize_is_what_the_cli_writes(world, tmp_path):
    memory = langcell.tokenize(anndata.read_h5ad(world["h5ad"]))
    assert cli_main(["tokenize", "--input", str(world["h5ad"]), "--out", str(tmp_path / "tok")]) == 0
    import datasets

    written = datasets.load_from_disk(str(tmp_path / "tok"))
    assert memory.num_rows == written.num_rows == N_CELLS
    assert memory["input_ids"] == written["input_ids"] and memory["length"] == written["length"]


def test_import_langcell_loads_no_torch_and_resolves_the_api_on_use():
    code = ("import sys, langcell; before = 'torch' in sys.modules; f = langcell.annotate; "
            "print(before, f.__module__, f.__name__, sorted(n for n in langcell.__all__ if not n.startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "langcell.eval.annotate", "annotate_adata",
                                  "['annotate',", "'load_model',", "'tokenize']"]
    with pytest.raises(AttributeError, match="no attribute 'embed'"):
        langcell.embed
