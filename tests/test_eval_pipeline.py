"""Eval end to end on a tiny model trained here: zero-shot quality, the suite, annotate, bad input."""

import json

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from langcell.eval import synthetic
from langcell.eval.annotate import annotate
from langcell.eval.data import load_eval_data
from langcell.eval.model_io import load_model
from langcell.eval.scoring import TopKScorer, score_cells
from langcell.eval.suite import headline, run_suite, run_task
from langcell.cli import main as cli_main
from langcell.core.errors import LangCellError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("eval")
    synthetic.write_vocab(root / "vocab", 120)
    train = synthetic.make_adata(n_per_class=40, seed=1)
    test = synthetic.make_adata(n_per_class=25, seed=2)
    test.write_h5ad(root / "test.h5ad")
    export = synthetic.train_tiny_export(root / "export", train, root / "vocab", steps=150, seed=0)
    return {"root": root, "export": export, "test": root / "test.h5ad", "adata": test}


def test_tiny_model_beats_chance_on_held_out_cells(world):
    model, vocab = load_model(world["export"])
    data = load_eval_data(world["test"], vocab, "cell_type", "dataset_id")
    classes = sorted(data.obs["cell_type"].unique())
    y = np.array([classes.index(c) for c in data.obs["cell_type"]])
    texts = synthetic.class_texts(classes)
    full = score_cells(TopKScorer(model, texts, top_k=None), data.input_ids)
    acc = (full["fused"].argmax(1) == y).mean()
    assert acc > 2 / len(classes), acc  # chance is 1/6
    # On the trained model too, k = number of classes is exactly LangCell's per-class loop.
    loop = score_cells(TopKScorer(model, texts, method="loop"), data.input_ids)
    np.testing.assert_allclose(full["fused"], loop["fused"], atol=1e-5)


