"""The pre-training objectives by meaning: which texts are true of which cells, the multi-positive
contrastive loss, BLIP's hard negatives, cells without text, and objectives switched off.

References here are written independently of pretrain/losses.py: plain Python loops over the
definitions, at the magnitudes training produces (unit vectors, CLIP's initial 1/0.07 scale and
its cap of 100)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langcell.pretrain.config import LossWeights, ModelConfig, TextChoiceConfig
from langcell.pretrain.data import ASPECT_ORDER, choose_text, term_codes
from langcell.pretrain.losses import (cell_text_contrastive, cell_text_matching, masked_gene_count, pretrain_losses,
                                      sample_hard_negatives, truth_matrix)
from langcell.pretrain.model import LangCellPretrainModel, load_text_tokenizer
from langcell.core.config import from_dict
from tests.pretrain_helpers import MODEL, VOCAB

INIT_SCALE = 1 / 0.07


def _meta(cell_type, tissue=None, disease=None, sex=None):
    meta, texts = {}, {}
    for aspect, value in (("cell_type", cell_type), ("tissue", tissue), ("disease", disease), ("sex", sex)):
        if value is not None:
            meta[f"{aspect}_ontology_term_id"] = f"ID:{value}"
            texts[aspect] = f"{aspect}: {value}."
    return meta, texts


def _encode(cells, chosen):
    """(codes [N, A], mentioned [N, A]) for (meta, texts) cells and the aspects each text keeps."""
    codes = torch.tensor([term_codes(m, t) for m, t in cells])
    mentioned = torch.tensor([[a in keep for a in ASPECT_ORDER] for keep in chosen])
    return codes, mentioned


def _reference_truth(cells, chosen):
    """Text i is true of cell j iff every aspect text i mentions has cell j's term."""
    return torch.tensor([[all(f"{a}_ontology_term_id" in cj[0] and cj[0][f"{a}_ontology_term_id"] == ci[0][f"{a}_ontology_term_id"]
                              for a in keep) for cj in cells] for ci, keep in zip(cells, chosen)])


# Same type with different optional aspects that agree; same type, another tissue; another type;
# a cell whose tissue is unknown.
CELLS = [_meta("B", "blood", "normal"), _meta("B", "blood", "normal", "female"), _meta("B", "lung", "normal"),
         _meta("T", "blood", "normal"), _meta("B")]
CHOSEN = [["cell_type", "tissue"], ["cell_type", "disease", "sex"], ["cell_type", "tissue"], ["cell_type"],
          ["cell_type"]]


def test_truth_by_meaning_not_by_string():
    codes, mentioned = _encode(CELLS, CHOSEN)
    valid = torch.ones(len(CELLS), dtype=torch.bool)
    true = truth_matrix(codes, mentioned, valid, codes, valid)
    assert torch.equal(true, _reference_truth(CELLS, CHOSEN))
    # "cell type: B. tissue: blood." is true of the other blood B cell (different string) ...
    assert true[0, 1]
    # ... not of the lung B cell (another tissue mentioned) nor of the B cell of unknown tissue,
    assert not true[0, 2] and not true[0, 4]
    # while the lung B cell's "B, lung" text is not true of the blood ones, and a bare "B" text is
    # true of every B cell whatever else it has: the relation is not symmetric.
    assert not true[2, 0] and true[4, :3].all() and not true[4, 3]
    assert not true[3, 0] and true[3, 3]
    # A cell without identity text is true of nothing and nothing is true of it.
    valid[1] = False
    true = truth_matrix(codes, mentioned, valid, codes, valid)
    assert not true[1].any() and not true[:, 1].any()


