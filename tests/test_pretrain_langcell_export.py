"""Exports LangCell's own code reads as we do: the tensors its classes define (the golden
fixture's expected_state_dict_keys.json), a tokenizer its BertTokenizer reads, and a refusal
for models it would read with other numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from langcell.core.errors import LangCellError
from langcell.pretrain.config import CellEncoderConfig
from langcell.pretrain.export import load_langcell, save_langcell
from langcell.pretrain.model import LangCellModel, TextBert, build_cell_encoder
from langcell.pretrain.warm_start import read_state_dict

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "langcell_release_layout"
EXPECTED = json.loads((FIXTURE / "expected_state_dict_keys.json").read_text())
TEXTS = ["cell type: b cell. A lymphocyte of B lineage.; ", "cell type: platelet. "]


def _fixture_sized_model(cell_pooling="cls", text_pooling="cls") -> LangCellModel:
    """Random weights at the fixture's sizes, built as training builds them (a token-type table
    in the text encoder, the tokenizer without [DEC]/[ENC])."""
    from transformers import BertConfig, BertTokenizer

    torch.manual_seed(0)
    cell = build_cell_encoder(CellEncoderConfig(vocab_size=25427, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=2048, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0))
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config.encoder_width, config.use_token_type_embeddings = 64, True
    text = TextBert(config)
    # A trained token-type row, far from zero: folding it must still give identical outputs.
    nn.init.normal_(text.embeddings.token_type_embeddings.weight, std=0.5)
    return LangCellModel(cell, nn.Linear(64, 256), text, nn.Linear(32, 256), nn.Linear(32, 2),
                         text_tokenizer=BertTokenizer.from_pretrained(str(FIXTURE / "text_vocab")),
                         text_max_length=512, cell_pooling=cell_pooling, text_pooling=text_pooling).eval()


def _vocab_dir(tmp_path: Path) -> Path:
    d = tmp_path / "vocab"
    d.mkdir()
    tokens = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, 25426)}, "<cls>": 25426}
    (d / "token_dictionary.json").write_text(json.dumps(tokens))
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    model = _fixture_sized_model()
    return model, save_langcell(model, tmp / "export", vocab_dir=_vocab_dir(tmp), langcell_compatible=True)


def _shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in state.items()}


def test_export_has_exactly_langcells_keys_and_shapes(exported):
    from langcell.pretrain.langcell_layout import CELL_UNUSED_KEYS

    _, out = exported
    assert _shapes(read_state_dict(out / "text_bert")) == EXPECTED["text_bert"]
    cell = _shapes(read_state_dict(out / "cell_bert"))
    # LangCell's cell class defines a pooler it never reads; its release, like ours, has none.
    assert cell == {k: v for k, v in EXPECTED["cell_bert"].items() if k not in CELL_UNUSED_KEYS}
    assert set(cell) == set(read_state_dict(FIXTURE / "checkpoint" / "cell_bert"))
    for head in ("cell_proj.bin", "text_proj.bin", "ctm_head.bin"):
        assert _shapes(torch.load(out / head, weights_only=True)) == EXPECTED[head]
    text_config = json.loads((out / "text_bert" / "config.json").read_text())
    assert text_config["vocab_size"] == 30524 and text_config["encoder_width"] == 64
    assert "use_token_type_embeddings" not in text_config
    config = json.loads((out / "langcell_config.json").read_text())
    assert config["langcell_compatible"] is True and config["langcell_incompatible_reason"] is None


def test_folded_token_types_give_identical_outputs(exported):
    model, out = exported
    loaded = load_langcell(out)
    assert loaded.text_bert.embeddings.token_type_embeddings is None
    ids = torch.tensor([[25426, 5, 900, 17, 3000, 44], [25426, 8, 9, 10, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    with torch.no_grad():
        t_ids, t_mask = model.tokenize_texts(TEXTS)
        a_emb, a_hidden = model.encode_cells(ids, mask)
        b_emb, b_hidden = loaded.encode_cells(ids, mask)
        l_ids, l_mask = loaded.tokenize_texts(TEXTS)
        assert torch.equal(t_ids, l_ids)
        assert torch.allclose(model.encode_texts(t_ids, t_mask), loaded.encode_texts(l_ids, l_mask), atol=1e-6)
        assert torch.allclose(model.match_logits(a_hidden, mask, t_ids, t_mask),
                              loaded.match_logits(b_hidden, mask, l_ids, l_mask), atol=1e-5)
        assert torch.allclose(a_emb, b_emb, atol=1e-6)
        # The fold is not a no-op: without it the texts would read differently.
        text_only = TextBert(model.text_bert.config)
        text_only.load_state_dict(model.text_bert.state_dict())
        text_only.embeddings.token_type_embeddings = None
        assert not torch.allclose(text_only(t_ids, t_mask), model.text_bert(t_ids, t_mask), atol=1e-3)


def test_tokenizer_folder_reads_as_langcells_bert_tokenizer(exported, tmp_path):
    import shutil

    from transformers import BertTokenizer

    _, out = exported
    # Only the files transformers 4.x's BertTokenizer reads (LangCell's): no tokenizer.json.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(out / "tokenizer" / name, legacy / name)
    tok = BertTokenizer.from_pretrained(str(legacy))
    assert len(tok) == 30524
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523] and tok.bos_token == "[DEC]"
    assert json.loads((legacy / "special_tokens_map.json").read_text())["additional_special_tokens"] == ["[ENC]"]
    reference = json.loads((FIXTURE / "reference_outputs.json").read_text())
    assert tok(reference["texts"])["input_ids"] == reference["text_token_ids"]
    assert (out / "tokenizer" / "vocab.txt").read_text() == (FIXTURE / "text_vocab" / "vocab.txt").read_text()


def test_mean_pooled_model_refused_or_flagged(tmp_path):
    model = _fixture_sized_model(cell_pooling="mean")
    with pytest.raises(LangCellError, match="cannot write a LangCell-compatible export: cell embeddings are "
                                            "mean-pooled"):
        save_langcell(model, tmp_path / "strict", vocab_dir=_vocab_dir(tmp_path), langcell_compatible=True)
    assert not (tmp_path / "strict").exists()
    out = save_langcell(_fixture_sized_model(text_pooling="mean"), tmp_path / "flagged",
                        vocab_dir=tmp_path / "vocab")
    config = json.loads((out / "langcell_config.json").read_text())
    assert config["langcell_compatible"] is False and "text embeddings are mean-pooled" in \
        config["langcell_incompatible_reason"]
