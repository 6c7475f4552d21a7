"""Every eval consumer of a cell embedding pools the way the model records it (`cell_pooling`).

Two untrained tiny exports, one pooling the <cls> state and one the mean over the cell's tokens,
give clearly different embeddings. Each consumer's output is compared with a reference pooled
here by hand with the recorded pooling, and must differ from the other pooling's reference.
"""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langcell.eval import metrics as M
from langcell.eval import synthetic
from langcell.eval.annotate import OBSM_KEY, annotate
from langcell.eval.data import load_eval_data
from langcell.eval.model_io import load_model
from langcell.eval.scoring import pad_cells, tokenize_texts
from langcell.eval.settings import load_eval_config
from langcell.eval.tasks import build_context, integration, retrieval, zero_shot_scores
from langcell.eval.train import CellClassifier, fewshot_loss
from langcell.pretrain.export import save_langcell

POOLINGS = ("cls", "mean")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("pooling")
    synthetic.write_vocab(root / "vocab", 120)
    adata = synthetic.make_adata(n_per_class=8, seed=3)
    adata.write_h5ad(root / "cells.h5ad")
    exports = {p: save_langcell(_with_distinct_texts(synthetic.tiny_model(root / "vocab", pooling=p)),
                                root / f"export_{p}", vocab_dir=root / "vocab") for p in POOLINGS}
    return {"root": root, "exports": exports, "cells": root / "cells.h5ad", "adata": adata}


def _with_distinct_texts(model):
    """An untrained text encoder (weights ~ N(0, 0.02)) gives every description nearly the same
    embedding, so similarities would not depend on the cell; wider weights set them apart."""
    torch.manual_seed(1)
    for module in model.text_bert.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.data.normal_(0.0, 0.5)
    return model


def _loaded(world, pooling):
    model, vocab = load_model(world["exports"][pooling])
    data = load_eval_data(world["cells"], vocab, "cell_type", "dataset_id")
    return model, data


@torch.no_grad()
def _by_hand(model, seqs) -> dict:
    """{pooling: (pooled [N,H], embeddings [N,256])} for both poolings, written out here."""
    ids, mask = pad_cells(seqs)
    hidden = model.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask[..., None].float()
    pooled = {"cls": hidden[:, 0], "mean": (hidden * weights).sum(1) / weights.sum(1)}
    return {p: (h, F.normalize(model.cell_proj(h), dim=-1)) for p, h in pooled.items()}


def _other(pooling):
    return "mean" if pooling == "cls" else "cls"


def _assert_pooled_as(got, refs: dict, pooling: str, atol=1e-5):
    got = torch.as_tensor(np.asarray(got))
    want, other = refs[pooling], refs[_other(pooling)]
    # The two poolings must really differ here, or the comparison below proves nothing.
    assert (want - other).abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert not torch.allclose(got, other, atol=1e-3)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_load_model_reads_the_recorded_pooling(world, pooling):
    model, _ = _loaded(world, pooling)
    assert model.cell_pooling == pooling
    assert json.loads((world["exports"][pooling] / "langcell_config.json").read_text())["cell_pooling"] == pooling