def test_sampled_texts_record_what_they_mention():
    meta, texts = _meta("B", "blood", "normal", "female")
    cfg = TextChoiceConfig(keep_prob=0.5)
    for i in range(50):
        text, keep = choose_text(texts, np.random.default_rng([2, i]), cfg.always, cfg.optional, cfg.keep_prob)
        assert keep[0] == "cell_type" and text == " ".join(texts[a] for a in keep)
    assert choose_text({}, np.random.default_rng(0), cfg.always, cfg.optional, 0.5) == ("", [])
    # The code of an aspect is its term; unknown aspects are 0.
    codes = term_codes(meta, texts)
    assert codes[ASPECT_ORDER.index("assay")] == 0 and all(c > 0 for c in codes[:2])
    other = term_codes(*_meta("B", "lung"))
    assert other[0] == codes[0] and other[1] != codes[1]


def _reference_contrastive(cell_emb, text_emb, true, scale):
    """Each direction: rows with a positive and a non-positive candidate, mean over those rows of
    -mean_{p in positives} log softmax_{candidates}(scale * sim)[p]."""
    def direction(a, b, pos):
        losses = []
        for i in range(a.shape[0]):
            if not pos[i].any() or pos[i].all():
                continue
            logits = [scale * float(a[i] @ b[j]) for j in range(b.shape[0])]
            lse = math.log(sum(math.exp(x) for x in logits))
            losses.append(-sum(logits[j] - lse for j in range(b.shape[0]) if pos[i, j]) / int(pos[i].sum()))
        return sum(losses) / max(1, len(losses))
    return 0.5 * (direction(cell_emb, text_emb, true.t()) + direction(text_emb, cell_emb, true))


@pytest.mark.parametrize("scale", [INIT_SCALE, 100.0])
def test_contrastive_matches_a_loop_reference_at_training_magnitudes(scale):
    torch.manual_seed(0)
    cell_emb = F.normalize(torch.randn(5, 16), dim=-1)
    text_emb = F.normalize(cell_emb + 0.8 * torch.randn(5, 16), dim=-1)  # cosines spread over [-1, 1]
    codes, mentioned = _encode(CELLS, CHOSEN)
    valid = torch.ones(5, dtype=torch.bool)
    got = cell_text_contrastive(cell_emb, text_emb, codes, mentioned, valid, torch.tensor(scale))
    want = _reference_contrastive(cell_emb, text_emb, _reference_truth(CELLS, CHOSEN), scale)
    assert abs(got.item() - want) < 1e-4 * max(1.0, abs(want))
    # A string-keyed target (the old bug) is another loss: the test can tell them apart.
    by_string = _reference_contrastive(cell_emb, text_emb, torch.eye(5, dtype=torch.bool), scale)
    assert abs(by_string - want) > 1e-2


def test_cells_without_text_are_left_out_of_the_contrast():
    torch.manual_seed(1)
    cell_emb = F.normalize(torch.randn(5, 16), dim=-1)
    text_emb = F.normalize(torch.randn(5, 16), dim=-1)
    codes, mentioned = _encode(CELLS, CHOSEN)
    valid = torch.tensor([True, True, False, True, True])
    got = cell_text_contrastive(cell_emb, text_emb, codes, mentioned, valid, torch.tensor(INIT_SCALE))
    keep = [0, 1, 3, 4]
    want = _reference_contrastive(cell_emb[keep], text_emb[keep],
                                  _reference_truth([CELLS[i] for i in keep], [CHOSEN[i] for i in keep]), INIT_SCALE)
    assert abs(got.item() - want) < 1e-4


