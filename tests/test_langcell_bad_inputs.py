"""Every command that reads a user's file answers bad input with exit status 2 and one line on
stderr naming the file or option.

Each bad AnnData is given to all three commands that read one (`tokenize`, `annotate`, `eval`);
the rest of the table covers the other files and options users pass (models, configs, ingest
folders, cell types, ontology ids). Everything runs in-process on an untrained tiny model.
"""

import shlex
import shutil
import subprocess
import sys

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from langcell.eval import synthetic
from langcell.cli import main
from langcell.pretrain.export import save_langcell
from tests.build_helpers import write_ingest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("bad_inputs")
    vocab = synthetic.write_vocab(root / "vocab", 120)
    export = save_langcell(synthetic.tiny_model(vocab), root / "export", vocab_dir=vocab)
    broken = root / "broken_export"
    shutil.copytree(export, broken)
    (broken / "cell_proj.bin").unlink()
    write_ingest(root / "ingest", n_cells=20, n_parts=1)
    adata = synthetic.make_adata(n_per_class=2, seed=0)
    adata.write_h5ad(root / "good.h5ad")
    return {"root": root, "vocab": vocab, "export": export, "broken": broken, "adata": adata,
            "good": root / "good.h5ad", "ingest": root / "ingest"}


def _lognorm(X):
    X = sp.csr_matrix(X, dtype=np.float32)
    return sp.csr_matrix(sp.diags(1e4 / np.maximum(np.asarray(X.sum(1)).ravel(), 1)) @ X).log1p()


def _with_x(X):
    def write(adata, path):
        adata.X = X(adata.X)
        adata.write_h5ad(path)
    return write


def _one_value(value, dense: bool):
    def X(counts):
        counts = counts.toarray()
        counts[1, 3] = value
        return counts if dense else sp.csr_matrix(counts)
    return _with_x(X)


def _text(adata, path):
    path.write_text("cell,gene,count\nc1,CD3E,4\n")


def _hdf5_not_anndata(adata, path):
    with h5py.File(path, "w") as f:
        f["counts"] = np.ones((3, 3))


def _subset(rows, cols):
    def write(adata, path):
        adata[rows, cols].copy().write_h5ad(path)
    return write


def _unknown_genes(adata, path):
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    adata.write_h5ad(path)


def _duplicate_gene(adata, path):
    names = list(adata.var_names)
    names[5] = names[4]
    adata.var_names = names
    adata.write_h5ad(path)


def _lognorm_counts_layer(adata, path):
    adata.layers["counts"] = _lognorm(adata.X)
    adata.write_h5ad(path)


def _no_matrix(adata, path):
    anndata.AnnData(obs=adata.obs, var=adata.var).write_h5ad(path)


# name -> writes the bad file at the path (None: the path is left missing).
BAD_ANNDATA = {
    "missing file": None,
    "not HDF5": _text,
    "empty file": lambda adata, path: path.write_bytes(b""),
    "a folder": lambda adata, path: path.mkdir(),
    "HDF5 but not AnnData": _hdf5_not_anndata,
    "0 cells": _subset(slice(0, 0), slice(None)),
    "0 genes": _subset(slice(None), slice(0, 0)),
    "no known genes": _unknown_genes,
    "duplicate genes": _duplicate_gene,
    "no X and no counts layer": _no_matrix,
    "log-normalised CSR": _with_x(_lognorm),
    "log-normalised dense": _with_x(lambda X: _lognorm(X).toarray()),
    "log-normalised CSC": _with_x(lambda X: sp.csc_matrix(_lognorm(X))),
    "log-normalised counts layer": _lognorm_counts_layer,
    "negative CSR": _one_value(-2.0, dense=False),
    "negative dense": _one_value(-2.0, dense=True),
    "NaN CSR": _one_value(np.nan, dense=False),
    "NaN dense": _one_value(np.nan, dense=True),
    "infinite dense": _one_value(np.inf, dense=True),
}


def _reader_argv(command, w, path, out):
    if command == "tokenize":
        return ["tokenize", "--input", path, "--out", out, "--vocab", str(w["vocab"])]
    if command == "annotate":
        return ["annotate", "--model", str(w["export"]), "--input", path, "--output", out,
                "--cell-types", "B cell", "T cell"]
    return ["eval", "zero-shot", "--model", str(w["export"]), "--data", path, "--out", out]


def _assert_one_line_naming(capsys, argv, name):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"langcell {argv[0]}: error: ") and name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["tokenize", "annotate", "eval"])
@pytest.mark.parametrize("kind", list(BAD_ANNDATA))
def test_bad_anndata(world, tmp_path, capsys, kind, command):
    path = tmp_path / "cells.h5ad"
    if BAD_ANNDATA[kind] is not None:
        BAD_ANNDATA[kind](world["adata"].copy(), path)
    out = tmp_path / "out"
    _assert_one_line_naming(capsys, _reader_argv(command, world, str(path), str(out)), str(path))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] in ([], ["cells.h5ad"])


def _yaml(text):
    def write(w, tmp):
        (tmp / "c.yaml").write_text(text)
        return str(tmp / "c.yaml")
    return write


def _empty_dir(w, tmp):
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def _filter_none(w, tmp):
    adata = w["adata"].copy()
    adata.obs["filter_pass"] = 0
    adata.write_h5ad(tmp / "c.h5ad")
    return str(tmp / "c.h5ad")


def _one_type(w, tmp):
    adata = w["adata"].copy()
    adata.obs["cell_type"] = "B cell"
    adata.write_h5ad(tmp / "c.h5ad")
    return str(tmp / "c.h5ad")


