"""Warm starts (`init_from`): the text encoder from a plain BERT folder. Checkpoints are tiny
random BertModel/BertForMaskedLM saves."""

from __future__ import annotations

import pytest
import torch

from langcell.config import from_dict
from pretrain.config import ModelConfig
from pretrain.model import LangCellPretrainModel
from tests.pretrain_helpers import MODEL


def _random_(module):
    """Every parameter random (a fresh BERT has zero biases and unit LayerNorms, which a load that
    skipped them would match by chance)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module.eval()


@pytest.mark.parametrize("layout", ["BertModel", "BertForMaskedLM"])
def test_text_encoder_starts_from_a_local_bert(tmp_path, layout):
    """A plain BERT folder (BertModel) and PubMedBERT's layout (BertForMaskedLM: bert.* and cls.*)."""
    import transformers
    cls = getattr(transformers, layout)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64)
    hf = _random_(cls(config))
    hf.save_pretrained(tmp_path / "bert")
    bert = hf if layout == "BertModel" else hf.bert
    cfg = from_dict(ModelConfig, {**MODEL, "text": {"init_from": str(tmp_path / "bert"), "max_length": 32}}, "test")
    torch.manual_seed(0)
    text = LangCellPretrainModel(cfg).eval().text_bert
    theirs = bert.state_dict()
    loaded = [name for name, p in text.named_parameters() if "crossattention" not in name]
    assert len(loaded) == len([k for k in theirs if not k.startswith("pooler.")])
    for name in loaded:
        assert torch.equal(dict(text.named_parameters())[name], theirs[name]), name
    ids = torch.randint(1, 120, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert (text(ids, mask) - bert(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max() < 1e-5