def test_one_distinct_description_contributes_zero_with_its_graph_intact():
    cell_emb = F.normalize(torch.randn(4, 16), dim=-1).requires_grad_()
    text_emb = F.normalize(torch.randn(4, 16), dim=-1).requires_grad_()
    cells = [_meta("B", "blood")] * 4
    codes, mentioned = _encode(cells, [["cell_type"]] * 4)
    loss = cell_text_contrastive(cell_emb, text_emb, codes, mentioned, torch.ones(4, dtype=torch.bool),
                                 torch.tensor(INIT_SCALE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(text_emb.grad, torch.zeros(4, 16))
    assert torch.isfinite(cell_emb.grad).all()


def test_hard_negatives_are_hard_and_never_true():
    torch.manual_seed(0)
    # A batch of 16 as training sees it: one near-duplicate at cosine 0.75, the rest at 0.1.
    sim = torch.full((16, 16), 0.1)
    sim.fill_diagonal_(0.9)
    sim[0, 5] = 0.75
    candidates = ~torch.eye(16, dtype=torch.bool)
    draws = torch.stack([sample_hard_negatives(sim, candidates, torch.tensor(INIT_SCALE))[0] for _ in range(500)])
    assert (draws != torch.arange(16)).all()          # never the true match
    hardest = (draws[:, 0] == 5).float().mean().item()
    # softmax(sim x 14.3): p = e^10.7 / (e^10.7 + 14 e^1.43) = 0.9987; softmax(sim): 0.12.
    assert hardest > 0.97
    raw = F.softmax(sim[0].masked_fill(~candidates[0], float("-inf")), 0)[5].item()
    assert raw < 0.15
    # Every candidate excluded: the row is flagged invalid.
    _, valid = sample_hard_negatives(sim[:2], torch.zeros(2, 16, dtype=torch.bool), torch.tensor(INIT_SCALE))
    assert not valid.any()
    # A uniform share of 0.5: half the draws spread over the 14 easy candidates, still never the true one.
    mixed = torch.stack([sample_hard_negatives(sim, candidates, torch.tensor(INIT_SCALE), uniform=0.5)[0]
                         for _ in range(2000)])
    assert (mixed != torch.arange(16)).all()
    easy = ((mixed[:, 0] != 5).float().mean().item())
    assert abs(easy - 0.5 * 14 / 15) < 0.04


class _TextPrior:
    """A matching head that sees only which text it is given: one learnable logit per text."""

    def __init__(self, n_texts):
        self.bias = torch.zeros(n_texts, requires_grad=True)

    def match_logits(self, cell_hidden, cell_mask, text_ids, text_mask, cell_index=None):
        return torch.stack([torch.zeros(len(text_ids)), self.bias[text_ids[:, 0]]], 1)


@pytest.mark.parametrize("balance", [False, True])
def test_balanced_matching_leaves_no_text_a_prior_of_its_own(balance):
    """Four confusable T-cell subtypes (3 cells each) and two distinctive types (2 each), at
    training's cosines. With BLIP's draws the subtypes are the usual hard negatives, so a head
    that reads only the text learns they rarely match; balanced, its gradient is zero in every
    batch."""
    torch.manual_seed(0)
    types = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5])
    b = len(types)
    true = types[:, None] == types[None, :]
    tcell = types < 4
    sim = torch.where(true, 0.8, torch.where(tcell[:, None] & tcell[None, :], 0.6, 0.1)) + 0.02 * torch.randn(b, b)
    text_ids = torch.arange(6)[:, None].repeat(1, 4)
    hidden, mask = torch.zeros(b, 3, 8), torch.ones(b, 3, dtype=torch.long)
    grads = []
    for _ in range(50):
        head = _TextPrior(6)
        loss = cell_text_matching(head, hidden, mask, text_ids, torch.ones_like(text_ids), types, torch.arange(b),
                                  true, sim, torch.tensor(INIT_SCALE), balance_texts=balance)
        loss.backward()
        grads.append(head.bias.grad)
    grads = torch.stack(grads)
    if balance:
        assert grads.abs().max() < 1e-6
    else:
        # A positive gradient lowers the logit: the subtypes are pushed towards "no match" in
        # every batch, several times harder than the distinctive types.
        assert (grads[:, :4] > 0).all()
        assert grads[:, :4].mean() > 4 * grads[:, 4:].mean()


def _model():
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, MODEL, "test")
    model = LangCellPretrainModel(cfg).train()
    model.text_tokenizer = load_text_tokenizer(cfg.text)
    return model


