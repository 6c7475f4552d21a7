"""Eval metrics against scikit-learn and hand-worked cases; top-k scoring against the full fusion."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, classification_report, f1_score

from langcell.eval import metrics as M
from langcell.eval.scoring import (TopKScorer, fuse, match_prob_per_class_loop, match_prob_topk, pad_cells, score_cells,
                          tune_alpha)


def test_classification_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d", "e"]
    y_true = rng.choice(labels[:4], 300)  # "e" is predicted but never true
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.choice(labels, 300))
    got = M.classification_metrics(y_true, y_pred)
    assert got["labels"] == labels
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert got["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for lab in labels:
        for key in ("precision", "recall", "f1"):
            assert got["per_class"][lab][key] == pytest.approx(report[lab][f"{key}-score" if key == "f1" else key])
        assert got["per_class"][lab]["support"] == report[lab]["support"]
    assert np.asarray(got["confusion"]).sum() == 300


def test_ontology_aware_counts_ancestor_and_descendant_apart():
    ancestors = {"T": {"lymph", "cell"}, "CD4T": {"T", "lymph", "cell"}, "B": {"lymph", "cell"}}
    true = ["T", "T", "T", "CD4T", "B"]
    pred = ["T", "CD4T", "lymph", "B", "x"]
    got = M.ontology_aware(true, pred, ancestors)
    assert got["exact_share"] == pytest.approx(0.2)
    assert got["descendant_share"] == pytest.approx(0.2)   # CD4T for T: finer
    assert got["ancestor_share"] == pytest.approx(0.2)     # lymph for T: coarser
    assert got["other_share"] == pytest.approx(0.4)
    assert got["ontology_accuracy"] == pytest.approx(0.6)


def test_retrieval_recall_hand_worked():
    # 4 cells, 3 texts; cells 0,1 are class 0, cell 2 class 1, cell 3 class 2.
    scores = np.array([[0.9, 0.1, 0.0],
                       [0.2, 0.8, 0.1],
                       [0.5, 0.4, 0.3],
                       [0.1, 0.2, 0.7]])
    cls = np.array([0, 0, 1, 2])
    got = M.retrieval_recall(scores, cls, ks=(1, 2))
    # cell->text rank of the right text: 0, 1, 1, 0
    assert got["cell_to_text_R@1"] == pytest.approx(0.5)
    assert got["cell_to_text_R@2"] == pytest.approx(1.0)
    # text 0 ranks cells 0,2,1,3 -> hit@1; text 1 ranks 1,2,... -> cell 1 is class 0: miss@1, hit@2;
    # text 2 ranks 3 first -> hit@1.
    assert got["text_to_cell_R@1"] == pytest.approx(2 / 3)
    assert got["text_to_cell_R@2"] == pytest.approx(1.0)
    assert got["text_to_cell_P@2"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)


def test_integration_metrics_separate_good_from_bad_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    batches = np.tile([0, 1], 60)
    good = np.eye(3)[labels] * 5 + rng.normal(0, 0.3, (120, 3))
    bad = rng.normal(0, 1, (120, 3)) + np.eye(2, 3)[batches] * 5  # clustered by batch, not label
    assert M.silhouette_label(good, labels) > 0.8 > M.silhouette_label(bad, labels)
    assert M.knn_batch_mixing(good, batches) > 0.8 > M.knn_batch_mixing(bad, batches)
    assert M.silhouette_batch(good, labels, batches) > M.silhouette_batch(bad, labels, batches)
    agree = M.cluster_agreement(good, labels)
    assert agree["kmeans_ari"] == pytest.approx(1.0)
    assert agree["leiden_nmi"] > 0.9


class _FakeModel(torch.nn.Module):
    """Deterministic stand-in with LangCellModel's interface: enough to compare scoring paths."""

    def __init__(self, n_vocab=50, width=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(n_vocab, width, generator=g))
        self.text_emb = torch.nn.Parameter(torch.randn(1000, width, generator=g))
        self.text_max_length = 16
        self.text_tokenizer = self._tokenize

    @staticmethod
    def _tokenize(texts, padding, truncation, max_length, return_tensors):
        ids = [[ord(ch) % 1000 for ch in t][:max_length] for t in texts]
        width = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}

    def encode_cells(self, input_ids, attention_mask):
        hidden = self.emb[input_ids] * attention_mask[..., None]
        return F.normalize(hidden.sum(1), dim=-1), hidden

    def encode_texts(self, input_ids, attention_mask):
        return F.normalize((self.text_emb[input_ids] * attention_mask[..., None]).sum(1), dim=-1)

    def match_logits(self, cell_hidden, cell_mask, text_ids, text_mask, cell_index=None):
        if cell_index is not None:
            cell_hidden, cell_mask = cell_hidden[cell_index], cell_mask[cell_index]
        cell = (cell_hidden * cell_mask[..., None]).sum(1)
        text = (self.text_emb[text_ids] * text_mask[..., None]).sum(1)
        s = (cell * text).sum(-1) / 10
        return torch.stack([-s, s], dim=-1)