def test_suite_writes_every_task(world, tmp_path, monkeypatch):
    # Run from the folder holding model and data: the report names them as the user would.
    monkeypatch.chdir(world["root"])
    out = tmp_path / "report"
    metrics = run_suite("smoke", model=world["export"], data=world["test"], out=out,
                        few_shot={"shots": [2], "seeds": [0, 1], "epochs": 1, "lr": 1e-4, "batch_size": 12},
                        finetune={"seeds": [0], "epochs": 1, "lr": 1e-3, "batch_size": 32},
                        zero_shot={"top_k": 3, "tune_alpha": True, "novel_types": ["platelet"]})
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"run", "zero-shot", "retrieval", "integration", "few-shot", "finetune"}
    zs = metrics["zero-shot"]
    assert zs["alpha"] in zs["alpha_grid"] and zs["n_cells"] == 120  # 150 cells less a 20% validation share
    assert zs["accuracy"] > 1 / 6
    assert set(zs["seen_vs_novel"]) == {"seen", "novel"} and zs["seen_vs_novel"]["novel"]["n_cells"] == 20
    assert zs["ontology"]["ontology_accuracy"] >= zs["ontology"]["exact_share"] == pytest.approx(zs["accuracy"])
    assert metrics["retrieval"]["similarity"]["cell_to_text_R@5"] >= metrics["retrieval"]["similarity"]["cell_to_text_R@1"]
    # The log-normalised counts separate the synthetic types almost perfectly; PCA must show it.
    assert metrics["integration"]["pca_log1p_cp10k"]["kmeans_ari"] > 0.9
    fs = metrics["few-shot"]["results"]["2"]
    assert set(fs) == {"langcell", "logreg", "knn"} and len(fs["langcell"]["runs"]) == 2
    assert metrics["finetune"]["results"]["logreg"]["accuracy_mean"] > 0.9
    report = (out / "report.md").read_text()
    assert report.startswith("# LangCell evaluation") and "Model `export`, data `test.h5ad` (150 cells" in report
    assert saved["run"]["model"] == "export" and saved["run"]["data"] == "test.h5ad"
    for section in ("## Zero-shot", "## Few-shot", "## Fine-tuning", "## Cell-text retrieval", "## Batch integration"):
        assert section in report
    short = headline(metrics)
    assert short["few-shot"]["2-shot"]["logreg"] == fs["logreg"]["accuracy_mean"]
    assert short["zero-shot"]["accuracy"] == zs["accuracy"] and set(short) == set(metrics)
    for png in ("zero_shot_confusion.png", "zero_shot_embedding.png", "integration_embedding.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_annotate_adds_fields_and_leaves_the_rest(world, tmp_path):
    src = world["adata"].copy()
    src.obsm["X_pca"] = np.random.default_rng(0).random((src.n_obs, 4)).astype(np.float32)
    src.obs["keep"] = np.arange(src.n_obs)
    src.layers["counts"] = src.X.copy()
    src.uns["note"] = "mine"
    inp, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    src.write_h5ad(inp)
    summary = annotate(world["export"], inp, out, ["B cell", "T cell", "natural killer cell", "monocyte",
                                                    "platelet", "CD4-positive, alpha-beta T cell"], chunk_size=40)
    assert summary["n_cells"] == src.n_obs and summary["counts_from"] == "layers['counts']"
    got = anndata.read_h5ad(out)
    assert list(got.obs.columns) == list(src.obs.columns) + ["langcell_prediction", "langcell_score", "langcell_top3"]
    assert got.obs[list(src.obs.columns)].equals(src.obs)
    np.testing.assert_array_equal(got.obsm["X_pca"], src.obsm["X_pca"])
    assert (got.X != src.X).nnz == 0 and got.uns["note"] == "mine"
    assert got.uns["langcell"]["scoring"] == "exact" and summary["scoring"] == "exact"
    assert got.uns["langcell"]["n_candidates"] == 6
    assert got.obsm["X_langcell"].shape == (src.n_obs, 256)
    np.testing.assert_allclose(np.linalg.norm(got.obsm["X_langcell"], axis=1), 1.0, atol=1e-5)
    assert (got.obs["langcell_prediction"].astype(str) == got.obs["cell_type"].astype(str)).mean() > 2 / 6
    assert all(t.split("; ")[0] == p for t, p in zip(got.obs["langcell_top3"], got.obs["langcell_prediction"]))
    assert ((got.obs["langcell_score"] > 0) & (got.obs["langcell_score"] <= 1)).all()
    # Same embeddings as the eval path computes for the same cells.
    model, vocab = load_model(world["export"])
    data = load_eval_data(inp, vocab, "cell_type")
    emb = score_cells(TopKScorer(model, ["x", "y"]), data.input_ids)["embeds"]
    np.testing.assert_allclose(got.obsm["X_langcell"], emb, atol=1e-5)


def test_annotate_by_ontology_root_and_cli(world, tmp_path):
    out = tmp_path / "root.h5ad"
    rc = cli_main(["annotate", "--model", str(world["export"]), "--input", str(world["test"]), "--output", str(out),
                   "--ontology-root", "CL:0000084", "--top-k", "4"])
    assert rc == 0
    got = anndata.read_h5ad(out)
    from langcell.eval.ontology import CellOntology
    onto = CellOntology.load()
    allowed = {onto.labels[t] for t in onto.descendants("CL:0000084")}
    assert len(allowed) > 10 and set(got.obs["langcell_prediction"].astype(str)) <= allowed
    assert got.uns["langcell"]["scoring"] == "top-k" and got.uns["langcell"]["top_k"] == 4


def test_annotate_says_when_it_chooses_top_k(world, tmp_path, monkeypatch, capsys):
    import langcell.eval.annotate

    monkeypatch.setattr(langcell.eval.annotate, "AUTO_TOP_K_ABOVE", 5)
    monkeypatch.setattr(langcell.eval.annotate, "AUTO_TOP_K", 3)
    out = tmp_path / "auto.h5ad"
    summary = annotate(world["export"], world["test"], out, ontology_root="CL:0000084")
    assert "matching head on each cell's 3 most similar only" in capsys.readouterr().err
    got = anndata.read_h5ad(out).uns["langcell"]
    assert got["scoring"] == "top-k" and got["top_k"] == 3 and summary["top_k"] == 3
    assert got["n_candidates"] == summary["n_candidates"] > 5
    # Asked for k >= the candidates, it is the exact formula and says so.
    annotate(world["export"], world["test"], out, ["B cell", "T cell"], top_k=2)
    assert anndata.read_h5ad(out).uns["langcell"]["scoring"] == "exact"


def _expect(match, fn, *args, **kwargs):
    with pytest.raises(LangCellError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    export, test = world["export"], world["test"]
    types = ["B cell", "T cell"]
    # label column missing
    _expect("column 'celltype' missing", run_task, "zero-shot", export, test, tmp_path / "r1", label_key="celltype")
    # genes not matching the vocabulary
    ad = world["adata"].copy()
    ad.var_names = [f"GENE{i}" for i in range(ad.n_vars)]
    ad.write_h5ad(tmp_path / "genes.h5ad")
    _expect(r"only 0 of 120 genes \(0\.0%", annotate, export, tmp_path / "genes.h5ad", tmp_path / "o.h5ad", types)
    # log-normalised data where counts are needed
    ad = world["adata"].copy()
    ad.X = sp.csr_matrix(np.log1p(ad.X.toarray() * 10000 / np.maximum(ad.X.sum(1), 1)))
    ad.write_h5ad(tmp_path / "lognorm.h5ad")
    _expect("non-integer values", annotate, export, tmp_path / "lognorm.h5ad", tmp_path / "o.h5ad", types)
    _expect("non-integer values", run_task, "zero-shot", export, tmp_path / "lognorm.h5ad", tmp_path / "r2")
    # empty candidate list
    _expect("candidate list is empty", annotate, export, test, tmp_path / "o.h5ad", [])
    # model folder missing a module
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(export, broken)
    (broken / "ctm_head.bin").unlink()
    _expect("lacks ctm_head.bin", annotate, broken, test, tmp_path / "o.h5ad", types)
    assert not (tmp_path / "o.h5ad").exists()
    # CLI: exit status 2 and one line
    assert cli_main(["eval", "zero-shot", "--model", str(broken), "--data", str(test), "--out",
                     str(tmp_path / "r3")]) == 2


def test_annotate_writes_obsm_when_the_input_has_none(world, tmp_path):
    inp = tmp_path / "bare.h5ad"
    world["adata"].write_h5ad(inp)
    with h5py.File(inp, "a") as f:
        if "obsm" in f:
            del f["obsm"]
    annotate(world["export"], inp, tmp_path / "bare_out.h5ad", ["B cell", "platelet"], top_k=1)
    got = anndata.read_h5ad(tmp_path / "bare_out.h5ad")
    assert got.obsm["X_langcell"].shape[0] == got.n_obs
    assert set(got.obs["langcell_prediction"].astype(str)) <= {"B cell", "platelet"}


def test_library_split_reads_type2text_and_novel_types_from_the_manifest(world, tmp_path):
    import datasets

    from langcell.build_sclibrary.tokenizer import RankValueTokenizer
    from langcell.eval.synthetic import class_texts

    ad = world["adata"]
    lib = tmp_path / "LIB"
    seqs = RankValueTokenizer.from_vocab_dir(world["root"] / "vocab").tokenize_csr(ad.X, list(ad.var_names))
    datasets.Dataset.from_dict({
        "input_ids": [s.tolist() for s in seqs], "length": [len(s) for s in seqs],
        "soma_joinid": list(range(ad.n_obs)), **{c: ad.obs[c].astype(str).tolist() for c in ad.obs.columns},
    }).save_to_disk(str(lib / "hf" / "test"))
    labels = sorted(ad.obs["cell_type"].unique())
    (lib / "type2text.json").write_text(json.dumps(dict(zip(labels, class_texts(labels)))))
    (lib / "manifest.json").write_text(json.dumps({"format": "langcell-sclibrary/1",
                                                   "config": {"holdout_cell_types": ["CL:0000233"]}}))
    from_lib = run_task("zero-shot", world["export"], lib / "hf" / "test", tmp_path / "r_lib", config="smoke")["zero-shot"]
    from_h5ad = run_task("zero-shot", world["export"], world["test"], tmp_path / "r_h5ad", config="smoke",
                         zero_shot={"top_k": 3, "novel_types": []})["zero-shot"]
    assert set(from_lib["text_sources"].values()) == {"type2text"}
    assert set(from_h5ad["text_sources"].values()) == {"ontology"}
    assert from_lib["novel_types"] == ["platelet"] and from_lib["seen_vs_novel"]["novel"]["n_cells"] == 25
    # Same tokens and the same texts: the HF split and the .h5ad give the same answer.
    assert from_lib["confusion"] == from_h5ad["confusion"]
    assert from_lib["accuracy"] == pytest.approx(from_h5ad["accuracy"])
    # A subsample is drawn before the split is materialised.
    model, vocab = load_model(world["export"])
    sub = load_eval_data(lib / "hf" / "test", vocab, "cell_type", "dataset_id", max_cells=40)
    assert len(sub) == 40 and sub.expression_kind == "rank_pseudo" and sub.expression.shape[0] == 40


@pytest.mark.parametrize("config", ["demo", "default"])
def test_finetune_does_not_collapse_to_the_majority_class(world, tmp_path, config):
    """LangCell-CE once predicted the majority class for every cell of the demo. On separable
    synthetic types with the demo's imbalance (the largest type ~8x the smallest), the recipe
    of each config must beat the majority rate by a wide margin and find the rare types too."""
    from langcell.eval.data import stratified_split

    ad = world["adata"]
    rng = np.random.default_rng(0)
    labels = ad.obs["cell_type"].astype(str).to_numpy()
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == t))[:n]
                           for t, n in zip(sorted(set(labels)), (25, 15, 10, 6, 4, 3))])
    path = tmp_path / "imbalanced.h5ad"
    ad[np.sort(keep)].write_h5ad(path)
    results = run_task("finetune", world["export"], path, tmp_path / "report", config=config)["finetune"]["results"]
    y = np.unique(labels[np.sort(keep)], return_inverse=True)[1]
    test = stratified_split(y, 1 / 3, 0)[1]
    majority = np.bincount(y[test]).max() / len(test)
    assert majority == pytest.approx(8 / 20)
    assert results["langcell_ce"]["accuracy_mean"] >= majority + 0.35, results["langcell_ce"]
    assert results["langcell_ce"]["macro_f1_mean"] >= 0.6, results["langcell_ce"]
    assert results["logreg"]["accuracy_mean"] > 0.9
