"""Packed cells: the cell encoder on real tokens only equals transformers' padded, masked BERT."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertModel

from langcell.core.config import from_dict
from langcell.pretrain.config import LossWeights, ModelConfig
from langcell.pretrain.losses import pretrain_losses
from langcell.pretrain.model import LangCellPretrainModel, load_text_tokenizer
from langcell.pretrain.packing import encode_packed, pack_cells, unpack
from tests.pretrain_helpers import MODEL, VOCAB, cell_type_batch

LENGTHS = [24, 9, 17, 3]


def _model(dropout: float = 0.0) -> LangCellPretrainModel:
    torch.manual_seed(0)
    cell = {**MODEL["cell"], "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    cfg = from_dict(ModelConfig, {**MODEL, "cell": cell}, "test")
    model = LangCellPretrainModel(cfg)
    model.text_tokenizer = load_text_tokenizer(cfg.text)
    return model


def _cells(lengths=LENGTHS):
    g = torch.Generator().manual_seed(4)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, VOCAB - 1, (n,), generator=g)
        ids[i, 0] = VOCAB - 1
    return ids, (ids != 0).long()


def test_pack_then_unpack_restores_the_real_tokens_and_zeros_the_padding():
    ids, mask = _cells()
    packed = pack_cells(ids, LENGTHS)
    assert packed.input_ids.shape == (1, sum(LENGTHS)) and packed.offsets == [0, 24, 33, 50, 53]
    assert packed.position_ids[0, 24:33].tolist() == list(range(9))
    back = unpack(packed.input_ids[..., None].float(), packed)[..., 0].long()
    assert torch.equal(back, ids)


def test_packed_states_and_gradients_equal_the_padded_masked_bert():
    """The reference is transformers' own padded path (SDPA with the padding mask)."""
    model = _model()
    ids, mask = _cells()
    w = torch.randn(MODEL["cell"]["hidden_size"], generator=torch.Generator().manual_seed(1))
    results = []
    for packed in (False, True):
        model.zero_grad()
        hidden = (encode_packed(model.cell_bert, ids, LENGTHS) if packed else
                  model.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state)
        # Only real tokens count: the padded model also computes states at the padding, which
        # every consumer masks out.
        (torch.tanh(hidden @ w) * mask).sum().backward()
        results.append((hidden * mask[..., None], {n: p.grad.clone() for n, p in model.cell_bert.named_parameters()
                                                   if p.grad is not None}))
    (h_pad, g_pad), (h_pack, g_pack) = results
    assert torch.allclose(h_pad, h_pack, atol=1e-5)
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 10
    for name in g_pad:
        assert torch.allclose(g_pad[name], g_pack[name], atol=1e-4), name


@pytest.mark.parametrize("stage", [1, 2])
def test_pretrain_losses_packed_equal_padded(stage):
    model = _model()
    ids, mask = _cells()
    batch = cell_type_batch(model, ids, mask, ["A T cell.", "A B cell.", "A T cell.", "A monocyte."])
    weights = LossWeights() if stage == 2 else LossWeights(cell_text=0.0, ctm=0.0)
    values = []
    for lengths in (None, LENGTHS):
        torch.manual_seed(7)  # the same genes masked and the same negatives drawn
        total, parts = pretrain_losses(model, batch, stage, weights, 0.15, 0.05, cell_lengths=lengths)
        values.append({"total": total.item(), **{k: v.item() for k, v in parts.items()}})
    assert values[0].keys() == values[1].keys()
    for key in values[0]:
        assert values[0][key] == pytest.approx(values[1][key], abs=1e-4), key


def test_dropout_applies_in_packed_attention():
    model = _model(dropout=0.5).train()
    ids, _ = _cells()
    a, b = (encode_packed(model.cell_bert, ids, LENGTHS) for _ in range(2))
    assert not torch.allclose(a, b)


def test_exported_cell_encoder_loads_as_a_plain_bert(tmp_path):
    """The packed attention is how we run the encoder, not part of what we save."""
    model = _model().eval()
    model.cell_bert.save_pretrained(tmp_path)
    assert "langcell" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    plain = BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    ids, mask = _cells()
    with torch.no_grad():
        ours = encode_packed(model.cell_bert, ids, LENGTHS)
        theirs = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ours * mask[..., None], theirs * mask[..., None], atol=1e-5)


def test_lengths_that_do_not_fit_the_batch_are_refused():
    ids, _ = _cells()
    with pytest.raises(ValueError, match="do not fit"):
        pack_cells(ids, [24, 9, 17])
    with pytest.raises(ValueError, match="do not fit"):
        pack_cells(ids, [25, 9, 17, 3])


def test_inference_packs_right_padded_cells_and_falls_back_otherwise():
    model = _model().eval()
    ids, mask = _cells()
    with torch.no_grad():
        pooled, hidden = model.cell_states(ids, mask)
        reference = model.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(hidden, reference * mask[..., None], atol=1e-5)  # packed: zeros at padding
        # Padding on the left cannot be packed: the padded path runs instead.
        left_ids, left_mask = ids.flip(1), mask.flip(1)
        _, left_hidden = model.cell_states(left_ids, left_mask)
        assert torch.equal(left_hidden, model.cell_bert(input_ids=left_ids, attention_mask=left_mask).last_hidden_state)
    assert pooled.shape == (len(LENGTHS), MODEL["cell"]["hidden_size"])