ANNOTATE = "annotate --model {export} --input {good} --output {tmp}/o.h5ad"
EVAL = "eval zero-shot --model {export} --data {good} --out {tmp}/r"
BUILD = "build --ingest {ingest} --out {tmp}/lib --quiet"
# name -> (argv template, what the error line must contain, writer of {file} or None). Templates
# may use {good}, {export}, {broken}, {vocab}, {ingest}, {tmp} and {file}.
OTHER = {
    "one candidate cell type": (ANNOTATE + " --cell-types 'B cell'", "--cell-types", None),
    "a candidate listed twice": (ANNOTATE + " --cell-types 'B cell' 'T cell' 'B cell'", "--cell-types", None),
    "bad ontology id": (ANNOTATE + " --ontology-root CL:9999999", "--ontology-root", None),
    "ontology root without descendants": (ANNOTATE + " --ontology-root CL:0000001", "--ontology-root", None),
    "missing ontology terms file": (ANNOTATE + " --cell-types 'B cell' 'T cell' --ontology-terms {tmp}/terms.parquet",
                                    "{tmp}/terms.parquet", None),
    "annotate: missing model": (ANNOTATE.replace("{export}", "{tmp}/nowhere") + " --cell-types 'B cell' 'T cell'",
                                "{tmp}/nowhere", None),
    "annotate: missing model part": (ANNOTATE.replace("{export}", "{broken}") + " --cell-types 'B cell' 'T cell'",
                                     "{broken}", None),
    "eval: missing model part": (EVAL.replace("{export}", "{broken}"), "{broken}", None),
    "eval: bad YAML": (EVAL + " --config {file}", "{file}", _yaml("zero_shot: [unclosed\n")),
    "eval: unknown config key": (EVAL + " --config {file}", "{file}", _yaml("zero_shot:\n  alpah: 0.2\n")),
    "eval: missing config": (EVAL + " --config {tmp}/none.yaml", "{tmp}/none.yaml", None),
    "eval: unknown novel cell type": (EVAL + " --config {file}", "zero_shot.novel_types",
                                      _yaml("zero_shot:\n  novel_types: [hepatocyte]\n")),
    "eval: missing label column": (EVAL + " --label-key celltype", "celltype", None),
    "eval: one cell type in the labels": (EVAL.replace("{good}", "{file}"), "{file}", _one_type),
    "eval: a folder that is no datasets split": (EVAL.replace("{good}", "{file}"), "{file}", _empty_dir),
    "tokenize: missing vocab": ("tokenize --input {good} --out {tmp}/t --vocab {tmp}/novocab", "{tmp}/novocab", None),
    "tokenize: missing layer": ("tokenize --input {good} --out {tmp}/t --vocab {vocab} --layer raw", "'raw'", None),
    "tokenize: missing gene column": ("tokenize --input {good} --out {tmp}/t --vocab {vocab} --gene-column sym",
                                      "'sym'", None),
    "tokenize: no cell passes filter_pass": ("tokenize --input {file} --out {tmp}/t --vocab {vocab}", "{file}",
                                             _filter_none),
    "build: missing manifest": (BUILD.replace("{ingest}", "{file}"), "{file}", _empty_dir),
    "build: bad YAML": (BUILD + " --config {file}", "{file}", _yaml("seed: [\n")),
    "build: unknown config key": (BUILD + " --config {file}", "{file}", _yaml("sede: 3\n")),
    "build: unknown holdout cell type": (BUILD + " --holdout-cell-types no-such-type", "no-such-type", None),
    "export: missing run": ("export --run {tmp}/norun --out {tmp}/e", "{tmp}/norun", None),
    "ingest ontologies: missing ingest": ("ingest ontologies --ingest {tmp}/noingest", "{tmp}/noingest", None),
    "ingest census: missing store": ("ingest census --uri {tmp}/nostore --out {tmp}/i", "{tmp}/nostore", None),
    "ingest census: a folder that is no SOMA store": ("ingest census --uri {file} --out {tmp}/i", "{file}", _empty_dir),
    "ingest merge: no shard manifests": ("ingest merge --out {file}", "{file}", _empty_dir),
    "pretrain: unknown config key": ("pretrain --config {file} --data {tmp} --out {tmp}/run --stage 1", "{file}",
                                     _yaml("sede: 3\n")),
    "demo: bad YAML": ("demo --out {tmp}/d --config {file}", "{file}", _yaml("seed: [\n")),
}


@pytest.mark.parametrize("kind", list(OTHER))
def test_bad_option_or_file(world, tmp_path, capsys, kind):
    template, name, writer = OTHER[kind]
    values = {k: str(world[k]) for k in ("good", "export", "broken", "vocab", "ingest")}
    values["tmp"] = str(tmp_path)
    values["file"] = writer(world, tmp_path) if writer else ""
    argv = [arg.format(**values) for arg in shlex.split(template)]
    _assert_one_line_naming(capsys, argv, name.format(**values))


def test_a_real_process_prints_one_line_for_a_file_that_is_not_hdf5(world, tmp_path):
    """In-process runs hide Python warnings and tracebacks that a terminal would show."""
    notes = tmp_path / "notes.h5ad"
    notes.write_text("not an AnnData\n")
    proc = subprocess.run([sys.executable, "-m", "langcell.cli", "annotate", "--model", str(world["export"]),
                           "--input", str(notes), "--output", str(tmp_path / "o.h5ad"), "--cell-types", "B cell",
                           "T cell"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"langcell annotate: error: {notes}: not an HDF5 file, so not an .h5ad; pass an AnnData file written by "
        "anndata/scanpy (write_h5ad)"]


def test_the_table_covers_every_command():
    from langcell.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    covered = {shlex.split(t)[0] for t, _, _ in OTHER.values()} | {"tokenize", "annotate", "eval"}
    assert covered == set(commands)
