"""Warm starts (`init_from`): the cell encoder from a Geneformer-layout checkpoint, the text encoder
from a plain BERT folder. Checkpoints are tiny random BertForMaskedLM/BertModel saves."""

from __future__ import annotations

import logging

import pytest
import torch

from langcell.core.config import from_dict
from langcell.core.errors import LangCellError
from langcell.pretrain.config import ModelConfig
from langcell.pretrain.model import LangCellPretrainModel
from tests.pretrain_helpers import MODEL, VOCAB

GENEFORMER_VOCAB = VOCAB - 1  # the checkpoint lacks our last token, <cls>


def _bert_config(tie=True, **shape):
    from transformers import BertConfig
    cell = MODEL["cell"]
    kw = dict(vocab_size=GENEFORMER_VOCAB, hidden_size=cell["hidden_size"], num_hidden_layers=cell["num_hidden_layers"],
              num_attention_heads=cell["num_attention_heads"], intermediate_size=cell["intermediate_size"],
              max_position_embeddings=cell["max_position_embeddings"], hidden_act="relu", pad_token_id=0,
              tie_word_embeddings=tie)
    kw.update(shape)
    return BertConfig(**kw)


def _random_(module):
    """Every parameter random (a fresh BERT has zero biases and unit LayerNorms, which a load that
    skipped them would match by chance)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module.eval()


def _geneformer(folder, tie=True, weights="safetensors"):
    """A Geneformer-layout BertForMaskedLM with random weights saved in `folder`."""
    from transformers import BertForMaskedLM
    mlm = _random_(BertForMaskedLM(_bert_config(tie)))
    mlm.save_pretrained(folder)
    if weights == "bin":
        # As Geneformer's 2021 file: torch.save of the state dict, so the tied decoder weight and
        # bias are stored under their own names, with the position_ids buffer of old transformers.
        (folder / "model.safetensors").unlink()
        state = dict(mlm.state_dict())
        state["bert.embeddings.position_ids"] = torch.arange(MODEL["cell"]["max_position_embeddings"])[None]
        torch.save(state, folder / "pytorch_model.bin")
    return mlm


def _model(init_from, **cell) -> LangCellPretrainModel:
    cfg = from_dict(ModelConfig, {**MODEL, "cell": {**MODEL["cell"], "init_from": str(init_from), **cell}}, "test")
    return LangCellPretrainModel(cfg, with_text=False).eval()


def _cells(b=3, length=24):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, GENEFORMER_VOCAB, (b, length), generator=g)  # genes only: no <cls>
    mask = torch.ones_like(ids)
    ids[1, 15:] = 0
    mask[1, 15:] = 0
    return ids, mask


def _check_loaded(model, mlm):
    """Every tensor of our cell encoder and MLM head equals the checkpoint's (the <cls> row: mean gene)."""
    theirs = mlm.state_dict()
    vocab_rows = {"embeddings.word_embeddings.weight"}
    for name, p in model.cell_bert.named_parameters():
        ref = theirs[f"bert.{name}"]
        if name in vocab_rows:
            assert p.shape[0] == VOCAB and torch.equal(p[:-1], ref), name
            assert torch.allclose(p[-1], ref[2:].mean(dim=0), atol=1e-6), name
        else:
            assert torch.equal(p, ref), name
    head = model.mlm_head
    pairs = [(head.dense.weight, "cls.predictions.transform.dense.weight"),
             (head.dense.bias, "cls.predictions.transform.dense.bias"),
             (head.LayerNorm.weight, "cls.predictions.transform.LayerNorm.weight"),
             (head.LayerNorm.bias, "cls.predictions.transform.LayerNorm.bias")]
    for ours, key in pairs:
        assert torch.equal(ours, theirs[key]), key
    decoder = mlm.cls.predictions.decoder.weight
    assert torch.equal(head.decoder.weight[:-1], decoder)
    assert torch.equal(head.decoder.bias[:-1], mlm.cls.predictions.bias)
    assert torch.allclose(head.decoder.weight[-1], decoder[2:].mean(dim=0), atol=1e-6)