def test_topk_with_k_equal_classes_is_the_full_fusion_and_the_loop():
    model = _FakeModel()
    texts = [f"cell type {c}" * (1 + i % 3) for i, c in enumerate("abcdefg")]
    rng = np.random.default_rng(1)
    seqs = [np.r_[49, rng.choice(np.arange(2, 49), rng.integers(3, 12), replace=False)] for _ in range(37)]
    full = score_cells(TopKScorer(model, texts, top_k=None, pair_batch=5), seqs, batch_size=8)
    loop = score_cells(TopKScorer(model, texts, method="loop"), seqs, batch_size=8)
    k_eq = score_cells(TopKScorer(model, texts, top_k=len(texts), pair_batch=1000), seqs, batch_size=16)
    np.testing.assert_allclose(full["fused"], loop["fused"], atol=1e-6)
    np.testing.assert_allclose(k_eq["fused"], loop["fused"], atol=1e-6)
    # Independent reference: the formula written out over all pairs, p_match written out per pair.
    ids, mask = pad_cells(seqs)
    with torch.no_grad():
        emb, hidden = model.encode_cells(ids, mask)
        scorer = TopKScorer(model, texts, top_k=None)
        sim = emb @ scorer.text_embeds.T
        ref_match = torch.tensor([[float(torch.softmax(model.match_logits(
            hidden[i:i + 1], mask[i:i + 1], scorer.text_ids[c:c + 1], scorer.text_mask[c:c + 1]), -1)[0, 1])
            for c in range(len(texts))] for i in range(len(seqs))])
        ref = 0.1 * torch.softmax(sim / 0.05, -1) + 0.9 * torch.softmax(ref_match, -1)
        # The packed pairs of top-k, at k = C, give the same matching probabilities.
        packed = match_prob_topk(model, hidden, mask, sim, scorer.text_ids, scorer.text_mask, len(texts), 5)
    np.testing.assert_allclose(full["fused"], ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(packed.numpy(), ref_match.numpy(), atol=1e-6)
    # With k < C only the k most similar classes carry a match probability.
    k2 = score_cells(TopKScorer(model, texts, top_k=2), seqs, batch_size=8)
    assert ((k2["match"] > 0).sum(axis=1) == 2).all()
    top2 = np.argsort(-k2["sim"], axis=1)[:, :2]
    assert (np.take_along_axis(k2["match"], top2, axis=1) > 0).all()


def test_topk_match_fills_only_selected_pairs():
    model = _FakeModel()
    ids, mask = pad_cells([np.array([49, 3, 4]), np.array([49, 5])])
    with torch.no_grad():
        _, hidden = model.encode_cells(ids, mask)
        scorer = TopKScorer(model, ["x", "yy", "zzz"], top_k=None)
        sim = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
        got = match_prob_topk(model, hidden, mask, sim, scorer.text_ids, scorer.text_mask, k=1, pair_batch=4)
        full = match_prob_per_class_loop(model, hidden, mask, scorer.text_ids, scorer.text_mask)
    assert got[0, 1] == pytest.approx(float(full[0, 1])) and got[1, 0] == pytest.approx(float(full[1, 0]))
    assert float(got.sum()) == pytest.approx(float(full[0, 1] + full[1, 0]))
    assert torch.allclose(fuse(sim, full, 1.0), torch.softmax(sim / 0.05, -1))


def test_tune_alpha_picks_the_better_signal():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    sim = rng.normal(0, 1, (200, 4)) * 0.01            # uninformative similarities
    match = np.eye(4)[labels] * 0.6 + rng.random((200, 4)) * 0.5   # informative matching
    alpha, accs = tune_alpha(sim, match, labels)
    assert accs[0.0] > 0.9 > accs[1.0]
    assert alpha < 0.5