def test_export_without_config_loads_as_cls_like_langcells_release(world, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(world["exports"]["mean"], release)
    (release / "langcell_config.json").unlink()
    model, _ = load_model(release)
    assert model.cell_pooling == "cls"


@pytest.mark.parametrize("pooling", POOLINGS)
def test_zero_shot_retrieval_and_integration_pool_as_recorded(world, pooling, tmp_path):
    cfg = load_eval_config("smoke", {"model": str(world["exports"][pooling]), "data": str(world["cells"]),
                                     "out": str(tmp_path)})
    ctx = build_context(cfg)
    refs = {p: e for p, (_, e) in _by_hand(ctx.model, ctx.data.input_ids).items()}
    scores = zero_shot_scores(ctx)
    _assert_pooled_as(scores["embeds"], refs, pooling)
    with torch.no_grad():
        text = ctx.model.encode_texts(*tokenize_texts(ctx.model, ctx.texts))
    sims = {p: e @ text.T for p, e in refs.items()}
    _assert_pooled_as(scores["sim"], sims, pooling)
    # The tasks compute their own scores when not handed the suite's.
    ret = retrieval(ctx, tmp_path)[0]["similarity"]
    want = {p: M.retrieval_recall(s.numpy(), ctx.y, cfg.retrieval.ks) for p, s in sims.items()}
    assert ret == pytest.approx(want[pooling]) and ret != pytest.approx(want[_other(pooling)])
    sil = integration(ctx, tmp_path)[0]["langcell"]["silhouette_label"]
    want = {p: M.silhouette_label(e.numpy(), ctx.y) for p, e in refs.items()}
    # Packed (inference) and padded (the reference above) attention differ in rounding only.
    assert sil == pytest.approx(want[pooling], abs=5e-4) and sil != pytest.approx(want[_other(pooling)], abs=5e-3)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_annotate_embeds_as_recorded(world, pooling, tmp_path):
    import anndata

    out = tmp_path / "annotated.h5ad"
    annotate(world["exports"][pooling], world["cells"], out, ["B cell", "T cell", "monocyte"], chunk_size=20,
             batch_size=7)
    model, data = _loaded(world, pooling)
    refs = {p: e for p, (_, e) in _by_hand(model, data.input_ids).items()}
    _assert_pooled_as(anndata.read_h5ad(out).obsm[OBSM_KEY], refs, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_fewshot_loss_pools_as_recorded(world, pooling):
    model, data = _loaded(world, pooling)
    # The few-shot task trains a deep copy; the copy must pool like the original.
    model = copy.deepcopy(model)
    classes = sorted(set(data.obs["cell_type"]))
    y = torch.as_tensor([classes.index(c) for c in data.obs["cell_type"]])
    texts = synthetic.class_texts(classes)
    ids, mask = pad_cells(data.input_ids)
    text_ids, text_mask = tokenize_texts(model, texts)
    with torch.no_grad():
        got = fewshot_loss(model, ids, mask, y, text_ids, text_mask)
        # LangCell's loss written out: CE over similarities / 0.05 + CE over matching probabilities.
        hidden = model.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state
        text = model.encode_texts(text_ids, text_mask)
        match = torch.stack([F.softmax(model.match_logits(hidden, mask, text_ids[c].expand(len(y), -1),
                                                          text_mask[c].expand(len(y), -1)), -1)[:, 1]
                             for c in range(len(classes))], dim=1)
        want = {p: F.cross_entropy(e @ text.T / 0.05, y) + F.cross_entropy(match, y)
                for p, (_, e) in _by_hand(model, data.input_ids).items()}
    assert abs(want[pooling] - want[_other(pooling)]) > 0.01
    torch.testing.assert_close(got, want[pooling], atol=1e-4, rtol=0)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_finetune_classifier_pools_as_recorded(world, pooling):
    model, data = _loaded(world, pooling)
    clf = CellClassifier(model, n_classes=6).eval()
    ids, mask = pad_cells(data.input_ids)
    with torch.no_grad():
        got = clf(ids, mask)
        refs = {p: clf.head(h) for p, (h, _) in _by_hand(model, data.input_ids).items()}
    _assert_pooled_as(got, refs, pooling, atol=1e-4)
    # The classifier trains its own copy of the encoder, never the model it was given.
    assert clf.encoder.cell_bert is not model.cell_bert


@pytest.mark.parametrize("pooling", POOLINGS)
def test_tiny_export_records_the_pooling_it_was_built_with(world, pooling, tmp_path):
    export = synthetic.train_tiny_export(tmp_path / "export", world["adata"], world["root"] / "vocab", steps=1,
                                         pooling=pooling)
    assert load_model(export)[0].cell_pooling == pooling