def test_cell_encoder_and_mlm_head_start_from_geneformer(tmp_path, caplog):
    mlm = _geneformer(tmp_path / "gf")
    from safetensors.torch import load_file
    assert "cls.predictions.decoder.weight" not in load_file(str(tmp_path / "gf" / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="langcell.pretrain.warm_start"):
        model = _model(tmp_path / "gf")
    _check_loaded(model, mlm)
    n_tensors = len(list(model.cell_bert.parameters())) + len(list(model.mlm_head.parameters()))
    assert f"loaded {n_tensors} tensors" in caplog.text and str(tmp_path / "gf") in caplog.text
    ids, mask = _cells()
    with torch.no_grad():
        ours = model.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = mlm.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.mlm_head(ours)
        ref_logits = mlm(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    assert (ours - ref)[m].abs().max() < 1e-5
    assert logits.shape[-1] == VOCAB and (logits[..., :-1] - ref_logits)[m].abs().max() < 1e-4
    # A different seed's random model is far from the checkpoint: the comparison above can fail.
    torch.manual_seed(1)
    cold = LangCellPretrainModel(from_dict(ModelConfig, MODEL, "test"), with_text=False).eval()
    with torch.no_grad():
        assert (cold.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state - ref)[m].abs().max() > 0.1


def test_pytorch_model_bin_with_untied_decoder(tmp_path):
    mlm = _geneformer(tmp_path / "gf", tie=False, weights="bin")
    assert not torch.equal(mlm.cls.predictions.decoder.weight, mlm.bert.embeddings.word_embeddings.weight)
    _check_loaded(_model(tmp_path / "gf"), mlm)


def test_missing_or_unexpected_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    _geneformer(tmp_path / "gf")
    path = tmp_path / "gf" / "model.safetensors"
    state = load_file(str(path))
    full = dict(state)
    del state["bert.encoder.layer.1.output.dense.weight"]
    save_file(state, str(path))
    with pytest.raises(LangCellError, match=r"model.cell.init_from '.*gf': not a Geneformer .* 1 missing "
                                            r"\['bert.encoder.layer.1.output.dense.weight'\]"):
        _model(tmp_path / "gf")
    full["cls.seq_relationship.weight"] = torch.zeros(2, MODEL["cell"]["hidden_size"])
    save_file(full, str(path))
    with pytest.raises(LangCellError, match=r"1 unexpected \['cls.seq_relationship.weight'\]"):
        _model(tmp_path / "gf")


@pytest.mark.parametrize("field, ours, theirs", [("num_hidden_layers", 3, 2), ("hidden_act", "gelu", "relu"),
                                                 ("max_position_embeddings", 256, 128)])
def test_yaml_shape_must_match_the_checkpoint(tmp_path, field, ours, theirs):
    _geneformer(tmp_path / "gf")
    with pytest.raises(LangCellError, match=f"model.cell.{field} is {ours!r} but the checkpoint's config.json "
                                            f"says {theirs!r}; set model.cell.{field}: {theirs}"):
        _model(tmp_path / "gf", **{field: ours})


@pytest.mark.parametrize("vocab", [GENEFORMER_VOCAB, VOCAB + 1])
def test_vocabulary_must_be_the_checkpoints_plus_cls(tmp_path, vocab):
    _geneformer(tmp_path / "gf")
    with pytest.raises(LangCellError, match=f"the checkpoint has {GENEFORMER_VOCAB} tokens and "
                                            f"model.cell.vocab_size is {vocab}; .* set vocab_size to {VOCAB}"):
        _model(tmp_path / "gf", vocab_size=vocab)


def test_checkpoint_not_found(tmp_path):
    with pytest.raises(LangCellError, match="model.cell.init_from '/no/such/geneformer': folder does not exist"):
        _model("/no/such/geneformer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LangCellError, match="no config.json in"):
        _model(tmp_path / "empty")
    # An HF id with revision and subfolder; tests run offline, so the hub answers from the (empty) cache.
    with pytest.raises(LangCellError, match=r"'someone/geneformer@abc123/gf-12L': not a local folder and not available "
                                            r"from the HF hub .*hf download someone/geneformer --revision abc123 "
                                            r"--include gf-12L/\*"):
        _model("someone/geneformer@abc123/gf-12L")


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


# gf-12L-30M-i2048/config.json of ctheodoris/Geneformer as published (Geneformer V1, 12 layers).
GENEFORMER_12L_30M = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.02,
                      "gradient_checkpointing": False, "hidden_act": "relu", "hidden_dropout_prob": 0.02,
                      "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 1024,
                      "layer_norm_eps": 1e-12, "max_position_embeddings": 2048, "model_type": "bert",
                      "num_attention_heads": 8, "num_hidden_layers": 12, "pad_token_id": 0,
                      "position_embedding_type": "absolute", "transformers_version": "4.6.0",
                      "type_vocab_size": 2, "use_cache": True, "vocab_size": 25426}


def test_base_yaml_example_fits_geneformer_12l(tmp_path):
    """The commented init_from of configs/model/base.yaml names Geneformer 12L-30M, whose published
    config.json the base shape passes (the shape check reads config.json only)."""
    import json

    from langcell.pretrain.config import MODEL_CONFIG_DIR, load_model_config
    from langcell.pretrain.warm_start import _parse_hub_id, check_cell_checkpoint
    lines = [ln.strip() for ln in (MODEL_CONFIG_DIR / "base.yaml").read_text().splitlines()]
    spec = next(ln for ln in lines if ln.startswith("# init_from:")).split(": ", 1)[1]
    assert _parse_hub_id(spec) == ("ctheodoris/Geneformer", "933ca80e39d421c47a12168699766bb7e4e2c197",
                                   "gf-12L-30M-i2048")
    (tmp_path / "gf").mkdir()
    (tmp_path / "gf" / "config.json").write_text(json.dumps(GENEFORMER_12L_30M))
    cfg = load_model_config("base").cell
    cfg.init_from = str(tmp_path / "gf")
    assert check_cell_checkpoint(cfg) == (tmp_path / "gf", True)