def _batch(model, cells, chosen, has_text):
    g = torch.Generator().manual_seed(3)
    b = len(cells)
    ids = torch.randint(2, VOCAB - 1, (b, 24), generator=g)
    ids[:, 0] = VOCAB - 1
    # Cell i has 12 + i tokens: a matching pass's masks tell which cells it paired.
    mask = (torch.arange(24)[None, :] < 12 + torch.arange(b)[:, None]).long()
    ids = ids * mask
    texts = [" ".join(t[a] for a in keep) for (_, t), keep in zip(cells, chosen)]
    unique = list(dict.fromkeys(t for t, h in zip(texts, has_text) if h))
    t_ids, t_mask = model.tokenize_texts(unique or [""])  # as the loader: "" when no cell has text
    codes, mentioned = _encode(cells, chosen)
    has = torch.tensor(has_text)
    return {"cell_ids": ids, "cell_mask": mask, "text_ids": t_ids, "text_mask": t_mask,
            "text_index": torch.tensor([unique.index(t) if h else 0 for t, h in zip(texts, has_text)]),
            "has_text": has, "term_codes": codes * has[:, None], "text_aspects": mentioned & has[:, None]}


class _Spy:
    """Records the batch sizes a module's forward sees (and the cell rows of matching passes)."""

    def __init__(self, model):
        self.text_rows, self.cell_rows, self.mlm_calls = [], [], 0
        text_forward, cell_forward, mlm_forward = model.text_bert.forward, model.cell_bert.forward, model.mlm_head.forward

        def text(input_ids, attention_mask, encoder_hidden_states=None, **kw):
            self.text_rows.append((kw.get("mode", "text"), input_ids.shape[0]))
            return text_forward(input_ids, attention_mask, encoder_hidden_states=encoder_hidden_states, **kw)

        def cell(*a, **kw):
            self.cell_rows.append(kw["input_ids"].shape[0])
            return cell_forward(*a, **kw)

        def mlm(h):
            self.mlm_calls += 1
            return mlm_forward(h)
        model.text_bert.forward, model.cell_bert.forward, model.mlm_head.forward = text, cell, mlm


def test_cells_without_text_never_reach_the_text_encoder():
    model = _model()
    cells = CELLS + [({}, {})]
    chosen = CHOSEN + [[]]
    has_text = [True, True, False, True, True, False]
    batch = _batch(model, cells, chosen, has_text)
    spy = _Spy(model)
    matched = []
    match_logits = model.match_logits

    def record(cell_hidden, cell_mask, text_ids, text_mask, cell_index):
        matched.append(cell_mask.sum(1)[cell_index] - 12)
        return match_logits(cell_hidden, cell_mask, text_ids, text_mask, cell_index)
    model.match_logits = record
    torch.manual_seed(0)
    total, parts = pretrain_losses(model, batch, 2, LossWeights(), 0.15, 0.05)
    total.backward()
    # One text pass over the 4 distinct texts of the 4 cells that have one ...
    assert ("text", 4) in spy.text_rows
    # ... and the matching pass pairs only those cells: 4 positives, then up to 4 + 4 negatives.
    paired = matched[0]
    assert paired[:4].tolist() == [0, 1, 3, 4] and 6 <= len(paired) <= 12
    assert set(paired.tolist()) <= {0, 1, 3, 4}
    assert set(parts) == {"mlm", "cell_cell", "cell_text", "ctm"} and abs(total.item() - sum(parts.values())) < 1e-4
    # Every part of the model learns from this batch.
    for name in ("cell_bert.embeddings.word_embeddings.weight", "text_bert.encoder.layer.0.crossattention.self.key.weight",
                 "ctm_head.weight", "logit_scale", "mlm_head.decoder.weight", "text_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_an_all_textless_batch_trains_the_cell_side_and_keeps_every_gradient():
    model = _model()
    batch = _batch(model, [_meta("B")] * 4, [["cell_type"]] * 4, [False] * 4)
    torch.manual_seed(0)
    total, parts = pretrain_losses(model, batch, 2, LossWeights(), 0.15, 0.05)
    total.backward()
    assert parts["cell_text"] == 0.0 and parts["ctm"] == 0.0 and parts["mlm"] > 0
    # Every parameter still has a gradient (ZeRO expects one on every rank).
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("off", ["mlm", "cell_cell", "ctm", "text"])
def test_objectives_with_weight_zero_cost_nothing(off):
    model = _model()
    batch = _batch(model, CELLS, CHOSEN, [True] * 5)
    weights = LossWeights()
    if off == "text":
        weights.cell_text = weights.ctm = 0.0
    else:
        setattr(weights, off, 0.0)
    spy = _Spy(model)
    torch.manual_seed(0)
    _, parts = pretrain_losses(model, batch, 2, weights, 0.15, 0.05)
    modes = [m for m, _ in spy.text_rows]
    assert (spy.mlm_calls == 0) == (off == "mlm")
    assert spy.cell_rows == [5 if off == "cell_cell" else 10]
    assert ("multimodal" in modes) == (off not in ("ctm", "text"))
    assert (len(modes) == 0) == (off == "text")
    assert set(parts) == {"mlm", "cell_cell", "cell_text", "ctm"} - ({"cell_text", "ctm"} if off == "text" else {off})


def test_matching_head_learns_to_tell_true_descriptions_on_separable_types(tmp_path):
    """Trained alone on six separable synthetic types, the matching loss leaves its label prior
    (1 match : 2 non-matches, 0.637) well behind; it first sits on that plateau for ~200 steps."""
    from langcell.pretrain.data import CellStream, library_shards
    from langcell.pretrain.model import resolve_text_model_path
    from langcell.pretrain.synthetic import write_synthetic_library

    torch.set_num_threads(1)
    lib = write_synthetic_library(tmp_path / "lib", n_cells=512, n_shards=2, vocab_size=600, min_len=12, max_len=40,
                                  seed=1)
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {**MODEL, "cell": {**MODEL["cell"], "pooling": "mean"},
                                  "text": {**MODEL["text"], "pooling": "mean"}}, "test")
    model = LangCellPretrainModel(cfg).train()
    stream = iter(CellStream([p for p, _ in library_shards(lib)], rank=0, world=1, seed=1, batch_size=16,
                             shuffle_buffer=64, bucket_batches=1, max_length=64, with_text=True,
                             tokenizer_path=resolve_text_model_path("all-MiniLM-L6-v2"), text_max_length=32,
                             text_choice=TextChoiceConfig(optional=[], keep_prob=0.0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = LossWeights(mlm=0.0, cell_cell=0.0, cell_text=0.0, ctm=1.0)
    losses = []
    for _ in range(320):
        loss, parts = pretrain_losses(model, next(stream), 2, weights, 0.15, 0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["ctm"])
    prior = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    assert abs(np.mean(losses[:25]) - prior) < 0.1
    assert np.mean(losses[-40:]) < prior - 0.1


def test_a_training_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """With the counts the trainer gives it (genes to mask, rows with text), the project's
    objectives never turn a tensor into a Python value in forward or backward: on a GPU each such
    read would make the step wait for the device. The cells run packed, as in training, with
    their lengths counted on the host (a padded pass has transformers check its mask instead)."""
    import traceback

    model = _model()
    cells = CELLS + [({}, {})]
    batch = _batch(model, cells, CHOSEN + [[]], [True, True, False, True, True, False])
    batch["text_rows"] = batch["has_text"].nonzero().squeeze(1)
    n_masked = masked_gene_count(batch["cell_ids"], 0.15, cls_id=VOCAB - 1)
    lengths = batch["cell_mask"].sum(1).tolist()
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "site-packages" not in caller:
                reads.append((_name, caller))
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    torch.manual_seed(0)
    total, parts = pretrain_losses(model, batch, 2, LossWeights(), 0.15, 0.05, n_masked=n_masked,
                                   cell_lengths=lengths)
    total.backward()
    monkeypatch.undo()
    assert reads == []
    assert set(parts) == {"mlm", "cell_cell", "cell_text", "ctm"} and torch.isfinite(total)
